//! The Phi-3 family (Phi-3, Phi-3.5, Phi-4-mini): Llama's block with queries, keys and values in
//! one projection and the MLP's gate and up projections in another, a sliding window where the
//! config sets one, and rotary embeddings over part of each head (`partial_rotary_factor`).

use super::super::config::{parse, Config, Keys, MAX_POSITIONS};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, Projection, Qkv};
use super::super::Result;
use super::{llama, LlamaJson};
use std::path::Path;

pub static FAMILY: Family = Family {
    name: "phi3",
    model_types: &["phi3"],
    block: BlockTable {
        qkv: Qkv::Fused(Projection::linear("model.layers.{layer}.self_attn.qkv_proj.weight", Some("blk.{layer}.attn_qkv.weight"), &[Dim::Qkv, Dim::Hidden])),
        ..llama::BLOCK
    },
    // llama.cpp stores the stacked gate and up rows as `ffn_up`.
    mlp_in: MlpInputs::FusedGated(Projection::linear(
        "model.layers.{layer}.mlp.gate_up_proj.weight",
        Some("blk.{layer}.ffn_up.weight"),
        &[Dim::GateUp, Dim::Hidden],
    )),
    config,
    ..llama::FAMILY
};

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: LlamaJson = parse(json, path)?;
    let k = Keys { path };
    k.require("attention_bias", !k.bool_or("attention_bias", &c.attention_bias, false)?, "is true, but attention biases are not supported")?;
    let window = k.usize_or_at_most("sliding_window", &c.sliding_window, MAX_POSITIONS, MAX_POSITIONS)?;
    c.config(&FAMILY, &k, Some(window))
}
