//! Merging a patch stack into one equivalent patch.

use super::stack::{add_delta, check_layout, Stack};
use super::{Error, Result};
use crate::checkpoint::Checkpoint;
use crate::io_err;
use crate::patch::{self, BaseTensor, Delta, Edit, Manifest, Method, Patch};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What [`merge`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub output: PathBuf,
    pub id: String,
    pub bytes: u64,
    /// Facts edited more than once, later target winning (only with `allow_override`).
    pub overridden: Vec<String>,
}

/// Merges `patches` (applied in order) into one equivalent patch at `out`.
/// `model` is the base they apply to; it is needed only when a RECT entry shares a tensor
/// with another patch, and when given, the whole stack is verified against it first.
pub fn merge(patches: &[PathBuf], out: &Path, model: Option<&Path>, allow_override: bool) -> Result<MergeSummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    let stack = Stack::load(patches)?;
    let first = stack.patches.first().ok_or(Error::Empty)?;
    let (edits, overridden) = merge_edits(&stack.patches, allow_override)?;
    let ckpt = model.map(Checkpoint::open).transpose()?;
    match &ckpt {
        Some(c) => stack.verify(c)?,
        // Without the base, nothing bounds a delta but the patch format's caps.
        None => stack.patches.iter().try_for_each(Patch::check_unbounded)?,
    }
    let mut deltas = Vec::with_capacity(stack.touched.len());
    for (name, list) in &stack.touched {
        let (p0, e0) = list[0];
        let entry = &stack.patches[p0].manifest().entries[e0];
        let base = BaseTensor { name: name.clone(), dtype: entry.dtype, shape: entry.shape.clone(), blake3: entry.base_blake3.clone() };
        for &(p, e) in &list[1..] {
            check_layout(&stack.patches[p], &stack.patches[p].manifest().entries[e], entry.dtype, &entry.shape)?;
        }
        let decoded: Vec<Delta> = list.iter().map(|&(p, e)| stack.patches[p].delta(e)).collect::<patch::Result<_>>()?;
        let delta = if decoded.len() == 1 {
            decoded.into_iter().next().expect("one")
        } else if decoded.iter().all(|d| matches!(d, Delta::LowRank(_))) {
            Delta::LowRank(decoded.into_iter().flat_map(|d| if let Delta::LowRank(g) = d { g } else { Vec::new() }).collect())
        } else if let Some(c) = &ckpt {
            Delta::explicit(stack.delta_for(&stack.base(c, name)?)?)
        } else {
            let mut d = vec![0f32; entry.shape.iter().product()];
            for (&(p, _), delta) in list.iter().zip(&decoded) {
                if matches!(delta, Delta::LowRankRect { .. }) {
                    return Err(Error::NeedsModel { patch: stack.patches[p].path().to_path_buf(), name: name.clone() });
                }
                add_delta(&mut d, delta, &entry.shape, None);
            }
            Delta::explicit(d)
        };
        deltas.push((base, delta));
    }
    let mut manifest = Manifest::new(first.manifest().model.clone(), Method { name: "merge".into(), hyperparameters: BTreeMap::new() });
    manifest.parent = first.manifest().parent.clone();
    manifest.includes =
        stack.patches.iter().flat_map(|p| if p.manifest().includes.is_empty() { vec![p.id().to_string()] } else { p.manifest().includes.clone() }).collect();
    manifest.edits = edits;
    let all_same = |f: &dyn Fn(&Manifest) -> bool| stack.patches.iter().all(|p| f(p.manifest()));
    let m0 = first.manifest();
    manifest.stats_id = m0.stats_id.clone().filter(|_| all_same(&|m| m.stats_id == m0.stats_id));
    manifest.rect_k = m0.rect_k.filter(|_| all_same(&|m| m.rect_k == m0.rect_k));
    let encoded = patch::encode(manifest, deltas)?;
    crate::atomic::write(out, &encoded.bytes, false).map_err(io_err(out))?;
    Ok(MergeSummary { output: out.to_path_buf(), id: encoded.id, bytes: encoded.bytes.len() as u64, overridden })
}

/// Concatenates the stack's edits; same subject and relation with another target is a conflict.
fn merge_edits(patches: &[Patch], allow_override: bool) -> Result<(Vec<Edit>, Vec<String>)> {
    let mut seen: BTreeMap<(String, String), (usize, String)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut edits: Vec<(usize, Edit)> = Vec::new();
    for (p, patch) in patches.iter().enumerate() {
        for e in &patch.manifest().edits {
            let key = (e.subject.clone(), e.relation.clone());
            if let Some((q, target)) = seen.get(&key) {
                if *target != e.target_new {
                    conflicts.push(format!(
                        "({:?}, {:?}): {} sets {:?}, {} sets {:?}",
                        e.subject,
                        e.relation,
                        patches[*q].path().display(),
                        target,
                        patch.path().display(),
                        e.target_new
                    ));
                }
                edits.retain(|(_, x)| (&x.subject, &x.relation) != (&e.subject, &e.relation));
            }
            seen.insert(key, (p, e.target_new.clone()));
            edits.push((p, e.clone()));
        }
    }
    if !conflicts.is_empty() && !allow_override {
        return Err(Error::Conflict(conflicts.join("; ")));
    }
    Ok((edits.into_iter().map(|(_, e)| e).collect(), conflicts))
}
