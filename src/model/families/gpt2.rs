//! The GPT-2 family: LayerNorm, learned positions, fused QKV, GELU (tanh) MLP, tied
//! unembedding, and `Conv1D` weights stored `[in, out]`.

use super::super::config::{ids, parse, Config, Field, Keys, MAX_LAYERS, MAX_POSITIONS};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, NormKind, Projection, Qkv};
use super::super::ops::{Activation, RotaryLayout};
use super::super::Result;
use std::path::Path;

use Dim::{Ff, Hidden, Positions, Qkv as Fused, Vocab};

/// A `Conv1D` weight (stored `[in, out]`) and its bias.
const fn conv1d(name: &'static str, shape: &'static [Dim; 2]) -> Projection {
    Projection::linear(name, None, shape).stored_in_out().with_bias()
}

pub static FAMILY: Family = Family {
    name: "gpt2",
    model_types: &["gpt2"],
    embed: Projection::linear("transformer.wte.weight", None, &[Vocab, Hidden]),
    scaled_embedding: false,
    positions: Some(Projection::linear("transformer.wpe.weight", None, &[Positions, Hidden])),
    final_norm: Projection::layer_norm("transformer.ln_f.weight"),
    unembed: Projection::linear("lm_head.weight", None, &[Vocab, Hidden]),
    block: BlockTable {
        attn_norm: Projection::layer_norm("transformer.h.{layer}.ln_1.weight"),
        qkv: Qkv::Fused(conv1d("transformer.h.{layer}.attn.c_attn.weight", &[Fused, Hidden])),
        qk_norm: None,
        o: conv1d("transformer.h.{layer}.attn.c_proj.weight", &[Hidden, Hidden]),
        post_attn_norm: None,
        mlp_norm: Some(Projection::layer_norm("transformer.h.{layer}.ln_2.weight")),
        post_mlp_norm: None,
    },
    norm: NormKind::Layer,
    rotary: RotaryLayout::HalfSplit,
    activation: Activation::GeluTanh,
    mlp_in: MlpInputs::Plain(conv1d("transformer.h.{layer}.mlp.c_fc.weight", &[Ff, Hidden])),
    mlp_out: conv1d("transformer.h.{layer}.mlp.c_proj.weight", &[Hidden, Ff]),
    default_edit_layers: &[3, 4, 5, 6, 7],
    rome_layer_index: 1,
    layers_key: "n_layer",
    kn_steps: 20,
    answer_kl: 0.0,
    config,
};

/// The `config.json` keys of a GPT-2 model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Gpt2Json {
    vocab_size: Field<u64>,
    n_embd: Field<u64>,
    n_head: Field<u64>,
    n_inner: Field<u64>,
    n_layer: Field<u64>,
    n_positions: Field<u64>,
    layer_norm_epsilon: Field<f64>,
    activation_function: Field<String>,
    scale_attn_by_inverse_layer_idx: Field<bool>,
    scale_attn_weights: Field<bool>,
    bos_token_id: Field<serde_json::Value>,
    eos_token_id: Field<serde_json::Value>,
}

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: Gpt2Json = parse(json, path)?;
    let k = Keys { path };
    let hidden_size = k.usize("n_embd", &c.n_embd)?;
    let num_heads = k.usize("n_head", &c.n_head)?;
    k.one_of("activation_function", &c.activation_function, &["gelu_new"])?;
    k.require(
        "scale_attn_by_inverse_layer_idx",
        !k.bool_or("scale_attn_by_inverse_layer_idx", &c.scale_attn_by_inverse_layer_idx, false)?,
        "is not supported",
    )?;
    k.require("scale_attn_weights", k.bool_or("scale_attn_weights", &c.scale_attn_weights, true)?, "must be true")?;
    k.require("n_head", hidden_size % num_heads == 0, "must divide n_embd")?;
    Ok(Config {
        family: &FAMILY,
        vocab_size: k.usize("vocab_size", &c.vocab_size)?,
        hidden_size,
        intermediate_size: k.usize_or("n_inner", &c.n_inner, 4 * hidden_size)?,
        num_layers: k.usize_at_most("n_layer", &c.n_layer, MAX_LAYERS)?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        norm_eps: k.f64_or("layer_norm_epsilon", &c.layer_norm_epsilon, 1e-5)?,
        rope: None,
        local_rope: None,
        sliding_window: None,
        full_attention_layers: Vec::new(),
        attn_scale: 1.0 / ((hidden_size / num_heads) as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        parallel_residual: false,
        max_positions: k.usize_or_at_most("n_positions", &c.n_positions, 1024, MAX_POSITIONS)?,
        tied_embeddings: true,
        bos_token_id: ids(&c.bos_token_id).first().copied(),
        eos_token_ids: ids(&c.eos_token_id),
    })
}
