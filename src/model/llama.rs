//! The Llama family (SmolLM2, Llama 2/3 without rope scaling, Mistral without sliding windows):
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, tied or separate unembedding.

use super::config::{Config, ConfigJson, Family, Orientation, Projection, MAX_LAYERS, MAX_POSITIONS};
use super::ops::{Activation, Linear, Norm};
use super::weights::{load, load_proj, Block, MlpIn, Weights};
use super::Result;
use crate::checkpoint::Tensors;
use candle_core::Device;
use std::path::Path;

pub static FAMILY: Family = Family {
    name: "llama",
    model_types: &["llama", "mistral"],
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    unembed: "lm_head.weight",
    mlp_in: &[
        Projection { name: "model.layers.{layer}.mlp.gate_proj.weight", orientation: Orientation::OutIn },
        Projection { name: "model.layers.{layer}.mlp.up_proj.weight", orientation: Orientation::OutIn },
    ],
    mlp_out: Projection { name: "model.layers.{layer}.mlp.down_proj.weight", orientation: Orientation::OutIn },
    default_edit_layers: [4, 5, 6, 7, 8],
    layers_key: "num_hidden_layers",
    kn_steps: 1,
    load: config,
    weights,
};

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c = ConfigJson { json, path };
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    c.require("rope_scaling", json.get("rope_scaling").is_none_or(|v| v.is_null()), "is set, but rope scaling is not supported")?;
    c.require("attention_bias", !c.bool_or("attention_bias", false)?, "is true, but attention biases are not supported")?;
    c.require("sliding_window", json.get("sliding_window").is_none_or(|v| v.is_null()), "is set, but sliding-window attention is not supported")?;
    let act = c.str_or("hidden_act", "silu");
    c.require("hidden_act", act == "silu", "must be silu")?;
    let num_kv_heads = c.usize_or("num_key_value_heads", num_heads)?;
    c.require("num_key_value_heads", num_heads % num_kv_heads == 0, "must divide num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden_size / num_heads)?;
    c.require("head_dim", head_dim % 2 == 0, "must be even for rotary embeddings")?;
    Ok(Config {
        family: &FAMILY,
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_layers: c.usize_at_most("num_hidden_layers", MAX_LAYERS)?,
        num_heads,
        num_kv_heads,
        head_dim,
        norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(c.f64_or("rope_theta", 10_000.0)?),
        max_positions: c.usize_or_at_most("max_position_embeddings", 2048, MAX_POSITIONS)?,
        tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
        bos_token_id: c.ids("bos_token_id").first().copied(),
        eos_token_ids: c.ids("eos_token_id"),
    })
}

fn weights(cfg: &Config, ckpt: &dyn Tensors, dev: &Device) -> Result<Weights> {
    let (d, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let linear = |name: String, out: usize, inp: usize| -> Result<Linear> {
        Ok(Linear { weight: load_proj(ckpt, &name, out, inp, Orientation::OutIn, dev)?, bias: None })
    };
    let norm = |name: String| -> Result<Norm> { Ok(Norm::Rms { weight: load(ckpt, &name, &[d], dev)?, eps: cfg.norm_eps }) };
    let blocks = (0..cfg.num_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            Ok(Block {
                attn_norm: norm(format!("{p}.input_layernorm.weight"))?,
                q: linear(format!("{p}.self_attn.q_proj.weight"), cfg.num_heads * hd, d)?,
                k: linear(format!("{p}.self_attn.k_proj.weight"), cfg.num_kv_heads * hd, d)?,
                v: linear(format!("{p}.self_attn.v_proj.weight"), cfg.num_kv_heads * hd, d)?,
                o: linear(format!("{p}.self_attn.o_proj.weight"), d, cfg.num_heads * hd)?,
                mlp_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                mlp_in: MlpIn::Gated { gate: linear(FAMILY.mlp_in[0].at(l), ff, d)?, up: linear(FAMILY.mlp_in[1].at(l), ff, d)? },
                down: linear(FAMILY.mlp_out.at(l), d, ff)?,
                act: Activation::Silu,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = load(ckpt, FAMILY.embed, &[cfg.vocab_size, d], dev)?;
    // Tied models may still store a copy of the head; a separate head is used whenever present.
    let unembed = if ckpt.contains(FAMILY.unembed) {
        load(ckpt, FAMILY.unembed, &[cfg.vocab_size, d], dev)?
    } else if cfg.tied_embeddings {
        embed.clone()
    } else {
        return Err(crate::checkpoint::Error::MissingTensor { dir: ckpt.dir().to_path_buf(), name: FAMILY.unembed.into() }.into());
    };
    Ok(Weights { embed, positions: None, blocks, final_norm: norm(FAMILY.final_norm.to_string())?, unembed })
}
