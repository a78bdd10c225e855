//! The GPT-2 family: LayerNorm, learned positions, fused QKV, GELU (tanh) MLP, tied
//! unembedding, and `Conv1D` weights stored `[in, out]`.

use super::config::{Config, ConfigJson, Family, Orientation, Projection, MAX_LAYERS, MAX_POSITIONS};
use super::ops::{Activation, Linear, Norm};
use super::weights::{load, load_proj, Block, MlpIn, Weights};
use super::Result;
use crate::checkpoint::Tensors;
use candle_core::Device;
use std::path::Path;

pub static FAMILY: Family = Family {
    name: "gpt2",
    model_types: &["gpt2"],
    embed: "transformer.wte.weight",
    final_norm: "transformer.ln_f.weight",
    unembed: "lm_head.weight",
    mlp_in: &[Projection { name: "transformer.h.{layer}.mlp.c_fc.weight", orientation: Orientation::InOut }],
    mlp_out: Projection { name: "transformer.h.{layer}.mlp.c_proj.weight", orientation: Orientation::InOut },
    default_edit_layers: [3, 4, 5, 6, 7],
    layers_key: "n_layer",
    kn_steps: 20,
    load: config,
    weights,
};

fn config(json: &serde_json::Value, path: &Path) -> Result<Config> {
    let c = ConfigJson { json, path };
    let hidden_size = c.usize("n_embd")?;
    let num_heads = c.usize("n_head")?;
    let act = c.str_or("activation_function", "gelu_new");
    c.require("activation_function", act == "gelu_new", "must be gelu_new")?;
    c.require("scale_attn_by_inverse_layer_idx", !c.bool_or("scale_attn_by_inverse_layer_idx", false)?, "is not supported")?;
    c.require("scale_attn_weights", c.bool_or("scale_attn_weights", true)?, "must be true")?;
    c.require("n_head", hidden_size % num_heads == 0, "must divide n_embd")?;
    Ok(Config {
        family: &FAMILY,
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize_or("n_inner", 4 * hidden_size)?,
        num_layers: c.usize_at_most("n_layer", MAX_LAYERS)?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        norm_eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
        rope_theta: None,
        max_positions: c.usize_or_at_most("n_positions", 1024, MAX_POSITIONS)?,
        tied_embeddings: true,
        bos_token_id: c.ids("bos_token_id").first().copied(),
        eos_token_ids: c.ids("eos_token_id"),
    })
}

fn weights(cfg: &Config, ckpt: &dyn Tensors, dev: &Device) -> Result<Weights> {
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let conv1d = |name: String, out: usize, inp: usize| -> Result<Linear> {
        let bias = name.strip_suffix(".weight").map(|p| format!("{p}.bias")).unwrap_or_default();
        Ok(Linear { weight: load_proj(ckpt, &name, out, inp, Orientation::InOut, dev)?, bias: Some(load(ckpt, &bias, &[out], dev)?) })
    };
    let norm = |p: String| -> Result<Norm> {
        Ok(Norm::Layer { weight: load(ckpt, &format!("{p}.weight"), &[d], dev)?, bias: load(ckpt, &format!("{p}.bias"), &[d], dev)?, eps: cfg.norm_eps })
    };
    let blocks = (0..cfg.num_layers)
        .map(|l| {
            let p = format!("transformer.h.{l}");
            let qkv = conv1d(format!("{p}.attn.c_attn.weight"), 3 * d, d)?;
            let part = |i: usize| -> Result<Linear> {
                Ok(Linear { weight: qkv.weight.narrow(0, i * d, d)?.contiguous()?, bias: qkv.bias.as_ref().map(|b| b.narrow(0, i * d, d)).transpose()? })
            };
            Ok(Block {
                attn_norm: norm(format!("{p}.ln_1"))?,
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                o: conv1d(format!("{p}.attn.c_proj.weight"), d, d)?,
                mlp_norm: norm(format!("{p}.ln_2"))?,
                mlp_in: MlpIn::Plain(conv1d(FAMILY.mlp_in[0].at(l), ff, d)?),
                down: conv1d(FAMILY.mlp_out.at(l), d, ff)?,
                act: Activation::GeluTanh,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = load(ckpt, FAMILY.embed, &[cfg.vocab_size, d], dev)?;
    let positions = Some(load(ckpt, "transformer.wpe.weight", &[cfg.max_positions, d], dev)?);
    let final_norm = norm("transformer.ln_f".into())?;
    Ok(Weights { unembed: embed.clone(), embed, positions, blocks, final_norm })
}
