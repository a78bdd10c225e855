//! Prompts, keys and target vectors: where the subject sits in each prompt, what the MLP key is
//! there, and which residual change makes the model say the new target.

use super::{EarlyStop, Error, Hparams, Result};
use crate::edit::request::Request;
use crate::model::{self, ops, Batch, Hooks, KvCache, Model};
use crate::tokenize::{self, Tokenizer};
use candle_core::{DType, IndexOp, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// A tokenized prompt with the position of the subject's last token and, for rewriting
/// prompts, the teacher-forced target tokens `(position, id)`.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub lookup: usize,
    pub targets: Vec<(usize, u32)>,
}

/// `template` (one `{}`: the subject's place) filled with `subject`, optionally followed by the
/// target tokens but the last (their predictions are what the loss reads).
pub fn prompt(tok: &Tokenizer, template: &str, subject: &str, target: Option<&[u32]>, req: &Request) -> Result<Prompt> {
    let start = template.find("{}").expect("validated: one {}");
    let text = template.replacen("{}", subject, 1);
    let enc = tok.encode(&text)?;
    let lookup = tokenize::last_token_in(&enc.offsets, (start, start + subject.len()))
        .ok_or_else(|| Error::Request { origin: req.origin.clone(), problem: format!("subject `{subject}` cannot be located among the tokens of `{text}`") })?;
    let mut ids = enc.ids;
    let mut targets = Vec::new();
    if let Some(t) = target {
        for (i, &id) in t.iter().enumerate() {
            targets.push((ids.len() - 1 + i, id));
        }
        ids.extend_from_slice(&t[..t.len() - 1]);
    }
    Ok(Prompt { ids, lookup, targets })
}

/// Rows `(sequence, position)` of `x [b, t, d]` as `[n, d]`.
pub fn rows(x: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
    let (_, t, d) = x.dims3()?;
    let idx: Vec<u32> = at.iter().map(|&(s, p)| (s * t + p) as u32).collect();
    let idx = Tensor::from_vec(idx, at.len(), x.device())?;
    Ok(x.reshape(((), d))?.index_select(&idx, 0)?)
}

/// Keys at the subject's last token of each prompt, at each of `layers`, on the current model:
/// layer → `[prompts, intermediate]` (f32).
pub fn keys(model: &Model, prompts: &[Prompt], layers: &[usize]) -> Result<Vec<Tensor>> {
    let batch = Batch::right_padded(&prompts.iter().map(|p| p.ids.clone()).collect::<Vec<_>>());
    let at: Vec<_> = prompts.iter().enumerate().map(|(i, p)| (i, p.lookup)).collect();
    let hooks = Hooks { keys: layers.to_vec(), stop_after: layers.iter().max().copied(), ..Hooks::default() };
    let trace = model.forward(&batch, &hooks, None)?;
    layers.iter().map(|l| rows(&trace.keys[l], &at)).collect()
}

/// Where a target vector is added, and what it is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// ROME, and MEMIT where a norm follows the MLP: added to layer `l`'s MLP output (the down
    /// projection's, before any post-MLP norm); the target is that output.
    MlpOut(usize),
    /// MEMIT: added to layer `l`'s residual output; the target is the residual stream.
    Residual(usize),
}

/// Why a fact's target optimisation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    /// The loss fell below 0.05.
    Converged,
    /// Most-probable early stopping: the new target became the most probable continuation on
    /// every rewriting prompt.
    MostProbable,
    /// The step cap (`v_steps`) was reached.
    StepCap,
}

/// The result of a target-vector optimisation.
#[derive(Clone, Debug)]
pub struct Target {
    /// The vector to add at the edit point `[hidden]` (f64).
    pub delta: Vec<f64>,
    /// The value at the edit point before the edit, for the raw prompt `[hidden]`.
    pub init: Vec<f64>,
    /// The raw prompt's MLP key `[intermediate]` and MLP output `[hidden]` at the edited layer
    /// before the edit (f64).
    pub key: Vec<f64>,
    pub value: Vec<f64>,
    /// Adam steps taken: `delta` is the vector after this many updates, the one the loss and the
    /// stopping rule were last evaluated at (at the step cap, the update after the last
    /// evaluation is kept too).
    pub steps: usize,
    pub loss: f64,
    pub stop: Stop,
}

/// One fact's prompts for [`optimize`]: the rewriting prompts (with targets) and the essence prompt.
pub struct FactPrompts {
    pub rewriting: Vec<Prompt>,
    pub essence: Prompt,
}

/// Optimises, for each fact, a vector δ added at the subject's last token (at `edit`) of every
/// one of its prompts so that the rewriting prompts predict their targets: mean target NLL +
/// `kl_factor`·KL(now ‖ before) on the essence prompt + `weight_decay`·‖δ‖/‖init‖², Adam, ‖δ‖
/// clamped to `clamp_norm`·‖init‖, stopping a fact once its loss is below 0.05 or, with
/// `early_stop = mpes`, at the first step where every target token is the most probable token
/// (ties included) on every rewriting prompt, given the prompt and the target tokens before it
/// (MPES, Gupta et al. 2025, arXiv:2502.01636: the paper checks the single next token; a
/// multi-token target must win at each of its positions). The criterion is checked on the same
/// pass as the loss, before the step's update, so a fact already most probable keeps δ = 0.
/// Either way at most `v_steps` steps are taken.
///
/// Facts are independent (separate sequences, separate rows of δ, element-wise Adam), so they
/// run together in one batch; a finished fact's row is frozen. Nothing before the subject's last
/// token depends on δ: each prompt's prefix runs once into a KV cache, and each step runs only
/// the suffixes through the layers after the edit point.
pub fn optimize(model: &Model, facts: &[FactPrompts], edit: Edit, hp: &Hparams) -> Result<Vec<Target>> {
    let layer = match edit {
        Edit::MlpOut(l) | Edit::Residual(l) => l,
    };
    let dev = model.device();
    let nf = facts.len();
    // Rows: each fact's rewriting prompts, then its essence prompt.
    let mut all: Vec<&Prompt> = Vec::new();
    let mut row_fact: Vec<u32> = Vec::new();
    let mut first_row = Vec::new();
    let mut essence_rows = Vec::new();
    for (f, fp) in facts.iter().enumerate() {
        first_row.push(all.len());
        all.extend(fp.rewriting.iter());
        essence_rows.push((all.len(), 0));
        all.push(&fp.essence);
        row_fact.extend(std::iter::repeat_n(f as u32, fp.rewriting.len() + 1));
    }
    let prefixes: Vec<Vec<u32>> = all.iter().map(|p| p.ids[..p.lookup].to_vec()).collect();
    let suffix = Batch::right_padded(&all.iter().map(|p| p.ids[p.lookup..].to_vec()).collect::<Vec<_>>());
    let mut prefix_cache = KvCache::default();
    if prefixes.iter().any(|p| !p.is_empty()) {
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut prefix_cache))?;
    }
    // In suffix coordinates the subject's last token is position 0 of every row.
    let at: Vec<_> = (0..all.len()).map(|i| (i, 0)).collect();
    let (mut target_rows, mut target_ids, mut target_weight) = (Vec::new(), Vec::new(), Vec::new());
    let mut target_fact = vec![0f32; 0];
    let mut target_owner = Vec::new();
    for (f, fp) in facts.iter().enumerate() {
        for (i, p) in fp.rewriting.iter().enumerate() {
            for &(pos, id) in &p.targets {
                target_rows.push((first_row[f] + i, pos - p.lookup));
                target_ids.push(id);
                target_weight.push((1.0 / (p.targets.len() * fp.rewriting.len()) as f64) as f32);
                target_fact.extend((0..nf).map(|g| (g == f) as u8 as f32));
                target_owner.push(f);
            }
        }
    }
    let n = target_rows.len();

    // The unedited pass: the resume state after `layer`, the values at the edit point, the KL anchors.
    let hooks = Hooks { keys: vec![layer], residuals: vec![layer], mlp_outputs: vec![layer], ..Hooks::default() };
    let base = model.forward(&suffix, &hooks, Some(&mut prefix_cache.clone()))?;
    let resume = base.residuals[&layer].detach();
    let source = match edit {
        Edit::MlpOut(_) => &base.mlp_outputs[&layer],
        Edit::Residual(_) => &resume,
    };
    let raw_rows = |x: &Tensor| -> Result<Vec<Vec<f64>>> { first_row.iter().map(|&r| Ok(x.i((r, 0))?.to_dtype(DType::F64)?.to_vec1()?)).collect() };
    let inits = raw_rows(source)?;
    let (keys, outputs) = (raw_rows(&base.keys[&layer])?, raw_rows(&base.mlp_outputs[&layer])?);
    let init_norms: Vec<f64> = inits.iter().map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let anchor = ops::log_softmax(&model.logits(&rows(&base.hidden, &essence_rows)?)?)?.detach();

    let d = model.config.hidden_size;
    let delta = Var::zeros((nf, d), DType::F32, dev)?;
    let mut adam = AdamW::new(vec![delta.clone()], ParamsAdamW { lr: hp.v_lr, weight_decay: 0.0, ..Default::default() })?;
    let row_fact = Tensor::from_vec(row_fact, all.len(), dev)?;
    let ids = Tensor::from_vec(target_ids, (n, 1), dev)?;
    let weight = Tensor::from_vec(target_weight, n, dev)?;
    // [facts, target rows]: sums each fact's weighted target log-probabilities.
    let by_fact = Tensor::from_vec(target_fact, (n, nf), dev)?.t()?.contiguous()?;
    let decay = Tensor::from_vec(init_norms.iter().map(|v| (hp.v_weight_decay / (v * v)) as f32).collect::<Vec<_>>(), nf, dev)?;
    let mut wanted = target_rows.clone();
    wanted.extend(&essence_rows);
    let mut done: Vec<Option<Stopped>> = vec![None; nf];
    let mut last_loss = vec![f64::NAN; nf];
    let mpes = hp.early_stop == EarlyStop::Mpes;
    for step in 0..hp.v_steps {
        let rows_delta = delta.as_tensor().index_select(&row_fact, 0)?;
        let x = match edit {
            Edit::MlpOut(_) => model.add_to_mlp_output(layer, &resume, &base.mlp_outputs[&layer], &at, &rows_delta)?,
            Edit::Residual(_) => model::add_at(&resume, &at, &rows_delta)?,
        };
        let hidden = if layer + 1 < model.config.num_layers {
            let hooks = Hooks { resume: Some((layer + 1, x)), ..Hooks::default() };
            model.forward(&suffix, &hooks, Some(&mut prefix_cache.clone()))?.hidden
        } else {
            x
        };
        let lp = ops::log_softmax(&model.logits(&rows(&hidden, &wanted)?)?)?;
        let target_lp = lp.narrow(0, 0, n)?.gather(&ids, 1)?;
        // MPES: facts all of whose target tokens are the most probable ones.
        let mut most_probable = vec![mpes; nf];
        if mpes {
            let best: Vec<f32> = lp.narrow(0, 0, n)?.max_keepdim(1)?.squeeze(1)?.to_vec1()?;
            let own: Vec<f32> = target_lp.squeeze(1)?.to_vec1()?;
            for ((b, o), &f) in best.iter().zip(&own).zip(&target_owner) {
                most_probable[f] &= o >= b;
            }
        }
        let picked = (target_lp.squeeze(1)? * &weight)?;
        let nll = by_fact.matmul(&picked.unsqueeze(1)?)?.squeeze(1)?.neg()?;
        let now = lp.narrow(0, n, nf)?;
        let kl = (now.exp()? * (&now - &anchor)?)?.sum(1)?;
        // ‖δ‖ with a zero-safe gradient (δ starts at 0, where √ has none).
        let norm = (delta.as_tensor().sqr()?.sum(1)? + 1e-24)?.sqrt()?;
        let losses = ((nll + (kl * hp.kl_factor)?)? + (norm * &decay)?)?;
        let values: Vec<f32> = losses.to_vec1()?;
        let current: Vec<f32> = delta.as_tensor().flatten_all()?.to_vec1()?;
        let mut active = vec![0f32; nf];
        for f in 0..nf {
            last_loss[f] = values[f] as f64;
            let stop = match ((values[f] as f64) < 5e-2, most_probable[f]) {
                (true, _) => Some(Stop::Converged),
                (false, true) => Some(Stop::MostProbable),
                (false, false) => None,
            };
            if let (None, Some(stop)) = (&done[f], stop) {
                done[f] = Some(Stopped { step, loss: values[f] as f64, delta: current[f * d..(f + 1) * d].to_vec(), stop });
            }
            active[f] = done[f].is_none() as u8 as f32;
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        let loss = (losses * Tensor::from_vec(active, nf, dev)?)?.sum_all()?;
        adam.backward_step(&loss)?;
        // Finished facts keep their δ (Adam's momentum would move them); the rest are clamped.
        let mut next: Vec<f32> = delta.as_tensor().flatten_all()?.to_vec1()?;
        for f in 0..nf {
            let row = &mut next[f * d..(f + 1) * d];
            match &done[f] {
                Some(stopped) => row.copy_from_slice(&stopped.delta),
                None => {
                    let norm = row.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
                    let max = hp.clamp_norm * init_norms[f];
                    if norm > max {
                        row.iter_mut().for_each(|x| *x = (*x as f64 * max / norm) as f32);
                    }
                }
            }
        }
        delta.set(&Tensor::from_vec(next, (nf, d), dev)?)?;
    }
    let finals: Vec<f32> = delta.as_tensor().flatten_all()?.to_vec1()?;
    Ok((0..nf)
        .map(|f| {
            let (steps, loss, row, stop) = match &done[f] {
                Some(s) => (s.step, s.loss, s.delta.clone(), s.stop),
                None => (hp.v_steps, last_loss[f], finals[f * d..(f + 1) * d].to_vec(), Stop::StepCap),
            };
            let delta = row.iter().map(|&x| x as f64).collect();
            Target { delta, init: inits[f].clone(), key: keys[f].clone(), value: outputs[f].clone(), steps, loss, stop }
        })
        .collect())
}

/// A fact whose optimisation stopped: at which step, its loss there, δ then, and why.
#[derive(Clone)]
struct Stopped {
    step: usize,
    loss: f64,
    delta: Vec<f32>,
    stop: Stop,
}

/// Mean per-token log-probability of `target` after each prompt, on the current model:
/// the score evaluations compare.
pub fn target_logprob(model: &Model, prompts: &[Vec<u32>], target: &[u32]) -> Result<Vec<f64>> {
    let seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().chain(&target[..target.len() - 1]).copied().collect()).collect();
    let batch = Batch::right_padded(&seqs);
    let hidden = model.forward(&batch, &Hooks::default(), None)?.hidden;
    let rows_at: Vec<(usize, usize)> = prompts.iter().enumerate().flat_map(|(i, p)| (0..target.len()).map(move |j| (i, p.len() - 1 + j))).collect();
    let lp = ops::log_softmax(&model.logits(&rows(&hidden, &rows_at)?)?)?;
    let ids = Tensor::from_vec(target.iter().cycle().take(rows_at.len()).copied().collect::<Vec<_>>(), (rows_at.len(), 1), model.device())?;
    let picked: Vec<f32> = lp.gather(&ids, 1)?.squeeze(1)?.to_vec1()?;
    Ok(picked.chunks(target.len()).map(|c| c.iter().map(|&x| x as f64).sum::<f64>() / target.len() as f64).collect())
}
