//! The Gemma 2 family: Llama's projections with `(1 + w)` RMSNorms, a norm after attention and
//! after the MLP as well as before each, a GELU (tanh) gate, embeddings scaled by √hidden_size,
//! attention scaled by `query_pre_attn_scalar^-½`, soft-capped attention and output logits, tied
//! embeddings, and a sliding window in the layers `layer_types` marks (every other one, from the
//! first, by default). The `config.json` reader here is Gemma 3's too.

use super::super::config::{parse, Config, Field, Keys, MAX_POSITIONS};
use super::super::family::{BlockTable, Dim, Family, NormKind, Projection};
use super::super::ops::Activation;
use super::super::Result;
use super::{llama, LlamaJson};
use serde_json::Value;
use std::path::Path;

/// A Gemma RMSNorm's weight and its GGUF name (llama.cpp stores it with the 1 added, which
/// `import-gguf` subtracts).
const fn norm(name: &'static str, gguf: &'static str) -> Projection {
    Projection::vector(name, Some(gguf), &[Dim::Hidden])
}

pub static FAMILY: Family = Family {
    name: "gemma2",
    model_types: &["gemma2"],
    scaled_embedding: true,
    final_norm: norm("model.norm.weight", "output_norm.weight"),
    block: BLOCK,
    norm: NormKind::RmsPlusOne,
    activation: Activation::GeluTanh,
    config,
    ..llama::FAMILY
};

/// Gemma's block: Llama's projections, four norms.
pub(crate) const BLOCK: BlockTable = BlockTable {
    attn_norm: norm("model.layers.{layer}.input_layernorm.weight", "blk.{layer}.attn_norm.weight"),
    post_attn_norm: Some(norm("model.layers.{layer}.post_attention_layernorm.weight", "blk.{layer}.post_attention_norm.weight")),
    mlp_norm: Some(norm("model.layers.{layer}.pre_feedforward_layernorm.weight", "blk.{layer}.ffn_norm.weight")),
    post_mlp_norm: Some(norm("model.layers.{layer}.post_feedforward_layernorm.weight", "blk.{layer}.post_ffw_norm.weight")),
    ..llama::BLOCK
};

fn config(json: &Value, path: &Path) -> Result<Config> {
    let defaults = Defaults { attn_softcap: Some(50.0), final_softcap: Some(30.0), max_positions: 8192 };
    let (c, _, _) = gemma_config(&FAMILY, json, path, &defaults, |_, _| Ok(2))?;
    Ok(c)
}

/// The `config.json` keys Gemma adds to Llama's.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct GemmaJson {
    pub hidden_activation: Field<String>,
    pub query_pre_attn_scalar: Field<f64>,
    pub layer_types: Field<Vec<String>>,
    pub sliding_window_pattern: Field<u64>,
    pub rope_local_base_freq: Field<f64>,
    pub use_bidirectional_attention: Field<bool>,
}

/// What transformers assumes where a Gemma config omits a key.
pub(crate) struct Defaults {
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub max_positions: usize,
}

/// A Gemma config: Llama's dimensions and rotary embedding, then Gemma's activation, attention
/// scale, soft-capping, tied embeddings and windows. Without `layer_types`, layer `i` is a
/// full-attention layer when `i + 1` is a multiple of `pattern` (given the parsed keys), and a
/// sliding one otherwise.
pub(crate) fn gemma_config(
    family: &'static Family,
    json: &Value,
    path: &Path,
    defaults: &Defaults,
    pattern: impl FnOnce(&Keys, &GemmaJson) -> Result<usize>,
) -> Result<(Config, LlamaJson, GemmaJson)> {
    let (l, g): (LlamaJson, GemmaJson) = (parse(json, path)?, parse(json, path)?);
    let k = Keys { path };
    k.one_of("hidden_activation", &g.hidden_activation, &["gelu_pytorch_tanh"])?;
    k.require("attention_bias", !k.bool_or("attention_bias", &l.attention_bias, false)?, "is true, but attention biases are not supported")?;
    k.require(
        "use_bidirectional_attention",
        !k.bool_or("use_bidirectional_attention", &g.use_bidirectional_attention, false)?,
        "is true, but only causal attention is supported",
    )?;
    let mut c = l.dims(family, &k, None)?;
    c.tied_embeddings = k.bool_or("tie_word_embeddings", &l.tie_word_embeddings, true)?;
    c.max_positions = k.usize_or_at_most("max_position_embeddings", &l.max_position_embeddings, defaults.max_positions, MAX_POSITIONS)?;
    c.attn_scale = 1.0 / k.f64_or("query_pre_attn_scalar", &g.query_pre_attn_scalar, 256.0)?.sqrt();
    c.attn_softcap = softcap(json, &k, "attn_logit_softcapping", defaults.attn_softcap)?;
    c.final_softcap = softcap(json, &k, "final_logit_softcapping", defaults.final_softcap)?;
    c.sliding_window = Some(k.usize_or_at_most("sliding_window", &l.sliding_window, 4096, MAX_POSITIONS)?);
    c.full_attention_layers = match &g.layer_types {
        Field::Value(types) => {
            let n = c.num_layers;
            k.require("layer_types", types.len() == n, &format!("has {} entries, but the model has {n} layers", types.len()))?;
            let mut full = Vec::new();
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "full_attention" => full.push(i),
                    "sliding_attention" => {}
                    other => return Err(k.err("layer_types", format!("entry {i} is `{other}` (supported: sliding_attention, full_attention)"))),
                }
            }
            full
        }
        Field::Wrong => return Err(k.err("layer_types", "must be a list of strings")),
        Field::Absent => {
            let every = pattern(&k, &g)?;
            (0..c.num_layers).filter(|i| (i + 1) % every == 0).collect()
        }
    };
    Ok((c, l, g))
}

/// A soft-capping constant: `default` when the key is absent, none when it is null.
fn softcap(json: &Value, k: &Keys, key: &str, default: Option<f64>) -> Result<Option<f64>> {
    match json.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().filter(|c| c.is_finite() && *c > 0.0).map(Some).ok_or_else(|| k.err(key, "must be a positive number or null")),
    }
}
