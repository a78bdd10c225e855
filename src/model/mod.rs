//! The model engine: Hugging Face checkpoints of the supported families, an exact forward pass
//! with the interventions editing needs (capture keys and residuals, add vectors, stop early,
//! differentiate with respect to an added vector), and generation with a KV cache.
//!
//! Each family lives in its own file and is described as data ([`Family`]): which stored tensors
//! are the MLP projections, the final norm and the unembedding, and how each is oriented. The
//! loaders turn every family into the same [`Block`] structure, so nothing downstream branches
//! on the family.

mod attention;
mod generate;
mod gpt2;
mod llama;
pub mod ops;

pub use generate::{generate, Sampling};

use crate::checkpoint::{self, Checkpoint, Tensors};
use candle_core::{DType, Device, Module, Tensor};
use ops::{Activation, Linear, Norm, Rope};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// How a stored projection matrix maps to the `[out, in]` view edits use (`out = W·k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Orientation {
    /// Stored `[out, in]` (torch `nn.Linear`).
    OutIn,
    /// Stored `[in, out]` (GPT-2's `Conv1D`): the transpose of the edit view.
    InOut,
}

/// A per-layer stored matrix: its name template (`{layer}` is replaced) and orientation.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Projection {
    pub name: &'static str,
    pub orientation: Orientation,
}

impl Projection {
    /// The stored tensor's name at `layer`.
    pub fn at(&self, layer: usize) -> String {
        self.name.replace("{layer}", &layer.to_string())
    }
}

/// A model family described as data.
#[derive(Debug, serde::Serialize)]
pub struct Family {
    pub name: &'static str,
    /// `model_type` values in `config.json` that belong to this family.
    pub model_types: &'static [&'static str],
    pub embed: &'static str,
    pub final_norm: &'static str,
    /// The unembedding, when stored separately; otherwise the embedding is tied.
    pub unembed: &'static str,
    /// The MLP's input projections (for Llama, gate then up).
    pub mlp_in: &'static [Projection],
    /// The MLP's output projection: the matrix ROME and MEMIT edit. Its input is the "key".
    pub mlp_out: Projection,
    /// Layers MEMIT edits by default.
    pub default_edit_layers: [usize; 5],
    /// KN's integrated-gradient steps by default (the peers' setting for the family).
    pub kn_steps: usize,
    #[serde(skip)]
    load: fn(&serde_json::Value, &Path) -> Result<Config>,
    #[serde(skip)]
    weights: fn(&Config, &dyn Tensors, &Device) -> Result<Weights>,
}

/// The supported families.
pub static FAMILIES: &[&Family] = &[&llama::FAMILY, &gpt2::FAMILY];

/// A model's dimensions, read from `config.json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub family: &'static Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f64,
    /// RoPE base, for families that rotate positions.
    pub rope_theta: Option<f64>,
    pub max_positions: usize,
    pub tied_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Reads `dir/config.json` and picks the family by `model_type`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(checkpoint::CONFIG);
        if !path.is_file() {
            return Err(checkpoint::Error::MissingConfig(dir.to_path_buf()).into());
        }
        Self::from_json(&checkpoint::read_json(&path)?, &path)
    }

    fn from_json(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let found = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("<missing>");
        let family = FAMILIES.iter().find(|f| f.model_types.contains(&found)).ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            found: found.to_string(),
            supported: FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect::<Vec<_>>().join(", "),
        })?;
        (family.load)(json, path)
    }
}

/// Typed access to `config.json` fields, naming the file and key in errors.
pub(crate) struct ConfigJson<'a> {
    pub json: &'a serde_json::Value,
    pub path: &'a Path,
}

impl ConfigJson<'_> {
    fn err(&self, key: &str, problem: &str) -> Error {
        Error::Config { path: self.path.to_path_buf(), key: key.to_string(), problem: problem.to_string() }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Err(self.err(key, "is missing")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.err(key, "must be a positive integer")),
            },
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| self.err(key, "must be a positive number")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "must be true or false")),
        }
    }

    pub fn str_or<'s>(&'s self, key: &str, default: &'s str) -> &'s str {
        self.json.get(key).and_then(|v| v.as_str()).unwrap_or(default)
    }

    /// Token ids: an integer or a list of integers.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        match self.json.get(key) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Rejects features this engine does not implement rather than computing something else.
    pub fn require(&self, key: &str, ok: bool, problem: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.err(key, problem))
        }
    }
}

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
    fn to_dtype(&self, dt: DType) -> candle_core::Result<Self> {
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

/// A loaded model, weights in f32 on one device. Cloning is cheap: the clone shares the
/// weight tensors, and replacing one in either (an edit) leaves the other as it was.
#[derive(Clone)]
pub struct Model {
    pub config: Config,
    dir: PathBuf,
    device: Device,
    w: Weights,
    rope: Option<Rope>,
}

/// Where an added vector enters a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Added to the MLP key, the input of the output projection (where KN attributes).
    Key,
    /// Added to the MLP's output, before the residual sum (ROME's edit point).
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

/// What a forward pass should record or change.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Layers whose MLP keys (the input of the output projection) are captured.
    pub keys: Vec<usize>,
    /// Layers whose block outputs (residual stream) are captured.
    pub residuals: Vec<usize>,
    /// Layers whose MLP outputs are captured.
    pub mlp_outputs: Vec<usize>,
    /// Start at this layer from this residual stream `[batch, seq, hidden]` instead of the
    /// embeddings (what earlier layers computed, reused).
    pub resume: Option<(usize, Tensor)>,
    pub additions: Vec<Addition>,
    /// Run layers `0..=stop_after` only.
    pub stop_after: Option<usize>,
}

/// What a forward pass recorded.
pub struct Trace {
    /// Layer → keys `[batch, seq, intermediate]`.
    pub keys: BTreeMap<usize, Tensor>,
    /// Layer → block outputs `[batch, seq, hidden]`.
    pub residuals: BTreeMap<usize, Tensor>,
    /// Layer → MLP outputs `[batch, seq, hidden]`.
    pub mlp_outputs: BTreeMap<usize, Tensor>,
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
        let w = (config.family.weights)(&config, ckpt, device)?;
        let rope = match config.rope_theta {
            Some(theta) => Some(Rope::new(config.head_dim, theta, config.max_positions, device)?),
            None => None,
        };
        Ok(Model { config, dir: ckpt.dir().to_path_buf(), device: device.clone(), w, rope })
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
        let hooked = hooks.keys.iter().chain(&hooks.residuals).chain(&hooks.mlp_outputs).chain(hooks.additions.iter().map(|a| &a.layer));
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
        let (positions, bias) = self.positions_and_bias(batch, &past_mask)?;

        let flat_ids: Vec<u32> = batch.ids.iter().flatten().copied().collect();
        if let Some(&bad) = flat_ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("token id {bad} out of range (vocabulary {})", cfg.vocab_size)));
        }
        let mut x = match &hooks.resume {
            Some((_, hidden)) if hidden.dims() != [b, t, cfg.hidden_size] => {
                return Err(Error::Input(format!("resume state {:?} does not fit the batch [{b}, {t}]", hidden.dims())));
            }
            Some((_, hidden)) => hidden.clone(),
            None => {
                let ids = Tensor::from_vec(flat_ids, b * t, &self.device)?;
                let x = self.w.embed.index_select(&ids, 0)?.reshape((b, t, cfg.hidden_size))?;
                match &self.w.positions {
                    Some(pos) => (x + pos.index_select(&positions.flatten_all()?, 0)?.reshape((b, t, cfg.hidden_size))?)?,
                    None => x,
                }
            }
        };

        let mut trace = Trace { keys: BTreeMap::new(), residuals: BTreeMap::new(), mlp_outputs: BTreeMap::new(), hidden: x.clone() };
        for (l, block) in self.w.blocks.iter().enumerate().take(last + 1).skip(first) {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.kv[l]);
            let attn = self.attention(block, &block.attn_norm.forward(&x)?, &positions, &bias, layer_cache)?;
            x = (x + attn)?;
            let h = block.mlp_norm.forward(&x)?;
            let key = match &block.mlp_in {
                MlpIn::Gated { gate, up } => block.act.gated(&gate.forward(&h)?, &up.forward(&h)?)?,
                MlpIn::Plain(fc) => block.act.apply(&fc.forward(&h)?)?,
            };
            let key = add_vectors(key, hooks, l, Site::Key)?;
            let mut mlp = block.down.forward(&key)?;
            if hooks.keys.contains(&l) {
                trace.keys.insert(l, key);
            }
            mlp = add_vectors(mlp, hooks, l, Site::MlpOut)?;
            if hooks.mlp_outputs.contains(&l) {
                trace.mlp_outputs.insert(l, mlp.clone());
            }
            x = add_vectors((x + mlp)?, hooks, l, Site::Residual)?;
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

    /// Next-token logits from residual-stream states `[.., hidden]`: final norm, then unembedding.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = Linear { weight: self.w.unembed.clone(), bias: None };
        Ok(head.forward(&self.w.final_norm.forward(hidden)?)?)
    }

    /// Position ids `[b, t]` (counting real tokens only) and the additive attention bias
    /// `[b, 1, t, past + t]` (causal, pads masked) for `batch` after `past` cached positions.
    fn positions_and_bias(&self, batch: &Batch, past: &[Vec<bool>]) -> Result<(Tensor, Tensor)> {
        let (b, t) = (batch.len(), batch.seq_len());
        let p = past.first().map_or(0, Vec::len);
        let mut positions = Vec::with_capacity(b * t);
        let mut bias = Vec::with_capacity(b * t * (p + t));
        for (row, past_row) in batch.mask.iter().zip(past) {
            if row.len() != t {
                return Err(Error::Input("batch rows differ in length".into()));
            }
            let keys: Vec<bool> = past_row.iter().chain(row).copied().collect();
            let mut seen = past_row.iter().filter(|&&m| m).count();
            for (i, &real) in row.iter().enumerate() {
                positions.push(if real { seen } else { 0 } as u32);
                seen += real as usize;
                for (j, &k) in keys.iter().enumerate() {
                    bias.push(if k && j <= p + i { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let max = positions.iter().max().copied().unwrap_or(0) as usize;
        if max >= self.config.max_positions {
            return Err(Error::Input(format!("sequence of {} tokens exceeds the model's {} positions", max + 1, self.config.max_positions)));
        }
        // A query with no visible key (a pad row) would give NaN: let it see itself.
        for (qi, chunk) in bias.chunks_mut(p + t).enumerate() {
            if chunk.iter().all(|v| v.is_infinite()) {
                chunk[p + qi % t] = 0.0;
            }
        }
        Ok((Tensor::from_vec(positions, (b, t), &self.device)?, Tensor::from_vec(bias, (b, 1, t, p + t), &self.device)?.to_dtype(self.dtype())?))
    }

    fn attention(&self, block: &Block, x: &Tensor, positions: &Tensor, bias: &Tensor, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let split = |y: Tensor, heads: usize| y.reshape((b, t, heads, hd))?.transpose(1, 2);
        let mut q = split(block.q.forward(x)?, nh)?;
        let mut k = split(block.k.forward(x)?, nkv)?;
        let mut v = split(block.v.forward(x)?, nkv)?;
        if let Some(rope) = &self.rope {
            q = rope.apply(&q.contiguous()?, positions)?;
            k = rope.apply(&k.contiguous()?, positions)?;
        }
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        if ![&q, &k, &v].iter().any(|y| y.track_op()) && attention::supports(&q) {
            return Ok(block.o.forward(&attention::attend(&q, &k, &v, bias)?)?);
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
        let scores = (q.contiguous()?.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
        let probs = ops::softmax(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(block.o.forward(&out)?)
    }
}

/// Adds the hooks' vectors for `(layer, site)` to `x [b, t, d]`.
fn add_vectors(x: Tensor, hooks: &Hooks, layer: usize, site: Site) -> Result<Tensor> {
    let mut x = x;
    for a in hooks.additions.iter().filter(|a| a.layer == layer && a.site == site) {
        x = add_at(&x, &a.at, &a.delta)?;
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

/// The device forward passes run on: `FACTPATCH_DEVICE` (`cpu`, `cuda` or `cuda:N`) when set,
/// else the first CUDA device when built with `cuda` and one opens, else the CPU.
pub fn default_device() -> Result<Device> {
    device_from(std::env::var("FACTPATCH_DEVICE").ok().as_deref())
}

fn device_from(spec: Option<&str>) -> Result<Device> {
    let bad = |s: &str, why: String| Error::Input(format!("FACTPATCH_DEVICE={s}: {why}"));
    match spec {
        None | Some("") if cfg!(feature = "cuda") => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        None | Some("") | Some("cpu") => Ok(Device::Cpu),
        Some(s) => {
            let ordinal = s
                .strip_prefix("cuda")
                .and_then(|n| if n.is_empty() { Some(0) } else { n.strip_prefix(':')?.parse().ok() })
                .ok_or_else(|| bad(s, "expected cpu, cuda or cuda:N".into()))?;
            Device::new_cuda(ordinal).map_err(|e| bad(s, e.to_string()))
        }
    }
}

/// `cpu`, `cuda:N` or `metal:N`: where a model runs, for reports.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec() {
        assert!(device_from(Some("cpu")).unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            assert!(device_from(None).unwrap().is_cpu());
            let e = device_from(Some("cuda:0")).unwrap_err().to_string();
            assert!(e.starts_with("FACTPATCH_DEVICE=cuda:0: "), "{e}");
        }
        for bad in ["gpu", "cuda0", "cuda:x"] {
            let e = device_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }
}
