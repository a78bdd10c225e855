//! Loaded weights in the one structure every family shares: decoder blocks, embeddings,
//! final norm and unembedding, and the helpers family loaders read stored tensors with.

use super::config::Orientation;
use super::ops::{Activation, Linear, Norm};
use super::Result;
use crate::checkpoint::Tensors;
use candle_core::{DType, Device, Tensor};

/// One decoder block, the same structure for every family.
#[derive(Clone)]
pub(crate) struct Block {
    pub attn_norm: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Norm,
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
    pub unembed: Tensor,
}

impl Block {
    pub(super) fn to_dtype(&self, dt: DType) -> candle_core::Result<Self> {
        Ok(Block {
            attn_norm: self.attn_norm.to_dtype(dt)?,
            q: self.q.to_dtype(dt)?,
            k: self.k.to_dtype(dt)?,
            v: self.v.to_dtype(dt)?,
            o: self.o.to_dtype(dt)?,
            mlp_norm: self.mlp_norm.to_dtype(dt)?,
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
pub(crate) fn load(ckpt: &dyn Tensors, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
    let t = ckpt.tensor_with_shape(name, shape)?;
    Ok(Tensor::from_vec(t.to_f32().into_owned(), shape, device)?)
}

/// Loads a projection in the `[out, in]` view given its stored orientation.
pub(crate) fn load_proj(ckpt: &dyn Tensors, name: &str, out: usize, inp: usize, o: Orientation, device: &Device) -> Result<Tensor> {
    Ok(match o {
        Orientation::OutIn => load(ckpt, name, &[out, inp], device)?,
        Orientation::InOut => load(ckpt, name, &[inp, out], device)?.t()?.contiguous()?,
    })
}
