//! Auditing a patch: which facts, which tensors, how much change, how it is stored.
//! [`Report`] prints for people (`Display`) and serializes for machines; [`heatmap`] draws |ΔW/W|.

use crate::apply::{self, Error, Result, Stack};
use crate::checkpoint::Checkpoint;
use crate::model::{Orientation, FAMILIES};
use crate::patch::{Manifest, Patch};
use crate::plot;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Relative changes |ΔW|/|W| are taken against max(|W|, this).
pub const REL_FLOOR: f32 = 1e-12;
/// Decades of the relative-change histogram: 10^-8 … 10^2.
const DECADES: std::ops::Range<i32> = -8..2;

/// Everything `factpatch audit` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub path: PathBuf,
    pub file_bytes: u64,
    /// Compressed payload bytes per encoding kind.
    pub bytes_by_encoding: BTreeMap<String, u64>,
    /// The base checkpoint the changes were measured against, if any.
    pub against_model: Option<PathBuf>,
    pub tensors: Vec<TensorReport>,
    /// The patch's manifest, as stored.
    pub manifest: Manifest,
    /// The detached signature beside the patch (`PATCH.minisig`), if any.
    pub signature: Option<SignatureReport>,
}

/// Who signed the patch, and whether that was checked.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    #[serde(flatten)]
    pub signer: crate::sign::Signer,
    /// `None` until checked against trusted keys ([`Report::check_signature`]).
    pub verified: Option<bool>,
    /// Why it did not verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One touched tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub encoding: String,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    /// Non-zero delta elements (needs the model for RECT entries).
    pub nonzeros: Option<u64>,
    pub delta_norm: Option<f64>,
    pub delta_max_abs: Option<f64>,
    /// Only with the model.
    pub against_base: Option<AgainstBase>,
}

/// Measurements that need the base tensor.
#[derive(Debug, Clone, Serialize)]
pub struct AgainstBase {
    pub base_norm: f64,
    /// ‖ΔW‖ / ‖W‖.
    pub norm_ratio: f64,
    /// Elements whose stored value changes after rounding to the checkpoint's dtype.
    pub changed_after_rounding: u64,
    /// Quantiles of |ΔW|/|W| over the non-zero delta elements: p50, p90, p99, max.
    pub relative_quantiles: [f64; 4],
    /// Counts of |ΔW|/|W| per decade: below 10^-8, [10^-8, 10^-7), …, [10^1, 10^2), ≥ 10^2.
    pub relative_histogram: Vec<u64>,
}

/// Audits the patch at `patch`; with `model`, also measures it against that base.
pub fn report(patch: &Path, model: Option<&Path>) -> Result<Report> {
    let p = Patch::read(patch)?;
    // Deltas are materialised below: bounded by the model's tensors, else by the patch's caps.
    let ckpt = model.map(Checkpoint::open).transpose()?;
    match &ckpt {
        Some(c) => check_layouts(&p, c)?,
        None => p.check_unbounded()?,
    }
    let mut tensors = Vec::new();
    let mut bytes_by_encoding = BTreeMap::new();
    for (i, e) in p.manifest().entries.iter().enumerate() {
        *bytes_by_encoding.entry(e.encoding.kind().to_string()).or_insert(0) += e.zlen;
        tensors.push(TensorReport {
            name: e.tensor.clone(),
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
            encoding: e.encoding.kind().to_string(),
            stored_bytes: e.zlen,
            raw_bytes: e.raw_len,
            nonzeros: None,
            delta_norm: None,
            delta_max_abs: None,
            against_base: None,
        });
        if let Some(d) = apply::standalone(&p.delta(i)?, &e.shape) {
            fill_delta_stats(tensors.last_mut().expect("just pushed"), &d);
        }
    }
    let mut r = Report {
        id: p.id().to_string(),
        path: patch.to_path_buf(),
        manifest: p.manifest().clone(),
        file_bytes: p.bytes().len() as u64,
        bytes_by_encoding,
        against_model: model.map(Path::to_path_buf),
        tensors,
        signature: crate::sign::read_signature(patch)?.map(|(_, signer)| SignatureReport { signer, verified: None, problem: None }),
    };
    if let Some(ckpt) = ckpt {
        let stack = Stack::new(vec![p])?;
        for t in &mut r.tensors {
            let m = measure(&ckpt, &stack, &t.name)?;
            fill_delta_stats(t, &m.delta);
            t.against_base = Some(against_base(&m));
        }
    }
    Ok(r)
}

impl Report {
    /// Checks the patch's signature against `trusted` and records the outcome (an unsigned
    /// patch stays without one).
    pub fn check_signature(&mut self, trusted: &crate::sign::Trusted) -> Result<()> {
        if let Some(s) = &mut self.signature {
            let outcome = trusted.verify(&Patch::read(&self.path)?);
            s.verified = Some(outcome.is_ok());
            s.problem = outcome.err().map(|e| e.to_string());
        }
        Ok(())
    }
}

/// Every entry of `p` names a tensor of `ckpt` with the entry's dtype and shape.
fn check_layouts(p: &Patch, ckpt: &Checkpoint) -> Result<()> {
    for e in &p.manifest().entries {
        if !ckpt.contains(&e.tensor) {
            return Err(Error::MissingTensor { patch: p.path().to_path_buf(), name: e.tensor.clone(), model: ckpt.dir().to_path_buf() });
        }
        let t = ckpt.tensor(&e.tensor)?;
        if t.dtype != e.dtype || t.shape != e.shape {
            return Err(Error::ShapeMismatch {
                patch: p.path().to_path_buf(),
                name: e.tensor.clone(),
                expected: format!("{:?}{:?}", e.dtype, e.shape),
                found: format!("{:?}{:?}", t.dtype, t.shape),
            });
        }
    }
    Ok(())
}

fn fill_delta_stats(t: &mut TensorReport, d: &[f32]) {
    t.nonzeros = Some(d.iter().filter(|v| **v != 0.0).count() as u64);
    t.delta_norm = Some(d.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt());
    t.delta_max_abs = Some(d.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)));
}

/// One touched tensor measured against its base.
struct Measured {
    w: Vec<f32>,
    delta: Vec<f32>,
    changed: u64,
    shape: Vec<usize>,
}

fn measure(ckpt: &Checkpoint, stack: &Stack, name: &str) -> Result<Measured> {
    if !ckpt.contains(name) {
        return Err(Error::MissingTensor { patch: stack.patches()[0].path().to_path_buf(), name: name.to_string(), model: ckpt.dir().to_path_buf() });
    }
    let base = ckpt.tensor(name)?;
    let delta = stack.delta_for(&base)?;
    let out = stack.patched(&base)?;
    let s = base.dtype.size();
    let changed = base.bytes.chunks_exact(s).zip(out.chunks_exact(s)).filter(|(a, b)| a != b).count() as u64;
    Ok(Measured { w: base.to_f32().into_owned(), delta, changed, shape: base.shape.to_vec() })
}

fn relative(d: f32, w: f32) -> f32 {
    d.abs() / w.abs().max(REL_FLOOR)
}

fn against_base(m: &Measured) -> AgainstBase {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let mut rel: Vec<f32> = m.delta.iter().zip(&m.w).filter(|(d, _)| **d != 0.0).map(|(&d, &w)| relative(d, w)).collect();
    rel.sort_by(f32::total_cmp);
    let q = |p: f64| rel.get(((rel.len().max(1) - 1) as f64 * p).round() as usize).map_or(0.0, |&v| v as f64);
    let mut histogram = vec![0u64; DECADES.len() + 2];
    for &r in &rel {
        let decade = (r as f64).log10().floor() as i64;
        let bin = (decade - DECADES.start as i64 + 1).clamp(0, histogram.len() as i64 - 1);
        histogram[bin as usize] += 1;
    }
    let base_norm = norm(&m.w);
    AgainstBase {
        base_norm,
        norm_ratio: if base_norm > 0.0 { norm(&m.delta) / base_norm } else { f64::INFINITY },
        changed_after_rounding: m.changed,
        relative_quantiles: [q(0.5), q(0.9), q(0.99), q(1.0)],
        relative_histogram: histogram,
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "patch {}  ({} bytes, {})", self.id, self.file_bytes, m.tool)?;
        writeln!(f, "model {} ({}), method {}", m.model.name, m.model.family, m.method.name)?;
        if let Some(b) = &m.base_model {
            writeln!(f, "base model identity {b}")?;
        }
        if let Some(p) = &m.parent {
            writeln!(f, "parent {p}")?;
        }
        for i in &m.includes {
            writeln!(f, "includes {i}")?;
        }
        match &self.signature {
            Some(s) => {
                let status = match (s.verified, &s.problem) {
                    (None, _) => "not checked: pass --trusted KEYS".to_string(),
                    (Some(true), _) => "verified against the trusted keys".to_string(),
                    (Some(false), p) => format!("DOES NOT VERIFY: {}", p.as_deref().unwrap_or("")),
                };
                writeln!(f, "signed by key {} ({}); {status}", s.signer.key_id, s.signer.trusted_comment)?
            }
            None => writeln!(f, "unsigned")?,
        }
        match m.rect_k {
            Some(k) if k < 100.0 => writeln!(f, "RECT k = {k}%")?,
            Some(_) => writeln!(f, "RECT none (the whole update)")?,
            None => {}
        }
        if let Some(s) = &m.stats_id {
            writeln!(f, "statistics {s}")?;
        }
        for (k, v) in m.method.hyperparameters.iter().map(|(k, v)| (k, v.to_string())).chain(m.metrics.iter().map(|(k, v)| (k, v.to_string()))) {
            writeln!(f, "{k} = {v}")?;
        }
        writeln!(f, "{} edit(s):", m.edits.len())?;
        for e in &m.edits {
            writeln!(f, "  {:?} [{}]: {:?} → {:?}   ({:?})", e.subject, e.relation, e.target_old, e.target_new, e.prompt)?;
        }
        if !m.overridden.is_empty() {
            writeln!(f, "{} overridden edit(s), their weight changes still in the patch:", m.overridden.len())?;
        }
        for e in &m.overridden {
            let by = m
                .edits
                .iter()
                .find(|x| (&x.subject, &x.relation) == (&e.subject, &e.relation))
                .map_or(String::new(), |x| format!(", overridden by → {:?}", x.target_new));
            writeln!(f, "  {:?} [{}]: {:?} → {:?}{by}   ({:?})", e.subject, e.relation, e.target_old, e.target_new, e.prompt)?;
        }
        let enc: Vec<_> = self.bytes_by_encoding.iter().map(|(k, v)| format!("{k} {v} B")).collect();
        writeln!(f, "{} tensor(s); payload bytes by encoding: {}", self.tensors.len(), enc.join(", "))?;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3e}"));
        for t in &self.tensors {
            writeln!(
                f,
                "  {} {}{:?} {} stored {} B (raw {} B) nnz {} ‖Δ‖ {} max|Δ| {}",
                t.name,
                t.dtype,
                t.shape,
                t.encoding,
                t.stored_bytes,
                t.raw_bytes,
                t.nonzeros.map_or("-".to_string(), |n| n.to_string()),
                opt(t.delta_norm),
                opt(t.delta_max_abs)
            )?;
            if let Some(a) = &t.against_base {
                let [p50, p90, p99, max] = a.relative_quantiles;
                writeln!(
                    f,
                    "      ‖Δ‖/‖W‖ {:.3e}; |ΔW/W| p50 {p50:.2e} p90 {p90:.2e} p99 {p99:.2e} max {max:.2e}; changed after rounding to {}: {}",
                    a.norm_ratio, t.dtype, a.changed_after_rounding
                )?;
                let bins: Vec<_> = a.relative_histogram.iter().map(u64::to_string).collect();
                writeln!(f, "      |ΔW/W| per decade (<1e-8 … ≥1e2): {}", bins.join(" "))?;
            }
        }
        Ok(())
    }
}

/// Draws |ΔW/W| of every touched tensor of `patch` against `model` into `png` (see
/// [`plot::heatmap`]), one panel per tensor, titled with the patch id and its RECT k. Returns
/// the tensor names in panel order.
pub fn heatmap(patch: &Path, model: &Path, png: &Path) -> Result<Vec<String>> {
    if png.exists() {
        return Err(Error::OutputExists(png.to_path_buf()));
    }
    let ckpt = Checkpoint::open(model)?;
    let stack = Stack::load(&[patch.to_path_buf()])?;
    let p = &stack.patches()[0];
    let manifest = p.manifest();
    let names: Vec<String> = stack.touched().map(str::to_string).collect();
    let mut matrices = Vec::new();
    for name in &names {
        let m = measure(&ckpt, &stack, name)?;
        let (rows, cols) = match m.shape[..] {
            [r, c] => (r, c),
            _ => (1, m.w.len()),
        };
        let changed = m.delta.iter().filter(|d| **d != 0.0).count();
        let (out, inp) = axes(&manifest.model.family, name).unwrap_or_default();
        matrices.push(plot::Matrix {
            title: format!("{name} · {:.1}% of elements changed", 100.0 * changed as f64 / m.delta.len().max(1) as f64),
            x_label: format!("columns ({inp}{cols})"),
            y_label: format!("rows ({out}{rows})"),
            rows,
            cols,
            values: m.delta.iter().zip(&m.w).map(|(&d, &w)| if d == 0.0 { 0.0 } else { relative(d, w) }).collect(),
        });
    }
    let (rect, effect) = match manifest.rect_k {
        Some(k) if k < 100.0 => {
            (format!("RECT k = {k}%"), format!("RECT: each update keeps only its top {k}% of elements by |ΔW/W|; the others stay unchanged."))
        }
        _ => ("no RECT".to_string(), "No RECT (k = 100): every element of each update is applied.".to_string()),
    };
    let title = format!("|ΔW/W| of each edited matrix · {rect}");
    let notes = [format!("patch {} · {} · {} edit(s)", p.id(), manifest.method.name, manifest.edits.len()), effect];
    plot::heatmap(png, &title, &notes, &matrices)?;
    Ok(names)
}

/// The (rows, columns) axis prefixes of `tensor`, ("out, ", "in, ") or the reverse, when
/// `family` names it as an MLP projection.
fn axes(family: &str, tensor: &str) -> Option<(&'static str, &'static str)> {
    let f = FAMILIES.iter().find(|f| f.name == family)?;
    let p = f.mlp_in.projections().into_iter().chain([&f.mlp_out]).find(|p| {
        let (pre, post) = p.name.split_once("{layer}").unwrap_or((p.name, ""));
        tensor.strip_prefix(pre).and_then(|t| t.strip_suffix(post)).is_some_and(|l| l.parse::<usize>().is_ok())
    })?;
    Some(match p.orientation {
        Orientation::OutIn => ("out, ", "in, "),
        Orientation::InOut => ("in, ", "out, "),
    })
}
