//! The Gemma 3 family's text model (`model_type` `gemma3_text`): Gemma 2's block with a
//! `(1 + w)` RMSNorm over each head's queries and keys before the rotary embedding, no attention
//! soft-capping, and two rotary embeddings: the sliding-window layers' (`rope_local_base_freq`, or
//! `rope_parameters.sliding_attention`) and the full-attention layers' (`rope_theta` and
//! `rope_scaling`, or `rope_parameters.full_attention`). Without `layer_types`, every
//! `sliding_window_pattern`-th layer (default 6) attends fully. [`MULTIMODAL`] is the same text
//! model inside a multimodal checkpoint (`model_type` `gemma3`): its config under `text_config`,
//! its tensors under `language_model.`; the vision tower is left as it is. The text model's GGUF
//! names are llama.cpp's (`import-gguf` reads them); its norm weights are stored there with the 1
//! added.

use super::super::config::{Config, Field, Keys};
use super::super::family::{BlockTable, Dim, Family, MlpInputs, Projection, Qkv};
use super::super::{Error, Result};
use super::gemma2::{self, gemma_config, Defaults};
use super::rope_section;
use serde_json::{Map, Value};
use std::path::Path;

/// Edit layers from the average causal trace of 20 known facts on Gemma 3 270M (the MLP effect
/// at the last subject token peaks at layer 4: ROME there) and, for MEMIT, the ranges around the
/// peak compared on CounterFact records no table reports: 2-4 kept the neighbours best
/// (docs/families.md).
pub static FAMILY: Family = Family {
    name: "gemma3_text",
    model_types: &["gemma3_text"],
    block: BLOCK,
    default_edit_layers: &[2, 3, 4],
    rome_layer_index: 2,
    answer_kl: 1.0,
    config,
    ..gemma2::FAMILY
};

const BLOCK: BlockTable = BlockTable {
    qk_norm: Some((
        Projection::vector("model.layers.{layer}.self_attn.q_norm.weight", Some("blk.{layer}.attn_q_norm.weight"), &[Dim::HeadDim]),
        Projection::vector("model.layers.{layer}.self_attn.k_norm.weight", Some("blk.{layer}.attn_k_norm.weight"), &[Dim::HeadDim]),
    )),
    ..gemma2::BLOCK
};

/// A Gemma 3 projection's names: Hugging Face's under `language_model.` (the multimodal checkpoint's), no GGUF name.
const fn inner(p: Projection, name: &'static str) -> Projection {
    Projection { name, gguf: None, ..p }
}

pub static MULTIMODAL: Family = Family {
    name: "gemma3",
    model_types: &["gemma3"],
    embed: inner(FAMILY.embed, "language_model.model.embed_tokens.weight"),
    final_norm: inner(FAMILY.final_norm, "language_model.model.norm.weight"),
    unembed: inner(FAMILY.unembed, "language_model.lm_head.weight"),
    block: BlockTable {
        attn_norm: inner(BLOCK.attn_norm, "language_model.model.layers.{layer}.input_layernorm.weight"),
        qkv: match BLOCK.qkv {
            Qkv::Separate { q, k, v } => Qkv::Separate {
                q: inner(q, "language_model.model.layers.{layer}.self_attn.q_proj.weight"),
                k: inner(k, "language_model.model.layers.{layer}.self_attn.k_proj.weight"),
                v: inner(v, "language_model.model.layers.{layer}.self_attn.v_proj.weight"),
            },
            Qkv::Fused(_) | Qkv::FusedPerHead(_) => panic!("Gemma's projections are separate"),
        },
        qk_norm: match BLOCK.qk_norm {
            Some((q, k)) => Some((
                inner(q, "language_model.model.layers.{layer}.self_attn.q_norm.weight"),
                inner(k, "language_model.model.layers.{layer}.self_attn.k_norm.weight"),
            )),
            None => panic!("Gemma 3 has q/k norms"),
        },
        o: inner(BLOCK.o, "language_model.model.layers.{layer}.self_attn.o_proj.weight"),
        post_attn_norm: Some(inner(BLOCK.attn_norm, "language_model.model.layers.{layer}.post_attention_layernorm.weight")),
        mlp_norm: Some(inner(BLOCK.attn_norm, "language_model.model.layers.{layer}.pre_feedforward_layernorm.weight")),
        post_mlp_norm: Some(inner(BLOCK.attn_norm, "language_model.model.layers.{layer}.post_feedforward_layernorm.weight")),
    },
    mlp_in: match FAMILY.mlp_in {
        MlpInputs::Gated { gate, up } => MlpInputs::Gated {
            gate: inner(gate, "language_model.model.layers.{layer}.mlp.gate_proj.weight"),
            up: inner(up, "language_model.model.layers.{layer}.mlp.up_proj.weight"),
        },
        _ => panic!("Gemma's MLP is gated by separate projections"),
    },
    mlp_out: inner(FAMILY.mlp_out, "language_model.model.layers.{layer}.mlp.down_proj.weight"),
    layers_key: "text_config.num_hidden_layers",
    config: multimodal_config,
    ..FAMILY
};

fn config(json: &Value, path: &Path) -> Result<Config> {
    text_config(&FAMILY, json, path)
}

/// A multimodal config: its `text_config` read as a text model's, errors naming the key within it.
fn multimodal_config(json: &Value, path: &Path) -> Result<Config> {
    let text = match json.get("text_config") {
        Some(t @ Value::Object(_)) => t,
        None | Some(Value::Null) => return Err(Keys { path }.err("text_config", "is missing")),
        Some(_) => return Err(Keys { path }.err("text_config", "must be an object")),
    };
    text_config(&MULTIMODAL, text, path).map_err(|e| match e {
        Error::Config { path, key, problem } => Error::Config { path, key: format!("text_config.{key}"), problem },
        e => e,
    })
}

/// A Gemma 3 text model's config, for `family`'s table.
fn text_config(family: &'static Family, json: &Value, path: &Path) -> Result<Config> {
    let defaults = Defaults { attn_softcap: None, final_softcap: None, max_positions: 131_072 };
    let (mut c, l, g) = gemma_config(family, json, path, &defaults, |k, g| k.usize_or("sliding_window_pattern", &g.sliding_window_pattern, 6))?;
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
