//! Patches as LoRA adapters for other runtimes: a PEFT folder (PEFT and transformers load it;
//! llama.cpp's `convert_lora_to_gguf.py` reads its names) or a llama.cpp LoRA GGUF file
//! (`docs/runtimes.md`).
//!
//! Each touched matrix becomes a pair `B·A` with `ΔW [out, in] = B·A · lora_alpha/r`, and
//! `lora_alpha = r`, so the scale is 1. A low-rank patch (ROME, MEMIT, EMMET, AlphaEdit without
//! RECT, and merges of them) is exported exactly: its factors, the groups side by side. Any other
//! delta (RECT's masked product, KN's and `diff`'s explicit ones) needs a rank: its rank-R truncated
//! SVD is exported, and the relative error `‖ΔW − B·A‖_F / ‖ΔW‖_F` reported per tensor.
//!
//! The adapter holds the file's own delta: a patch compiled on a parent adapts the model with the
//! parent applied (the parent's id is recorded in the adapter); `merge` a chain to export it whole.

mod gguf_lora;
mod peft;

use crate::apply::{self, Stack};
use crate::atomic::{AtomicDir, Policy};
use crate::checkpoint::{self, Checkpoint};
use crate::model::{Family, Orientation, FAMILIES};
use crate::patch::{self, Delta, Factors, Patch};
use crate::{io_err, IoError};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use ndarray_linalg::{JobSvd, SVDDC};
use std::path::{Path, PathBuf};

/// The adapter formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Hugging Face PEFT folder: `adapter_config.json` and `adapter_model.safetensors`.
    Peft,
    /// A llama.cpp LoRA adapter, one GGUF file (Llama family only).
    GgufLora,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Peft => "a PEFT LoRA adapter",
            Format::GgufLora => "a llama.cpp LoRA adapter (GGUF)",
        })
    }
}

/// What to export and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    /// Export every tensor's rank-R truncated SVD instead of its exact factors (required for
    /// deltas that are not low-rank).
    pub rank: Option<usize>,
    /// The model the patch applies to (with its parents applied): needed for RECT entries, whose
    /// mask depends on the weights; every entry is then checked against it.
    pub model: Option<PathBuf>,
}

/// Everything that can go wrong exporting a patch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The patch file is unreadable, corrupt or malformed.
    #[error(transparent)]
    Patch(#[from] patch::Error),
    /// The patch does not fit the model given with `--model`.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// The model folder is unreadable or malformed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// Writing the output failed, or the output path is refused (it exists, or is an input).
    #[error(transparent)]
    Io(#[from] IoError),
    /// The patch's model family is not one factpatch knows.
    #[error("{path}: model family `{family}` is unknown (known: {known})")]
    UnknownFamily { path: PathBuf, family: String, known: String },
    /// A touched tensor is not one a LoRA adapter can carry.
    #[error("{path}: tensor `{name}` is not an MLP projection of the {family} family (shape {shape:?}): only those are exported as LoRA")]
    UnsupportedTensor { path: PathBuf, name: String, family: String, shape: Vec<usize> },
    /// A delta is not stored as low-rank factors and no rank was given.
    #[error("{path}: tensor `{name}` is not low-rank ({why}): pass --rank R to export its rank-R truncated SVD")]
    NotLowRank { path: PathBuf, name: String, why: String },
    /// A RECT entry's mask needs the base weights.
    #[error("{path}: tensor `{name}` uses RECT, whose mask depends on the weights: pass --model DIR, the model the patch applies to")]
    NeedsModel { path: PathBuf, name: String },
    /// The requested rank does not fit a tensor.
    #[error("{path}: --rank {rank} does not fit tensor `{name}` of shape {shape:?} (1 to {max})")]
    Rank { path: PathBuf, name: String, rank: usize, shape: Vec<usize>, max: usize },
    /// The patch changes no tensor.
    #[error("{0}: the patch changes no tensor: nothing to export")]
    Empty(PathBuf),
    /// The format has no names for the patch's family.
    #[error("{path}: gguf-lora needs llama.cpp tensor names, known for the llama family only; this patch is for {family} (use --format peft)")]
    GgufFamily { path: PathBuf, family: String },
    /// The SVD did not converge.
    #[error("tensor `{name}`: SVD failed: {reason}")]
    Svd { name: String, reason: String },
    /// The GGUF writer failed.
    #[error("{path}: cannot write the GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One exported matrix: `ΔW ≈ B·A` in the edit view `[out, in]`.
struct Lora {
    /// The stored tensor's name in the checkpoint (`model.layers.4.mlp.down_proj.weight`).
    pub tensor: String,
    pub rank: usize,
    pub out_features: usize,
    pub in_features: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    /// Whether these are the patch's own factors (else a truncated SVD).
    pub exact: bool,
    /// `‖ΔW − B·A‖_F / ‖ΔW‖_F` in f64, ΔW the f32 delta `apply` adds (0 when ΔW is 0).
    pub relative_error: f64,
}

/// One exported tensor, as reported.
#[derive(Debug, Clone)]
pub struct TensorSummary {
    pub tensor: String,
    /// Its name in the adapter (PEFT module or GGUF tensor).
    pub target: String,
    pub rank: usize,
    pub exact: bool,
    pub relative_error: f64,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    pub output: PathBuf,
    pub format: Format,
    pub patch: String,
    pub tensors: Vec<TensorSummary>,
    /// `lora_alpha`, the largest rank (every tensor's scale is 1).
    pub alpha: usize,
    pub bytes: u64,
}

/// Exports the patch at `patch` as an adapter at `out` (a new folder for PEFT, a new file for
/// GGUF; an existing path is refused, nothing is written on error).
pub fn export(patch: &Path, out: &Path, options: &Options) -> Result<Summary> {
    let inputs = std::iter::once(patch).chain(options.model.as_deref());
    let policy = Policy::new().reading(inputs);
    // Refused outputs cost nothing: the folder is claimed, or the file checked, first.
    let dir = match options.format {
        Format::Peft => Some(AtomicDir::create(out, &policy).map_err(io_err(out))?),
        Format::GgufLora => {
            policy.check(out).map_err(io_err(out))?;
            None
        }
    };
    let stack = Stack::new(vec![Patch::read(patch)?])?;
    let p = &stack.patches()[0];
    let family = family(p)?;
    if options.format == Format::GgufLora && family.name != "llama" {
        return Err(Error::GgufFamily { path: patch.to_path_buf(), family: family.name.into() });
    }
    let loras = loras(&stack, family, options)?;
    let (bytes, tensors) = match options.format {
        Format::Peft => {
            let dir = dir.expect("made above");
            let written = peft::write(p, family, &loras, dir.path())?;
            dir.commit(true).map_err(io_err(out))?;
            written
        }
        Format::GgufLora => gguf_lora::write(p, &loras, out, &policy)?,
    };
    let tensors = loras
        .iter()
        .zip(tensors)
        .map(|(l, target)| TensorSummary { tensor: l.tensor.clone(), target, rank: l.rank, exact: l.exact, relative_error: l.relative_error })
        .collect();
    Ok(Summary { output: out.to_path_buf(), format: options.format, patch: p.id().to_string(), tensors, alpha: max_rank(&loras), bytes })
}

/// The largest rank of `loras`: the adapter's `r` and `lora_alpha`.
fn max_rank(loras: &[Lora]) -> usize {
    loras.iter().map(|l| l.rank).max().unwrap_or(0)
}

/// The family the patch records.
fn family(p: &Patch) -> Result<&'static Family> {
    let name = &p.manifest().model.family;
    FAMILIES.iter().copied().find(|f| f.name == name).ok_or_else(|| Error::UnknownFamily {
        path: p.path().to_path_buf(),
        family: name.clone(),
        known: FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
    })
}

/// How a stored tensor of `family` is oriented, if it is one of its MLP projections.
fn orientation(family: &Family, name: &str) -> Option<Orientation> {
    family.mlp_in.projections().into_iter().chain([&family.mlp_out]).find(|p| p.layer_of(name).is_some()).map(|p| p.orientation)
}

/// Every entry of the stack's one patch as a LoRA pair, in the patch's order. Everything that
/// can be refused is refused before any delta is computed.
fn loras(stack: &Stack, family: &Family, options: &Options) -> Result<Vec<Lora>> {
    let p = &stack.patches()[0];
    let path = p.path().to_path_buf();
    let entries = &p.manifest().entries;
    if entries.is_empty() {
        return Err(Error::Empty(path));
    }
    let mut plan = Vec::with_capacity(entries.len());
    for e in entries {
        let name = e.tensor.clone();
        let orientation = match (orientation(family, &name), &e.shape[..]) {
            (Some(o), [_, _]) => o,
            _ => return Err(Error::UnsupportedTensor { path, name, family: family.name.into(), shape: e.shape.clone() }),
        };
        let max = e.shape[0].min(e.shape[1]);
        match (options.rank, &e.encoding) {
            (Some(rank), _) if rank == 0 || rank > max => return Err(Error::Rank { path, name, rank, shape: e.shape.clone(), max }),
            (None, patch::Encoding::LowRank { .. }) => {}
            (None, enc) => {
                let why = match enc {
                    patch::Encoding::LowRankRect { .. } => "RECT masks its factors' product".to_string(),
                    other => format!("stored {}", other.kind()),
                };
                return Err(Error::NotLowRank { path, name, why });
            }
            (Some(_), patch::Encoding::LowRankRect { .. }) if options.model.is_none() => return Err(Error::NeedsModel { path, name }),
            (Some(_), _) => {}
        }
        plan.push(orientation);
    }
    // Deltas are materialised: bounded by the model's tensors, else by the patch's caps.
    let ckpt = options.model.as_deref().map(Checkpoint::open).transpose()?;
    if ckpt.is_none() {
        p.check_unbounded()?;
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, (e, orientation)) in entries.iter().zip(plan).enumerate() {
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let delta = p.delta(i)?;
        let full = match &ckpt {
            Some(c) => stack.delta_for(&c.tensor(&e.tensor)?)?,
            None => apply::standalone(&delta, &e.shape).expect("RECT entries were refused without a model"),
        };
        let (factors, exact) = match (options.rank, delta) {
            (None, Delta::LowRank(groups)) => (side_by_side(&groups, rows, cols), true),
            (Some(rank), _) => (truncated_svd(&e.tensor, &full, rows, cols, rank)?, false),
            (None, _) => unreachable!("refused above"),
        };
        let relative_error = relative_error(&full, &factors, rows, cols);
        out.push(lora(&e.tensor, &factors, rows, cols, orientation, exact, relative_error));
    }
    Ok(out)
}

/// The groups' factors side by side: `Σ Uᵢ·Vᵢᵀ = [U₁ U₂ …]·[V₁ V₂ …]ᵀ`.
fn side_by_side(groups: &[Factors], rows: usize, cols: usize) -> Factors {
    let rank = groups.iter().map(|g| g.rank).sum();
    let join = |n: usize, of: fn(&Factors) -> &[f32]| -> Vec<f32> {
        (0..n).flat_map(|i| groups.iter().flat_map(move |g| &of(g)[i * g.rank..(i + 1) * g.rank])).copied().collect()
    };
    Factors { rank, u: join(rows, |g| &g.u), v: join(cols, |g| &g.v) }
}

/// The rank-`rank` truncated SVD of the `rows × cols` delta `d`, in f64, as factors in the
/// stored layout: `U·√Σ` and `V·√Σ`, rounded to f32.
fn truncated_svd(name: &str, d: &[f32], rows: usize, cols: usize, rank: usize) -> Result<Factors> {
    let m = Array2::from_shape_fn((rows, cols), |(i, j)| d[i * cols + j] as f64);
    let failed = |reason: String| Error::Svd { name: name.to_string(), reason };
    let (u, s, vt) = m.svddc(JobSvd::Some).map_err(|e| failed(e.to_string()))?;
    let (u, vt) = (u.ok_or_else(|| failed("no U".into()))?, vt.ok_or_else(|| failed("no Vᵀ".into()))?);
    let root: Array1<f64> = s.slice(ndarray::s![..rank]).mapv(f64::sqrt);
    let us = &u.slice(ndarray::s![.., ..rank]) * &root;
    let vs = &vt.slice(ndarray::s![..rank, ..]).t() * &root;
    let flat = |a: Array2<f64>| a.iter().map(|&x| x as f32).collect();
    Ok(Factors { rank, u: flat(us.as_standard_layout().into_owned()), v: flat(vs.as_standard_layout().into_owned()) })
}

/// `‖D − U·Vᵀ‖_F / ‖D‖_F` in f64, row by row; 0 when both are 0.
fn relative_error(d: &[f32], f: &Factors, rows: usize, cols: usize) -> f64 {
    let as_f64 = |x: &[f32], n: usize| Array2::from_shape_fn((n, f.rank), |(i, t)| x[i * f.rank + t] as f64);
    let (u, v) = (as_f64(&f.u, rows), as_f64(&f.v, cols));
    let (mut err, mut norm) = (0f64, 0f64);
    for (i, urow) in u.axis_iter(Axis(0)).enumerate() {
        let product = v.dot(&urow);
        for (&dij, pij) in d[i * cols..(i + 1) * cols].iter().zip(product) {
            err += (dij as f64 - pij).powi(2);
            norm += (dij as f64).powi(2);
        }
    }
    if err == 0.0 {
        0.0
    } else {
        (err / norm).sqrt()
    }
}

/// Stored-layout factors as a LoRA pair: `[out, in]` storage gives `B = U`, `A = Vᵀ`; `[in, out]`
/// (GPT-2's `Conv1D`, whose delta is `(B·A)ᵀ`) gives `B = V`, `A = Uᵀ`.
fn lora(tensor: &str, f: &Factors, rows: usize, cols: usize, orientation: Orientation, exact: bool, relative_error: f64) -> Lora {
    let ((b, out_features), (a, in_features)) = match orientation {
        Orientation::OutIn => ((&f.u, rows), (&f.v, cols)),
        Orientation::InOut => ((&f.v, cols), (&f.u, rows)),
    };
    let at = ArrayView2::from_shape((in_features, f.rank), a).expect("factor sizes checked by the patch reader");
    Lora { tensor: tensor.to_string(), rank: f.rank, out_features, in_features, a: at.t().iter().copied().collect(), b: b.clone(), exact, relative_error }
}

/// What the adapter records about its patch: id, parent, merged patches, base model, edits.
fn provenance(p: &Patch) -> serde_json::Value {
    let m = p.manifest();
    serde_json::json!({
        "patch": p.id(),
        "parent": m.parent,
        "includes": m.includes,
        "model": m.model.name,
        "base_model": m.base_model,
        "method": m.method.name,
        "edits": m.edits,
        "tool": crate::tool_version(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mlp_projections_at_a_layer_have_an_orientation() {
        let [llama, gpt2] = [FAMILIES[0], FAMILIES[1]];
        assert_eq!(orientation(llama, "model.layers.4.mlp.down_proj.weight"), Some(Orientation::OutIn));
        assert_eq!(orientation(llama, "model.layers.31.mlp.up_proj.weight"), Some(Orientation::OutIn));
        assert_eq!(orientation(gpt2, "transformer.h.0.mlp.c_fc.weight"), Some(Orientation::InOut));
        for name in [
            "model.layers.04.mlp.down_proj.weight",
            "model.layers.4.mlp.down_proj.weight.x",
            "model.layers.4.self_attn.q_proj.weight",
            "model.layers..mlp.down_proj.weight",
        ] {
            assert_eq!(orientation(llama, name), None, "{name}");
        }
        assert_eq!(orientation(gpt2, "transformer.h.0.attn.c_proj.weight"), None);
    }

    #[test]
    fn groups_side_by_side_multiply_to_their_sum() {
        let g1 = Factors { rank: 2, u: vec![1., 2., 3., 4.], v: vec![5., 6., 7., 8., 9., 10.] };
        let g2 = Factors { rank: 1, u: vec![-1., 0.5], v: vec![2., -3., 4.] };
        let f = side_by_side(&[g1.clone(), g2.clone()], 2, 3);
        let mut sum = apply::product(&g1, &[2, 3]);
        sum.iter_mut().zip(apply::product(&g2, &[2, 3])).for_each(|(s, p)| *s += p);
        assert_eq!(apply::product(&f, &[2, 3]), sum);
        assert_eq!(relative_error(&sum, &f, 2, 3), 0.0);
    }
}
