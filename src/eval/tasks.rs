//! General-ability task files: their formats, and the prompts built from them. Prompts follow
//! lm-evaluation-harness (zero-shot); each choice is scored as a continuation after one space.
//!
//! | task | file | prompt | choices / answer |
//! |---|---|---|---|
//! | `perplexity` | plain text | the whole file as one token stream | — |
//! | `hellaswag` | 6 lines per item: context, gold index 0-3, four endings | the context | the endings |
//! | `boolq` | JSON lines: `passage, question, answer: bool` | `{passage}\nQuestion: {question}?\nAnswer:` | `no`, `yes` |
//! | `sst2` | TSV `sentence, label` (0/1), header | `{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:` | `negative`, `positive` |
//! | `rte` | TSV `index, sentence1, sentence2, label`, header | `{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:` | `True` (entailment), `False` |
//! | `nq-open` | JSON lines: `question, answer: [str]` | `Q: {question}?\nA:` | any answer, exact match |
//! | `gsm8k` | JSON lines: `question, answer` ending `#### N` | `Question: {question}\nAnswer:` | N, the last number generated |
//!
//! HellaSwag texts go through the harness's `preprocess` (WikiHow `[title]` markers and
//! bracketed artifacts removed).

use super::{answer, Error, Result};
use std::path::{Path, PathBuf};

/// A general-ability task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Held-out perplexity of a text.
    Perplexity,
    /// Commonsense sentence completion.
    HellaSwag,
    /// Yes/no questions about a passage.
    BoolQ,
    /// Sentiment of a movie-review sentence.
    Sst2,
    /// Textual entailment.
    Rte,
    /// Open-domain questions, answered by generation.
    NqOpen,
    /// Grade-school arithmetic word problems, answered by generation.
    Gsm8k,
}

impl Task {
    pub const ALL: [Task; 7] = [Task::Perplexity, Task::HellaSwag, Task::BoolQ, Task::Sst2, Task::Rte, Task::NqOpen, Task::Gsm8k];

    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Task::Perplexity => "perplexity",
            Task::HellaSwag => "hellaswag",
            Task::BoolQ => "boolq",
            Task::Sst2 => "sst2",
            Task::Rte => "rte",
            Task::NqOpen => "nq-open",
            Task::Gsm8k => "gsm8k",
        }
    }

    /// The task called `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::UnknownTask { name: name.to_string(), known: Task::ALL.map(Task::name).join(", ") })
    }
}

/// A task as the command line names it: `TASK=FILE`, or `TASK:N=FILE` to evaluate `N` items
/// (windows, for perplexity) whatever `--limit` says.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub task: Task,
    pub path: PathBuf,
    pub limit: Option<usize>,
}

impl Spec {
    /// Parses `TASK[:N]=FILE`.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || Error::TaskSpec(spec.to_string());
        let (head, path) = spec.split_once('=').filter(|(_, path)| !path.is_empty()).ok_or_else(bad)?;
        let (name, limit) = match head.split_once(':') {
            Some((name, n)) => (name, Some(n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad)?)),
            None => (head, None),
        };
        Ok(Spec { task: Task::from_name(name)?, path: PathBuf::from(path), limit })
    }

    /// Reads the file (see [`read`]) and attaches the limit.
    pub fn read(&self) -> Result<TaskData> {
        Ok(TaskData { limit: self.limit, ..read(self.task, &self.path)? })
    }
}

impl serde::Serialize for Task {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A multiple-choice item: the prompt, the choices (without the leading space they are scored
/// with), and the index of the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub prompt: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// A question answered by generation, with the accepted answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub prompt: String,
    pub answers: Vec<String>,
}

/// A task's items, as read from its file.
#[derive(Clone, Debug)]
pub enum Items {
    Text(String),
    Choices(Vec<Choice>),
    Questions(Vec<Question>),
}

/// A task file, read and checked.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub task: Task,
    pub path: PathBuf,
    pub items: Items,
    /// Items to evaluate, in place of `Options::limit`.
    pub limit: Option<usize>,
}

/// Reads `path` as `task`'s format; every problem names the file and line.
pub fn read(task: Task, path: &Path) -> Result<TaskData> {
    let text = crate::read_regular_text(path, crate::MAX_DATA_BYTES)?;
    let file = File { path, text: &text };
    let items = match task {
        Task::Perplexity if text.trim().is_empty() => return Err(file.empty("no text")),
        Task::Perplexity => Items::Text(text.clone()),
        Task::HellaSwag => Items::Choices(file.hellaswag()?),
        Task::BoolQ => Items::Choices(file.json_lines(boolq)?),
        Task::Sst2 => Items::Choices(file.tsv("sentence\tlabel", 2, sst2)?),
        Task::Rte => Items::Choices(file.tsv("index\tsentence1\tsentence2\tlabel", 4, rte)?),
        Task::NqOpen => Items::Questions(file.json_lines(nq_open)?),
        Task::Gsm8k => Items::Questions(file.json_lines(gsm8k)?),
    };
    let count = match &items {
        Items::Text(_) => 1,
        Items::Choices(c) => c.len(),
        Items::Questions(q) => q.len(),
    };
    if count == 0 {
        return Err(file.empty("no items"));
    }
    Ok(TaskData { task, path: path.to_path_buf(), items, limit: None })
}

/// A task file's text, for parsers that name it in errors.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

impl File<'_> {
    fn bad(&self, line: usize, problem: impl Into<String>) -> Error {
        Error::Malformed { path: self.path.to_path_buf(), line, problem: problem.into() }
    }

    fn empty(&self, what: &str) -> Error {
        Error::Empty { path: self.path.to_path_buf(), what: what.to_string() }
    }

    /// Non-blank lines with their 1-based numbers.
    fn lines(&self) -> impl Iterator<Item = (usize, &str)> {
        self.text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim().is_empty())
    }

    /// Six lines per item: context, gold index, four endings.
    fn hellaswag(&self) -> Result<Vec<Choice>> {
        let lines: Vec<&str> = self.text.lines().collect();
        let end = lines.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1);
        let mut items = Vec::new();
        for (k, item) in lines[..end].chunks(6).enumerate() {
            let first = k * 6 + 1;
            if item.len() < 6 {
                return Err(self.bad(first, format!("truncated item: {} of 6 lines (context, gold index, four endings)", item.len())));
            }
            if let Some(blank) = item.iter().position(|l| l.trim().is_empty()) {
                return Err(self.bad(first + blank, "blank line inside an item (context, gold index, four endings)"));
            }
            let gold = match item[1].trim().parse::<usize>() {
                Ok(g) if g < 4 => g,
                _ => return Err(self.bad(first + 1, format!("gold index `{}` is not 0, 1, 2 or 3", item[1].trim()))),
            };
            items.push(Choice { prompt: hellaswag_preprocess(item[0]), choices: item[2..].iter().map(|e| hellaswag_preprocess(e)).collect(), gold });
        }
        Ok(items)
    }

    /// One JSON object per non-blank line, turned into an item by `parse`.
    fn json_lines<T>(&self, parse: fn(&serde_json::Value) -> std::result::Result<T, String>) -> Result<Vec<T>> {
        self.lines()
            .map(|(n, line)| {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| self.bad(n, format!("invalid JSON: {e}")))?;
                parse(&v).map_err(|problem| self.bad(n, problem))
            })
            .collect()
    }

    /// Tab-separated rows of `columns` fields after an optional `header`, turned into items by `parse`.
    fn tsv<T>(&self, header: &str, columns: usize, parse: fn(&[&str]) -> std::result::Result<T, String>) -> Result<Vec<T>> {
        self.lines()
            .enumerate()
            .filter(|(i, (_, line))| !(*i == 0 && line.trim_end() == header))
            .map(|(_, (n, line))| {
                let fields: Vec<&str> = line.split('\t').collect();
                if fields.len() != columns {
                    return Err(self.bad(n, format!("{} tab-separated fields, expected {columns} ({})", fields.len(), header.replace('\t', ", "))));
                }
                parse(&fields).map_err(|problem| self.bad(n, problem))
            })
            .collect()
    }
}

/// lm-evaluation-harness's HellaSwag `preprocess`, trimmed again after the brackets go.
fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ").trim().to_string()
}

fn string<'a>(v: &'a serde_json::Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key).and_then(|x| x.as_str()).ok_or_else(|| format!("missing `{key}` (a string)"))
}

fn boolq(v: &serde_json::Value) -> std::result::Result<Choice, String> {
    let answer = v.get("answer").and_then(|a| a.as_bool()).ok_or("missing `answer` (true or false)")?;
    Ok(Choice {
        prompt: format!("{}\nQuestion: {}?\nAnswer:", string(v, "passage")?, string(v, "question")?),
        choices: vec!["no".into(), "yes".into()],
        gold: answer as usize,
    })
}

/// A two-way choice whose gold index is the position of `label` among `labels`.
fn binary(prompt: String, choices: [&str; 2], label: &str, labels: [&str; 2]) -> std::result::Result<Choice, String> {
    let label = label.trim();
    let gold = labels.iter().position(|l| *l == label).ok_or_else(|| format!("label `{label}` is not {} or {}", labels[0], labels[1]))?;
    Ok(Choice { prompt, choices: choices.map(String::from).to_vec(), gold })
}

fn sst2(fields: &[&str]) -> std::result::Result<Choice, String> {
    let prompt = format!("{}\nQuestion: Is this sentence positive or negative?\nAnswer:", fields[0].trim());
    binary(prompt, ["negative", "positive"], fields[1], ["0", "1"])
}

fn rte(fields: &[&str]) -> std::result::Result<Choice, String> {
    let prompt = format!("{}\nQuestion: {} True or False?\nAnswer:", fields[1].trim(), fields[2].trim());
    binary(prompt, ["True", "False"], fields[3], ["entailment", "not_entailment"])
}

fn nq_open(v: &serde_json::Value) -> std::result::Result<Question, String> {
    let answers: Vec<String> = match v.get("answer") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    if answers.is_empty() {
        return Err("missing `answer` (a list of strings)".into());
    }
    let question = string(v, "question")?.trim_end().trim_end_matches('?');
    Ok(Question { prompt: format!("Q: {question}?\nA:"), answers })
}

fn gsm8k(v: &serde_json::Value) -> std::result::Result<Question, String> {
    let gold = answer::gsm8k_gold(string(v, "answer")?).ok_or("`answer` does not end with `#### N`")?;
    Ok(Question { prompt: format!("Question: {}\nAnswer:", string(v, "question")?), answers: vec![gold.to_string()] })
}
