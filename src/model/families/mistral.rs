//! The Mistral family: Llama's tables and one sliding window of attention in every layer.

use super::super::config::{parse, Config, Keys, MAX_POSITIONS};
use super::super::family::Family;
use super::super::Result;
use super::{llama, LlamaJson};
use std::path::Path;

pub static FAMILY: Family = Family { name: "mistral", model_types: &["mistral"], config, ..llama::FAMILY };

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    windowed(&FAMILY, json, path)
}

/// The config of a Llama-style `family` with one sliding window in every layer (or none, when
/// `sliding_window` is absent or null), and no attention biases.
pub(crate) fn windowed(family: &'static Family, json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c: LlamaJson = parse(json, path)?;
    let k = Keys { path };
    k.require("attention_bias", !k.bool_or("attention_bias", &c.attention_bias, false)?, "is true, but attention biases are not supported")?;
    let window = k.usize_or_at_most("sliding_window", &c.sliding_window, MAX_POSITIONS, MAX_POSITIONS)?;
    c.config(family, &k, Some(window))
}
