//! Diffing two checkpoints of the same architecture into a patch that turns one into the other.

use super::{Error, Result};
use crate::checkpoint::{Checkpoint, Dtype, TensorRef};
use crate::io_err;
use crate::patch::{self, BaseTensor, Delta, Manifest, Method, ModelInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What [`diff`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiffSummary {
    pub output: PathBuf,
    pub id: String,
    pub bytes: u64,
    pub tensors_changed: usize,
}

/// A patch that turns the checkpoint at `from` into the one at `to` (same tensors, dtypes, shapes).
pub fn diff(from: &Path, to: &Path, out: &Path) -> Result<DiffSummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    let (a, b) = (Checkpoint::open(from)?, Checkpoint::open(to)?);
    let incompatible = |reason: String| Error::Incompatible { from: from.to_path_buf(), to: to.to_path_buf(), reason };
    let (na, nb): (BTreeSet<_>, BTreeSet<_>) = (a.names().collect(), b.names().collect());
    if let Some(n) = na.symmetric_difference(&nb).next() {
        return Err(incompatible(format!("tensor `{n}` is in only one of them")));
    }
    let mut deltas = Vec::new();
    for name in na {
        let (ta, tb) = (a.tensor(name)?, b.tensor(name)?);
        if ta.dtype != tb.dtype || ta.shape != tb.shape {
            return Err(incompatible(format!("tensor `{name}` is {:?}{:?} vs {:?}{:?}", ta.dtype, ta.shape, tb.dtype, tb.shape)));
        }
        if ta.bytes != tb.bytes {
            deltas.push((BaseTensor::of(&ta), Delta::explicit(exact_delta(&ta, &tb)?)));
        }
    }
    let family = a.config().get("model_type").and_then(|v| v.as_str()).unwrap_or("unknown");
    let name = a.config().get("_name_or_path").and_then(|v| v.as_str()).map(str::to_string);
    let name = name.unwrap_or_else(|| from.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut manifest = Manifest::new(ModelInfo { name, family: family.to_string() }, Method { name: "diff".into(), hyperparameters: BTreeMap::new() });
    manifest.base_model = Some(a.identity()?.to_hex().to_string());
    let tensors_changed = deltas.len();
    let encoded = patch::encode(manifest, deltas)?;
    crate::atomic::write(out, &encoded.bytes, &crate::atomic::Policy::new()).map_err(io_err(out))?;
    Ok(DiffSummary { output: out.to_path_buf(), id: encoded.id, bytes: encoded.bytes.len() as u64, tensors_changed })
}

/// Per element, an f32 `D` with `materialize(a, D) = b`: `b − a`, or a neighbour of it.
fn exact_delta(a: &TensorRef, b: &TensorRef) -> Result<Vec<f32>> {
    let (dt, s) = (a.dtype, a.dtype.size());
    let (wa, wb) = (a.to_f32(), b.to_f32());
    let mut d = vec![0f32; wa.len()];
    for i in 0..wa.len() {
        let (ba, bb) = (&a.bytes[i * s..(i + 1) * s], &b.bytes[i * s..(i + 1) * s]);
        if ba == bb {
            continue;
        }
        let hits = |d: f32| d != 0.0 && d.is_finite() && reaches(dt, wa[i] + d, bb);
        let guess = wb[i] - wa[i];
        let found = [0i32, 1, -1, 2, -2].into_iter().map(|k| nudge(guess, k)).find(|&d| hits(d));
        d[i] = found.ok_or_else(|| Error::Unrepresentable { path: b.path.to_path_buf(), name: b.name.to_string(), index: i, from: wa[i], to: wb[i] })?;
    }
    Ok(d)
}

fn reaches(dt: Dtype, v: f32, want: &[u8]) -> bool {
    let mut got = [0u8; 4];
    dt.put(v, &mut got[..dt.size()]);
    &got[..dt.size()] == want
}

/// `x` moved by `k` units in the last place.
fn nudge(x: f32, k: i32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let bits = x.to_bits() as i64 + if x.is_sign_negative() { -(k as i64) } else { k as i64 };
    f32::from_bits(bits.clamp(0, u32::MAX as i64) as u32)
}
