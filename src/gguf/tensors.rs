//! GGUF tensors → Hugging Face Llama tensors: names, shapes, dequantization
//! and the rotary un-permutation of `q_proj`/`k_proj`.
//!
//! Name mapping (llama.cpp → Hugging Face):
//!
//! | GGUF                   | Hugging Face                                |
//! |------------------------|---------------------------------------------|
//! | `token_embd.weight`    | `model.embed_tokens.weight`                 |
//! | `blk.N.attn_q.weight`  | `model.layers.N.self_attn.q_proj.weight`    |
//! | `blk.N.attn_k.weight`  | `model.layers.N.self_attn.k_proj.weight`    |
//! | `blk.N.attn_v.weight`  | `model.layers.N.self_attn.v_proj.weight`    |
//! | `blk.N.attn_output.weight` | `model.layers.N.self_attn.o_proj.weight` |
//! | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight`   |
//! | `blk.N.ffn_norm.weight`  | `model.layers.N.post_attention_layernorm.weight` |
//! | `blk.N.ffn_gate.weight`  | `model.layers.N.mlp.gate_proj.weight`     |
//! | `blk.N.ffn_up.weight`    | `model.layers.N.mlp.up_proj.weight`       |
//! | `blk.N.ffn_down.weight`  | `model.layers.N.mlp.down_proj.weight`     |
//! | `output_norm.weight`   | `model.norm.weight`                         |
//! | `output.weight`        | `lm_head.weight` (absent: tied embeddings)  |
//!
//! GGUF lists dimensions fastest-first; candle's reader reverses them, so the
//! shapes here are already PyTorch's `[out_features, in_features]`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use safetensors::{Dtype, View};

use super::{Error, Hparams, OutDtype};

/// Per-layer tensors: GGUF suffix, Hugging Face suffix.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The GGUF name of a per-layer Llama tensor, by the table above:
/// `model.layers.N.mlp.down_proj.weight` → `blk.N.ffn_down.weight`.
pub fn llama_gguf_name(hf: &str) -> Option<String> {
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|l: &usize| l.to_string() == layer)?;
    let hf_suffix = rest.strip_suffix(".weight")?;
    LAYER_NAMES.iter().find(|(_, h)| *h == hf_suffix).map(|(gguf, _)| format!("blk.{layer}.{gguf}.weight"))
}

/// One tensor ready to be written.
struct Blob {
    /// Element type.
    dtype: Dtype,
    /// PyTorch shape.
    shape: Vec<usize>,
    /// Little-endian element bytes.
    data: Vec<u8>,
}

impl View for &Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The converted weights, keyed by Hugging Face name.
pub(super) struct Weights {
    /// Tensors in name order.
    blobs: BTreeMap<String, Blob>,
    /// Whether the GGUF had its own `output.weight`.
    pub(super) has_lm_head: bool,
}

impl Weights {
    /// Number of tensors.
    pub(super) fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Total number of elements.
    pub(super) fn parameters(&self) -> u64 {
        self.blobs.values().map(|b| b.shape.iter().product::<usize>() as u64).sum()
    }

    /// Write all tensors as one safetensors file.
    pub(super) fn write(&self, path: &Path) -> Result<(), Error> {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(self.blobs.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata), path)
            .map_err(|e| Error::Write { path: path.to_path_buf(), reason: e.to_string() })
    }
}

/// The expected Hugging Face name and shape of every GGUF tensor of a Llama
/// model, keyed by GGUF name. `output.weight` is included but optional.
fn expected(hp: &Hparams) -> BTreeMap<String, (String, Vec<usize>)> {
    let (h, hd) = (hp.hidden, hp.head_dim());
    let (q, kv, inter) = (hp.heads * hd, hp.kv_heads * hd, hp.intermediate);
    let mut map = BTreeMap::new();
    let mut add = |gguf: String, hf: String, shape: Vec<usize>| {
        map.insert(gguf, (hf, shape));
    };
    add("token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![hp.vocab_size, h]);
    add("output_norm.weight".into(), "model.norm.weight".into(), vec![h]);
    add("output.weight".into(), "lm_head.weight".into(), vec![hp.vocab_size, h]);
    for layer in 0..hp.layers {
        for (gguf, hf) in LAYER_NAMES {
            let shape = match gguf {
                "attn_q" => vec![q, h],
                "attn_k" | "attn_v" => vec![kv, h],
                "attn_output" => vec![h, q],
                "attn_norm" | "ffn_norm" => vec![h],
                "ffn_gate" | "ffn_up" => vec![inter, h],
                _ => vec![h, inter], // ffn_down
            };
            add(format!("blk.{layer}.{gguf}.weight"), format!("model.layers.{layer}.{hf}.weight"), shape);
        }
    }
    map
}

/// Read, dequantize, un-permute and convert every tensor of the GGUF.
pub(super) fn convert<R: Read + Seek>(path: &Path, content: &Content, reader: &mut R, hp: &Hparams, dtype: OutDtype) -> Result<Weights, Error> {
    let tensor_err = |name: &str, problem: String| Error::Tensor { path: path.to_path_buf(), name: name.to_string(), problem };
    let expected = expected(hp);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    if let Some(extra) = names.iter().find(|n| !expected.contains_key(n.as_str())) {
        return Err(tensor_err(extra, "not part of a llama model".into()));
    }
    if let Some(missing) = expected.keys().find(|k| k.as_str() != "output.weight" && !content.tensor_infos.contains_key(k.as_str())) {
        return Err(tensor_err(missing, "missing".into()));
    }
    let mut blobs = BTreeMap::new();
    for name in names {
        let (hf, shape) = &expected[name.as_str()];
        let info = &content.tensor_infos[name.as_str()];
        if info.shape.dims() != shape.as_slice() {
            return Err(tensor_err(name, format!("shape {:?}, expected {:?}", info.shape.dims(), shape)));
        }
        let corrupt = |e: candle_core::Error| Error::Corrupt { path: path.to_path_buf(), reason: format!("tensor `{name}`: {e}") };
        let values = info
            .read(reader, content.tensor_data_offset, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(corrupt)?;
        let values = if name.ends_with(".attn_q.weight") {
            unpermute_rotary(&values, hp.heads, shape[1])
        } else if name.ends_with(".attn_k.weight") {
            unpermute_rotary(&values, hp.kv_heads, shape[1])
        } else {
            values
        };
        blobs.insert(
            hf.clone(),
            Blob {
                dtype: match dtype {
                    OutDtype::F32 => Dtype::F32,
                    OutDtype::Bf16 => Dtype::BF16,
                },
                shape: shape.clone(),
                data: encode(&values, dtype),
            },
        );
    }
    let has_lm_head = blobs.contains_key("lm_head.weight");
    Ok(Weights { blobs, has_lm_head })
}

/// Undo llama.cpp's rotary permutation of a `q_proj`/`k_proj` weight
/// (`rows = heads * head_dim`, row-major with `cols` columns).
///
/// Hugging Face's Llama rotates the two halves of each head (`rotate_half`),
/// llama.cpp rotates adjacent pairs, so its converter reorders each head's rows
/// `[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]` into `[x_0, y_0, x_1, y_1, ...]`:
/// GGUF row `2i + t` of a head is Hugging Face row `t * d/2 + i`. This is the
/// inverse, the same as transformers' `_reverse_permute_weights`.
fn unpermute_rotary(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = (head * head_dim + 2 * i + t) * cols;
                let dst = (head * head_dim + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

/// Little-endian bytes of `values` in the output type.
fn encode(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        OutDtype::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_map_to_gguf_names_by_the_table() {
        assert_eq!(llama_gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(llama_gguf_name("model.layers.0.mlp.gate_proj.weight").as_deref(), Some("blk.0.ffn_gate.weight"));
        for other in ["model.layers.04.mlp.down_proj.weight", "model.layers.+4.mlp.down_proj.weight", "model.layers.4.mlp.down_proj.bias", "lm_head.weight"] {
            assert_eq!(llama_gguf_name(other), None, "{other}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is a tie between 1.0 and 1 + 2^-7: rounds to the even 1.0.
        let bytes = encode(&[1.0 + 1.0 / 256.0], OutDtype::Bf16);
        assert_eq!(bytes, half::bf16::from_f32(1.0).to_le_bytes().to_vec());
    }
}
