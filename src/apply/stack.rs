//! The patch stack: patches in order with their parent chain checked, verified against a
//! checkpoint (layouts, base hashes) and accumulated into one f32 delta per tensor, and the
//! per-element arithmetic that turns deltas into patched bytes.

use super::{Error, Result};
use crate::checkpoint::{Checkpoint, Dtype, TensorRef};
use crate::patch::{self, Delta, Encoding, Entry, Factors, Patch};
use crate::rect;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Patches to apply in order, with their parent chain checked.
pub struct Stack {
    pub(super) patches: Vec<Patch>,
    /// Tensor name → (patch index, entry index), in stack order.
    pub(super) touched: BTreeMap<String, Vec<(usize, usize)>>,
}

impl Stack {
    /// Reads and verifies every patch, then checks the parent chain.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        Self::new(paths.iter().map(|p| Patch::read(p)).collect::<patch::Result<_>>()?)
    }

    /// A stack of already-read patches; the parent chain is checked: no patch comes before its
    /// parent, and a patch with a parent follows that parent (or a merge ending with it). The
    /// first patch may have a parent; whether the model has it applied is [`Stack::check_model`]'s.
    pub fn new(patches: Vec<Patch>) -> Result<Self> {
        for (i, p) in patches.iter().enumerate() {
            let Some(parent) = &p.manifest().parent else { continue };
            if let Some(later) = patches[i + 1..].iter().find(|q| q.id() == parent || q.manifest().includes.contains(parent)) {
                return Err(Error::ParentAfterChild { patch: p.path().to_path_buf(), parent: parent.clone(), parent_path: later.path().to_path_buf() });
            }
        }
        for w in patches.windows(2) {
            if let Some(parent) = &w[1].manifest().parent {
                if parent != w[0].id() && parent != w[0].tip() {
                    return Err(Error::ParentChain { patch: w[1].path().to_path_buf(), parent: parent.clone(), previous: w[0].id().to_string() });
                }
            }
        }
        let mut touched: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
        for (p, patch) in patches.iter().enumerate() {
            for (e, entry) in patch.manifest().entries.iter().enumerate() {
                touched.entry(entry.tensor.clone()).or_default().push((p, e));
            }
        }
        Ok(Stack { patches, touched })
    }

    /// Checks the stack against the model it is applied to, whose identity is `identity`
    /// (`formats/patch.md`, "Base model"): every recorded `base_model` must be `identity`, and
    /// the first patch may have a parent only if the model has it applied already. With
    /// `allow_other_base`, another model is accepted (the tensor hashes, checked anyway, decide),
    /// unless it is the first patch's recorded base while that patch has a parent: then the
    /// parent's changes are certainly missing.
    pub fn check_base(&self, model: &Path, identity: &str, allow_other_base: bool) -> Result<()> {
        self.check_first_parent(Some(identity), allow_other_base)?;
        if allow_other_base {
            return Ok(());
        }
        for p in &self.patches {
            match &p.manifest().base_model {
                Some(b) if b != identity => {
                    return Err(Error::OtherBase {
                        patch: p.path().to_path_buf(),
                        expected: b.clone(),
                        model: model.to_path_buf(),
                        found: identity.to_string(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The part of [`Stack::check_base`] about the first patch's parent; without `identity`, only
    /// what does not depend on it.
    fn check_first_parent(&self, identity: Option<&str>, allow_other_base: bool) -> Result<()> {
        let Some((first, parent)) = self.patches.first().and_then(|p| Some((p, p.manifest().parent.as_ref()?))) else { return Ok(()) };
        let why = if !allow_other_base {
            "its changes would be missing (apply the parent first, or --allow-other-base for a model that has it applied already)"
        } else if identity.is_some() && first.manifest().base_model.as_deref() == identity {
            "its changes would be missing: the model is the patch's base, without it"
        } else {
            return Ok(());
        };
        Err(Error::MissingParent { patch: first.path().to_path_buf(), parent: parent.clone(), why: why.into() })
    }

    /// Whether [`Stack::check_base`] needs the model's identity at all.
    pub(super) fn needs_identity(&self, allow_other_base: bool) -> bool {
        self.patches.first().is_some_and(|p| p.manifest().parent.is_some())
            || (!allow_other_base && self.patches.iter().any(|p| p.manifest().base_model.is_some()))
    }

    /// [`Stack::check_base`] against `ckpt`, its identity taken from the tensor-hash `cache` when
    /// one is given; a refusal is confirmed from the bytes first, since a cache entry can be stale
    /// or altered. Returns the identity it checked against.
    pub fn check_model(&self, ckpt: &Checkpoint, cache: Option<&Path>, allow_other_base: bool) -> Result<ModelIdentity> {
        let from_bytes = || -> Result<ModelIdentity> {
            let names: Vec<&str> = ckpt.names().collect();
            let hashes = ckpt.tensor_hashes(&names)?;
            Ok(ModelIdentity { identity: ckpt.identity_of(&hashes).to_hex().to_string(), hashes: Some(hashes) })
        };
        let cached = cache.map(|cache| move || Ok(ckpt.identity_cached(cache)?.to_hex().to_string()));
        self.check_identity(ckpt.dir(), cached, from_bytes, allow_other_base)
    }

    /// [`Stack::check_model`] for any model format: the identity of the model at `model` comes
    /// from `cached` (a tensor-hash cache) when given, else, or when that one is refused, from
    /// `from_bytes`. Nothing is computed when the first patch's parent is refused anyway.
    pub fn check_identity<E: From<Error>>(
        &self,
        model: &Path,
        cached: Option<impl FnOnce() -> std::result::Result<String, E>>,
        from_bytes: impl FnOnce() -> std::result::Result<ModelIdentity, E>,
        allow_other_base: bool,
    ) -> std::result::Result<ModelIdentity, E> {
        self.check_first_parent(None, allow_other_base)?;
        let (id, from_bytes) = match cached {
            Some(cached) => (ModelIdentity { identity: cached()?, hashes: None }, Some(from_bytes)),
            None => (from_bytes()?, None),
        };
        let id = match from_bytes {
            Some(from_bytes) if self.check_base(model, &id.identity, allow_other_base).is_err() => from_bytes()?,
            _ => id,
        };
        self.check_base(model, &id.identity, allow_other_base)?;
        Ok(id)
    }

    /// The patches, in order.
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    /// Names of the tensors any patch touches, sorted.
    pub fn touched(&self) -> impl Iterator<Item = &str> {
        self.touched.keys().map(String::as_str)
    }

    /// The stack's accumulated f32 delta `D` for `base`, verifying each patch's base hash,
    /// dtype and shape against the tensor as that patch sees it.
    pub fn delta_for(&self, base: &TensorRef) -> Result<Vec<f32>> {
        Ok(self.accumulate(base)?.1)
    }

    /// The base values `W₀` as f32 and the accumulated delta `D` (see [`Stack::delta_for`]).
    /// For one patch on an F32 checkpoint, `W₀` is the map itself and `D` the only buffer. The
    /// tensor as a later patch saw it is hashed chunk by chunk as it is materialised, and kept
    /// whole only for a RECT mask, so memory does not grow with the number of patches.
    pub(super) fn accumulate<'a>(&self, base: &TensorRef<'a>) -> Result<(Cow<'a, [f32]>, Vec<f32>)> {
        let list = self.touched.get(base.name).map_or(&[][..], Vec::as_slice);
        let w0 = base.to_f32();
        let mut d = Vec::new();
        for (k, &(p, e)) in list.iter().enumerate() {
            let patch = &self.patches[p];
            let entry = &patch.manifest().entries[e];
            check_layout(patch, entry, base.dtype, base.shape)?;
            let rect = matches!(entry.encoding, Encoding::LowRankRect { .. });
            // The tensor as this patch saw it, as f32: needed for a RECT mask only.
            let mut seen = Vec::new();
            if k == 0 {
                check_hash(patch, entry, base.bytes)?;
            } else {
                let mut h = blake3::Hasher::new();
                materialize(base, &w0, &d, patch, &mut |chunk| {
                    h.update(chunk);
                    if rect {
                        seen.extend(base.dtype.decode(chunk));
                    }
                    Ok(())
                })?;
                check_found(patch, entry, h.finalize())?;
            }
            let delta = patch.delta(e)?;
            match k {
                0 if rect => d = rect_contribution(&delta, base.shape, &w0),
                0 => {
                    d = vec![0.0; w0.len()];
                    add_delta(&mut d, &delta, base.shape, None);
                }
                _ => add_delta(&mut d, &delta, base.shape, Some(&seen)),
            }
        }
        if d.is_empty() {
            d = vec![0.0; w0.len()];
        }
        Ok((w0, d))
    }

    /// The bytes of `base` with the whole stack applied (`base`'s own bytes if untouched).
    pub fn patched<'a>(&self, base: &TensorRef<'a>) -> Result<Cow<'a, [u8]>> {
        if !self.touched.contains_key(base.name) {
            return Ok(Cow::Borrowed(base.bytes));
        }
        let last = &self.patches[self.touched[base.name].last().expect("non-empty").0];
        let (w0, d) = self.accumulate(base)?;
        let mut out = Vec::with_capacity(base.bytes.len());
        materialize(base, &w0, &d, last, &mut |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(Cow::Owned(out))
    }

    /// Verifies every patch against `ckpt` without writing anything: see [`Stack::verify_tensor`].
    pub fn verify(&self, ckpt: &Checkpoint) -> Result<()> {
        for name in self.touched.keys() {
            let base = self.base(ckpt, name)?;
            self.verify_tensor(&base, &|r| ckpt.evict_range(&base, r))?;
            ckpt.evict(&base);
        }
        Ok(())
    }

    /// Verifies the patches touching `base` without writing anything: dtypes, shapes, base
    /// hashes and finite payloads; `done` hears each byte range of `base` once hashed. A tensor
    /// touched by several patches is fully accumulated, since later base hashes depend on
    /// earlier patches; a result that overflows is caught when written.
    pub fn verify_tensor(&self, base: &TensorRef, done: &dyn Fn(Range<usize>)) -> Result<()> {
        match self.touched.get(base.name).map_or(&[][..], Vec::as_slice) {
            &[(p, e)] => {
                let (patch, entry) = (&self.patches[p], &self.patches[p].manifest().entries[e]);
                check_layout(patch, entry, base.dtype, base.shape)?;
                check_hash_streamed(patch, entry, base.bytes, done)?;
                patch.delta(e)?;
            }
            _ => {
                self.accumulate(base)?;
            }
        }
        Ok(())
    }

    /// Verifies the patches touching tensor `name` without reading it, from `hash`, the blake3 its
    /// bytes have by the record the model's identity was checked against (the hash cache, or the
    /// bytes): dtype, shape, base hash and payload, as [`Stack::verify_tensor`] does. `false`, with
    /// nothing checked, when several patches touch it: later base hashes depend on earlier
    /// patches, so only its bytes can tell.
    pub fn verify_recorded(&self, name: &str, dtype: Dtype, shape: &[usize], hash: &blake3::Hash) -> Result<bool> {
        let &[(p, e)] = self.touched.get(name).map_or(&[][..], Vec::as_slice) else { return Ok(false) };
        let (patch, entry) = (&self.patches[p], &self.patches[p].manifest().entries[e]);
        check_layout(patch, entry, dtype, shape)?;
        check_found(patch, entry, *hash)?;
        patch.delta(e)?;
        Ok(true)
    }

    /// The accumulated f32 delta of every touched tensor of `ckpt` (see [`Stack::delta_for`]), by
    /// name.
    pub fn deltas(&self, ckpt: &Checkpoint) -> Result<Vec<(String, Vec<f32>)>> {
        self.touched().map(|name| Ok((name.to_string(), self.delta_for(&self.base(ckpt, name)?)?))).collect()
    }

    pub(super) fn base<'a>(&self, ckpt: &'a Checkpoint, name: &str) -> Result<TensorRef<'a>> {
        if !ckpt.contains(name) {
            return Err(Error::MissingTensor {
                patch: self.patches[self.touched[name][0].0].path().to_path_buf(),
                name: name.to_string(),
                model: ckpt.dir().to_path_buf(),
            });
        }
        Ok(ckpt.tensor(name)?)
    }
}

/// A model's identity as [`Stack::check_model`] found it.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// `Checkpoint::identity`, hex.
    pub identity: String,
    /// Every tensor's byte hash, when they were computed from the bytes rather than read from a cache.
    pub hashes: Option<BTreeMap<String, blake3::Hash>>,
}

/// The tensor `entry` patches must have the bytes it was compiled against.
fn check_hash(patch: &Patch, entry: &Entry, bytes: &[u8]) -> Result<()> {
    check_hash_streamed(patch, entry, bytes, &|_| {})
}

/// [`check_hash`], telling `done` each byte range as soon as it is hashed.
fn check_hash_streamed(patch: &Patch, entry: &Entry, bytes: &[u8], done: &dyn Fn(Range<usize>)) -> Result<()> {
    const STEP: usize = 1 << 20;
    let mut h = blake3::Hasher::new();
    for start in (0..bytes.len()).step_by(STEP) {
        let end = (start + STEP).min(bytes.len());
        h.update(&bytes[start..end]);
        done(start..end);
    }
    check_found(patch, entry, h.finalize())
}

/// The tensor `entry` patches must hash to its `base_blake3`; `found` is what it hashes to.
fn check_found(patch: &Patch, entry: &Entry, found: blake3::Hash) -> Result<()> {
    let found = found.to_hex().to_string();
    if found == entry.base_blake3 {
        return Ok(());
    }
    Err(Error::BaseMismatch { patch: patch.path().to_path_buf(), name: entry.tensor.clone(), expected: entry.base_blake3.clone(), found })
}

/// The tensor `entry` patches must have `dtype` and `shape`.
pub(super) fn check_layout(patch: &Patch, entry: &Entry, dtype: Dtype, shape: &[usize]) -> Result<()> {
    if entry.dtype == dtype && entry.shape == shape {
        return Ok(());
    }
    Err(Error::ShapeMismatch {
        patch: patch.path().to_path_buf(),
        name: entry.tensor.clone(),
        expected: format!("{:?}{:?}", entry.dtype, entry.shape),
        found: format!("{:?}{:?}", dtype, shape),
    })
}

/// Adds one entry's contributions to `d`. `w` gives the tensor as the patch saw it (for RECT).
pub(super) fn add_delta(d: &mut [f32], delta: &Delta, shape: &[usize], w: Option<&[f32]>) {
    match delta {
        Delta::LowRankRect { .. } => {
            let masked = rect_contribution(delta, shape, w.expect("callers without a base reject RECT first"));
            d.iter_mut().zip(&masked).for_each(|(d, v)| *d += v);
        }
        _ => add_chunk(d, delta, shape, 0),
    }
}

/// The masked `U·Vᵀ` of a low-rank + RECT entry against `w`. It has no −0, so adding it to a
/// fresh `D = +0` gives it back unchanged.
fn rect_contribution(delta: &Delta, shape: &[usize], w: &[f32]) -> Vec<f32> {
    let Delta::LowRankRect { factors, k, eps } = delta else { unreachable!("only called for RECT entries") };
    let mut full = product(factors, shape);
    rect::mask(&mut full, w, *k, *eps);
    full
}

/// A delta that needs no base (anything but RECT) as a full f32 array, summed from +0.
pub fn standalone(delta: &Delta, shape: &[usize]) -> Option<Vec<f32>> {
    if matches!(delta, Delta::LowRankRect { .. }) {
        return None;
    }
    let mut d = vec![0f32; shape.iter().product()];
    add_delta(&mut d, delta, shape, None);
    Some(d)
}

/// Every entry of `patch` as a full f32 delta without the model (see [`standalone`]), by name,
/// within [`Patch::check_unbounded`]'s bounds. A RECT entry is an error: its mask depends on the
/// base weights.
pub fn standalone_deltas(patch: &Patch) -> Result<Vec<(String, Vec<f32>)>> {
    patch.check_unbounded()?;
    let entries = patch.manifest().entries.iter().enumerate();
    entries
        .map(|(i, e)| match standalone(&patch.delta(i)?, &e.shape) {
            Some(d) => Ok((e.tensor.clone(), d)),
            None => Err(Error::NeedsBase { patch: patch.path().to_path_buf(), name: e.tensor.clone() }),
        })
        .collect()
}

/// `U·Vᵀ` of one group, each element summed over the rank in order from +0, in f32.
pub fn product(f: &Factors, shape: &[usize]) -> Vec<f32> {
    let mut out = vec![0f32; shape[0] * shape[1]];
    add_product(&mut out, f, shape, 0);
    out
}

/// Elements per chunk of a streamed tensor.
pub(super) const CHUNK: usize = 1 << 14;

/// The tensor's bytes with delta `d` added, streamed to `sink` in chunks: untouched where `d`
/// is ±0, else `round(W₀ + D)`.
pub(super) fn materialize(base: &TensorRef, w0: &[f32], d: &[f32], patch: &Patch, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    for (c, (w0, d)) in w0.chunks(CHUNK).zip(d.chunks(CHUNK)).enumerate() {
        sink(&materialize_chunk(base, c * CHUNK, w0, d, patch)?)?;
    }
    Ok(())
}

/// [`materialize`] for the elements `start..start + w0.len()`.
pub(super) fn materialize_chunk(base: &TensorRef, start: usize, w0: &[f32], d: &[f32], patch: &Patch) -> Result<Vec<u8>> {
    let s = base.dtype.size();
    let mut out = base.bytes[start * s..(start + w0.len()) * s].to_vec();
    let finite = match base.dtype {
        Dtype::F32 => blend(&mut out, w0, d, |v| (v.to_le_bytes(), v.is_finite())),
        Dtype::F16 => blend(&mut out, w0, d, |v| (half::f16::from_f32(v).to_le_bytes(), half::f16::from_f32(v).is_finite())),
        Dtype::BF16 => blend(&mut out, w0, d, |v| (half::bf16::from_f32(v).to_le_bytes(), half::bf16::from_f32(v).is_finite())),
    };
    if !finite {
        let i = w0.iter().zip(d).position(|(&w, &d)| d != 0.0 && !base.dtype.round(w + d).is_finite()).expect("an element is not finite");
        return Err(Error::NonFinite { patch: patch.path().to_path_buf(), name: base.name.to_string(), index: start + i });
    }
    Ok(out)
}

/// Overwrites the `N`-byte elements of `out` where `d` is not ±0 with `encode(w0 + d)` (its
/// bytes, rounded to nearest-even, and whether finite), selecting without a branch per element
/// (a RECT mask keeps elements in no predictable pattern). Whether every value written is finite.
fn blend<const N: usize>(out: &mut [u8], w0: &[f32], d: &[f32], encode: impl Fn(f32) -> ([u8; N], bool)) -> bool {
    let mut finite = true;
    for ((o, &w), &d) in out.chunks_exact_mut(N).zip(w0).zip(d) {
        let (new, ok) = encode(w + d);
        let keep = d == 0.0;
        finite &= keep | ok;
        let o: &mut [u8; N] = o.try_into().expect("N bytes");
        *o = if keep { *o } else { new };
    }
    finite
}

/// Adds one entry's contributions at the flat elements `start..start + d.len()` to `d`, a
/// RECT entry's unmasked.
pub(super) fn add_chunk(d: &mut [f32], delta: &Delta, shape: &[usize], start: usize) {
    match delta {
        Delta::Dense(v) => d.iter_mut().zip(&v[start..]).for_each(|(d, v)| *d += v),
        Delta::Sparse { indices, values } => {
            let from = indices.partition_point(|&i| (i as usize) < start);
            let end = start + d.len();
            for (&i, v) in indices[from..].iter().zip(&values[from..]).take_while(|(&i, _)| (i as usize) < end) {
                d[i as usize - start] += v;
            }
        }
        Delta::LowRank(groups) => groups.iter().for_each(|g| add_product(d, g, shape, start)),
        Delta::LowRankRect { factors, .. } => add_product(d, factors, shape, start),
    }
}

/// Adds `U·Vᵀ` at the flat elements `start..` to `d`, each element summed over the rank in
/// order from +0 (a row at a time, one rank component after another, so that it vectorizes).
fn add_product(d: &mut [f32], f: &Factors, shape: &[usize], start: usize) {
    let (cols, r) = (shape[1], f.rank);
    let (mut q, mut rest) = (start, d);
    let mut sum = Vec::with_capacity(cols.min(rest.len()));
    while !rest.is_empty() {
        let (i, j0) = (q / cols, q % cols);
        let (row, tail) = rest.split_at_mut((cols - j0).min(rest.len()));
        let v = &f.v[j0 * r..(j0 + row.len()) * r];
        if r == 1 {
            // As below (+0 + u·v is u·v), but for the sign of a zero sum, which leaves an
            // element unchanged either way.
            let u = f.u[i];
            row.iter_mut().zip(v).for_each(|(d, &v)| *d += u * v);
            q += row.len();
            rest = tail;
            continue;
        }
        sum.clear();
        sum.resize(row.len(), 0f32);
        for (t, &u) in f.u[i * r..(i + 1) * r].iter().enumerate() {
            match r {
                1 => sum.iter_mut().zip(v).for_each(|(o, &v)| *o += u * v),
                _ => sum.iter_mut().zip(v[t..].iter().step_by(r)).for_each(|(o, &v)| *o += u * v),
            }
        }
        row.iter_mut().zip(&sum).for_each(|(d, o)| *d += o);
        q += row.len();
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::{BaseTensor, Manifest, Method, ModelInfo};

    /// A one-entry dense patch of `d` against `base`, read back.
    fn dense_patch(base: &TensorRef, d: &[f32]) -> Patch {
        let manifest = Manifest::new(ModelInfo { name: "t".into(), family: "llama".into() }, Method { name: "test".into(), hyperparameters: BTreeMap::new() });
        let encoded = patch::encode(manifest, vec![(BaseTensor::of(base), Delta::Dense(d.to_vec()))]).unwrap();
        Patch::from_bytes(encoded.bytes, Path::new("t.fpatch")).unwrap()
    }

    #[test]
    fn materialize_rounds_sums_where_the_delta_is_not_zero_and_names_the_first_overflow() {
        // Untouched where d is ±0 (the -0 weight and the infinite one kept as stored).
        let raw = [1.0f32, -0.0, 60000.0, 2.0, f32::INFINITY, 0.3];
        let d = [0.5f32, 0.0, 0.0, -0.0, 0.0, 1e-3];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = dtype.encode(&raw);
            let shape = [raw.len()];
            let base = TensorRef { name: "w", dtype, shape: &shape, bytes: &bytes, path: Path::new("w.safetensors"), offset: 0 };
            let w0 = dtype.decode(&bytes);
            let patch = dense_patch(&base, &d);
            let got = materialize_chunk(&base, 0, &w0, &d, &patch).unwrap();
            let mut want = bytes.clone();
            let s = dtype.size();
            for i in [0, 5] {
                dtype.put(w0[i] + d[i], &mut want[i * s..(i + 1) * s]);
            }
            assert_eq!(got, want, "{dtype:?}");
            // 60000 + 10000 overflows f16 only; the index counts from the chunk's start.
            let over = [0.0f32, 0.0, 10000.0, 0.0, 0.0, 0.0];
            match (dtype, materialize_chunk(&base, 0, &w0, &over, &patch)) {
                (Dtype::F16, Err(Error::NonFinite { index, .. })) => assert_eq!(index, 2),
                (Dtype::F16, other) => panic!("f16 overflow not refused: {other:?}"),
                (_, r) => assert!(r.is_ok(), "{dtype:?}"),
            }
            let err = materialize_chunk(&base, 2, &w0[2..], &[0.0, f32::INFINITY, 0.0, 0.0], &patch).unwrap_err();
            assert!(matches!(err, Error::NonFinite { index: 3, .. }), "{err}");
        }
    }

    #[test]
    fn products_sum_the_rank_in_order_from_zero() {
        let (rows, cols, r) = (5, 7, 3);
        let x = |k: usize| ((k * 7919 % 101) as f32 - 50.0) * 0.013;
        let f = Factors { rank: r, u: (0..rows * r).map(x).collect(), v: (0..cols * r).map(|k| x(k + 500)).collect() };
        let got = product(&f, &[rows, cols]);
        for i in 0..rows {
            for j in 0..cols {
                let mut o = 0f32;
                for t in 0..r {
                    o += f.u[i * r + t] * f.v[j * r + t];
                }
                assert_eq!(got[i * cols + j].to_bits(), o.to_bits(), "({i}, {j})");
            }
        }
        // From an offset inside a row, added to what is there.
        let mut d = vec![1.0f32; 9];
        add_chunk(&mut d, &Delta::LowRank(vec![f.clone()]), &[rows, cols], 4);
        assert!(d.iter().zip(&got[4..13]).all(|(d, g)| *d == 1.0 + g));
    }
}
