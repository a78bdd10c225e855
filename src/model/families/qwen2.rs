//! The Qwen2 family (Qwen2, Qwen2.5): Llama's tables with biases on the query, key and value
//! projections.

use super::super::config::{parse, Config, Keys};
use super::super::family::{BlockTable, Family, Qkv};
use super::super::Result;
use super::{llama, LlamaJson};
use std::path::Path;

pub static FAMILY: Family = Family { name: "qwen2", model_types: &["qwen2"], block: BLOCK, config, ..llama::FAMILY };

const BLOCK: BlockTable = match llama::BLOCK.qkv {
    Qkv::Separate { q, k, v } => BlockTable { qkv: Qkv::Separate { q: q.with_bias(), k: k.with_bias(), v: v.with_bias() }, ..llama::BLOCK },
    Qkv::Fused(_) | Qkv::FusedPerHead(_) => panic!("Llama's projections are separate"),
};

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: LlamaJson = parse(json, path)?;
    let k = Keys { path };
    k.require(
        "use_sliding_window",
        !k.bool_or("use_sliding_window", &c.use_sliding_window, false)?,
        "is true, but per-layer sliding windows are not supported",
    )?;
    c.config(&FAMILY, &k, None)
}
