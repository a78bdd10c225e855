//! The model engine: Hugging Face checkpoints of the supported families, an exact forward pass
//! with the interventions editing needs (capture keys and residuals, add vectors, stop early,
//! differentiate with respect to an added vector), and generation with a KV cache.
//!
//! Each family is a table in its own file (`families/`, types in `family.rs`): every stored
//! tensor's name, GGUF name, orientation, shape and bias, and the block's optional parts. One
//! loader reads every table into the same `Block` structure (`weights.rs`), so nothing
//! downstream branches on the family.

mod attention;
mod config;
mod device;
mod families;
mod family;
mod forward;
mod generate;
pub mod ops;
mod weights;

pub use config::{Config, RopeConfig, RopeScaling, MAX_DIMENSION, MAX_LAYERS, MAX_POSITIONS};
pub use device::{default_device, device_name};
pub use family::{BlockTable, Dim, Dims, Family, NormKind, Orientation, Projection, Qkv};
pub use forward::{add_at, rows, Addition, Batch, Hooks, KvCache, Restore, Site, Trace, WeightUpdate};
pub use generate::{generate, Sampling};

use crate::checkpoint::{self, Checkpoint, Tensors};
use candle_core::{DType, Device, Tensor};
use ops::Rope;
use std::path::{Path, PathBuf};
use weights::Weights;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint folder is missing files or holds bad tensors.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// `config.json` names an architecture no family handles.
    #[error("{path}: unsupported model_type `{found}` (supported: {supported})")]
    UnknownArchitecture { path: PathBuf, found: String, supported: String },
    /// `config.json` lacks a field or holds an unusable value.
    #[error("{path}: `{key}` {problem}")]
    Config { path: PathBuf, key: String, problem: String },
    /// The caller asked for something the model cannot do.
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The supported families.
pub static FAMILIES: &[&Family] = &[
    &families::llama::FAMILY,
    &families::gpt2::FAMILY,
    &families::mistral::FAMILY,
    &families::qwen2::FAMILY,
    &families::qwen3::FAMILY,
    &families::phi3::FAMILY,
    &families::gemma2::FAMILY,
    &families::gemma3::FAMILY,
    &families::gemma3::MULTIMODAL,
    &families::gpt_neox::FAMILY,
    &families::gptj::FAMILY,
];

/// A loaded model, weights in f32 on one device. Cloning is cheap: the clone shares the
/// weight tensors, and replacing one in either (an edit) leaves the other as it was.
#[derive(Clone)]
pub struct Model {
    pub config: Config,
    dir: PathBuf,
    device: Device,
    w: Weights,
    rope: Option<Rope>,
    /// The sliding-window layers' rotary embedding, where it differs from `rope`.
    local_rope: Option<Rope>,
}

impl Model {
    /// Loads a Hugging Face folder onto the default device (CPU, or the first GPU with `cuda`).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &default_device()?)
    }

    pub fn load_on(dir: &Path, device: &Device) -> Result<Self> {
        let config = Config::read(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ckpt, device)
    }

    /// Builds the model from an opened checkpoint, or one with patches overlaid.
    pub fn from_checkpoint(config: Config, ckpt: &dyn Tensors, device: &Device) -> Result<Self> {
        config.check_layers(ckpt)?;
        let w = weights::load_weights(&config, ckpt, device)?;
        let layout = config.family.rotary;
        let rope = config.rope.as_ref().map(|r| Rope::new(r, layout));
        let local_rope = config.local_rope.as_ref().map(|r| Rope::new(r, layout));
        Ok(Model { config, dir: ckpt.dir().to_path_buf(), device: device.clone(), w, rope, local_rope })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The same model computing in `dtype` (f32 by default; f64 for numerical checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let w = &self.w;
        Ok(Model {
            config: self.config.clone(),
            dir: self.dir.clone(),
            device: self.device.clone(),
            w: Weights {
                embed: w.embed.to_dtype(dtype)?,
                positions: w.positions.as_ref().map(|p| p.to_dtype(dtype)).transpose()?,
                blocks: w.blocks.iter().map(|b| b.to_dtype(dtype)).collect::<candle_core::Result<_>>()?,
                final_norm: w.final_norm.to_dtype(dtype)?,
                unembed: w.unembed.to_dtype(dtype)?,
            },
            rope: self.rope.clone(),
            local_rope: self.local_rope.clone(),
        })
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.w.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The input embedding of token `id` `[hidden]`.
    pub fn token_embedding(&self, id: u32) -> Result<Tensor> {
        if id as usize >= self.config.vocab_size {
            return Err(Error::Input(format!("token id {id} out of range (vocabulary {})", self.config.vocab_size)));
        }
        Ok(self.w.embed.get(id as usize)?)
    }

    /// The standard deviation of the input embeddings' elements, over the whole vocabulary and
    /// after any embedding scale: the unit of causal tracing's noise.
    pub fn embedding_std(&self) -> Result<f64> {
        let e = self.w.embed.to_dtype(DType::F32)?;
        let mean = e.mean_all()?;
        let var: f32 = e.broadcast_sub(&mean)?.sqr()?.mean_all()?.to_scalar()?;
        let scale = if self.config.family.scaled_embedding { (self.config.hidden_size as f64).sqrt() } else { 1.0 };
        Ok((var as f64).sqrt() * scale)
    }

    /// The edit view `[out, in]` of layer `layer`'s MLP output projection.
    pub fn mlp_out_weight(&self, layer: usize) -> &Tensor {
        &self.w.blocks[layer].down.weight
    }

    /// Replaces layer `layer`'s MLP output projection (edit view `[out, in]`), e.g. to apply an
    /// update before reading the next layer's keys.
    pub fn set_mlp_out_weight(&mut self, layer: usize, weight: Tensor) -> Result<()> {
        let old = &self.w.blocks[layer].down.weight;
        if old.dims() != weight.dims() {
            return Err(Error::Input(format!("layer {layer}: new weight {:?} differs from {:?}", weight.dims(), old.dims())));
        }
        self.w.blocks[layer].down.weight = weight.to_dtype(self.dtype())?.to_device(&self.device)?;
        Ok(())
    }
}
