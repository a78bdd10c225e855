//! The family tables, one file each, and the `config.json` struct the Llama-style families
//! (Llama, Mistral, Qwen2, Qwen3, Phi-3) share; each family's `validate` adds its own checks.

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod gptj;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use super::config::{ids, Config, Field, Keys, RopeConfig, RopeScaling, MAX_LAYERS, MAX_POSITIONS};
use super::family::Family;
use super::Result;
use serde_json::{Map, Value};

/// The `config.json` keys of a Llama-style model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct LlamaJson {
    pub vocab_size: Field<u64>,
    pub hidden_size: Field<u64>,
    pub intermediate_size: Field<u64>,
    pub num_hidden_layers: Field<u64>,
    pub num_attention_heads: Field<u64>,
    pub num_key_value_heads: Field<u64>,
    pub head_dim: Field<u64>,
    pub rms_norm_eps: Field<f64>,
    pub hidden_act: Field<String>,
    pub mlp_bias: Field<bool>,
    pub attention_bias: Field<bool>,
    pub rope_theta: Field<f64>,
    /// transformers < 5: the rope type and its parameters (`rope_theta` beside).
    pub rope_scaling: Field<Map<String, Value>>,
    /// transformers ≥ 5: the rope type, its parameters and `rope_theta`.
    pub rope_parameters: Field<Map<String, Value>>,
    /// The share of each head's dimensions rotated (Phi-3 family; also in `rope_parameters`).
    pub partial_rotary_factor: Field<f64>,
    pub sliding_window: Field<u64>,
    pub use_sliding_window: Field<bool>,
    pub max_position_embeddings: Field<u64>,
    pub tie_word_embeddings: Field<bool>,
    pub bos_token_id: Field<Value>,
    pub eos_token_id: Field<Value>,
}

impl LlamaJson {
    /// The checks every Llama-style family makes, and its [`Config`] (with `sliding_window`, which
    /// the family has validated).
    pub fn config(&self, family: &'static Family, k: &Keys, sliding_window: Option<usize>) -> Result<Config> {
        k.one_of("hidden_act", &self.hidden_act, &["silu"])?;
        self.dims(family, k, sliding_window)
    }

    /// [`LlamaJson::config`] without the activation check (Gemma names its activation
    /// `hidden_activation`).
    pub fn dims(&self, family: &'static Family, k: &Keys, sliding_window: Option<usize>) -> Result<Config> {
        let hidden_size = k.usize("hidden_size", &self.hidden_size)?;
        let num_heads = k.usize("num_attention_heads", &self.num_attention_heads)?;
        k.require("mlp_bias", !k.bool_or("mlp_bias", &self.mlp_bias, false)?, "is true, but MLP biases are not supported")?;
        let num_kv_heads = k.usize_or("num_key_value_heads", &self.num_key_value_heads, num_heads)?;
        k.require("num_key_value_heads", num_heads % num_kv_heads == 0, "must divide num_attention_heads")?;
        let head_dim = k.usize_or("head_dim", &self.head_dim, hidden_size / num_heads)?;
        Ok(Config {
            family,
            vocab_size: k.usize("vocab_size", &self.vocab_size)?,
            hidden_size,
            intermediate_size: k.usize("intermediate_size", &self.intermediate_size)?,
            num_layers: k.usize_at_most("num_hidden_layers", &self.num_hidden_layers, MAX_LAYERS)?,
            num_heads,
            num_kv_heads,
            head_dim,
            norm_eps: k.f64_or("rms_norm_eps", &self.rms_norm_eps, 1e-6)?,
            rope: Some(self.rope(k, head_dim)?),
            local_rope: None,
            sliding_window,
            full_attention_layers: Vec::new(),
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            parallel_residual: false,
            max_positions: k.usize_or_at_most("max_position_embeddings", &self.max_position_embeddings, 2048, MAX_POSITIONS)?,
            tied_embeddings: k.bool_or("tie_word_embeddings", &self.tie_word_embeddings, false)?,
            bos_token_id: ids(&self.bos_token_id).first().copied(),
            eos_token_ids: ids(&self.eos_token_id),
        })
    }

    /// The rotary embedding: `rope_parameters` (transformers ≥ 5) or `rope_scaling` with
    /// `rope_theta` (earlier), over all of `head_dim` or the share `partial_rotary_factor` of it.
    fn rope(&self, k: &Keys, head_dim: usize) -> Result<RopeConfig> {
        let (key, section) = match (&self.rope_parameters, &self.rope_scaling) {
            (Field::Value(m), _) => ("rope_parameters", Some(m)),
            (Field::Wrong, _) => return Err(k.err("rope_parameters", "must be an object")),
            (_, Field::Value(m)) => ("rope_scaling", Some(m)),
            (_, Field::Wrong) => return Err(k.err("rope_scaling", "must be an object")),
            _ => ("rope_parameters", None),
        };
        let empty = Map::new();
        let section = section.unwrap_or(&empty);
        let theta = k.f64_or("rope_theta", &self.rope_theta, 10_000.0)?;
        let partial = k.f64_or("partial_rotary_factor", &self.partial_rotary_factor, 1.0)?;
        rope_section(k, key, section, theta, head_dim, Some(partial))
    }
}

/// A rotary embedding from one `config.json` section (`key` names it in errors): its `rope_type`
/// (or `type`: `default`, `linear` or `llama3`) and parameters, `rope_theta` (else `theta`), and
/// over `head_dim` or, where `partial` is given, the share `partial_rotary_factor` of it (from the
/// section, else `partial`); without `partial` every dimension is rotated, as Gemma does.
pub(crate) fn rope_section(k: &Keys, key: &str, section: &Map<String, Value>, theta: f64, head_dim: usize, partial: Option<f64>) -> Result<RopeConfig> {
    let number = |name: &str| -> Result<Option<f64>> {
        match section.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).map(Some).ok_or_else(|| k.err(&format!("{key}.{name}"), "must be a positive number")),
        }
    };
    let required = |name: &str| number(name)?.ok_or_else(|| k.err(&format!("{key}.{name}"), "is missing"));
    let theta = number("rope_theta")?.unwrap_or(theta);
    let rotary_dim = match partial {
        None => head_dim,
        Some(fallback) => {
            let (factor_key, factor) = match number("partial_rotary_factor")? {
                Some(f) => (format!("{key}.partial_rotary_factor"), f),
                None => ("partial_rotary_factor".to_string(), fallback),
            };
            // As transformers: the rotated dimensions are `int(head_dim · factor)`.
            let rotary_dim = (head_dim as f64 * factor) as usize;
            k.require(
                &factor_key,
                factor <= 1.0 && rotary_dim > 0 && rotary_dim.is_multiple_of(2),
                "must rotate an even, non-zero number of each head's dimensions, at most all",
            )?;
            rotary_dim
        }
    };
    let kind = section.get("rope_type").or_else(|| section.get("type"));
    let scaling = match kind.map(|v| v.as_str().ok_or_else(|| k.err(&format!("{key}.rope_type"), "must be a string"))).transpose()? {
        None | Some("default") => None,
        Some("linear") => Some(RopeScaling::Linear { factor: required("factor")? }),
        Some("llama3") => {
            let original = required("original_max_position_embeddings")?;
            Some(RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_positions: original as usize,
            })
        }
        Some(other) => return Err(k.err(&format!("{key}.rope_type"), format!("is `{other}`, which is not supported (supported: default, linear, llama3)"))),
    };
    if let Some(RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. }) = scaling {
        k.require(&format!("{key}.high_freq_factor"), high_freq_factor > low_freq_factor, "must exceed low_freq_factor")?;
    }
    Ok(RopeConfig { theta, scaling, rotary_dim })
}
