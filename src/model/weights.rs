//! Loaded weights in the one structure every family shares (decoder blocks, embeddings, final
//! norm and unembedding), read from a checkpoint by the family's table.

use super::config::Config;
use super::family::{Dims, MlpInputs, NormKind, Orientation, Projection, Qkv};
use super::ops::{Activation, Linear, Norm};
use super::Result;
use crate::checkpoint::Tensors;
use candle_core::{DType, Device, Tensor};

/// One decoder block, the same structure for every family.
#[derive(Clone)]
pub(crate) struct Block {
    pub attn_norm: Norm,
    pub q: Linear,
    /// Per-head norms of queries and keys (Qwen3).
    pub qk_norm: Option<(Norm, Norm)>,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Norm of the attention output before the residual sum (Gemma).
    pub post_attn_norm: Option<Norm>,
    /// The MLP's input norm; none where the MLP reads the attention norm's output (GPT-J).
    pub mlp_norm: Option<Norm>,
    /// Norm of the MLP output before the residual sum (Gemma).
    pub post_mlp_norm: Option<Norm>,
    /// Gate (if gated) and up projections, or the single input projection.
    pub mlp_in: MlpIn,
    pub down: Linear,
    pub act: Activation,
}

#[derive(Clone)]
pub(crate) enum MlpIn {
    /// `act(gate·x) ⊙ (up·x)` (SwiGLU).
    Gated { gate: Linear, up: Linear },
    /// `act(fc·x)`.
    Plain(Linear),
}

/// Loaded tensors of a family, in the common structure.
#[derive(Clone)]
pub(crate) struct Weights {
    pub embed: Tensor,
    pub positions: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    /// The unembedding, with its bias where the family stores one (GPT-J).
    pub unembed: Linear,
}

impl Block {
    pub(super) fn to_dtype(&self, dt: DType) -> candle_core::Result<Self> {
        Ok(Block {
            attn_norm: self.attn_norm.to_dtype(dt)?,
            q: self.q.to_dtype(dt)?,
            qk_norm: self.qk_norm.as_ref().map(|(q, k)| Ok::<_, candle_core::Error>((q.to_dtype(dt)?, k.to_dtype(dt)?))).transpose()?,
            k: self.k.to_dtype(dt)?,
            v: self.v.to_dtype(dt)?,
            o: self.o.to_dtype(dt)?,
            post_attn_norm: self.post_attn_norm.as_ref().map(|n| n.to_dtype(dt)).transpose()?,
            mlp_norm: self.mlp_norm.as_ref().map(|n| n.to_dtype(dt)).transpose()?,
            post_mlp_norm: self.post_mlp_norm.as_ref().map(|n| n.to_dtype(dt)).transpose()?,
            mlp_in: match &self.mlp_in {
                MlpIn::Gated { gate, up } => MlpIn::Gated { gate: gate.to_dtype(dt)?, up: up.to_dtype(dt)? },
                MlpIn::Plain(fc) => MlpIn::Plain(fc.to_dtype(dt)?),
            },
            down: self.down.to_dtype(dt)?,
            act: self.act,
        })
    }
}

/// Loads a stored tensor as f32, checking its shape.
fn load(ckpt: &dyn Tensors, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
    let t = ckpt.tensor_with_shape(name, shape)?;
    Ok(Tensor::from_vec(t.to_f32().into_owned(), shape, device)?)
}

/// Reads a checkpoint by its family's table.
struct Loader<'a> {
    ckpt: &'a dyn Tensors,
    dims: Dims,
    cfg: &'a Config,
    device: &'a Device,
}

impl Loader<'_> {
    /// `p` at `layer` in the `[out, in]` view, with its bias.
    fn linear(&self, p: &Projection, layer: usize) -> Result<Linear> {
        let view = p.view_shape(&self.dims);
        let weight = load(self.ckpt, &p.at(layer), &p.stored_shape(&self.dims), self.device)?;
        let weight = match p.orientation {
            Orientation::OutIn => weight,
            Orientation::InOut => weight.t()?.contiguous()?,
        };
        let bias = p.bias_at(layer).map(|b| load(self.ckpt, &b, &view[..1], self.device)).transpose()?;
        Ok(Linear { weight, bias })
    }

    fn norm(&self, p: &Projection, layer: usize) -> Result<Norm> {
        let Linear { weight, bias } = self.linear(p, layer)?;
        let eps = self.cfg.norm_eps;
        Ok(match (self.cfg.family.norm, bias) {
            (NormKind::Rms, None) => Norm::Rms { weight, eps },
            (NormKind::RmsPlusOne, None) => Norm::Rms { weight: (weight + 1.0)?, eps },
            (NormKind::Layer, Some(bias)) => Norm::Layer { weight, bias, eps },
            _ => unreachable!("a family's norms have biases exactly when they are LayerNorms"),
        })
    }

    fn block(&self, l: usize) -> Result<Block> {
        let f = self.cfg.family;
        let t = &f.block;
        let (q, k, v) = match &t.qkv {
            Qkv::Separate { q, k, v } => (self.linear(q, l)?, self.linear(k, l)?, self.linear(v, l)?),
            Qkv::Fused(p) => {
                let qkv = self.linear(p, l)?;
                let (q, kv) = (self.dims.heads * self.dims.head_dim, self.dims.kv_heads * self.dims.head_dim);
                (rows(&qkv, 0, q)?, rows(&qkv, q, kv)?, rows(&qkv, q + kv, kv)?)
            }
            Qkv::FusedPerHead(p) => {
                let qkv = self.linear(p, l)?;
                let part = |i| per_head_rows(&qkv, i, self.dims.heads, self.dims.head_dim);
                (part(0)?, part(1)?, part(2)?)
            }
        };
        let mlp_in = match &f.mlp_in {
            MlpInputs::Gated { gate, up } => MlpIn::Gated { gate: self.linear(gate, l)?, up: self.linear(up, l)? },
            MlpInputs::FusedGated(p) => {
                let (gate_up, ff) = (self.linear(p, l)?, self.dims.ff);
                MlpIn::Gated { gate: rows(&gate_up, 0, ff)?, up: rows(&gate_up, ff, ff)? }
            }
            MlpInputs::Plain(fc) => MlpIn::Plain(self.linear(fc, l)?),
        };
        Ok(Block {
            attn_norm: self.norm(&t.attn_norm, l)?,
            q,
            qk_norm: t.qk_norm.as_ref().map(|(qn, kn)| Ok::<_, super::Error>((self.norm(qn, l)?, self.norm(kn, l)?))).transpose()?,
            k,
            v,
            o: self.linear(&t.o, l)?,
            post_attn_norm: t.post_attn_norm.as_ref().map(|p| self.norm(p, l)).transpose()?,
            mlp_norm: t.mlp_norm.as_ref().map(|p| self.norm(p, l)).transpose()?,
            post_mlp_norm: t.post_mlp_norm.as_ref().map(|p| self.norm(p, l)).transpose()?,
            mlp_in,
            down: self.linear(&f.mlp_out, l)?,
            act: f.activation,
        })
    }
}

/// `len` output rows of a fused projection from row `start`, with their bias entries.
fn rows(fused: &Linear, start: usize, len: usize) -> Result<Linear> {
    Ok(Linear { weight: fused.weight.narrow(0, start, len)?.contiguous()?, bias: fused.bias.as_ref().map(|b| b.narrow(0, start, len)).transpose()? })
}

/// Part `part` (0 queries, 1 keys, 2 values) of a projection whose rows are `[heads, 3, head_dim]`.
fn per_head_rows(fused: &Linear, part: usize, heads: usize, head_dim: usize) -> Result<Linear> {
    let idx: Vec<u32> = (0..heads).flat_map(|h| (0..head_dim).map(move |d| ((3 * h + part) * head_dim + d) as u32)).collect();
    let idx = Tensor::from_vec(idx, heads * head_dim, fused.weight.device())?;
    Ok(Linear { weight: fused.weight.index_select(&idx, 0)?, bias: fused.bias.as_ref().map(|b| b.index_select(&idx, 0)).transpose()? })
}

/// Loads every tensor of `cfg`'s family table from `ckpt`, checking shapes against `cfg`.
pub(crate) fn load_weights(cfg: &Config, ckpt: &dyn Tensors, device: &Device) -> Result<Weights> {
    let f = cfg.family;
    let ld = Loader { ckpt, dims: cfg.dims(), cfg, device };
    let blocks = (0..cfg.num_layers).map(|l| ld.block(l)).collect::<Result<Vec<_>>>()?;
    let global = |p: &Projection| -> Result<Tensor> { Ok(ld.linear(p, 0)?.weight) };
    let embed = global(&f.embed)?;
    // Tied models may still store a copy of the head; a separate head is used whenever present.
    let unembed = if ckpt.contains(f.unembed.name) {
        ld.linear(&f.unembed, 0)?
    } else if cfg.tied_embeddings {
        Linear { weight: embed.clone(), bias: None }
    } else {
        return Err(crate::checkpoint::Error::MissingTensor { dir: ckpt.dir().to_path_buf(), name: f.unembed.name.into() }.into());
    };
    let positions = f.positions.as_ref().map(global).transpose()?;
    Ok(Weights { embed, positions, blocks, final_norm: ld.norm(&f.final_norm, 0)?, unembed })
}
