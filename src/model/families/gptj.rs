//! The GPT-J family: one LayerNorm (`ln_1`) read by attention and the MLP side by side (always a
//! parallel block), separate bias-free attention projections, interleaved rotary embeddings over
//! the first `rotary_dim` dimensions of each head, a GELU (tanh) MLP with biases, and an untied
//! `lm_head` with a bias.

use super::super::config::{ids, parse, Config, Field, Keys, RopeConfig, MAX_LAYERS, MAX_POSITIONS};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, NormKind, Projection, Qkv};
use super::super::ops::{Activation, RotaryLayout};
use super::super::Result;
use std::path::Path;

use Dim::{Ff, Hidden, Vocab};

/// An attention projection (no bias).
const fn attn(name: &'static str) -> Projection {
    Projection::linear(name, None, &[Hidden, Hidden])
}

pub static FAMILY: Family = Family {
    name: "gptj",
    model_types: &["gptj"],
    embed: Projection::linear("transformer.wte.weight", None, &[Vocab, Hidden]),
    scaled_embedding: false,
    positions: None,
    final_norm: Projection::layer_norm("transformer.ln_f.weight"),
    unembed: Projection::linear("lm_head.weight", None, &[Vocab, Hidden]).with_bias(),
    block: BlockTable {
        attn_norm: Projection::layer_norm("transformer.h.{layer}.ln_1.weight"),
        qkv: Qkv::Separate {
            q: attn("transformer.h.{layer}.attn.q_proj.weight"),
            k: attn("transformer.h.{layer}.attn.k_proj.weight"),
            v: attn("transformer.h.{layer}.attn.v_proj.weight"),
        },
        qk_norm: None,
        o: attn("transformer.h.{layer}.attn.out_proj.weight"),
        post_attn_norm: None,
        mlp_norm: None,
        post_mlp_norm: None,
    },
    norm: NormKind::Layer,
    rotary: RotaryLayout::Interleaved,
    activation: Activation::GeluTanh,
    mlp_in: MlpInputs::Plain(Projection::linear("transformer.h.{layer}.mlp.fc_in.weight", None, &[Ff, Hidden]).with_bias()),
    mlp_out: Projection::linear("transformer.h.{layer}.mlp.fc_out.weight", None, &[Hidden, Ff]).with_bias(),
    default_edit_layers: &[3, 4, 5, 6, 7],
    rome_layer_index: 1,
    layers_key: "n_layer",
    kn_steps: 20,
    answer_kl: 0.0,
    config,
};

/// The `config.json` keys of a GPT-J model.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct GptjJson {
    vocab_size: Field<u64>,
    n_embd: Field<u64>,
    n_head: Field<u64>,
    n_inner: Field<u64>,
    n_layer: Field<u64>,
    n_positions: Field<u64>,
    rotary_dim: Field<u64>,
    layer_norm_epsilon: Field<f64>,
    activation_function: Field<String>,
    tie_word_embeddings: Field<bool>,
    bos_token_id: Field<serde_json::Value>,
    eos_token_id: Field<serde_json::Value>,
}

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: GptjJson = parse(json, path)?;
    let k = Keys { path };
    let hidden_size = k.usize("n_embd", &c.n_embd)?;
    let num_heads = k.usize("n_head", &c.n_head)?;
    k.require("n_head", hidden_size.is_multiple_of(num_heads), "must divide n_embd")?;
    k.one_of("activation_function", &c.activation_function, &["gelu_new"])?;
    let head_dim = hidden_size / num_heads;
    let rotary_dim = k.usize_or("rotary_dim", &c.rotary_dim, 64)?;
    k.require("rotary_dim", rotary_dim <= head_dim && rotary_dim.is_multiple_of(2), "must be even and at most the head size (n_embd / n_head)")?;
    Ok(Config {
        family: &FAMILY,
        vocab_size: k.usize("vocab_size", &c.vocab_size)?,
        hidden_size,
        intermediate_size: k.usize_or("n_inner", &c.n_inner, 4 * hidden_size)?,
        num_layers: k.usize_at_most("n_layer", &c.n_layer, MAX_LAYERS)?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        norm_eps: k.f64_or("layer_norm_epsilon", &c.layer_norm_epsilon, 1e-5)?,
        rope: Some(RopeConfig { theta: 10_000.0, scaling: None, rotary_dim }),
        local_rope: None,
        sliding_window: None,
        full_attention_layers: Vec::new(),
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        parallel_residual: true,
        max_positions: k.usize_or_at_most("n_positions", &c.n_positions, 2048, MAX_POSITIONS)?,
        tied_embeddings: k.bool_or("tie_word_embeddings", &c.tie_word_embeddings, false)?,
        bos_token_id: ids(&c.bos_token_id).first().copied(),
        eos_token_ids: ids(&c.eos_token_id),
    })
}
