//! A model's configuration: its family (which stored tensors are which, how they are
//! oriented) and its dimensions, read from `config.json`.

use super::weights::Weights;
use super::{Error, Result, FAMILIES};
use crate::checkpoint::{self, Tensors};
use candle_core::Device;
use std::path::Path;

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

    /// The layer whose stored tensor is `name`, if `name` is this projection at some layer.
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        let (prefix, suffix) = self.name.split_once("{layer}")?;
        let layer = name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()?;
        (self.at(layer) == name).then_some(layer)
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
    /// Layers MEMIT edits by default in a model that has them all (see [`Family::edit_layers`]).
    pub default_edit_layers: [usize; 5],
    /// The `config.json` key of the layer count.
    pub layers_key: &'static str,
    /// KN's integrated-gradient steps by default (the peers' setting for the family).
    pub kn_steps: usize,
    #[serde(skip)]
    pub(super) load: fn(&serde_json::Value, &Path) -> Result<Config>,
    #[serde(skip)]
    pub(super) weights: fn(&Config, &dyn Tensors, &Device) -> Result<Weights>,
}

impl Family {
    /// The layers MEMIT edits by default in a model of `num_layers` layers (ROME edits the
    /// second of them, or the only one): [`Family::default_edit_layers`] when the model has
    /// them all; in a shallower model, the same relative depths, each once: layer `l` becomes
    /// `l·n / (last + 1)` for `n` layers and `last` the deepest default. A 2-layer Llama gets
    /// `[0, 1]`, a 1-layer one `[0]`.
    pub fn edit_layers(&self, num_layers: usize) -> Vec<usize> {
        let last = *self.default_edit_layers.iter().max().expect("five layers");
        if last < num_layers {
            return self.default_edit_layers.to_vec();
        }
        let mut layers: Vec<usize> = self.default_edit_layers.iter().map(|&l| l * num_layers / (last + 1)).collect();
        layers.dedup();
        layers
    }
}

/// Most layers a config may declare.
pub const MAX_LAYERS: usize = 1 << 12;
/// Most positions a config may declare: 2^24. Nothing is allocated per position (rotary
/// angles are computed for the positions in use), but a larger context is not a real model's.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Most any other dimension (vocabulary, widths, heads) may be; each is also checked against
/// the stored tensors' shapes when the weights load.
pub const MAX_DIMENSION: usize = 1 << 31;

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
        let path = checkpoint::config_path(dir)?;
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

    /// Checks the declared layer count against `tensors`: layer `num_layers - 1` must exist and
    /// layer `num_layers` must not (each located by its MLP output projection).
    pub fn check_layers(&self, tensors: &dyn Tensors) -> Result<()> {
        let present = |l: usize| tensors.contains(&self.family.mlp_out.at(l));
        let n = self.num_layers;
        if present(n - 1) && !present(n) {
            return Ok(());
        }
        let found = (0..).take_while(|&l| present(l)).count();
        Err(Error::Config {
            path: tensors.dir().join(checkpoint::CONFIG),
            key: self.family.layers_key.to_string(),
            problem: format!("is {n}, but the checkpoint holds {found} layer(s) (`{}` for layer 0 on)", self.family.mlp_out.name),
        })
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

    /// A positive integer of at most [`MAX_DIMENSION`].
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_at_most(key, MAX_DIMENSION)
    }

    /// A positive integer of at most `max`.
    pub fn usize_at_most(&self, key: &str, max: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Err(self.err(key, "is missing")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= max as u64 => Ok(n as usize),
                Some(n) if n > 0 => Err(self.err(key, &format!("is {n}, more than the {max} supported"))),
                _ => Err(self.err(key, "must be a positive integer")),
            },
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.usize_or_at_most(key, default, MAX_DIMENSION)
    }

    pub fn usize_or_at_most(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(_) => self.usize_at_most(key, max),
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
