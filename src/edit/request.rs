//! Edit requests: every accepted input format (see `formats/requests.md`) becomes one
//! [`Request`]. Records are validated as they are read; errors name the file and record.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A request could not be read or is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// The file is neither a JSON array nor JSON lines.
    #[error("{path}: {line}: invalid JSON: {reason}")]
    Json { path: PathBuf, line: usize, reason: String },
    /// A record matches no accepted format or breaks a rule.
    #[error("{origin}: {problem}")]
    Record { origin: String, problem: String },
    /// Two records ask for different targets for the same fact.
    #[error("{first} and {second} edit the same fact ({fact}) with different targets: `{a}` vs `{b}`")]
    Conflict { first: String, second: String, fact: String, a: String, b: String },
    /// No requests were given.
    #[error("no edit requests given")]
    Empty,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A prompt with the answer expected from the unedited model, for locality checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Neighbor {
    pub prompt: String,
    pub answer: String,
}

/// One fact to write: `prompt` with `{}` replaced by `subject` should continue with `target_new`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Template with exactly one `{}` where the subject goes.
    pub prompt: String,
    pub subject: String,
    pub target_new: String,
    /// The fact being replaced, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_true: Option<String>,
    /// Relation identifier (e.g. Wikidata `P30`), when known: facts conflict per (subject, relation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Rephrasings of the filled prompt, for generalization metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paraphrases: Vec<String>,
    /// Unrelated prompts whose answers must not change, for locality metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbors: Vec<Neighbor>,
    /// Prompts about the subject to generate from, for fluency metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generation_prompts: Vec<String>,
    /// Where the request came from (file and record), for error messages.
    #[serde(skip)]
    pub origin: String,
}

impl Request {
    /// The prompt with the subject filled in.
    pub fn filled(&self) -> String {
        self.prompt.replacen("{}", &self.subject, 1)
    }

    /// The new target as a continuation: with a leading space.
    pub fn target_text(&self) -> String {
        continuation(&self.target_new)
    }

    /// What identifies the fact: the relation if known, else the prompt template.
    pub fn fact_key(&self) -> String {
        format!("{} / {}", self.subject, self.relation.as_deref().unwrap_or(&self.prompt))
    }

    fn validate(self) -> Result<Self> {
        let bad = |problem: String| Err(Error::Record { origin: self.origin.clone(), problem });
        if self.prompt.matches("{}").count() != 1 {
            return bad(format!("prompt `{}` must contain `{{}}` exactly once (where the subject goes)", self.prompt));
        }
        if self.subject.trim().is_empty() {
            return bad("empty subject".into());
        }
        if self.target_new.trim().is_empty() {
            return bad("empty target_new".into());
        }
        Ok(self)
    }
}

/// `text` as a continuation after a prompt: one leading space.
pub fn continuation(text: &str) -> String {
    format!(" {}", text.trim_start())
}

/// The edits a patch records, as requests (for methods that must preserve earlier facts).
pub fn recorded(patch: &crate::patch::Patch) -> Vec<Request> {
    let id = patch.id().to_string();
    patch
        .manifest()
        .edits
        .iter()
        .enumerate()
        .map(|(i, e)| Request {
            prompt: e.prompt.clone(),
            subject: e.subject.clone(),
            target_new: e.target_new.clone(),
            target_true: (!e.target_old.is_empty()).then(|| e.target_old.clone()),
            relation: Some(e.relation.clone()),
            paraphrases: Vec::new(),
            neighbors: Vec::new(),
            generation_prompts: Vec::new(),
            origin: format!("{id}, edit {}", i + 1),
        })
        .collect()
}

/// Parses `PROMPT|SUBJECT|TARGET` (the prompt holds `{}` or contains the subject verbatim).
pub fn parse_fact(spec: &str) -> Result<Request> {
    let origin = format!("--fact `{spec}`");
    let parts: Vec<&str> = spec.split('|').collect();
    let [prompt, subject, target] = parts[..] else {
        return Err(Error::Record { origin, problem: "expected PROMPT|SUBJECT|TARGET".into() });
    };
    let prompt = template(prompt, subject, &origin)?;
    let req = Request {
        prompt,
        subject: subject.trim().to_string(),
        target_new: target.trim().to_string(),
        target_true: None,
        relation: None,
        paraphrases: vec![],
        neighbors: vec![],
        generation_prompts: vec![],
        origin,
    };
    req.validate()
}

/// `prompt` as a template: kept if it has `{}`, else the subject's first occurrence becomes `{}`.
pub(crate) fn template(prompt: &str, subject: &str, origin: &str) -> Result<String> {
    if prompt.contains("{}") {
        return Ok(prompt.to_string());
    }
    let subject = subject.trim();
    if subject.is_empty() || !prompt.contains(subject) {
        return Err(Error::Record { origin: origin.into(), problem: format!("prompt `{prompt}` does not contain the subject `{subject}`") });
    }
    Ok(prompt.replacen(subject, "{}", 1))
}

/// Reads requests from a JSON array or JSON-lines file in any accepted format, then checks
/// that no two records edit the same fact with different targets.
pub fn read(path: &Path) -> Result<Vec<Request>> {
    check(records(path)?)
}

/// The requests of a file as [`read`] parses them, unchecked: for callers that edit only some
/// of them and [`check`] those.
pub fn records(path: &Path) -> Result<Vec<Request>> {
    let text = crate::read_regular_text(path, crate::MAX_DATA_BYTES)?;
    json_records(&text, path)?
        .into_iter()
        .map(|(line, i, v)| {
            let at = line.map_or_else(String::new, |l| format!(" (line {l})"));
            from_json(&v, format!("{}: record {}{at}", path.display(), i + 1))
        })
        .collect()
}

/// The requests of `files` (see [`read`]) followed by `facts` (`PROMPT|SUBJECT|TARGET`, see
/// [`parse_fact`]), checked together (see [`check`]): what `compile` edits.
pub fn gather(files: &[PathBuf], facts: &[String]) -> Result<Vec<Request>> {
    let mut requests = Vec::new();
    for file in files {
        requests.extend(read(file)?);
    }
    for fact in facts {
        requests.push(parse_fact(fact)?);
    }
    check(requests)
}

/// Refuses empty sets and conflicting duplicates; drops exact duplicates.
pub fn check(requests: Vec<Request>) -> Result<Vec<Request>> {
    if requests.is_empty() {
        return Err(Error::Empty);
    }
    let mut seen: BTreeMap<String, &Request> = BTreeMap::new();
    let mut keep = vec![true; requests.len()];
    for (i, r) in requests.iter().enumerate() {
        match seen.get(&r.fact_key()) {
            Some(prev) if prev.target_new.trim() != r.target_new.trim() => {
                return Err(Error::Conflict {
                    first: prev.origin.clone(),
                    second: r.origin.clone(),
                    fact: r.fact_key(),
                    a: prev.target_new.clone(),
                    b: r.target_new.clone(),
                })
            }
            Some(_) => keep[i] = false,
            None => {
                seen.insert(r.fact_key(), r);
            }
        }
    }
    Ok(requests.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect())
}

/// `(line, index, value)` for each record of a JSON array (no line) or JSON-lines text.
fn json_records(text: &str, path: &Path) -> Result<Vec<(Option<usize>, usize, serde_json::Value)>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| Error::Json { path: path.into(), line: e.line(), reason: e.to_string() })?;
        return Ok(values.into_iter().enumerate().map(|(i, v)| (None, i, v)).collect());
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v = serde_json::from_str(line).map_err(|e| Error::Json { path: path.into(), line: n + 1, reason: e.to_string() })?;
        out.push((Some(n + 1), out.len(), v));
    }
    Ok(out)
}

fn from_json(v: &serde_json::Value, origin: String) -> Result<Request> {
    let origin = match v.get("case_id") {
        Some(id) => format!("{origin}, case_id {id}"),
        None => origin,
    };
    let s = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_string);
    let list = |v: &serde_json::Value, key: &str| -> Vec<String> {
        match v.get(key) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            Some(serde_json::Value::String(x)) => vec![x.clone()],
            _ => vec![],
        }
    };
    let missing = |what: &str| Error::Record { origin: origin.clone(), problem: format!("missing `{what}`") };
    let req = if let Some(rw) = v.get("requested_rewrite") {
        // ROME/MEMIT CounterFact.
        let target = |key: &str| rw.get(key).and_then(|t| t.get("str").or(Some(t))).and_then(|t| t.as_str()).map(str::to_string);
        let target_true = target("target_true");
        Request {
            prompt: s(rw, "prompt").ok_or_else(|| missing("requested_rewrite.prompt"))?,
            subject: s(rw, "subject").ok_or_else(|| missing("requested_rewrite.subject"))?,
            target_new: target("target_new").ok_or_else(|| missing("requested_rewrite.target_new"))?,
            relation: s(rw, "relation_id"),
            paraphrases: list(v, "paraphrase_prompts"),
            neighbors: match &target_true {
                Some(t) => list(v, "neighborhood_prompts").into_iter().map(|p| Neighbor { prompt: p, answer: t.clone() }).collect(),
                None => vec![],
            },
            generation_prompts: list(v, "generation_prompts"),
            target_true,
            origin,
        }
    } else if v.get("src").is_some() && v.get("alt").is_some() {
        // zsRE (MEND split).
        let subject = s(v, "subject").ok_or_else(|| missing("subject"))?;
        let src = s(v, "src").ok_or_else(|| missing("src"))?;
        Request {
            prompt: template(&src, &subject, &origin)?,
            target_new: s(v, "alt").ok_or_else(|| missing("alt"))?,
            target_true: list(v, "answers").into_iter().next(),
            relation: None,
            paraphrases: list(v, "rephrase"),
            neighbors: match (s(v, "loc"), s(v, "loc_ans")) {
                (Some(p), Some(a)) => vec![Neighbor { prompt: p.trim_start_matches("nq question: ").to_string(), answer: a }],
                _ => vec![],
            },
            generation_prompts: vec![],
            subject,
            origin,
        }
    } else if v.get("ground_truth").is_some() || v.get("rephrase_prompt").is_some() {
        // EasyEdit.
        let subject = s(v, "subject").ok_or_else(|| missing("subject"))?;
        let prompt = s(v, "prompt").ok_or_else(|| missing("prompt"))?;
        Request {
            prompt: template(&prompt, &subject, &origin)?,
            target_new: s(v, "target_new").ok_or_else(|| missing("target_new"))?,
            target_true: s(v, "ground_truth"),
            relation: None,
            paraphrases: list(v, "rephrase_prompt"),
            neighbors: match (s(v, "locality_prompt"), s(v, "locality_ground_truth")) {
                (Some(p), Some(a)) => vec![Neighbor { prompt: p, answer: a }],
                _ => vec![],
            },
            generation_prompts: vec![],
            subject,
            origin,
        }
    } else if v.get("target_new").is_some() {
        // factpatch's own.
        let mut r: Request = serde_json::from_value(v.clone()).map_err(|e| Error::Record { origin: origin.clone(), problem: e.to_string() })?;
        r.prompt = template(&r.prompt, &r.subject, &origin)?;
        r.origin = origin;
        r
    } else {
        return Err(Error::Record {
            origin,
            problem: "not a recognised request (CounterFact, EasyEdit, zsRE or factpatch JSONL; see formats/requests.md)".into(),
        });
    };
    req.validate()
}
