//! Prompts, keys and target vectors: where the subject sits in each prompt, what the MLP key is
//! there, and which residual change makes the model say the new target.

use super::{Error, Hparams, Result};
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
    let lookup = tokenize::last_token_in(&enc.offsets, (start, start + subject.len())).ok_or_else(|| Error::Request {
        origin: req.origin.clone(),
        problem: format!("subject `{subject}` cannot be located among the tokens of `{text}`"),
    })?;
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
    /// ROME: added to layer `l`'s MLP output; the target is the MLP output.
    MlpOut(usize),
    /// MEMIT: added to layer `l`'s residual output; the target is the residual stream.
    Residual(usize),
}

/// The result of a target-vector optimisation.
#[derive(Clone, Debug)]
pub struct Target {
    /// The vector to add at the edit point `[hidden]` (f64).
    pub delta: Vec<f64>,
    /// The value at the edit point before the edit, for the raw prompt `[hidden]`.
    pub init: Vec<f64>,
    pub steps: usize,
    pub loss: f64,
}

/// Optimises a vector δ added at the subject's last token (at `edit`) of every prompt so that
/// the rewriting prompts predict their targets: mean target NLL + `kl_factor`·KL(now ‖ before)
/// on the essence prompt + `weight_decay`·‖δ‖/‖init‖², Adam, ‖δ‖ clamped to
/// `clamp_norm`·‖init‖. Nothing before the subject's last token depends on δ, so each prompt's
/// prefix runs once into a KV cache, and each step runs only the suffixes through the layers
/// after the edit point.
pub fn optimize(model: &Model, rewriting: &[Prompt], essence: &Prompt, edit: Edit, hp: &Hparams) -> Result<Target> {
    let layer = match edit {
        Edit::MlpOut(l) | Edit::Residual(l) => l,
    };
    let mut all: Vec<&Prompt> = rewriting.iter().collect();
    all.push(essence);
    let prefixes: Vec<Vec<u32>> = all.iter().map(|p| p.ids[..p.lookup].to_vec()).collect();
    let suffix = Batch::right_padded(&all.iter().map(|p| p.ids[p.lookup..].to_vec()).collect::<Vec<_>>());
    let mut prefix_cache = KvCache::default();
    if prefixes.iter().any(|p| !p.is_empty()) {
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut prefix_cache))?;
    }
    // In suffix coordinates the subject's last token is position 0 of every row.
    let at: Vec<_> = (0..all.len()).map(|i| (i, 0)).collect();
    let ess = (all.len() - 1, 0);
    let target_rows: Vec<(usize, usize)> =
        rewriting.iter().enumerate().flat_map(|(i, p)| p.targets.iter().map(move |&(pos, _)| (i, pos - p.lookup))).collect();
    let target_ids: Vec<u32> = rewriting.iter().flat_map(|p| p.targets.iter().map(|&(_, id)| id)).collect();
    let target_len: Vec<f64> = rewriting.iter().flat_map(|p| p.targets.iter().map(|_| p.targets.len() as f64)).collect();
    let dev = model.device();

    // The unedited pass: the resume state after `layer`, the value at the edit point, the KL anchor.
    let hooks = Hooks { residuals: vec![layer], mlp_outputs: vec![layer], ..Hooks::default() };
    let base = model.forward(&suffix, &hooks, Some(&mut prefix_cache.clone()))?;
    let resume = base.residuals[&layer].detach();
    let init = match edit {
        Edit::MlpOut(_) => base.mlp_outputs[&layer].i((0, 0))?,
        Edit::Residual(_) => resume.i((0, 0))?,
    };
    let init: Vec<f64> = init.to_dtype(DType::F64)?.to_vec1()?;
    let init_norm = init.iter().map(|x| x * x).sum::<f64>().sqrt();
    let anchor = ops::log_softmax(&model.logits(&rows(&base.hidden, &[ess])?)?)?.detach();

    let d = model.config.hidden_size;
    let delta = Var::zeros(d, DType::F32, dev)?;
    let mut adam = AdamW::new(vec![delta.clone()], ParamsAdamW { lr: hp.v_lr, weight_decay: 0.0, ..Default::default() })?;
    let ids = Tensor::from_vec(target_ids, (target_rows.len(), 1), dev)?;
    let inv_len = Tensor::from_vec(target_len.iter().map(|n| (1.0 / (n * rewriting.len() as f64)) as f32).collect::<Vec<_>>(), target_rows.len(), dev)?;
    let max_norm = hp.clamp_norm * init_norm;
    let mut wanted = target_rows.clone();
    wanted.push(ess);
    let (mut steps, mut loss_value) = (0, f64::NAN);
    for step in 0..hp.v_steps {
        let x = model::add_at(&resume, &at, delta.as_tensor())?;
        let hidden = if layer + 1 < model.config.num_layers {
            let hooks = Hooks { resume: Some((layer + 1, x)), ..Hooks::default() };
            model.forward(&suffix, &hooks, Some(&mut prefix_cache.clone()))?.hidden
        } else {
            x
        };
        let lp = ops::log_softmax(&model.logits(&rows(&hidden, &wanted)?)?)?;
        let n = target_rows.len();
        let nll = (lp.narrow(0, 0, n)?.gather(&ids, 1)?.squeeze(1)? * &inv_len)?.sum_all()?.neg()?;
        let now = lp.narrow(0, n, 1)?;
        let kl = (now.exp()? * (&now - &anchor)?)?.sum_all()?;
        // ‖δ‖ with a zero-safe gradient (δ starts at 0, where √ has none).
        let norm = (delta.as_tensor().sqr()?.sum_all()? + 1e-24)?.sqrt()?;
        let loss = ((nll + (kl * hp.kl_factor)?)? + (norm * (hp.v_weight_decay / (init_norm * init_norm)))?)?;
        loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        steps = step;
        if loss_value < 5e-2 {
            break;
        }
        adam.backward_step(&loss)?;
        let norm = delta.as_tensor().sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        if norm > max_norm {
            delta.set(&(delta.as_tensor() * (max_norm / norm))?)?;
        }
        steps = step + 1;
    }
    let delta: Vec<f64> = delta.as_tensor().to_dtype(DType::F64)?.to_vec1()?;
    Ok(Target { delta, init, steps, loss: loss_value })
}

/// Mean per-token log-probability of `target` after each prompt, on the current model:
/// the score evaluations compare.
pub fn target_logprob(model: &Model, prompts: &[Vec<u32>], target: &[u32]) -> Result<Vec<f64>> {
    let seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().chain(&target[..target.len() - 1]).copied().collect()).collect();
    let batch = Batch::right_padded(&seqs);
    let hidden = model.forward(&batch, &Hooks::default(), None)?.hidden;
    let rows_at: Vec<(usize, usize)> =
        prompts.iter().enumerate().flat_map(|(i, p)| (0..target.len()).map(move |j| (i, p.len() - 1 + j))).collect();
    let lp = ops::log_softmax(&model.logits(&rows(&hidden, &rows_at)?)?)?;
    let ids = Tensor::from_vec(target.iter().cycle().take(rows_at.len()).copied().collect::<Vec<_>>(), (rows_at.len(), 1), model.device())?;
    let picked: Vec<f32> = lp.gather(&ids, 1)?.squeeze(1)?.to_vec1()?;
    Ok(picked.chunks(target.len()).map(|c| c.iter().map(|&x| x as f64).sum::<f64>() / target.len() as f64).collect())
}
