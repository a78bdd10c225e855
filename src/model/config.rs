//! A model's configuration: its family and its dimensions, read from `config.json` by the
//! family's serde struct, and the typed fields those structs are made of.

use super::family::{Dims, Family};
use super::{Error, Result, FAMILIES};
use crate::checkpoint::{self, Tensors};
use serde::de::DeserializeOwned;
use std::path::Path;

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
    /// Rotary embedding, for families that rotate queries and keys.
    pub rope: Option<RopeConfig>,
    /// The rotary embedding of the sliding-window layers, where it differs from `rope` (Gemma 3).
    pub local_rope: Option<RopeConfig>,
    /// Each query sees only the keys fewer than this many positions back (Mistral), in every layer
    /// but `full_attention_layers`.
    pub sliding_window: Option<usize>,
    /// Layers that see every earlier key despite `sliding_window` (Gemma's global layers).
    pub full_attention_layers: Vec<usize>,
    /// Attention logits are `q·k` times this (`1/√head_dim`, or Gemma's `query_pre_attn_scalar^-½`).
    pub attn_scale: f64,
    /// Attention logits become `c·tanh(x/c)` (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Output logits become `c·tanh(x/c)` (Gemma's `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// Attention and MLP read the block's input side by side: `x + attn(ln1(x)) + mlp(ln2(x))`
    /// (GPT-J; GPT-NeoX's `use_parallel_residual`).
    pub parallel_residual: bool,
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
        (family.config)(json, path)
    }

    /// The dimensions stored tensors must have.
    pub fn dims(&self) -> Dims {
        Dims {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            ff: self.intermediate_size,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            positions: self.max_positions,
        }
    }

    /// Whether `layer` attends within `sliding_window` only.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !self.full_attention_layers.contains(&layer)
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

/// Rotary position embedding: the base, an optional rescaling of its frequencies, and how many
/// of each head's dimensions are rotated (the first ones; the rest pass through).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// Dimensions rotated per head: `head_dim`, or fewer (`partial_rotary_factor` < 1, Phi-4-mini).
    pub rotary_dim: usize,
}

/// A rescaling of rotary frequencies.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a smooth band between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_positions: usize },
    /// Every frequency divided by `factor` (positions interpolated; Gemma 3's global layers).
    Linear { factor: f64 },
}

/// One `config.json` value as read by a family's serde struct: absent (or null), of the type
/// the struct wants, or of another type (kept so that `validate()` can name the key).
#[derive(Clone, Debug, Default)]
pub enum Field<T> {
    #[default]
    Absent,
    Value(T),
    Wrong,
}

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for Field<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(match v {
            serde_json::Value::Null => Field::Absent,
            v => serde_json::from_value(v).map_or(Field::Wrong, Field::Value),
        })
    }
}

/// Parses `json` into a family's serde struct (whose fields are [`Field`]s, so this fails only
/// when `json` is not an object).
pub(crate) fn parse<T: DeserializeOwned>(json: &serde_json::Value, path: &Path) -> Result<T> {
    serde_json::from_value(json.clone()).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        key: "config.json".into(),
        problem: format!("is not a config: {e}"),
    })
}

/// Checks [`Field`]s of one `config.json`, naming the file and key in errors.
pub(crate) struct Keys<'a> {
    pub path: &'a Path,
}

impl Keys<'_> {
    pub fn err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Config { path: self.path.to_path_buf(), key: key.to_string(), problem: problem.into() }
    }

    /// A positive integer of at most [`MAX_DIMENSION`].
    pub fn usize(&self, key: &str, f: &Field<u64>) -> Result<usize> {
        self.usize_at_most(key, f, MAX_DIMENSION)
    }

    /// A positive integer of at most `max`.
    pub fn usize_at_most(&self, key: &str, f: &Field<u64>, max: usize) -> Result<usize> {
        match f {
            Field::Absent => Err(self.err(key, "is missing")),
            Field::Value(n) if *n > 0 && *n <= max as u64 => Ok(*n as usize),
            Field::Value(n) if *n > 0 => Err(self.err(key, format!("is {n}, more than the {max} supported"))),
            _ => Err(self.err(key, "must be a positive integer")),
        }
    }

    pub fn usize_or(&self, key: &str, f: &Field<u64>, default: usize) -> Result<usize> {
        self.usize_or_at_most(key, f, default, MAX_DIMENSION)
    }

    pub fn usize_or_at_most(&self, key: &str, f: &Field<u64>, default: usize, max: usize) -> Result<usize> {
        match f {
            Field::Absent => Ok(default),
            _ => self.usize_at_most(key, f, max),
        }
    }

    /// A positive, finite number, `default` when absent.
    pub fn f64_or(&self, key: &str, f: &Field<f64>, default: f64) -> Result<f64> {
        match f {
            Field::Absent => Ok(default),
            Field::Value(x) if x.is_finite() && *x > 0.0 => Ok(*x),
            _ => Err(self.err(key, "must be a positive number")),
        }
    }

    pub fn bool_or(&self, key: &str, f: &Field<bool>, default: bool) -> Result<bool> {
        match f {
            Field::Absent => Ok(default),
            Field::Value(b) => Ok(*b),
            Field::Wrong => Err(self.err(key, "must be true or false")),
        }
    }

    /// A string that must be one of `allowed` (the first when absent).
    pub fn one_of<'s>(&self, key: &str, f: &'s Field<String>, allowed: &[&'s str]) -> Result<&'s str> {
        match f {
            Field::Absent => Ok(allowed[0]),
            Field::Value(s) if allowed.contains(&s.as_str()) => Ok(s),
            Field::Value(s) => Err(self.err(key, format!("is `{s}`, which is not supported (supported: {})", allowed.join(", ")))),
            Field::Wrong => Err(self.err(key, "must be a string")),
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

/// Token ids: an integer or a list of integers (anything else reads as none).
pub(crate) fn ids(f: &Field<serde_json::Value>) -> Vec<u32> {
    match f {
        Field::Value(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        Field::Value(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        _ => Vec::new(),
    }
}
