//! The forward pass: batches, the hooks that capture or change activations, the KV cache for
//! incremental decoding, and the blocks run over a batch.

use super::ops::{self, Norm, Rope, RopeAngles};
use super::weights::{Block, MlpIn};
use super::{attention, Error, Model, Result};
use candle_core::{Module, Tensor};
use std::collections::BTreeMap;

/// Where an added vector enters a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Added to the token embeddings (layer 0 only; after any embedding scale and position
    /// embeddings), where causal tracing adds its noise.
    Embedding,
    /// Added to the attention's output (after any post-attention norm), before the residual sum.
    AttnOut,
    /// Added to the MLP key, the input of the output projection (where KN attributes).
    Key,
    /// Added to the MLP's output, the down projection's, before any post-MLP norm and the
    /// residual sum (ROME's edit point).
    MlpOut,
    /// Added to the block's output, the residual stream (MEMIT's edit point).
    Residual,
}

/// A vector added at chosen token positions of one layer. Differentiable in `delta`.
#[derive(Clone, Debug)]
pub struct Addition {
    pub layer: usize,
    pub site: Site,
    /// `(sequence, position)` pairs in the batch.
    pub at: Vec<(usize, usize)>,
    /// `[hidden]` (the same vector everywhere) or `[at.len(), hidden]` (one per position).
    pub delta: Tensor,
}

/// States set to given values at chosen token positions of one layer, after its additions
/// (causal tracing's restoration of clean states).
#[derive(Clone, Debug)]
pub struct Restore {
    pub layer: usize,
    pub site: Site,
    /// `(sequence, position)` pairs in the batch.
    pub at: Vec<(usize, usize)>,
    /// `[at.len(), hidden]`: the state each position takes.
    pub values: Tensor,
}

/// A low-rank change `U·Vᵀ` to layer `layer`'s MLP output projection (edit view `[out, in]`):
/// the projection computes `(W + U·Vᵀ)·key` with ordinary matmuls, so the pass is
/// differentiable in `u [out, r]` and `v [in, r]` while `W` stays frozen (MEND's training).
#[derive(Clone, Debug)]
pub struct WeightUpdate {
    pub layer: usize,
    pub u: Tensor,
    pub v: Tensor,
}

/// What a forward pass should record or change.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Layers whose MLP keys (the input of the output projection) are captured.
    pub keys: Vec<usize>,
    /// Layers whose block outputs (residual stream) are captured.
    pub residuals: Vec<usize>,
    /// Layers whose MLP outputs (the down projection's, before any post-MLP norm) are captured.
    pub mlp_outputs: Vec<usize>,
    /// Layers whose attention outputs (as they join the residual stream) are captured.
    pub attn_outputs: Vec<usize>,
    /// Start at this layer from this residual stream `[batch, seq, hidden]` instead of the
    /// embeddings (what earlier layers computed, reused).
    pub resume: Option<(usize, Tensor)>,
    pub additions: Vec<Addition>,
    pub restores: Vec<Restore>,
    pub weight_updates: Vec<WeightUpdate>,
    /// Run layers `0..=stop_after` only.
    pub stop_after: Option<usize>,
}

/// What a forward pass recorded.
pub struct Trace {
    /// Layer → keys `[batch, seq, intermediate]`.
    pub keys: BTreeMap<usize, Tensor>,
    /// Layer → block outputs `[batch, seq, hidden]`.
    pub residuals: BTreeMap<usize, Tensor>,
    /// Layer → MLP outputs (before any post-MLP norm) `[batch, seq, hidden]`.
    pub mlp_outputs: BTreeMap<usize, Tensor>,
    /// Layer → attention outputs `[batch, seq, hidden]`.
    pub attn_outputs: BTreeMap<usize, Tensor>,
    /// The residual stream after the last layer run, before the final norm `[batch, seq, hidden]`.
    pub hidden: Tensor,
}

/// A rectangular batch of token ids with a mask of real (non-pad) tokens.
#[derive(Clone, Debug)]
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<bool>>,
}

impl Batch {
    /// Sequences padded on the right (for scoring: positions stay 0..len).
    pub fn right_padded(seqs: &[Vec<u32>]) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids = seqs.iter().map(|s| s.iter().copied().chain(std::iter::repeat(0)).take(t).collect()).collect();
        let mask = seqs.iter().map(|s| (0..t).map(|i| i < s.len()).collect()).collect();
        Batch { ids, mask }
    }

    /// Sequences padded on the left (for generation: every sequence ends at the last column).
    pub fn left_padded(seqs: &[Vec<u32>]) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids = seqs.iter().map(|s| std::iter::repeat_n(0, t - s.len()).chain(s.iter().copied()).collect()).collect();
        let mask = seqs.iter().map(|s| (0..t).map(|i| i >= t - s.len()).collect()).collect();
        Batch { ids, mask }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }
}

/// Keys and values of earlier positions, per layer, for incremental decoding. Cloning is
/// cheap (tensors are shared), so one prefix can be continued many ways.
#[derive(Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// Which cached positions are real tokens, per sequence.
    mask: Vec<Vec<bool>>,
}

impl KvCache {
    /// Whether the cache holds no sequences (no pass has filled it).
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }

    /// The cache of sequences `rows` (repeats allowed), in that order: one cached prefix
    /// continued several ways in one batch.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.mask.len()) {
            return Err(Error::Input(format!("cache row {bad} out of range: the cache holds {} sequences", self.mask.len())));
        }
        let pick = |t: &Tensor| -> Result<Tensor> {
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), t.device())?;
            Ok(t.contiguous()?.index_select(&idx, 0)?)
        };
        let kv = self.kv.iter().map(|slot| slot.as_ref().map(|(k, v)| Ok((pick(k)?, pick(v)?))).transpose()).collect::<Result<_>>()?;
        Ok(KvCache { kv, mask: rows.iter().map(|&r| self.mask[r].clone()).collect() })
    }
}

impl Model {
    /// Runs the blocks over `batch`, applying `hooks`; with a cache, continues after its positions.
    pub fn forward(&self, batch: &Batch, hooks: &Hooks, mut cache: Option<&mut KvCache>) -> Result<Trace> {
        let cfg = &self.config;
        let (b, t) = (batch.len(), batch.seq_len());
        if b == 0 || t == 0 {
            return Err(Error::Input("empty batch".into()));
        }
        let last = hooks.stop_after.unwrap_or(cfg.num_layers - 1);
        if last >= cfg.num_layers {
            return Err(Error::Input(format!("layer {last} out of range: the model has {} layers", cfg.num_layers)));
        }
        let first = hooks.resume.as_ref().map_or(0, |(l, _)| *l);
        let hooked = hooks
            .keys
            .iter()
            .chain(&hooks.residuals)
            .chain(&hooks.mlp_outputs)
            .chain(&hooks.attn_outputs)
            .chain(hooks.additions.iter().map(|a| &a.layer))
            .chain(hooks.restores.iter().map(|r| &r.layer))
            .chain(hooks.weight_updates.iter().map(|u| &u.layer));
        for l in hooked {
            if *l > last || *l < first {
                return Err(Error::Input(format!("hook at layer {l} but the pass runs layers {first}..={last}")));
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.kv.is_empty() {
                c.kv = vec![None; cfg.num_layers];
                c.mask = vec![Vec::new(); b];
            } else if c.mask.len() != b {
                return Err(Error::Input(format!("cache holds {} sequences, batch has {b}", c.mask.len())));
            }
        }
        let past_mask = cache.as_deref().map(|c| c.mask.clone()).unwrap_or_else(|| vec![Vec::new(); b]);
        let layers = first..=last;
        let sliding = layers.clone().any(|l| cfg.is_sliding(l));
        let full = layers.clone().any(|l| !cfg.is_sliding(l));
        let (positions, full_bias, sliding_bias) = self.positions_and_bias(batch, &past_mask, full, sliding)?;
        let angles = |rope: Option<&Rope>| rope.map(|r| r.angles(&positions, (b, t), self.dtype(), &self.device)).transpose();
        let global_angles = angles(self.rope.as_ref())?;
        let local_angles = if sliding { angles(self.local_rope.as_ref())? } else { None };

        let flat_ids: Vec<u32> = batch.ids.iter().flatten().copied().collect();
        if let Some(&bad) = flat_ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("token id {bad} out of range (vocabulary {})", cfg.vocab_size)));
        }
        let x = match &hooks.resume {
            Some((_, hidden)) if hidden.dims() != [b, t, cfg.hidden_size] => {
                return Err(Error::Input(format!("resume state {:?} does not fit the batch [{b}, {t}]", hidden.dims())));
            }
            Some((_, hidden)) => hidden.clone(),
            None => {
                let ids = Tensor::from_vec(flat_ids, b * t, &self.device)?;
                let mut x = self.w.embed.index_select(&ids, 0)?.reshape((b, t, cfg.hidden_size))?;
                if cfg.family.scaled_embedding {
                    // As transformers: the scale rounded to the weights' dtype.
                    x = (x * (cfg.hidden_size as f64).sqrt() as f32 as f64)?;
                }
                match &self.w.positions {
                    Some(pos) => {
                        let at = Tensor::from_vec(positions.clone(), b * t, &self.device)?;
                        (x + pos.index_select(&at, 0)?.reshape((b, t, cfg.hidden_size))?)?
                    }
                    None => x,
                }
            }
        };
        if hooks
            .additions
            .iter()
            .map(|a| (a.site, a.layer))
            .chain(hooks.restores.iter().map(|r| (r.site, r.layer)))
            .any(|(s, l)| s == Site::Embedding && (l != 0 || first != 0))
        {
            return Err(Error::Input("a change to the embeddings must be at layer 0, in a pass that starts there".into()));
        }
        let mut x = add_vectors(x, hooks, 0, Site::Embedding)?;

        let mut trace =
            Trace { keys: BTreeMap::new(), residuals: BTreeMap::new(), mlp_outputs: BTreeMap::new(), attn_outputs: BTreeMap::new(), hidden: x.clone() };
        for (l, block) in self.w.blocks.iter().enumerate().take(last + 1).skip(first) {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.kv[l]);
            let (bias, angles) = match (cfg.is_sliding(l), &sliding_bias, &full_bias) {
                (true, Some(bias), _) => (bias, local_angles.as_ref().or(global_angles.as_ref())),
                (false, _, Some(bias)) => (bias, global_angles.as_ref()),
                _ => unreachable!("the biases of the layers run are built"),
            };
            let normed = block.attn_norm.forward(&x)?;
            let attn = self.attention(block, &normed, angles, bias, layer_cache)?;
            let attn = add_vectors(post_norm(&block.post_attn_norm, attn)?, hooks, l, Site::AttnOut)?;
            if hooks.attn_outputs.contains(&l) {
                trace.attn_outputs.insert(l, attn.clone());
            }
            // The MLP reads the block's input beside attention (a parallel block), or the sum after it.
            let after_attn = (&x + attn)?;
            let h = match (&block.mlp_norm, cfg.parallel_residual) {
                (None, _) => normed,
                (Some(norm), true) => norm.forward(&x)?,
                (Some(norm), false) => norm.forward(&after_attn)?,
            };
            x = after_attn;
            let key = match &block.mlp_in {
                MlpIn::Gated { gate, up } => block.act.gated(&gate.forward(&h)?, &up.forward(&h)?)?,
                MlpIn::Plain(fc) => block.act.apply(&fc.forward(&h)?)?,
            };
            let key = add_vectors(key, hooks, l, Site::Key)?;
            let mut mlp = block.down.forward(&key)?;
            for up in hooks.weight_updates.iter().filter(|u| u.layer == l) {
                mlp = (mlp + low_rank(&key, &up.u, &up.v)?)?;
            }
            if hooks.keys.contains(&l) {
                trace.keys.insert(l, key);
            }
            mlp = add_vectors(mlp, hooks, l, Site::MlpOut)?;
            if hooks.mlp_outputs.contains(&l) {
                trace.mlp_outputs.insert(l, mlp.clone());
            }
            x = add_vectors((x + post_norm(&block.post_mlp_norm, mlp)?)?, hooks, l, Site::Residual)?;
            if hooks.residuals.contains(&l) {
                trace.residuals.insert(l, x.clone());
            }
        }
        if let Some(c) = cache {
            for (m, new) in c.mask.iter_mut().zip(&batch.mask) {
                m.extend_from_slice(new);
            }
        }
        trace.hidden = x;
        Ok(trace)
    }

    /// Next-token logits from residual-stream states `[.., hidden]`: final norm, unembedding, and
    /// the family's soft-capping.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.w.unembed.forward(&self.w.final_norm.forward(hidden)?)?;
        Ok(match self.config.final_softcap {
            Some(c) => ops::softcap(&logits, c)?,
            None => logits,
        })
    }

    /// The residual stream after `layer` with `delta` added to its MLP output at `at` (as
    /// [`Site::MlpOut`] would), from an unedited pass's `residual` and `mlp` output there: the
    /// sum where the MLP output joins the residual as it is, through the post-MLP norm otherwise.
    /// Differentiable in `delta`.
    pub fn add_to_mlp_output(&self, layer: usize, residual: &Tensor, mlp: &Tensor, at: &[(usize, usize)], delta: &Tensor) -> Result<Tensor> {
        match &self.w.blocks[layer].post_mlp_norm {
            None => add_at(residual, at, delta),
            Some(norm) => Ok(((residual - norm.forward(mlp)?)? + norm.forward(&add_at(mlp, at, delta)?)?)?),
        }
    }

    /// Position ids `b × t`, row-major (counting real tokens only), and the additive attention
    /// biases `[b, 1, t, past + t]` (causal, pads masked) for `batch` after `past` cached
    /// positions: of full attention and of the sliding window (keys outside it masked too), each
    /// where asked for. A sequence longer than the model's context is refused before a bias, which
    /// grows with its square, is allocated.
    fn positions_and_bias(&self, batch: &Batch, past: &[Vec<bool>], full: bool, sliding: bool) -> Result<(Vec<u32>, Option<Tensor>, Option<Tensor>)> {
        let (b, t) = (batch.len(), batch.seq_len());
        if batch.mask.iter().any(|row| row.len() != t) {
            return Err(Error::Input("batch rows differ in length".into()));
        }
        let longest = batch.mask.iter().zip(past).map(|(row, past_row)| row.iter().chain(past_row).filter(|&&m| m).count()).max().unwrap_or(0);
        if longest > self.config.max_positions {
            return Err(Error::Input(format!("sequence of {longest} tokens exceeds the model's {} positions", self.config.max_positions)));
        }
        let mut positions = Vec::with_capacity(b * t);
        for (row, past_row) in batch.mask.iter().zip(past) {
            let mut seen = past_row.iter().filter(|&&m| m).count();
            for &real in row {
                positions.push(if real { seen } else { 0 } as u32);
                seen += real as usize;
            }
        }
        let full = full.then(|| self.bias(batch, past, None)).transpose()?;
        let sliding = sliding.then(|| self.bias(batch, past, self.config.sliding_window)).transpose()?;
        Ok((positions, full, sliding))
    }

    /// The additive attention bias `[b, 1, t, past + t]` of `batch` after `past`: causal, pads
    /// masked, and keys `window` or more positions back masked.
    fn bias(&self, batch: &Batch, past: &[Vec<bool>], window: Option<usize>) -> Result<Tensor> {
        let (b, t) = (batch.len(), batch.seq_len());
        let p = past.first().map_or(0, Vec::len);
        let mut bias = Vec::with_capacity(b * t * (p + t));
        for (row, past_row) in batch.mask.iter().zip(past) {
            let keys: Vec<bool> = past_row.iter().chain(row).copied().collect();
            for i in 0..row.len() {
                for (j, &k) in keys.iter().enumerate() {
                    let in_window = window.is_none_or(|w| p + i < j + w);
                    bias.push(if k && j <= p + i && in_window { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        // A query with no visible key (a pad row) would give NaN: let it see itself.
        for (qi, chunk) in bias.chunks_mut(p + t).enumerate() {
            if chunk.iter().all(|v| v.is_infinite()) {
                chunk[p + qi % t] = 0.0;
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, p + t), &self.device)?.to_dtype(self.dtype())?)
    }

    fn attention(&self, block: &Block, x: &Tensor, angles: Option<&RopeAngles>, bias: &Tensor, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let split = |y: Tensor, heads: usize| y.reshape((b, t, heads, hd))?.transpose(1, 2);
        let mut q = split(block.q.forward(x)?, nh)?;
        let mut k = split(block.k.forward(x)?, nkv)?;
        if let Some((q_norm, k_norm)) = &block.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let mut v = split(block.v.forward(x)?, nkv)?;
        if let Some(angles) = angles {
            q = Rope::apply(&q.contiguous()?, angles)?;
            k = Rope::apply(&k.contiguous()?, angles)?;
        }
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        if ![&q, &k, &v].iter().any(|y| y.track_op()) && attention::supports(&q) {
            let softcap = cfg.attn_softcap.map(|c| c as f32);
            return Ok(block.o.forward(&attention::attend(&q, &k, &v, bias, cfg.attn_scale as f32, softcap)?)?);
        }
        let rep = nh / nkv;
        let repeat = |y: Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            let (b, h, s, d) = y.dims4()?;
            y.unsqueeze(2)?.broadcast_as((b, h, rep, s, d))?.reshape((b, h * rep, s, d))
        };
        let (k, v) = (repeat(k)?.contiguous()?, repeat(v)?.contiguous()?);
        let mut scores = (q.contiguous()?.matmul(&k.t()?)? * cfg.attn_scale)?;
        if let Some(c) = cfg.attn_softcap {
            scores = ops::softcap(&scores, c)?;
        }
        let scores = scores.broadcast_add(bias)?;
        let probs = ops::softmax(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(block.o.forward(&out)?)
    }
}

/// `x` through the block's post-norm, where it has one.
fn post_norm(norm: &Option<Norm>, x: Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

/// Rows `(sequence, position)` of `x [b, t, d]` as `[n, d]`.
pub fn rows(x: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
    let (_, t, d) = x.dims3()?;
    let idx: Vec<u32> = at.iter().map(|&(s, p)| (s * t + p) as u32).collect();
    let idx = Tensor::from_vec(idx, at.len(), x.device())?;
    Ok(x.reshape(((), d))?.index_select(&idx, 0)?)
}

/// `U·Vᵀ` applied to `x [b, t, in]`: `(x·V)·Uᵀ` `[b, t, out]`.
fn low_rank(x: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, t, d_in) = x.dims3()?;
    let (d_out, r) = u.dims2()?;
    if v.dims() != [d_in, r] {
        return Err(Error::Input(format!("weight update factors {:?} and {:?} do not fit a [{d_out}, {d_in}] projection", u.dims(), v.dims())));
    }
    let y = x.reshape((b * t, d_in))?.matmul(&v.to_dtype(x.dtype())?)?.matmul(&u.to_dtype(x.dtype())?.t()?)?;
    Ok(y.reshape((b, t, d_out))?)
}

/// Adds the hooks' vectors for `(layer, site)` to `x [b, t, d]`, then sets the restored states.
fn add_vectors(x: Tensor, hooks: &Hooks, layer: usize, site: Site) -> Result<Tensor> {
    let mut x = x;
    for a in hooks.additions.iter().filter(|a| a.layer == layer && a.site == site) {
        x = add_at(&x, &a.at, &a.delta)?;
    }
    for r in hooks.restores.iter().filter(|r| r.layer == layer && r.site == site) {
        let now = rows(&x, &r.at)?;
        x = add_at(&x, &r.at, &(r.values.to_dtype(x.dtype())? - now.to_dtype(x.dtype())?)?)?;
    }
    Ok(x)
}

/// `x [b, t, d]` plus `delta` (`[hidden]`, or `[at.len(), hidden]`) at the `(sequence,
/// position)` pairs `at`; differentiable in both.
pub fn add_at(x: &Tensor, at: &[(usize, usize)], delta: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let n = at.len();
    let mut onehot = vec![0f32; b * t * n];
    for (i, &(s, p)) in at.iter().enumerate() {
        if s >= b || p >= t {
            return Err(Error::Input(format!("addition at ({s}, {p}) outside the batch [{b}, {t}]")));
        }
        onehot[(s * t + p) * n + i] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b * t, n), x.device())?.to_dtype(x.dtype())?;
    let delta = match delta.rank() {
        // Materialised: CUDA matmuls take no broadcast (zero-stride) operands.
        1 => delta.unsqueeze(0)?.broadcast_as((n, d))?.contiguous()?,
        _ => delta.contiguous()?,
    };
    let added = onehot.matmul(&delta.to_dtype(x.dtype())?)?.reshape((b, t, d))?;
    Ok((x + added)?)
}
