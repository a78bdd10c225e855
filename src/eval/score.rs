//! Teacher-forced log-likelihoods, the measurement under every choice task and edit metric, and
//! perplexity over windows of a token stream.
//!
//! The continuations of one context share its forward pass: the context (but its last token)
//! runs once into a KV cache, which is then selected once per continuation. Contexts of similar
//! length are batched together, so little is padded.

use super::Result;
use crate::model::{self, ops, Batch, Hooks, KvCache, Model};
use candle_core::{IndexOp, Tensor};

/// Continuations scored together in one forward pass, at most.
const BATCH_ROWS: usize = 16;

/// Tokens of a perplexity window run through the model at once, by default (the tokens before
/// them wait in the cache).
pub const CHUNK: usize = 512;

/// A context and the continuations to score after it.
#[derive(Clone, Debug)]
pub struct Choices {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

/// One continuation, teacher-forced: each token's log-probability after everything before it,
/// and the token the model found most probable there.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub argmax: Vec<u32>,
}

impl Scored {
    /// The continuation's log-probability.
    pub fn sum(&self) -> f64 {
        self.logprobs.iter().sum()
    }

    /// The mean per-token log-probability (ROME's and MEMIT's score for a target).
    pub fn mean(&self) -> f64 {
        self.sum() / self.logprobs.len() as f64
    }

    /// Token accuracy: the share of tokens that were the model's most probable one.
    pub fn accuracy(&self) -> f64 {
        agreement(&self.tokens, &self.argmax)
    }
}

/// The share of positions where `a` and `b` hold the same token (1 when both are empty).
pub fn agreement(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() {
        return 1.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Scores every continuation of every item: `result[i][j]` is item `i`'s continuation `j`.
pub fn score(model: &Model, items: &[Choices]) -> Result<Vec<Vec<Scored>>> {
    if items.iter().any(|c| c.context.is_empty() || c.continuations.iter().any(Vec::is_empty)) {
        return Err(model::Error::Input("cannot score an empty context or continuation".into()).into());
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].context.len());
    let mut out = vec![Vec::new(); items.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        let mut rows = items[order[start]].continuations.len();
        while end < order.len() && rows + items[order[end]].continuations.len() <= BATCH_ROWS {
            rows += items[order[end]].continuations.len();
            end += 1;
        }
        let group: Vec<&Choices> = order[start..end].iter().map(|&i| &items[i]).collect();
        for (&i, scored) in order[start..end].iter().zip(score_group(model, &group)?) {
            out[i] = scored;
        }
        start = end;
    }
    Ok(out)
}

/// One batch: the contexts' prefixes into a cache (left-padded), then every continuation after
/// its context's last token (right-padded), reading the predictions of the continuation tokens.
fn score_group(model: &Model, items: &[&Choices]) -> Result<Vec<Vec<Scored>>> {
    let prefixes: Vec<Vec<u32>> = items.iter().map(|c| c.context[..c.context.len() - 1].to_vec()).collect();
    let mut cache = KvCache::default();
    let cached = prefixes.iter().any(|p| !p.is_empty());
    if cached {
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut cache))?;
    }
    let (mut owner, mut suffixes, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in items.iter().enumerate() {
        let last = c.context[c.context.len() - 1];
        for t in &c.continuations {
            owner.push(i);
            suffixes.push(std::iter::once(last).chain(t[..t.len() - 1].iter().copied()).collect::<Vec<_>>());
            targets.push(t);
        }
    }
    let mut cache = if cached { Some(cache.select(&owner)?) } else { None };
    let hidden = model.forward(&Batch::right_padded(&suffixes), &Hooks::default(), cache.as_mut())?.hidden;
    // Row r's position j (of `width`) predicts its continuation's token j.
    let width = suffixes.iter().map(Vec::len).max().unwrap_or(0);
    let ids: Vec<u32> = targets.iter().flat_map(|t| t.iter().copied()).collect();
    let at: Vec<u32> = targets.iter().enumerate().flat_map(|(r, t)| (0..t.len()).map(move |j| (r * width + j) as u32)).collect();
    let at = Tensor::from_vec(at, ids.len(), hidden.device())?;
    let states = hidden.reshape(((), model.config.hidden_size))?.index_select(&at, 0)?;
    let (logprobs, argmax) = predictions(model, &states, &ids)?;
    let mut out: Vec<Vec<Scored>> = vec![Vec::new(); items.len()];
    let mut k = 0;
    for (&i, t) in owner.iter().zip(&targets) {
        let n = t.len();
        out[i].push(Scored { tokens: t.to_vec(), logprobs: logprobs[k..k + n].to_vec(), argmax: argmax[k..k + n].to_vec() });
        k += n;
    }
    Ok(out)
}

/// For residual states `hidden [n, d]` and the tokens `ids` that follow each: their
/// log-probabilities and the most probable tokens.
fn predictions(model: &Model, hidden: &Tensor, ids: &[u32]) -> Result<(Vec<f64>, Vec<u32>)> {
    let logits = model.logits(hidden)?;
    let lp = ops::log_softmax(&logits)?;
    let idx = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), hidden.device())?;
    let picked: Vec<f32> = lp.gather(&idx, 1)?.squeeze(1)?.to_vec1()?;
    let argmax: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    Ok((picked.into_iter().map(f64::from).collect(), argmax))
}

/// Summed negative log-likelihood over a token stream and how many tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Likelihood {
    pub nll: f64,
    pub tokens: usize,
}

impl Likelihood {
    /// exp(mean negative log-likelihood per token).
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens as f64).exp()
    }
}

/// Non-overlapping windows covering `ids`, each `seq_len` tokens long with `prefix` (the
/// tokenizer's sequence start, [`Tokenizer::prefix`](crate::tokenize::Tokenizer::prefix)) in
/// front; a window with no token to predict is dropped, and so is every window when the prefix
/// leaves no room.
pub fn windows<'a>(ids: &'a [u32], prefix: &[u32], seq_len: usize) -> Vec<&'a [u32]> {
    if seq_len <= prefix.len() {
        return Vec::new();
    }
    ids.chunks(seq_len - prefix.len()).filter(|w| prefix.len() + w.len() > 1).collect()
}

/// The negative log-likelihood of every token of `window`, each predicted from `prefix` and the
/// window's tokens before it (without a prefix, the first token is not predicted). The sequence
/// runs `chunk` tokens at a time through a KV cache: the same numbers as one pass, in bounded
/// memory.
pub fn window_likelihood(model: &Model, prefix: &[u32], window: &[u32], chunk: usize) -> Result<Likelihood> {
    let seq = [prefix, window].concat();
    let first = prefix.len().max(1);
    let mut cache = KvCache::default();
    let mut nll = 0.0;
    for start in (0..seq.len()).step_by(chunk.max(1)) {
        let chunk = &seq[start..(start + chunk.max(1)).min(seq.len())];
        let hidden = model.forward(&Batch::right_padded(&[chunk.to_vec()]), &Hooks::default(), Some(&mut cache))?.hidden;
        // Position j predicts token start + j + 1, if the sequence has it.
        let next = &seq[start + 1..(start + chunk.len() + 1).min(seq.len())];
        if next.is_empty() {
            break;
        }
        let (logprobs, _) = predictions(model, &hidden.i((0, ..next.len()))?, next)?;
        let skip = first.saturating_sub(start + 1).min(logprobs.len());
        nll -= logprobs[skip..].iter().sum::<f64>();
    }
    Ok(Likelihood { nll, tokens: seq.len().saturating_sub(first) })
}
