//! The Phi-3 family (Phi-3, Phi-3.5, Phi-4-mini): Llama's block with queries, keys and values in
//! one projection and the MLP's gate and up projections in another, a sliding window where the
//! config sets one, and rotary embeddings over part of each head (`partial_rotary_factor`).

use super::super::config::Config;
use super::super::family::{BlockTable, Dim, Family, MlpInputs, Projection, Qkv};
use super::super::Result;
use super::{llama, mistral};
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
    mistral::windowed(&FAMILY, json, path)
}
