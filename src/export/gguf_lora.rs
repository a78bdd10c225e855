//! The llama.cpp LoRA adapter, as llama.cpp's `convert_lora_to_gguf.py` writes it:
//! `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per matrix
//! `blk.N.ffn_down.weight.lora_a` (ggml `ne = [in, r]`) and `.lora_b` (`ne = [r, out]`), F32.
//! llama.cpp scales every pair by `alpha / r` with one alpha for the file: pairs of a smaller
//! rank are padded with zeros to the largest, so the scale is 1 everywhere.

use super::{max_rank, provenance, Error, Lora, Result};
use crate::atomic::{self, Policy};
use crate::io_err;
use crate::patch::Patch;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Writes the adapter to `out`; returns its size and each tensor's GGUF name.
pub(super) fn write(p: &Patch, loras: &[Lora], out: &Path, policy: &Policy) -> Result<(u64, Vec<String>)> {
    let failed = |e: candle_core::Error| Error::Gguf { path: out.to_path_buf(), reason: e.to_string() };
    let r = max_rank(loras);
    let mut names = Vec::with_capacity(loras.len());
    let mut tensors = Vec::with_capacity(2 * loras.len());
    for l in loras {
        let name = crate::gguf::llama_gguf_name(&l.tensor).expect("every Llama MLP projection has a GGUF name");
        // A: `[r, in]`, its extra rows zero. B: `[out, r]`, its extra columns zero.
        let mut a = l.a.clone();
        a.resize(r * l.in_features, 0.0);
        let b: Vec<f32> = l.b.chunks(l.rank).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, r - l.rank))).collect();
        let q = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu).and_then(|t| QTensor::quantize(&t, GgmlDType::F32));
        tensors.push((format!("{name}.lora_a"), q(a, (r, l.in_features)).map_err(failed)?));
        tensors.push((format!("{name}.lora_b"), q(b, (l.out_features, r)).map_err(failed)?));
        names.push(name);
    }
    let s = |v: &str| gguf_file::Value::String(v.to_string());
    let metadata = [
        ("general.architecture", s("llama")),
        ("general.type", s("adapter")),
        ("general.name", s(&format!("factpatch {}", p.id()))),
        ("adapter.type", s("lora")),
        ("adapter.lora.alpha", gguf_file::Value::F32(r as f32)),
        ("factpatch.provenance", s(&provenance(p).to_string())),
    ];
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &metadata, &tensors).map_err(failed)?;
    let bytes = bytes.into_inner();
    atomic::write(out, &bytes, policy).map_err(io_err(out))?;
    Ok((bytes.len() as u64, names))
}
