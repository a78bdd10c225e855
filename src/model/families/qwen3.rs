//! The Qwen3 family: Llama's tables with an RMSNorm over each head's queries and keys before
//! the rotary embedding.

use super::super::config::{parse, Config, Keys};
use super::super::family::{BlockTable, Dim, Family, Projection};
use super::super::Result;
use super::{llama, LlamaJson};
use std::path::Path;

pub static FAMILY: Family = Family { name: "qwen3", model_types: &["qwen3"], block: BLOCK, config, ..llama::FAMILY };

const BLOCK: BlockTable = BlockTable {
    qk_norm: Some((
        Projection::vector("model.layers.{layer}.self_attn.q_norm.weight", Some("blk.{layer}.attn_q_norm.weight"), &[Dim::HeadDim]),
        Projection::vector("model.layers.{layer}.self_attn.k_norm.weight", Some("blk.{layer}.attn_k_norm.weight"), &[Dim::HeadDim]),
    )),
    ..llama::BLOCK
};

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: LlamaJson = parse(json, path)?;
    let k = Keys { path };
    k.require(
        "use_sliding_window",
        !k.bool_or("use_sliding_window", &c.use_sliding_window, false)?,
        "is true, but per-layer sliding windows are not supported",
    )?;
    k.require("attention_bias", !k.bool_or("attention_bias", &c.attention_bias, false)?, "is true, but attention biases are not supported")?;
    c.config(&FAMILY, &k, None)
}
