//! Merging a patch stack into one equivalent patch.

use super::stack::{add_delta, check_layout, Stack};
use super::{Error, Result};
use crate::checkpoint::Checkpoint;
use crate::io_err;
use crate::patch::{self, BaseTensor, Delta, Edit, Encoding, Manifest, Method, Patch};
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

/// How [`merge_with`] merges.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// The base model the stack applies to: needed only when a RECT entry shares a tensor with
    /// another patch; when given, the stack is checked against it as `apply` checks it.
    pub model: Option<PathBuf>,
    /// Where the model's tensor hashes are remembered (for its identity; see `ApplyOptions`).
    pub hash_cache: Option<PathBuf>,
    /// Let a later edit of a fact override an earlier one (both are recorded).
    pub allow_override: bool,
    /// With `model`: accept it although it is not the patches' recorded base (see `ApplyOptions`).
    pub allow_other_base: bool,
}

/// [`merge_with`] of `patches` into `out`, with `model` if given, overriding if allowed.
pub fn merge(patches: &[PathBuf], out: &Path, model: Option<&Path>, allow_override: bool) -> Result<MergeSummary> {
    merge_with(patches, out, &MergeOptions { model: model.map(Path::to_path_buf), allow_override, ..Default::default() })
}

/// Merges `patches` (applied in order) into one equivalent patch at `out`. The stack is checked
/// from the patches alone as far as they tell (`formats/patch.md`, "Merging"): one base model,
/// parents before children, and a patch that changes a tensor an earlier one changed must descend
/// from it through parent links. With a model, its tensor hashes are checked instead, as `apply` does.
pub fn merge_with(patches: &[PathBuf], out: &Path, options: &MergeOptions) -> Result<MergeSummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    let stack = Stack::load(patches)?;
    let first = stack.patches.first().ok_or(Error::Empty)?;
    let (edits, overridden, conflicts) = merge_edits(&stack.patches, options.allow_override)?;
    let base_model = common_base(&stack.patches)?;
    let ckpt = options.model.as_deref().map(Checkpoint::open).transpose()?;
    match &ckpt {
        Some(c) => {
            if stack.needs_identity(options.allow_other_base) {
                stack.check_model(c, options.hash_cache.as_deref(), options.allow_other_base)?;
            }
            stack.verify(c)?;
        }
        // Without the base, nothing bounds a delta but the patch format's caps.
        None => {
            stack.patches.iter().try_for_each(Patch::check_unbounded)?;
            check_descent(&stack)?
        }
    }
    let mut deltas = Vec::with_capacity(stack.touched.len());
    for (name, list) in &stack.touched {
        let (p0, e0) = list[0];
        let entry = &stack.patches[p0].manifest().entries[e0];
        let base = BaseTensor { name: name.clone(), dtype: entry.dtype, shape: entry.shape.clone(), blake3: entry.base_blake3.clone() };
        for &(p, e) in &list[1..] {
            check_layout(&stack.patches[p], &stack.patches[p].manifest().entries[e], entry.dtype, &entry.shape)?;
        }
        let rect = list.iter().find(|&&(p, e)| matches!(stack.patches[p].manifest().entries[e].encoding, Encoding::LowRankRect { .. }));
        let delta = match (rect, &ckpt) {
            // Its implicit mask is against the same base tensor either way.
            (Some(&(p, e)), _) if list.len() == 1 => stack.patches[p].delta(e)?,
            (Some(_), Some(c)) => Delta::explicit(stack.delta_for(&stack.base(c, name)?)?),
            (Some(&(p, _)), None) => return Err(Error::NeedsModel { patch: stack.patches[p].path().to_path_buf(), name: name.clone() }),
            (None, _) => smallest(list.iter().map(|&(p, e)| stack.patches[p].delta(e)), &entry.shape)?,
        };
        deltas.push((base, delta));
    }
    let mut manifest = Manifest::new(first.manifest().model.clone(), Method { name: "merge".into(), hyperparameters: BTreeMap::new() });
    manifest.base_model = base_model;
    manifest.parent = first.manifest().parent.clone();
    manifest.includes =
        stack.patches.iter().flat_map(|p| if p.manifest().includes.is_empty() { vec![p.id().to_string()] } else { p.manifest().includes.clone() }).collect();
    manifest.edits = edits;
    manifest.overridden = overridden;
    let all_same = |f: &dyn Fn(&Manifest) -> bool| stack.patches.iter().all(|p| f(p.manifest()));
    let m0 = first.manifest();
    manifest.stats_id = m0.stats_id.clone().filter(|_| all_same(&|m| m.stats_id == m0.stats_id));
    manifest.rect_k = m0.rect_k.filter(|_| all_same(&|m| m.rect_k == m0.rect_k));
    let encoded = patch::encode(manifest, deltas)?;
    crate::atomic::write(out, &encoded.bytes, &crate::atomic::Policy::new()).map_err(io_err(out))?;
    Ok(MergeSummary { output: out.to_path_buf(), id: encoded.id, bytes: encoded.bytes.len() as u64, overridden: conflicts })
}

/// The smallest exact encoding of one tensor's `deltas` (none RECT), decoded one at a time:
/// their explicit sum `D` (sparse or dense, whichever is smaller), or, when every one is plain
/// low-rank, their groups concatenated if that payload is no larger (`formats/patch.md`,
/// "Merging"). Both apply as the deltas do, bit for bit.
fn smallest(deltas: impl Iterator<Item = patch::Result<Delta>>, shape: &[usize]) -> Result<Delta> {
    let mut d = vec![0f32; shape.iter().product()];
    // The groups so far, while every delta is plain low-rank.
    let mut groups = Some(Vec::new());
    for delta in deltas {
        let delta = delta?;
        add_delta(&mut d, &delta, shape, None);
        groups = match (groups, delta) {
            (Some(mut g), Delta::LowRank(more)) => {
                g.extend(more);
                Some(g)
            }
            _ => None,
        };
    }
    let explicit = Delta::explicit(d);
    Ok(match groups.map(Delta::LowRank) {
        Some(g) if g.payload_len(shape).zip(explicit.payload_len(shape)).is_some_and(|(g, e)| g <= e) => g,
        _ => explicit,
    })
}

/// The base model every patch that records one records, or why there is none.
fn common_base(patches: &[Patch]) -> Result<Option<String>> {
    let mut recorded = patches.iter().filter_map(|p| Some((p, p.manifest().base_model.as_ref()?)));
    let Some((first, base)) = recorded.next() else { return Ok(None) };
    if let Some((p, other)) = recorded.find(|(_, b)| b != &base) {
        return Err(Error::DifferentBases { first: first.path().to_path_buf(), first_base: base.clone(), patch: p.path().to_path_buf(), base: other.clone() });
    }
    Ok(Some(base.clone()))
}

/// Without the model, a patch that changes a tensor an earlier patch changed must have been
/// compiled on top of it: every patch after the earlier one, up to it, has a parent (which
/// [`Stack::new`] checked is the patch before it). Otherwise its base hash is that of another
/// state of the tensor, which only the model could tell.
fn check_descent(stack: &Stack) -> Result<()> {
    for (name, list) in &stack.touched {
        for w in list.windows(2) {
            let (earlier, later) = (w[0].0, w[1].0);
            if stack.patches[earlier + 1..=later].iter().any(|p| p.manifest().parent.is_none()) {
                let path = |i: usize| stack.patches[i].path().to_path_buf();
                return Err(Error::NotDescendant { earlier: path(earlier), patch: path(later), name: name.clone() });
            }
        }
    }
    Ok(())
}

/// The stack's edits, in order: those still in force, those a later edit of the same fact
/// overrode (kept, with overriding allowed), and each override described. Same subject and
/// relation with another target is a conflict.
fn merge_edits(patches: &[Patch], allow_override: bool) -> Result<(Vec<Edit>, Vec<Edit>, Vec<String>)> {
    let mut seen: BTreeMap<(String, String), (usize, String)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut edits: Vec<Edit> = Vec::new();
    let mut overridden: Vec<Edit> = patches.iter().flat_map(|p| p.manifest().overridden.iter().cloned()).collect();
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
                let (same, rest): (Vec<Edit>, Vec<Edit>) = edits.into_iter().partition(|x| (&x.subject, &x.relation) == (&e.subject, &e.relation));
                overridden.extend(same.into_iter().filter(|x| x.target_new != e.target_new));
                edits = rest;
            }
            seen.insert(key, (p, e.target_new.clone()));
            edits.push(e.clone());
        }
    }
    if !conflicts.is_empty() && !allow_override {
        return Err(Error::Conflict(conflicts.join("; ")));
    }
    Ok((edits, overridden, conflicts))
}
