//! GGUF tensors → Hugging Face tensors: names, shapes, dequantization, and what llama.cpp's
//! converter changed undone: Llama's rotary permutation of `q_proj`/`k_proj`, and the 1 it adds
//! to every norm weight of a `(1 + w)` RMSNorm family (Gemma 3).
//!
//! Names and shapes come from the architecture's family table (`model::families::llama`,
//! `gemma3`; shown by `factpatch inspect-model`): each tensor's Hugging Face name beside its GGUF
//! name (`blk.N.ffn_down.weight` → `model.layers.N.mlp.down_proj.weight`, `output.weight` →
//! `lm_head.weight`, absent when the embeddings are tied).
//!
//! GGUF lists dimensions fastest-first; candle's reader reverses them, so the
//! shapes here are already PyTorch's `[out_features, in_features]`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::QTensor;
use candle_core::Device;
use safetensors::{Dtype, View};

use super::{Arch, Error, Hparams, OutDtype};
use crate::model::{Dims, NormKind, Projection, Qkv};

/// The GGUF name of a per-layer Llama tensor, by the family table:
/// `model.layers.N.mlp.down_proj.weight` → `blk.N.ffn_down.weight`.
pub fn llama_gguf_name(hf: &str) -> Option<String> {
    Arch::Llama.family().layer_tensors().into_iter().find_map(|p| p.layer_of(hf).and_then(|l| p.gguf_at(l)))
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

/// How llama.cpp's converter stored a tensor, relative to Hugging Face's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    /// The same values.
    AsIs,
    /// A Llama `q_proj`/`k_proj` of this many heads, rows permuted for llama.cpp's rotary pairs.
    RotaryPermuted(usize),
    /// A `(1 + w)` RMSNorm's weight, stored as `1 + w` (llama.cpp's Gemma converters add the 1).
    PlusOne,
}

/// The expected Hugging Face name, shape and storage of every GGUF tensor of the model `hp`
/// describes, keyed by GGUF name. `output.weight` is included but optional.
fn expected(hp: &Hparams) -> BTreeMap<String, (String, Vec<usize>, Stored)> {
    let dims =
        Dims { vocab: hp.vocab_size, hidden: hp.hidden, ff: hp.intermediate, heads: hp.heads, kv_heads: hp.kv_heads, head_dim: hp.head_dim, positions: 0 };
    let f = hp.arch.family();
    let Qkv::Separate { q, k, .. } = f.block.qkv else { unreachable!("llama and gemma3 have separate projections") };
    let stored = |p: &Projection| match p.name {
        n if hp.arch == Arch::Llama && n == q.name => Stored::RotaryPermuted(hp.heads),
        n if hp.arch == Arch::Llama && n == k.name => Stored::RotaryPermuted(hp.kv_heads),
        _ if f.norm == NormKind::RmsPlusOne && p.shape.len() == 1 => Stored::PlusOne,
        _ => Stored::AsIs,
    };
    let globals = f.global_tensors().into_iter().map(|p| (p, 0));
    let layers = (0..hp.layers).flat_map(|l| f.layer_tensors().into_iter().map(move |p| (p, l)));
    globals.chain(layers).filter_map(|(p, l)| Some((p.gguf_at(l)?, (p.at(l), p.stored_shape(&dims), stored(p))))).collect()
}

/// One tensor of a GGUF, as Hugging Face names and lays it out.
pub(super) struct Mapped<'a> {
    /// Its GGUF name.
    pub(super) gguf: &'a str,
    /// Its Hugging Face name.
    pub(super) hf: String,
    /// Its PyTorch shape (the same in both files).
    pub(super) shape: Vec<usize>,
    /// Type, shape and place in the GGUF file.
    pub(super) info: &'a TensorInfo,
    /// How llama.cpp stored it.
    stored: Stored,
}

/// Every tensor of the GGUF, in GGUF name order, checked to be exactly the model's of `hp`'s
/// architecture (`output.weight` optional) with the shapes `hp` implies.
pub(super) fn map<'a>(path: &Path, content: &'a Content, hp: &Hparams) -> Result<Vec<Mapped<'a>>, Error> {
    let tensor_err = |name: &str, problem: String| Error::Tensor { path: path.to_path_buf(), name: name.to_string(), problem };
    let mut expected = expected(hp);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    if let Some(extra) = names.iter().find(|n| !expected.contains_key(n.as_str())) {
        return Err(tensor_err(extra, format!("not part of a {} model", hp.arch.name())));
    }
    let unembed = hp.arch.family().unembed.gguf;
    if let Some(missing) = expected.keys().find(|k| Some(k.as_str()) != unembed && !content.tensor_infos.contains_key(k.as_str())) {
        return Err(tensor_err(missing, "missing".into()));
    }
    names
        .into_iter()
        .map(|name| {
            let (hf, shape, stored) = expected.remove(name.as_str()).expect("checked above");
            let info = &content.tensor_infos[name.as_str()];
            if info.shape.dims() != shape.as_slice() {
                return Err(tensor_err(name, format!("shape {:?}, expected {:?}", info.shape.dims(), shape)));
            }
            Ok(Mapped { gguf: name, hf, shape, info, stored })
        })
        .collect()
}

impl Mapped<'_> {
    /// The tensor's values as Hugging Face has them: read from `reader` (the GGUF file, whose
    /// tensor data starts at `data_offset`), dequantized to f32 and, for Llama's `q_proj`/`k_proj`,
    /// un-permuted; Gemma's norm weights less the 1 llama.cpp added (in f32, as transformers'
    /// GGUF loader does). What `import-gguf` writes, and what `apply` hashes and patches.
    pub(super) fn hf_values<R: Read + Seek>(&self, path: &Path, reader: &mut R, data_offset: u64) -> Result<Vec<f32>, Error> {
        let q = self.info.read(reader, data_offset, &Device::Cpu).map_err(|e| self.corrupt(path, e))?;
        self.hf_values_of(path, &q)
    }

    /// [`Mapped::hf_values`] of `q`, this tensor's data in the GGUF's layout.
    pub(super) fn hf_values_of(&self, path: &Path, q: &QTensor) -> Result<Vec<f32>, Error> {
        let values = q.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(|e| self.corrupt(path, e))?;
        Ok(match self.stored {
            Stored::RotaryPermuted(heads) => unpermute_rotary(&values, heads, self.shape[1]),
            Stored::PlusOne => values.into_iter().map(|v| v - 1.0).collect(),
            Stored::AsIs => values,
        })
    }

    /// An error about this tensor of the GGUF file at `path`.
    fn corrupt(&self, path: &Path, e: candle_core::Error) -> Error {
        Error::Corrupt { path: path.to_path_buf(), reason: format!("tensor `{}`: {e}", self.gguf) }
    }

    /// Hugging Face values back as the GGUF stores them (the inverse of what
    /// [`Mapped::hf_values`] undoes).
    pub(super) fn gguf_order(&self, values: Vec<f32>) -> Vec<f32> {
        match self.stored {
            Stored::RotaryPermuted(heads) => permute_rotary(&values, heads, self.shape[1]),
            Stored::PlusOne => values.into_iter().map(|v| v + 1.0).collect(),
            Stored::AsIs => values,
        }
    }
}

/// Read, dequantize, un-permute and convert every tensor of the GGUF.
pub(super) fn convert<R: Read + Seek>(path: &Path, content: &Content, reader: &mut R, hp: &Hparams, dtype: OutDtype) -> Result<Weights, Error> {
    let mut blobs = BTreeMap::new();
    for m in map(path, content, hp)? {
        let values = m.hf_values(path, reader, content.tensor_data_offset)?;
        let dtype_st = match dtype {
            OutDtype::F32 => Dtype::F32,
            OutDtype::Bf16 => Dtype::BF16,
        };
        blobs.insert(m.hf, Blob { dtype: dtype_st, shape: m.shape, data: encode(&values, dtype) });
    }
    let has_lm_head = blobs.contains_key(hp.arch.family().unembed.name);
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

/// llama.cpp's rotary permutation, the inverse of [`unpermute_rotary`]: Hugging Face row
/// `t * d/2 + i` of a head becomes GGUF row `2i + t`.
fn permute_rotary(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = (head * head_dim + t * half + i) * cols;
                let dst = (head * head_dim + 2 * i + t) * cols;
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

    #[test]
    fn permute_inverts_unpermute() {
        // 3 heads of dimension 4, 2 columns: every row distinct.
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let hf = unpermute_rotary(&values, 3, 2);
        assert_ne!(hf, values);
        // Head 0's GGUF rows [x0, y0, x1, y1] are HF rows [x0, x1, y0, y1].
        assert_eq!(&hf[..8], &[0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        assert_eq!(permute_rotary(&hf, 3, 2), values);
    }
}
