//! Knowledge neurons (Dai et al. 2022), as EasyEdit runs them: every MLP neuron's attribution to
//! the old answer by integrated gradients at the prompt's last token, over the request's prompt
//! in each context template; the neurons above a share of a prompt's largest attribution that
//! enough prompts pick have, in their output column, the old answer's embedding swapped for the
//! new one's, twice over. The destructive baseline: the change is the size of an embedding.

use super::{commit, stack, target, target_ids, Error, FactReport, Hparams, LayerUpdate, Result};
use crate::edit::request::Request;
use crate::model::{ops, Addition, Batch, Hooks, KvCache, Model, Site};
use crate::tokenize::Tokenizer;
use candle_core::{DType, Tensor, Var};
use ndarray::Array1;
use std::collections::BTreeMap;

/// Integrated-gradient attributions of `answer`, the token after each prompt, to the MLP
/// neurons of each of `layers` at the prompt's last token: `result[layer][prompt][neuron]` =
/// `a · mean_j ∂p(answer)/∂a |_(α_j a)`, with `α_j = (j + ½)/steps` (midpoint rule).
pub fn attributions(model: &Model, prompts: &[Vec<u32>], answer: u32, layers: &[usize], steps: usize) -> Result<Vec<Vec<Vec<f64>>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) || steps == 0 {
        return Err(Error::Hparams("KN needs non-empty prompts and at least one step".into()));
    }
    let np = prompts.len();
    // Earlier positions do not depend on the last token's neurons: they run once into a cache.
    let prefixes: Vec<Vec<u32>> = prompts.iter().map(|p| p[..p.len() - 1].to_vec()).collect();
    let lasts: Vec<Vec<u32>> = prompts.iter().map(|p| vec![p[p.len() - 1]]).collect();
    let mut cache = KvCache::default();
    if prefixes.iter().any(|p| !p.is_empty()) {
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut cache))?;
    }
    let inputs: Vec<usize> = layers.iter().filter(|&&l| l > 0).map(|&l| l - 1).collect();
    let hooks = Hooks { keys: layers.to_vec(), residuals: inputs, ..Hooks::default() };
    let base = model.forward(&Batch::right_padded(&lasts), &hooks, Some(&mut cache.clone()))?;

    let owner: Vec<usize> = (0..np * steps).map(|r| r / steps).collect();
    let owner_idx = Tensor::from_vec(owner.iter().map(|&o| o as u32).collect::<Vec<_>>(), owner.len(), model.device())?;
    let alphas: Vec<f64> = (0..np * steps).map(|r| ((r % steps) as f64 + 0.5) / steps as f64 - 1.0).collect();
    let alphas = Tensor::from_vec(alphas, (np * steps, 1), model.device())?.to_dtype(model.dtype())?;
    let rows = Batch::right_padded(&owner.iter().map(|&o| lasts[o].clone()).collect::<Vec<_>>());
    let at: Vec<(usize, usize)> = (0..np * steps).map(|r| (r, 0)).collect();
    let answer_ids = Tensor::from_vec(vec![answer; np * steps], (np * steps, 1), model.device())?;
    let mut out = Vec::with_capacity(layers.len());
    for &l in layers {
        // [prompts, neurons] at full activation; each row starts at α_j·a (added: (α_j − 1)·a).
        let act = base.keys[&l].squeeze(1)?;
        let start = act.index_select(&owner_idx, 0)?.broadcast_mul(&alphas)?;
        let shift = Var::from_tensor(&start)?;
        let resume = match l {
            0 => None,
            _ => Some((l, base.residuals[&(l - 1)].index_select(&owner_idx, 0)?)),
        };
        let hooks =
            Hooks { resume, additions: vec![Addition { layer: l, site: Site::Key, at: at.clone(), delta: shift.as_tensor().clone() }], ..Hooks::default() };
        let hidden = model.forward(&rows, &hooks, Some(&mut cache.select(&owner)?))?.hidden.squeeze(1)?;
        let prob = ops::log_softmax(&model.logits(&hidden)?)?.gather(&answer_ids, 1)?.exp()?.sum_all()?;
        let grads = prob.backward()?;
        let grad = grads.get(shift.as_tensor()).ok_or_else(|| Error::Hparams("KN: no gradient reached the neurons".into()))?;
        let d = grad.dim(1)?;
        let mean = (grad.reshape((np, steps, d))?.sum(1)? / steps as f64)?;
        out.push((mean * act)?.to_dtype(DType::F64)?.to_vec2()?);
    }
    Ok(out)
}

/// The neurons `(layer index, neuron)` that at least `share` of the prompts pick, a prompt
/// picking those whose attribution exceeds `threshold` × its largest.
pub fn select(scores: &[Vec<Vec<f64>>], threshold: f64, share: f64) -> Vec<(usize, usize)> {
    let np = scores.first().map_or(0, Vec::len);
    let mut votes: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for p in 0..np {
        let max = scores.iter().flat_map(|layer| layer[p].iter().copied()).fold(f64::NEG_INFINITY, f64::max);
        if max <= 0.0 {
            continue;
        }
        for (li, layer) in scores.iter().enumerate() {
            for (n, &s) in layer[p].iter().enumerate() {
                if s > threshold * max {
                    *votes.entry((li, n)).or_default() += 1;
                }
            }
        }
    }
    votes.into_iter().filter(|&(_, v)| v as f64 >= share * np as f64).map(|(k, _)| k).collect()
}

/// Edits one fact: attribution of the old answer (`target_true`'s first token, or the model's
/// prediction when the request has none), then `Δ = 2·(E[new] − E[old])` added to the output
/// column of every selected neuron: one rank-one update per layer that has any.
pub fn edit(model: &mut Model, tok: &Tokenizer, req: &Request, hp: &Hparams, templates: &[Vec<String>]) -> Result<(Vec<LayerUpdate>, FactReport)> {
    let kn = hp.required(hp.kn, "kn")?;
    let prompts: Vec<Vec<u32>> = templates
        .iter()
        .flatten()
        .map(|ctx| Ok(target::prompt(tok, &ctx.replacen("{}", &req.prompt, 1), &req.subject, None, req)?.ids))
        .collect::<Result<_>>()?;
    let new = target_ids(tok, req)?;
    let old = match &req.target_true {
        Some(t) => *tok
            .ids(&crate::edit::request::continuation(t))?
            .first()
            .ok_or_else(|| Error::Request { origin: req.origin.clone(), problem: "the true target tokenizes to nothing".into() })?,
        None => predicted(model, &prompts[0])?,
    };
    let scores = attributions(model, &prompts, old, &hp.layers, kn.steps)?;
    // No neuron passing the thresholds (as on a model earlier KN edits have wrecked, where
    // p(answer) and its gradients vanish) leaves the model as it is, as in the peers.
    let neurons = select(&scores, kn.threshold, kn.share);
    let embedding = |id: u32| -> Result<Array1<f64>> { Ok(Array1::from(model.token_embedding(id)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)) };
    let swap = (embedding(new[0])? - embedding(old)?) * 2.0;
    let u = stack(&[swap]);
    let mut updates = Vec::new();
    let width = model.mlp_out_weight(0).dim(1)?;
    for (li, &layer) in hp.layers.iter().enumerate() {
        let picked: Vec<usize> = neurons.iter().filter(|(l, _)| *l == li).map(|&(_, n)| n).collect();
        if picked.is_empty() {
            continue;
        }
        let mut v = Array1::<f64>::zeros(width);
        picked.iter().for_each(|&n| v[n] = 1.0);
        updates.push(commit(model, layer, &u, &stack(&[v]), hp.rect_k)?);
    }
    let nll = -target::target_logprob(model, &prompts[..1], &new)?[0];
    Ok((
        updates,
        FactReport { subject: req.subject.clone(), target_new: req.target_new.clone(), steps: kn.steps, loss: nll, stop: None, neurons: Some(neurons.len()) },
    ))
}

/// The model's most probable next token after `prompt`.
fn predicted(model: &Model, prompt: &[u32]) -> Result<u32> {
    let hidden = model.forward(&Batch::right_padded(&[prompt.to_vec()]), &Hooks::default(), None)?.hidden;
    let last = hidden.squeeze(0)?.get(prompt.len() - 1)?.unsqueeze(0)?;
    Ok(model.logits(&last)?.argmax(1)?.to_vec1::<u32>()?[0])
}
