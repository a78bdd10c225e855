//! The GPT-NeoX family (Pythia, GPT-NeoX-20B): LayerNorms, biases on every projection, queries,
//! keys and values in one projection laid out head by head, rotary embeddings (half-split) over
//! the share `rotary_pct` of each head, an erf GELU MLP, an untied `embed_out`, and attention and
//! MLP side by side where `use_parallel_residual` is set (the default).

use super::super::config::{ids, parse, Config, Field, Keys, MAX_LAYERS, MAX_POSITIONS};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, NormKind, Projection, Qkv};
use super::super::ops::{Activation, RotaryLayout};
use super::super::Result;
use super::rope_section;
use serde_json::{Map, Value};
use std::path::Path;

use Dim::{Ff, Hidden, Qkv as Fused, Vocab};

/// A torch `nn.Linear` weight and its bias.
const fn linear(name: &'static str, shape: &'static [Dim; 2]) -> Projection {
    Projection::linear(name, None, shape).with_bias()
}

pub static FAMILY: Family = Family {
    name: "gpt_neox",
    model_types: &["gpt_neox"],
    embed: Projection::linear("gpt_neox.embed_in.weight", None, &[Vocab, Hidden]),
    scaled_embedding: false,
    positions: None,
    final_norm: Projection::layer_norm("gpt_neox.final_layer_norm.weight"),
    unembed: Projection::linear("embed_out.weight", None, &[Vocab, Hidden]),
    block: BlockTable {
        attn_norm: Projection::layer_norm("gpt_neox.layers.{layer}.input_layernorm.weight"),
        qkv: Qkv::FusedPerHead(linear("gpt_neox.layers.{layer}.attention.query_key_value.weight", &[Fused, Hidden])),
        qk_norm: None,
        o: linear("gpt_neox.layers.{layer}.attention.dense.weight", &[Hidden, Hidden]),
        post_attn_norm: None,
        mlp_norm: Some(Projection::layer_norm("gpt_neox.layers.{layer}.post_attention_layernorm.weight")),
        post_mlp_norm: None,
    },
    norm: NormKind::Layer,
    rotary: RotaryLayout::HalfSplit,
    activation: Activation::Gelu,
    mlp_in: MlpInputs::Plain(linear("gpt_neox.layers.{layer}.mlp.dense_h_to_4h.weight", &[Ff, Hidden])),
    mlp_out: linear("gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight", &[Hidden, Ff]),
    default_edit_layers: &[3, 4, 5, 6, 7],
    rome_layer_index: 1,
    layers_key: "num_hidden_layers",
    kn_steps: 20,
    answer_kl: 0.0,
    config,
};

/// The `config.json` keys of a GPT-NeoX model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct NeoxJson {
    vocab_size: Field<u64>,
    hidden_size: Field<u64>,
    intermediate_size: Field<u64>,
    num_hidden_layers: Field<u64>,
    num_attention_heads: Field<u64>,
    layer_norm_eps: Field<f64>,
    hidden_act: Field<String>,
    use_parallel_residual: Field<bool>,
    attention_bias: Field<bool>,
    /// transformers < 5: the rotated share of each head and the rotary base.
    rotary_pct: Field<f64>,
    rotary_emb_base: Field<f64>,
    /// transformers < 5: a rope rescaling.
    rope_scaling: Field<Map<String, Value>>,
    /// transformers ≥ 5: `rope_theta`, `partial_rotary_factor` and the rope type.
    rope_parameters: Field<Map<String, Value>>,
    max_position_embeddings: Field<u64>,
    tie_word_embeddings: Field<bool>,
    bos_token_id: Field<Value>,
    eos_token_id: Field<Value>,
}

fn config(json: &Value, path: &Path) -> Result<Config> {
    let c: NeoxJson = parse(json, path)?;
    let k = Keys { path };
    let hidden_size = k.usize("hidden_size", &c.hidden_size)?;
    let num_heads = k.usize("num_attention_heads", &c.num_attention_heads)?;
    k.require("num_attention_heads", hidden_size.is_multiple_of(num_heads), "must divide hidden_size")?;
    k.one_of("hidden_act", &c.hidden_act, &["gelu"])?;
    k.require("attention_bias", k.bool_or("attention_bias", &c.attention_bias, true)?, "is false, but the table reads attention biases")?;
    let head_dim = hidden_size / num_heads;
    let (key, section) = match (&c.rope_parameters, &c.rope_scaling) {
        (Field::Value(m), _) => ("rope_parameters", m.clone()),
        (Field::Wrong, _) => return Err(k.err("rope_parameters", "must be an object")),
        (_, Field::Value(m)) => ("rope_scaling", m.clone()),
        (_, Field::Wrong) => return Err(k.err("rope_scaling", "must be an object")),
        _ => ("rope_parameters", Map::new()),
    };
    let theta = k.f64_or("rotary_emb_base", &c.rotary_emb_base, 10_000.0)?;
    let partial = k.f64_or("rotary_pct", &c.rotary_pct, 0.25)?;
    let rope = rope_section(&k, key, &section, theta, head_dim, Some(partial))?;
    Ok(Config {
        family: &FAMILY,
        vocab_size: k.usize("vocab_size", &c.vocab_size)?,
        hidden_size,
        intermediate_size: k.usize("intermediate_size", &c.intermediate_size)?,
        num_layers: k.usize_at_most("num_hidden_layers", &c.num_hidden_layers, MAX_LAYERS)?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        norm_eps: k.f64_or("layer_norm_eps", &c.layer_norm_eps, 1e-5)?,
        rope: Some(rope),
        local_rope: None,
        sliding_window: None,
        full_attention_layers: Vec::new(),
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        parallel_residual: k.bool_or("use_parallel_residual", &c.use_parallel_residual, true)?,
        max_positions: k.usize_or_at_most("max_position_embeddings", &c.max_position_embeddings, 2048, MAX_POSITIONS)?,
        tied_embeddings: k.bool_or("tie_word_embeddings", &c.tie_word_embeddings, false)?,
        bos_token_id: ids(&c.bos_token_id).first().copied(),
        eos_token_ids: ids(&c.eos_token_id),
    })
}
