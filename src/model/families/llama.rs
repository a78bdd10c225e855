//! The Llama family (SmolLM2, Llama 2 and 3, including Llama 3.1's `llama3` rope scaling):
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, tied or separate unembedding.

use super::super::config::{parse, Config, Field, Keys};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, NormKind, Projection, Qkv};
use super::super::ops::{Activation, RotaryLayout};
use super::super::Result;
use super::LlamaJson;
use std::path::Path;

use Dim::{Ff, Hidden, KeyValues, Queries, Vocab};

pub static FAMILY: Family = Family {
    name: "llama",
    model_types: &["llama"],
    embed: Projection::linear("model.embed_tokens.weight", Some("token_embd.weight"), &[Vocab, Hidden]),
    scaled_embedding: false,
    positions: None,
    final_norm: Projection::vector("model.norm.weight", Some("output_norm.weight"), &[Hidden]),
    unembed: Projection::linear("lm_head.weight", Some("output.weight"), &[Vocab, Hidden]),
    block: BLOCK,
    norm: NormKind::Rms,
    rotary: RotaryLayout::HalfSplit,
    activation: Activation::Silu,
    mlp_in: MLP_IN,
    mlp_out: MLP_OUT,
    default_edit_layers: &[4, 5, 6, 7, 8],
    rome_layer_index: 1,
    layers_key: "num_hidden_layers",
    kn_steps: 1,
    answer_kl: 0.0,
    config,
};

/// The block every Llama-style family shares (Mistral, Qwen2 and Qwen3 vary it).
pub(crate) const BLOCK: BlockTable = BlockTable {
    attn_norm: Projection::vector("model.layers.{layer}.input_layernorm.weight", Some("blk.{layer}.attn_norm.weight"), &[Hidden]),
    qkv: Qkv::Separate {
        q: Projection::linear("model.layers.{layer}.self_attn.q_proj.weight", Some("blk.{layer}.attn_q.weight"), &[Queries, Hidden]),
        k: Projection::linear("model.layers.{layer}.self_attn.k_proj.weight", Some("blk.{layer}.attn_k.weight"), &[KeyValues, Hidden]),
        v: Projection::linear("model.layers.{layer}.self_attn.v_proj.weight", Some("blk.{layer}.attn_v.weight"), &[KeyValues, Hidden]),
    },
    qk_norm: None,
    o: Projection::linear("model.layers.{layer}.self_attn.o_proj.weight", Some("blk.{layer}.attn_output.weight"), &[Hidden, Queries]),
    post_attn_norm: None,
    mlp_norm: Some(Projection::vector("model.layers.{layer}.post_attention_layernorm.weight", Some("blk.{layer}.ffn_norm.weight"), &[Hidden])),
    post_mlp_norm: None,
};

pub(crate) const MLP_IN: MlpInputs = MlpInputs::Gated {
    gate: Projection::linear("model.layers.{layer}.mlp.gate_proj.weight", Some("blk.{layer}.ffn_gate.weight"), &[Ff, Hidden]),
    up: Projection::linear("model.layers.{layer}.mlp.up_proj.weight", Some("blk.{layer}.ffn_up.weight"), &[Ff, Hidden]),
};

pub(crate) const MLP_OUT: Projection = Projection::linear("model.layers.{layer}.mlp.down_proj.weight", Some("blk.{layer}.ffn_down.weight"), &[Hidden, Ff]);

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: LlamaJson = parse(json, path)?;
    let k = Keys { path };
    k.require("sliding_window", matches!(c.sliding_window, Field::Absent), "is set, but Llama has no sliding window (model_type mistral has)")?;
    k.require("attention_bias", !k.bool_or("attention_bias", &c.attention_bias, false)?, "is true, but attention biases are not supported")?;
    c.config(&FAMILY, &k, None)
}
