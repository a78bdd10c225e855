//! The Gemma 3 family (its text model, `model_type` `gemma3_text`): Gemma 2's block with a
//! `(1 + w)` RMSNorm over each head's queries and keys before the rotary embedding, no attention
//! soft-capping, and two rotary embeddings: the sliding-window layers' (`rope_local_base_freq`, or
//! `rope_parameters.sliding_attention`) and the full-attention layers' (`rope_theta` and
//! `rope_scaling`, or `rope_parameters.full_attention`). Without `layer_types`, every
//! `sliding_window_pattern`-th layer (default 6) attends fully.

use super::super::config::{Config, Field, Keys};
use super::super::family::{BlockTable, Dim, Family, Projection};
use super::super::Result;
use super::gemma2::{self, gemma_config, Defaults};
use super::rope_section;
use serde_json::{Map, Value};
use std::path::Path;

pub static FAMILY: Family = Family { name: "gemma3_text", model_types: &["gemma3_text"], block: BLOCK, config, ..gemma2::FAMILY };

const BLOCK: BlockTable = BlockTable {
    qk_norm: Some((
        Projection::vector("model.layers.{layer}.self_attn.q_norm.weight", None, &[Dim::HeadDim]),
        Projection::vector("model.layers.{layer}.self_attn.k_norm.weight", None, &[Dim::HeadDim]),
    )),
    ..gemma2::BLOCK
};

fn config(json: &Value, path: &Path) -> Result<Config> {
    let defaults = Defaults { attn_softcap: None, final_softcap: None, max_positions: 131_072 };
    let (mut c, l, g) = gemma_config(&FAMILY, json, path, &defaults, |k, g| k.usize_or("sliding_window_pattern", &g.sliding_window_pattern, 6))?;
    let k = Keys { path };
    k.require("attn_logit_softcapping", c.attn_softcap.is_none(), "is set, but Gemma 3 does not soft-cap attention logits (transformers ignores it)")?;
    let global = k.f64_or("rope_theta", &l.rope_theta, 1_000_000.0)?;
    let local = k.f64_or("rope_local_base_freq", &g.rope_local_base_freq, 10_000.0)?;
    let (full, sliding) = match (&l.rope_parameters, &l.rope_scaling) {
        (Field::Value(m), _) => (section(&k, m, "full_attention")?, section(&k, m, "sliding_attention")?),
        (Field::Wrong, _) => return Err(k.err("rope_parameters", "must be an object")),
        // transformers < 5: `rope_scaling` is the full-attention layers' alone.
        (_, Field::Value(m)) => (("rope_scaling".to_string(), Some(m)), (String::new(), None)),
        (_, Field::Wrong) => return Err(k.err("rope_scaling", "must be an object")),
        _ => ((String::new(), None), (String::new(), None)),
    };
    let empty = Map::new();
    c.rope = Some(rope_section(&k, &full.0, full.1.unwrap_or(&empty), global, c.head_dim, None)?);
    c.local_rope = Some(rope_section(&k, &sliding.0, sliding.1.unwrap_or(&empty), local, c.head_dim, None)?);
    Ok(c)
}

/// `rope_parameters.NAME`, an object or null (the type's defaults), with its key.
fn section<'m>(k: &Keys, parameters: &'m Map<String, Value>, name: &str) -> Result<(String, Option<&'m Map<String, Value>>)> {
    let key = format!("rope_parameters.{name}");
    match parameters.get(name) {
        None | Some(Value::Null) => Ok((key, None)),
        Some(Value::Object(m)) => Ok((key, Some(m))),
        Some(_) => Err(k.err(&key, "must be an object")),
    }
}
