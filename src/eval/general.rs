//! General abilities: held-out perplexity, multiple-choice accuracy by log-likelihood, and
//! exact match of greedy answers. What RECT is meant to keep while edits land.

use super::score::{self, Choices, Likelihood};
use super::tasks::{Choice, Items, Question, Task, TaskData};
use super::{answer, progress, subset, Error, Options, Result};
use crate::model::{self, Model, Sampling};
use crate::tokenize::Tokenizer;
use std::path::PathBuf;

/// Multiple-choice items scored per call (one progress step).
const CHOICE_STEP: usize = 32;

/// Questions generated for together.
const GENERATION_BATCH: usize = 16;

/// One task's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskResult {
    pub task: Task,
    pub path: PathBuf,
    /// Items evaluated (windows, for perplexity).
    pub items: usize,
    pub metrics: Vec<Metric>,
    /// How it was measured.
    pub protocol: String,
}

/// A named value.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
}

/// Evaluates `model` on one task file.
pub fn run(model: &Model, tok: &Tokenizer, data: &TaskData, opts: &Options) -> Result<TaskResult> {
    let (items, metrics, protocol) = match &data.items {
        Items::Text(text) => perplexity(model, tok, data, text, opts)?,
        Items::Choices(all) => {
            let picked: Vec<(usize, &Choice)> = subset(all.len(), data.limit.or(opts.limit), opts.seed).into_iter().map(|i| (i, &all[i])).collect();
            let (acc, acc_norm) = choice_accuracy(model, tok, data, &picked, opts)?;
            let mut metrics = vec![Metric { name: "acc", value: acc }];
            let mut protocol = "zero-shot, log-likelihood of each choice after the prompt (lm-evaluation-harness format)".to_string();
            if data.task == Task::HellaSwag {
                metrics.push(Metric { name: "acc_norm", value: acc_norm });
                protocol += "; acc_norm divides by the choice's length in characters";
            }
            (picked.len(), metrics, protocol)
        }
        Items::Questions(all) => {
            let picked: Vec<(usize, &Question)> = subset(all.len(), data.limit.or(opts.limit), opts.seed).into_iter().map(|i| (i, &all[i])).collect();
            let budget = Budget::of(data.task);
            let em = exact_match(model, tok, data, &picked, &budget, opts)?;
            let protocol = format!("zero-shot, greedy, at most {} new tokens, cut at {:?}", budget.max_new, budget.stop);
            (picked.len(), vec![Metric { name: "exact_match", value: em }], protocol)
        }
    };
    Ok(TaskResult { task: data.task, path: data.path.clone(), items, metrics, protocol })
}

/// Token-level perplexity of `text` over non-overlapping windows of `opts.seq_len` tokens
/// (default: the model's context), the tokenizer's sequence start included; the limit picks
/// windows.
fn perplexity(model: &Model, tok: &Tokenizer, data: &TaskData, text: &str, opts: &Options) -> Result<(usize, Vec<Metric>, String)> {
    let max = model.config.max_positions;
    let seq_len = opts.seq_len.unwrap_or(max);
    if seq_len > max {
        let what = format!("windows of {seq_len} tokens (--seq-len) are longer than the model's context of {max} tokens");
        return Err(Error::TooLong { path: data.path.clone(), what });
    }
    let ids = tok.ids(text)?;
    let windows = score::windows(&ids, tok.prefix(), seq_len);
    if windows.is_empty() {
        let what = format!("no window of {seq_len} token(s) has a token to predict");
        return Err(Error::Empty { path: data.path.clone(), what });
    }
    let picked = subset(windows.len(), data.limit.or(opts.limit), opts.seed);
    let bar = progress(opts.progress, data.task.name(), picked.len());
    let mut total = Likelihood::default();
    for &w in &picked {
        let l = score::window_likelihood(model, tok.prefix(), windows[w], score::CHUNK)?;
        total.nll += l.nll;
        total.tokens += l.tokens;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let start = match tok.prefix().len() {
        0 => String::new(),
        n => format!(", each opening with the tokenizer's {n} sequence-start token(s)"),
    };
    let protocol = format!(
        "token-level, non-overlapping windows of {seq_len} tokens{start}, each token predicted from the ones before it in its window ({} of {} windows, {} tokens predicted)",
        picked.len(),
        windows.len(),
        total.tokens
    );
    Ok((picked.len(), vec![Metric { name: "perplexity", value: total.perplexity() }], protocol))
}

/// The index of the largest value (the first of equals).
pub fn best(values: &[f64]) -> usize {
    (0..values.len()).fold(0, |b, i| if values[i] > values[b] { i } else { b })
}

/// Refuses item `i` (0-based) of `data` when its longest sequence, `tokens`, does not fit the
/// model's context: before any pass allocates for it.
fn check_fits(model: &Model, data: &TaskData, i: usize, tokens: usize) -> Result<()> {
    let max = model.config.max_positions;
    if tokens <= max {
        return Ok(());
    }
    let what = format!("item {}: {tokens} tokens with its longest continuation, more than the model's context of {max} tokens", i + 1);
    Err(Error::TooLong { path: data.path.clone(), what })
}

/// Accuracy of the most likely choice, raw and with each choice's log-likelihood divided by its
/// length in characters (lm-evaluation-harness's `acc` and `acc_norm`). Items come with their
/// index in the file.
fn choice_accuracy(model: &Model, tok: &Tokenizer, data: &TaskData, items: &[(usize, &Choice)], opts: &Options) -> Result<(f64, f64)> {
    let bar = progress(opts.progress, data.task.name(), items.len());
    let (mut acc, mut acc_norm) = (0usize, 0usize);
    for step in items.chunks(CHOICE_STEP) {
        let batch = step
            .iter()
            .map(|&(i, c)| {
                let continuations: Vec<Vec<u32>> = c.choices.iter().map(|x| tok.ids(&format!(" {x}"))).collect::<std::result::Result<_, _>>()?;
                let context = tok.prompt_ids(&c.prompt)?;
                check_fits(model, data, i, context.len() + continuations.iter().map(Vec::len).max().unwrap_or(0))?;
                Ok(Choices { context, continuations })
            })
            .collect::<Result<Vec<_>>>()?;
        for ((_, c), scored) in step.iter().zip(score::score(model, &batch)?) {
            let ll: Vec<f64> = scored.iter().map(score::Scored::sum).collect();
            let per_char: Vec<f64> = ll.iter().zip(&c.choices).map(|(l, x)| l / x.chars().count() as f64).collect();
            acc += (best(&ll) == c.gold) as usize;
            acc_norm += (best(&per_char) == c.gold) as usize;
        }
        bar.inc(step.len() as u64);
    }
    bar.finish_and_clear();
    let n = items.len() as f64;
    Ok((acc as f64 / n, acc_norm as f64 / n))
}

/// How long a generated answer may be, and where it ends.
#[derive(Clone, Copy, Debug)]
struct Budget {
    max_new: usize,
    stop: &'static [&'static str],
}

impl Budget {
    /// lm-evaluation-harness's stop sequences; budgets that fit each task's answers.
    fn of(task: Task) -> Self {
        match task {
            Task::Gsm8k => Budget { max_new: 64, stop: &["Question:", "\n\n"] },
            _ => Budget { max_new: 16, stop: &["\n", ".", ","] },
        }
    }

    /// `text` up to the first stop sequence.
    fn cut<'a>(&self, text: &'a str) -> &'a str {
        let end = self.stop.iter().filter_map(|s| text.find(s)).min().unwrap_or(text.len());
        &text[..end]
    }
}

/// The share of questions whose greedy answer matches: normalised text (NQ-open) or the final
/// number (GSM8K).
fn exact_match(model: &Model, tok: &Tokenizer, data: &TaskData, items: &[(usize, &Question)], budget: &Budget, opts: &Options) -> Result<f64> {
    let task = data.task;
    let bar = progress(opts.progress, task.name(), items.len());
    let prompts = items.iter().map(|(_, q)| tok.prompt_ids(&q.prompt)).collect::<std::result::Result<Vec<_>, _>>()?;
    for (&(i, _), p) in items.iter().zip(&prompts) {
        check_fits(model, data, i, p.len() + 1)?;
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let eos = &model.config.eos_token_ids;
    let mut correct = 0;
    for group in order.chunks(GENERATION_BATCH) {
        let batch: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
        for (&i, mut out) in group.iter().zip(model::generate(model, &batch, budget.max_new, Sampling::Greedy, eos)?) {
            out.retain(|t| !eos.contains(t));
            let text = tok.decode(&out)?;
            let answer = budget.cut(&text);
            let hit = match task {
                Task::Gsm8k => answer::last_number(answer).is_some_and(|x| items[i].1.answers.iter().any(|a| a.parse() == Ok(x))),
                _ => answer::exact_match(answer, &items[i].1.answers),
            };
            correct += hit as usize;
        }
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    Ok(correct as f64 / items.len() as f64)
}
