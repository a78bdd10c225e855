//! The edit loss and its gradient at the edited matrices as rank-one factors per token: for a
//! linear map `y_t = W·u_t`, `∂L/∂W = Σ_t δ_t·u_tᵀ` with `u_t` the map's input and `δ_t = ∂L/∂y_t`
//! (MEND, Mitchell et al. 2022, §3.1). Read from one forward and backward pass: the inputs are
//! the captured MLP keys, the gradients those of a zero vector added at the MLP output.

use crate::model::{ops, rows, Addition, Batch, Hooks, Model, Result, Site, WeightUpdate};
use candle_core::{DType, Tensor, Var, D};

/// A tokenized sequence and, for an edit prompt, the teacher-forced target tokens
/// `(position, id)`: the token at `position + 1` should be `id`.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<(usize, u32)>,
}

impl Sequence {
    /// `prompt` followed by the target tokens but the last (their predictions are scored).
    pub fn teacher_forced(prompt: Vec<u32>, target: &[u32]) -> Self {
        let mut ids = prompt;
        let targets = target.iter().enumerate().map(|(i, &id)| (ids.len() - 1 + i, id)).collect();
        ids.extend_from_slice(&target[..target.len().saturating_sub(1)]);
        Sequence { ids, targets }
    }
}

/// One edited layer's factors over the real tokens of a batch: `inputs [n, in]`, `grads [n, out]`.
pub struct LayerFactors {
    pub layer: usize,
    pub inputs: Tensor,
    pub grads: Tensor,
}

/// The mean negative log-likelihood of every target token of `seqs`, from the final hidden
/// states `[b, t, hidden]` of a batch of them.
pub fn target_nll(model: &Model, hidden: &Tensor, seqs: &[Sequence]) -> Result<Tensor> {
    let at: Vec<(usize, usize)> = seqs.iter().enumerate().flat_map(|(s, q)| q.targets.iter().map(move |&(p, _)| (s, p))).collect();
    let ids: Vec<u32> = seqs.iter().flat_map(|q| q.targets.iter().map(|&(_, id)| id)).collect();
    let logp = ops::log_softmax(&model.logits(&rows(hidden, &at)?)?)?;
    let ids = Tensor::from_vec(ids, (at.len(), 1), hidden.device())?;
    Ok((logp.gather(&ids, 1)?.mean_all()? * -1.0)?)
}

/// `KL(p ‖ q)` averaged over rows, for log-probabilities `[n, vocab]`.
pub fn kl(logp: &Tensor, logq: &Tensor) -> Result<Tensor> {
    Ok((logp.exp()? * (logp - logq)?)?.sum(D::Minus1)?.mean_all()?)
}

/// The `(sequence, position)` pairs of a batch's real tokens, row-major.
pub fn real_positions(batch: &Batch) -> Vec<(usize, usize)> {
    batch.mask.iter().enumerate().flat_map(|(s, m)| m.iter().enumerate().filter(|(_, &r)| r).map(move |(p, _)| (s, p))).collect()
}

/// The factors of the edit loss ([`target_nll`] of `seqs`) at the MLP output projection of each
/// of `layers`, over every real token of the sequences with targets.
/// `resume`: the residual stream entering the first of `layers` (from [`residual_before`]).
pub fn gradient_factors(model: &Model, seqs: &[Sequence], layers: &[usize], resume: Option<&Tensor>) -> Result<Vec<LayerFactors>> {
    let batch = Batch::right_padded(&seqs.iter().map(|q| q.ids.clone()).collect::<Vec<_>>());
    // Factors come from the sequences with targets; the others only share the pass.
    let at: Vec<(usize, usize)> = real_positions(&batch).into_iter().filter(|&(s, _)| !seqs[s].targets.is_empty()).collect();
    let dtype = model.dtype();
    let zeros = layers.iter().map(|_| Var::zeros((at.len(), model.config.hidden_size), dtype, model.device())).collect::<candle_core::Result<Vec<_>>>()?;
    let additions = layers.iter().zip(&zeros).map(|(&layer, z)| Addition { layer, site: Site::MlpOut, at: at.clone(), delta: z.as_tensor().clone() }).collect();
    let first = *layers.iter().min().expect("layers are checked non-empty");
    let hooks = Hooks { keys: layers.to_vec(), additions, resume: resume.map(|r| (first, r.clone())), ..Hooks::default() };
    let trace = model.forward(&batch, &hooks, None)?;
    let grads = target_nll(model, &trace.hidden, seqs)?.backward()?;
    layers
        .iter()
        .zip(&zeros)
        .map(|(l, z)| {
            let g = grads.get(z.as_tensor()).cloned().unwrap_or(z.zeros_like()?);
            Ok(LayerFactors { layer: *l, inputs: rows(&trace.keys[l], &at)?.detach(), grads: g.detach() })
        })
        .collect()
}

/// The residual stream entering layer `layer` for `batch` (`None` for layer 0), computed once
/// and shared by the passes that differ only from that layer on.
pub fn residual_before(model: &Model, batch: &Batch, layer: usize) -> Result<Option<Tensor>> {
    if layer == 0 {
        return Ok(None);
    }
    let hooks = Hooks { residuals: vec![layer - 1], stop_after: Some(layer - 1), ..Hooks::default() };
    Ok(Some(model.forward(batch, &hooks, None)?.residuals.remove(&(layer - 1)).expect("captured")))
}

/// The forward pass of `batch` from layer `first` (with `resume`, its input) with `updates`
/// applied to the MLP output projections: the final hidden states.
pub fn forward_with(model: &Model, batch: &Batch, first: usize, resume: Option<&Tensor>, updates: Vec<WeightUpdate>) -> Result<Tensor> {
    let hooks = Hooks { weight_updates: updates, resume: resume.map(|r| (first, r.clone())), ..Hooks::default() };
    Ok(model.forward(batch, &hooks, None)?.hidden)
}

/// Converts a tensor to f32 on the host, for storage or comparison.
pub fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}
