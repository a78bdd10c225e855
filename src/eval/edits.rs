//! Edit metrics per request and over a request file, in two protocols whose numbers do not
//! compare with each other:
//!
//! - **CounterFact** (ROME/MEMIT: `eval_utils_counterfact.py`, `summarize.py`). A target's score
//!   after a prompt is its mean per-token log-probability; its "probability" is the exp of that
//!   mean (the per-token geometric mean), as ROME computes it. Efficacy: the new target beats the
//!   true one after the rewrite prompt; paraphrase: the same on each paraphrase; neighbourhood:
//!   the true target beats the new one after each neighbourhood prompt (neighbours answered by
//!   the true target). Magnitudes are the mean probability differences, P(new) − P(true)
//!   (neighbourhood: P(true) − P(new)). Score: the harmonic mean of the three mean scores.
//!   Fluency: ROME's n-gram entropy ([`super::fluency`]) of top-5 samples from the generation
//!   prompts, prompt included, to a total length of `fluency_length` tokens.
//! - **EasyEdit** (and Gu et al.'s RECT paper): teacher-forced token accuracy. Reliability: of
//!   the new target after the rewrite prompt; generalization: after each paraphrase; locality:
//!   the share of the neighbour answer's positions where the edited model's most probable token
//!   equals the unedited model's.
//!
//! A metric whose inputs a record lacks (no true target, no paraphrases…) is absent, not zero.

use super::score::{self, Choices, Scored};
use super::{fluency, progress, subset, Models, Options, Result};
use crate::edit::request::{self, continuation, Request};
use crate::model::{self, Model, Sampling};
use crate::tokenize::Tokenizer;
use std::path::{Path, PathBuf};

/// ROME samples fluency generations from the 5 most probable tokens.
const FLUENCY_TOP_K: usize = 5;

/// Records scored per call (one progress step).
const RECORD_STEP: usize = 8;

/// One record's CounterFact metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CounterFact {
    pub efficacy: Option<f64>,
    pub efficacy_magnitude: Option<f64>,
    pub paraphrase: Option<f64>,
    pub paraphrase_magnitude: Option<f64>,
    pub neighborhood: Option<f64>,
    pub neighborhood_magnitude: Option<f64>,
    pub fluency: Option<f64>,
}

impl CounterFact {
    /// The metrics by name, in report order.
    pub fn metrics(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("efficacy", self.efficacy),
            ("efficacy_magnitude", self.efficacy_magnitude),
            ("paraphrase", self.paraphrase),
            ("paraphrase_magnitude", self.paraphrase_magnitude),
            ("neighborhood", self.neighborhood),
            ("neighborhood_magnitude", self.neighborhood_magnitude),
            ("fluency", self.fluency),
        ]
    }
}

/// One record's EasyEdit metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EasyEdit {
    pub reliability: Option<f64>,
    pub generalization: Option<f64>,
    pub locality: Option<f64>,
}

impl EasyEdit {
    /// The metrics by name, in report order.
    pub fn metrics(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![("reliability", self.reliability), ("generalization", self.generalization), ("locality", self.locality)]
    }
}

/// Both protocols' metrics for one request.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RecordScores {
    /// 1-based position among the file's requests.
    pub record: usize,
    pub origin: String,
    pub counterfact: CounterFact,
    pub easyedit: EasyEdit,
}

/// A metric's mean over the records that have it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Aggregate {
    pub name: &'static str,
    pub mean: f64,
    /// Records it was computed for.
    pub n: usize,
}

/// A request file's evaluation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EditReport {
    pub path: PathBuf,
    pub counterfact: Vec<Aggregate>,
    pub easyedit: Vec<Aggregate>,
    pub records: Vec<RecordScores>,
}

/// Evaluates `requests` (read from `path`; `opts.limit` picks a subset) on `models`.
pub fn report(models: &Models, tok: &Tokenizer, path: &Path, requests: &[Request], opts: &Options) -> Result<EditReport> {
    let picked = subset(requests.len(), opts.limit, opts.seed);
    let bar = progress(opts.progress, "edits", picked.len());
    let mut records = Vec::with_capacity(picked.len());
    for step in picked.chunks(RECORD_STEP) {
        let reqs: Vec<&Request> = step.iter().map(|&i| &requests[i]).collect();
        for (&i, (counterfact, easyedit)) in step.iter().zip(evaluate(models, tok, &reqs, opts)?) {
            records.push(RecordScores { record: i + 1, origin: requests[i].origin.clone(), counterfact, easyedit });
        }
        bar.inc(step.len() as u64);
    }
    bar.finish_and_clear();
    let counterfact_rows: Vec<_> = records.iter().map(|r| r.counterfact.metrics()).collect();
    let mut counterfact = aggregate(&counterfact_rows);
    let scores: Vec<&Aggregate> = counterfact.iter().filter(|a| ["efficacy", "paraphrase", "neighborhood"].contains(&a.name)).collect();
    if scores.len() == 3 {
        let mean = harmonic_mean(&scores.iter().map(|a| a.mean).collect::<Vec<_>>());
        let n = scores.iter().map(|a| a.n).min().unwrap_or(0);
        counterfact.push(Aggregate { name: "score", mean, n });
    }
    let easyedit = aggregate(&records.iter().map(|r| r.easyedit.metrics()).collect::<Vec<_>>());
    Ok(EditReport { path: path.to_path_buf(), counterfact, easyedit, records })
}

/// Per metric name, the mean of the values present (metrics present nowhere are left out).
fn aggregate(rows: &[Vec<(&'static str, Option<f64>)>]) -> Vec<Aggregate> {
    let Some(first) = rows.first() else { return Vec::new() };
    (0..first.len())
        .filter_map(|k| {
            let values: Vec<f64> = rows.iter().filter_map(|r| r[k].1).collect();
            mean(&values).map(|mean| Aggregate { name: first[k].0, mean, n: values.len() })
        })
        .collect()
}

/// The arithmetic mean, `None` for no values.
fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// `n / Σ 1/xᵢ`; 0 when any value is 0 (the limit).
pub fn harmonic_mean(values: &[f64]) -> f64 {
    if values.iter().any(|&x| x <= 0.0) {
        return 0.0;
    }
    values.len() as f64 / values.iter().map(|x| 1.0 / x).sum::<f64>()
}

/// Where one request's prompts sit among the scored items.
struct Layout {
    rewrite: usize,
    paraphrases: std::ops::Range<usize>,
    neighbors: std::ops::Range<usize>,
    /// The first neighbour's index among the items scored on the unedited model.
    first_neighbor: usize,
}

/// Both protocols' metrics for each of `requests`.
fn evaluate(models: &Models, tok: &Tokenizer, requests: &[&Request], opts: &Options) -> Result<Vec<(CounterFact, EasyEdit)>> {
    let ids = |text: &str| -> Result<Vec<u32>> { Ok(tok.ids(text)?) };
    let max = models.base.config.max_positions;
    let (mut items, mut neighbor_items, mut layouts) = (Vec::new(), Vec::new(), Vec::new());
    for r in requests {
        let first_item = items.len();
        let new = ids(&r.target_text())?;
        let old = r.target_true.as_deref().map(|t| ids(&continuation(t))).transpose()?;
        let targets: Vec<Vec<u32>> = std::iter::once(new.clone()).chain(old.clone()).collect();
        let rewrite = items.len();
        items.push(Choices { context: tok.prompt_ids(&r.filled())?, continuations: targets.clone() });
        for p in &r.paraphrases {
            items.push(Choices { context: tok.prompt_ids(p)?, continuations: targets.clone() });
        }
        let (paraphrases, first_neighbor) = (rewrite + 1..items.len(), neighbor_items.len());
        for n in &r.neighbors {
            let answer = ids(&continuation(&n.answer))?;
            // Neighbours answered by the true target also compare it with the new one.
            let new_too = old.as_ref() == Some(&answer);
            let context = tok.prompt_ids(&n.prompt)?;
            neighbor_items.push(Choices { context: context.clone(), continuations: vec![answer.clone()] });
            items.push(Choices { context, continuations: std::iter::once(answer).chain(new_too.then(|| new.clone())).collect() });
        }
        layouts.push(Layout { rewrite, paraphrases, neighbors: items.len() - r.neighbors.len()..items.len(), first_neighbor });
        // Refused before any pass allocates for them (its attention grows with the square).
        let generation = r.generation_prompts.iter().map(|p| Ok(ids(p)?.len() + 1)).collect::<Result<Vec<_>>>()?;
        let lengths = items[first_item..].iter().map(|c: &Choices| c.context.len() + c.continuations.iter().map(Vec::len).max().unwrap_or(0));
        if let Some(longest) = lengths.chain(generation).max().filter(|&n| n > max) {
            let problem = format!("a prompt with its continuation is {longest} tokens, more than the model's context of {max} tokens");
            return Err(request::Error::Record { origin: r.origin.clone(), problem }.into());
        }
    }
    let post = score::score(models.evaluated(), &items)?;
    // Without patches the evaluated model is the base: its own predictions are the reference.
    let pre = models.patched.as_ref().map(|_| score::score(&models.base, &neighbor_items)).transpose()?;
    requests
        .iter()
        .zip(&layouts)
        .map(|(r, at)| {
            let rewrite = &post[at.rewrite];
            let paraphrases = &post[at.paraphrases.clone()];
            let neighbors = &post[at.neighbors.clone()];
            let locality: Vec<f64> = neighbors
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let reference = pre.as_ref().map_or(&s[0], |p| &p[at.first_neighbor + k][0]);
                    score::agreement(&s[0].argmax, &reference.argmax)
                })
                .collect();
            let fluency = match r.generation_prompts.is_empty() {
                true => None,
                false => Some(fluency::fluency(&generations(models.evaluated(), tok, r, opts)?)),
            };
            let easyedit = EasyEdit {
                reliability: Some(rewrite[0].accuracy()),
                generalization: mean(&paraphrases.iter().map(|s| s[0].accuracy()).collect::<Vec<_>>()),
                locality: mean(&locality),
            };
            Ok((CounterFact { fluency, ..counterfact(r, rewrite, paraphrases, neighbors) }, easyedit))
        })
        .collect()
}

/// Whether `a` beats `b` (1 or 0) and P(a) − P(b), probabilities being exp of the mean token
/// log-probability.
fn compare(a: &Scored, b: &Scored) -> (f64, f64) {
    ((a.mean() > b.mean()) as u8 as f64, a.mean().exp() - b.mean().exp())
}

/// The means of the comparisons' outcomes and magnitudes.
fn compared(pairs: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    (mean(&pairs.iter().map(|p| p.0).collect::<Vec<_>>()), mean(&pairs.iter().map(|p| p.1).collect::<Vec<_>>()))
}

/// One record's probability comparisons from its scored items (targets: new, then true if known).
fn counterfact(r: &Request, rewrite: &[Scored], paraphrases: &[Vec<Scored>], neighbors: &[Vec<Scored>]) -> CounterFact {
    if r.target_true.is_none() {
        return CounterFact::default();
    }
    let (efficacy, efficacy_magnitude) = compare(&rewrite[0], &rewrite[1]);
    let (paraphrase, paraphrase_magnitude) = compared(&paraphrases.iter().map(|s| compare(&s[0], &s[1])).collect::<Vec<_>>());
    // Neighbours answered by the true target were scored as [true, new].
    let (neighborhood, neighborhood_magnitude) = compared(&neighbors.iter().filter(|s| s.len() == 2).map(|s| compare(&s[0], &s[1])).collect::<Vec<_>>());
    CounterFact {
        efficacy: Some(efficacy),
        efficacy_magnitude: Some(efficacy_magnitude),
        paraphrase,
        paraphrase_magnitude,
        neighborhood,
        neighborhood_magnitude,
        fluency: None,
    }
}

/// ROME's fluency generations: top-5 samples from each generation prompt, to `fluency_length`
/// tokens in all (stopping early at an end-of-sequence token), decoded with their prompts.
/// The sampler's seed mixes `opts.seed` with the prompts, so a record's texts do not depend on
/// which other records are evaluated.
fn generations(model: &Model, tok: &Tokenizer, r: &Request, opts: &Options) -> Result<Vec<String>> {
    let prompts = r.generation_prompts.iter().map(|p| tok.prompt_ids(p)).collect::<std::result::Result<Vec<_>, _>>()?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&opts.seed.to_le_bytes());
    for p in &r.generation_prompts {
        hasher.update(p.as_bytes()).update(&[0]);
    }
    let seed = u64::from_le_bytes(hasher.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    let shortest = prompts.iter().map(|p| p.len() - tok.prefix().len()).min().unwrap_or(0);
    let max_new = opts.fluency_length.saturating_sub(shortest).max(1);
    let sampling = Sampling::TopK { k: FLUENCY_TOP_K, temperature: 1.0, seed };
    let eos = &model.config.eos_token_ids;
    let outputs = model::generate(model, &prompts, max_new, sampling, eos)?;
    prompts
        .iter()
        .zip(outputs)
        .map(|(p, out)| {
            let p = &p[tok.prefix().len()..];
            let room = opts.fluency_length.saturating_sub(p.len());
            let ids: Vec<u32> = p.iter().copied().chain(out.into_iter().filter(|t| !eos.contains(t)).take(room)).collect();
            Ok(tok.decode(&ids)?)
        })
        .collect()
}
