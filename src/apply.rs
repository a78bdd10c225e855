//! Consuming patches: stacks (verify, accumulate, materialize), streaming apply onto a
//! checkpoint folder, load-time overlay, merge and diff. Semantics: `formats/patch.md`.

use crate::atomic::AtomicDir;
use crate::checkpoint::{self, Checkpoint, Dtype, TensorRef};
use crate::patch::{self, BaseTensor, Delta, Edit, Entry, Factors, Manifest, Method, ModelInfo, Patch};
use crate::rect;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Everything that can go wrong applying, merging or diffing patches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A patch file is unreadable, corrupt or malformed.
    #[error(transparent)]
    Patch(#[from] patch::Error),
    /// A checkpoint folder is unreadable or malformed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The output path exists already; nothing is overwritten.
    #[error("{0}: output already exists")]
    OutputExists(PathBuf),
    /// Writing an output failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A patch touches a tensor the model does not have.
    #[error("{patch}: tensor `{name}` is not in the model at {model}")]
    MissingTensor { patch: PathBuf, name: String, model: PathBuf },
    /// A patch records a dtype or shape that differs from the model's tensor.
    #[error("{patch}: tensor `{name}` is {found} in the model, the patch expects {expected}")]
    ShapeMismatch { patch: PathBuf, name: String, expected: String, found: String },
    /// A touched tensor is not the one the patch was compiled against.
    #[error("{patch}: tensor `{name}` differs from the patch's base (blake3 {found}, patch expects {expected}): patch for another model or out of order")]
    BaseMismatch { patch: PathBuf, name: String, expected: String, found: String },
    /// The patched tensor would contain NaN or infinity.
    #[error("{patch}: tensor `{name}` element {index} becomes non-finite once patched")]
    NonFinite { patch: PathBuf, name: String, index: usize },
    /// A patch's parent is not the patch before it in the stack.
    #[error("{patch}: compiled on top of {parent}, but follows {previous} in the stack")]
    ParentChain { patch: PathBuf, parent: String, previous: String },
    /// Patches in a stack edit the same fact with different targets (one line, `; `-separated).
    #[error("conflicting edits (use --allow-override to let later patches win): {0}")]
    Conflict(String),
    /// A RECT entry overlapping another patch cannot be merged without the base model.
    #[error("{patch}: tensor `{name}` uses RECT and is touched by several patches; merging it needs the base model")]
    NeedsModel { patch: PathBuf, name: String },
    /// Two checkpoints do not have the same tensors, dtypes and shapes.
    #[error("{from} → {to}: not the same architecture: {reason}")]
    Incompatible { from: PathBuf, to: PathBuf, reason: String },
    /// A change between two checkpoints cannot be expressed as an f32 delta.
    #[error("{path}: tensor `{name}` element {index}: {from} → {to} is not reachable by adding an f32 delta")]
    Unrepresentable { path: PathBuf, name: String, index: usize, from: f32, to: f32 },
    /// No patches were given.
    #[error("no patches given")]
    Empty,
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Patches to apply in order, with their parent chain checked.
pub struct Stack {
    patches: Vec<Patch>,
    /// Tensor name → (patch index, entry index), in stack order.
    touched: BTreeMap<String, Vec<(usize, usize)>>,
}

impl Stack {
    /// Reads and verifies every patch, then checks the parent chain.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        Self::new(paths.iter().map(|p| Patch::read(p)).collect::<patch::Result<_>>()?)
    }

    /// A stack of already-read patches; the parent chain is checked.
    pub fn new(patches: Vec<Patch>) -> Result<Self> {
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
    /// For one patch on an F32 checkpoint, `W₀` is the map itself and `D` the only buffer.
    fn accumulate<'a>(&self, base: &TensorRef<'a>) -> Result<(Cow<'a, [f32]>, Vec<f32>)> {
        let list = self.touched.get(base.name).map_or(&[][..], Vec::as_slice);
        let w0 = base.to_f32();
        let mut d = Vec::new();
        for (k, &(p, e)) in list.iter().enumerate() {
            let patch = &self.patches[p];
            let entry = &patch.manifest().entries[e];
            check_layout(patch, entry, base.dtype, base.shape)?;
            let current = (k > 0).then(|| {
                let mut c = Vec::with_capacity(base.bytes.len());
                materialize(base, &w0, &d, patch, &mut |chunk| {
                    c.extend_from_slice(chunk);
                    Ok(())
                })
                .map(|_| c)
            });
            let current = current.transpose()?;
            check_hash(patch, entry, current.as_deref().unwrap_or(base.bytes))?;
            let delta = patch.delta(e)?;
            match &current {
                None if matches!(delta, Delta::LowRankRect { .. }) => d = rect_contribution(&delta, base.shape, &w0),
                None => {
                    d = vec![0.0; w0.len()];
                    add_delta(&mut d, &delta, base.shape, None);
                }
                Some(c) => add_delta(&mut d, &delta, base.shape, Some(&base.dtype.decode(c))),
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

    /// Streams the bytes of touched tensor `base` with the whole stack applied to `sink`, in
    /// chunks, once [`Stack::verify`] has passed. A tensor one patch touches is computed chunk
    /// by chunk and never held whole; `done` hears which byte ranges of `base` have been read
    /// for the last time in a pass. A tensor several patches touch is accumulated in memory.
    fn stream_verified(&self, base: &TensorRef, done: &dyn Fn(Range<usize>), sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        match self.touched[base.name][..] {
            [(p, e)] => stream_one(base, &self.patches[p].delta(e)?, &self.patches[p], done, sink),
            ref list => {
                let last = &self.patches[list.last().expect("non-empty").0];
                let (w0, d) = self.accumulate(base)?;
                materialize(base, &w0, &d, last, sink)
            }
        }
    }

    /// Verifies every patch against `ckpt` without writing anything: dtypes, shapes, base
    /// hashes and finite payloads. A tensor touched by several patches is fully accumulated, since
    /// later base hashes depend on earlier patches; a result that overflows is caught when written.
    pub fn verify(&self, ckpt: &Checkpoint) -> Result<()> {
        for (name, list) in &self.touched {
            let base = self.base(ckpt, name)?;
            if let [(p, e)] = list[..] {
                let (patch, entry) = (&self.patches[p], &self.patches[p].manifest().entries[e]);
                check_layout(patch, entry, base.dtype, base.shape)?;
                check_hash_streamed(patch, entry, base.bytes, &|r| ckpt.evict_range(&base, r))?;
                patch.delta(e)?;
            } else {
                self.accumulate(&base)?;
            }
            ckpt.evict(&base);
        }
        Ok(())
    }

    fn base<'a>(&self, ckpt: &'a Checkpoint, name: &str) -> Result<TensorRef<'a>> {
        ckpt.tensor(name).map_err(|_| Error::MissingTensor {
            patch: self.patches[self.touched[name][0].0].path().to_path_buf(),
            name: name.to_string(),
            model: ckpt.dir().to_path_buf(),
        })
    }
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
    let found = h.finalize().to_hex().to_string();
    if found == entry.base_blake3 {
        return Ok(());
    }
    Err(Error::BaseMismatch { patch: patch.path().to_path_buf(), name: entry.tensor.clone(), expected: entry.base_blake3.clone(), found })
}

/// The tensor `entry` patches must have `dtype` and `shape`.
fn check_layout(patch: &Patch, entry: &Entry, dtype: Dtype, shape: &[usize]) -> Result<()> {
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
fn add_delta(d: &mut [f32], delta: &Delta, shape: &[usize], w: Option<&[f32]>) {
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

/// `U·Vᵀ` of one group, each element summed over the rank in order from +0, in f32.
pub fn product(f: &Factors, shape: &[usize]) -> Vec<f32> {
    let mut out = vec![0f32; shape[0] * shape[1]];
    add_product(&mut out, f, shape, 0);
    out
}

/// Elements per chunk of a streamed tensor.
const CHUNK: usize = 1 << 14;

/// The tensor's bytes with delta `d` added, streamed to `sink` in chunks: untouched where `d`
/// is ±0, else `round(W₀ + D)`.
fn materialize(base: &TensorRef, w0: &[f32], d: &[f32], patch: &Patch, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    for (c, (w0, d)) in w0.chunks(CHUNK).zip(d.chunks(CHUNK)).enumerate() {
        sink(&materialize_chunk(base, c * CHUNK, w0, d, patch)?)?;
    }
    Ok(())
}

/// [`materialize`] for the elements `start..start + w0.len()`.
fn materialize_chunk(base: &TensorRef, start: usize, w0: &[f32], d: &[f32], patch: &Patch) -> Result<Vec<u8>> {
    let s = base.dtype.size();
    let mut out = base.bytes[start * s..(start + w0.len()) * s].to_vec();
    for (i, (&w, &d)) in w0.iter().zip(d).enumerate() {
        if d != 0.0 {
            let v = base.dtype.round(w + d);
            if !v.is_finite() {
                return Err(Error::NonFinite { patch: patch.path().to_path_buf(), name: base.name.to_string(), index: start + i });
            }
            base.dtype.put(v, &mut out[i * s..(i + 1) * s]);
        }
    }
    Ok(out)
}

/// Streams `base` with one patch's `delta` added to `sink`, chunk by chunk, with the same
/// arithmetic per element as [`Stack::patched`]. The delta is never held whole: a RECT entry's
/// product is recomputed for each of the cut's two passes and for the write. `done` hears each
/// byte range of `base` as a pass finishes with it.
fn stream_one(base: &TensorRef, delta: &Delta, patch: &Patch, done: &dyn Fn(Range<usize>), sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let s = base.dtype.size();
    let n = base.bytes.len() / s;
    let chunks = || (0..n).step_by(CHUNK).map(move |a| a..(a + CHUNK).min(n));
    // The delta's unmasked chunk into `d`; the base's values there returned.
    let fill = |r: &Range<usize>, d: &mut Vec<f32>| {
        d.clear();
        d.resize(r.len(), 0.0);
        add_chunk(d, delta, base.shape, r.start);
        base.dtype.decode(&base.bytes[r.start * s..r.end * s])
    };
    let mut d = Vec::with_capacity(CHUNK);
    let mut cut = match delta {
        Delta::LowRankRect { k, eps, .. } => rect::Cut::find(n, *k, |visit| {
            for r in chunks() {
                let w = fill(&r, &mut d);
                d.iter().zip(&w).for_each(|(&d, &w)| visit(rect::key(d, w, *eps)));
                done(r.start * s..r.end * s);
            }
        }),
        _ => None,
    };
    for r in chunks() {
        let w = fill(&r, &mut d);
        if let (Some(cut), Delta::LowRankRect { eps, .. }) = (&mut cut, delta) {
            d.iter_mut().zip(&w).filter(|(d, &w)| !cut.keeps(rect::key(**d, w, *eps))).for_each(|(d, _)| *d = 0.0);
        }
        sink(&materialize_chunk(base, r.start, &w, &d, patch)?)?;
        done(r.start * s..r.end * s);
    }
    Ok(())
}

/// Adds one entry's contributions at the flat elements `start..start + d.len()` to `d`, a
/// RECT entry's unmasked.
fn add_chunk(d: &mut [f32], delta: &Delta, shape: &[usize], start: usize) {
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
/// order from +0.
fn add_product(d: &mut [f32], f: &Factors, shape: &[usize], start: usize) {
    let (cols, r) = (shape[1], f.rank);
    let (mut q, mut rest) = (start, d);
    while !rest.is_empty() {
        let (i, j0) = (q / cols, q % cols);
        let (row, tail) = rest.split_at_mut((cols - j0).min(rest.len()));
        let u = &f.u[i * r..(i + 1) * r];
        for (j, d) in (j0..).zip(row.iter_mut()) {
            let v = &f.v[j * r..(j + 1) * r];
            let mut o = 0f32;
            for t in 0..r {
                o += u[t] * v[t];
            }
            *d += o;
        }
        q += row.len();
        rest = tail;
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplySummary {
    pub output: PathBuf,
    /// The output's model identity, blake3 hex (see `Checkpoint::identity`).
    pub identity: String,
    pub patches: Vec<String>,
    pub tensors_patched: usize,
    pub bytes_written: u64,
}

/// How [`apply_with`] writes its output.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// fsync every output file before the rename, so that not even a power loss leaves a
    /// partly written model under the final name (`cp` does not). On by default.
    pub sync: bool,
    /// Where the base's tensor hashes are remembered (`Checkpoint::tensor_hashes_cached`);
    /// `None` hashes the untouched tensors at every apply.
    pub hash_cache: Option<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { sync: true, hash_cache: None }
    }
}

/// [`apply_with`] with the default options.
pub fn apply(model: &Path, patches: &[PathBuf], out: &Path) -> Result<ApplySummary> {
    apply_with(model, patches, out, &ApplyOptions::default())
}

/// Applies `patches` in order to the model at `model`, writing a new model folder at `out`.
/// Everything is verified before anything is written; the output appears only when complete.
/// The untouched tensors are copied by the kernel while another thread hashes them from the
/// base (or reads their hashes from the cache), so the output's identity costs no second pass.
pub fn apply_with(model: &Path, patches: &[PathBuf], out: &Path, options: &ApplyOptions) -> Result<ApplySummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    let ckpt = Checkpoint::open(model)?;
    let stack = Stack::load(patches)?;
    stack.verify(&ckpt)?;
    let dir = AtomicDir::create(out).map_err(io_err(out))?;
    let untouched: Vec<&str> = ckpt.names().filter(|n| !stack.touched.contains_key(*n)).collect();
    let (copied, written) = std::thread::scope(|s| {
        let hashing = s.spawn(|| match &options.hash_cache {
            Some(cache) => ckpt.tensor_hashes_cached(&untouched, cache),
            None => ckpt.tensor_hashes(&untouched),
        });
        let written = (|| {
            let (mut bytes, mut hashes) = (0, BTreeMap::new());
            for file in ckpt.files() {
                let name = file.file_name().expect("weight files have names");
                bytes += write_weights(&ckpt, &stack, file, &dir.path().join(name), &mut hashes)?;
            }
            let weights: BTreeSet<_> = ckpt.files().filter_map(Path::file_name).collect();
            copy_others(model, dir.path(), &weights)?;
            Ok::<_, Error>((bytes, hashes))
        })();
        (hashing.join().expect("hashing thread does not panic"), written)
    });
    let (bytes_written, mut hashes) = written?;
    hashes.extend(copied?);
    let identity = ckpt.identity_of(&hashes).to_hex().to_string();
    dir.commit(options.sync).map_err(io_err(out))?;
    Ok(ApplySummary {
        output: out.to_path_buf(),
        identity,
        patches: stack.patches.iter().map(|p| p.id().to_string()).collect(),
        tensors_patched: stack.touched.len(),
        bytes_written,
    })
}

/// Rewrites one weight file inside the output's temporary folder: the header and untouched
/// ranges copied by the kernel on one thread while this one streams the patched tensors into
/// their places, recording their byte hashes in `hashes`. Returns the file's length.
fn write_weights(ckpt: &Checkpoint, stack: &Stack, src: &Path, dest: &Path, hashes: &mut BTreeMap<String, blake3::Hash>) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut input = File::open(src).map_err(io_err(src))?;
    let len = input.metadata().map_err(io_err(src))?.len();
    let out = File::create_new(dest).map_err(io_err(dest))?;
    let touched = ckpt.names_in(src).into_iter().filter(|n| stack.touched.contains_key(*n)).map(|n| ckpt.tensor(n)).collect::<checkpoint::Result<Vec<_>>>()?;
    let mut gaps = Vec::new();
    let mut pos = 0u64;
    for t in &touched {
        gaps.push((pos, t.offset as u64));
        pos = (t.offset + t.bytes.len()) as u64;
    }
    gaps.push((pos, len));
    std::thread::scope(|s| {
        let copier = s.spawn(|| gaps.iter().try_for_each(|&(from, to)| copy_range(&mut input, src, &mut &out, dest, from, to)));
        let streamed = touched.iter().try_for_each(|t| {
            let (mut h, mut at) = (blake3::Hasher::new(), t.offset as u64);
            stack.stream_verified(t, &|r| ckpt.evict_range(t, r), &mut |chunk| {
                h.update(chunk);
                out.write_all_at(chunk, at).map_err(io_err(dest))?;
                at += chunk.len() as u64;
                Ok(())
            })?;
            hashes.insert(t.name.to_string(), h.finalize());
            ckpt.evict(t);
            Ok::<_, Error>(())
        });
        copier.join().expect("the copying thread does not panic")?;
        streamed
    })?;
    Ok(len)
}

fn copy_range(input: &mut File, src: &Path, out: &mut &File, dest: &Path, from: u64, to: u64) -> Result<()> {
    out.seek(SeekFrom::Start(from)).map_err(io_err(dest))?;
    input.seek(SeekFrom::Start(from)).map_err(io_err(src))?;
    let copied = std::io::copy(&mut std::io::Read::take(&*input, to - from), out).map_err(io_err(dest))?;
    if copied != to - from {
        return Err(Error::Io { path: src.to_path_buf(), source: std::io::ErrorKind::UnexpectedEof.into() });
    }
    Ok(())
}

/// Copies every file of `from` except the weight files, recursively, following links.
fn copy_others(from: &Path, to: &Path, skip: &BTreeSet<&std::ffi::OsStr>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(from).map_err(io_err(from))?.collect::<std::io::Result<_>>().map_err(io_err(from))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dest) = (e.path(), to.join(e.file_name()));
        if skip.contains(e.file_name().as_os_str()) {
            continue;
        }
        if src.is_dir() {
            std::fs::create_dir(&dest).map_err(io_err(&dest))?;
            copy_others(&src, &dest, &BTreeSet::new())?;
        } else {
            std::fs::copy(&src, &dest).map_err(io_err(&dest))?;
        }
    }
    Ok(())
}

/// A checkpoint with patches overlaid at load time: patched tensors are computed once, on
/// construction (after full verification), and served from memory; the rest from the memory map.
pub struct Overlay<'a> {
    ckpt: &'a Checkpoint,
    patched: BTreeMap<String, Vec<u8>>,
}

impl<'a> Overlay<'a> {
    /// Verifies `stack` against `ckpt` and computes every patched tensor.
    pub fn new(ckpt: &'a Checkpoint, stack: &Stack) -> Result<Self> {
        let mut patched = BTreeMap::new();
        for name in stack.touched() {
            patched.insert(name.to_string(), stack.patched(&stack.base(ckpt, name)?)?.into_owned());
        }
        Ok(Overlay { ckpt, patched })
    }
}

/// Tensors as the patched model has them.
impl checkpoint::Tensors for Overlay<'_> {
    fn dir(&self) -> &Path {
        self.ckpt.dir()
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    fn tensor(&self, name: &str) -> checkpoint::Result<TensorRef<'_>> {
        let mut t = self.ckpt.tensor(name)?;
        if let Some(bytes) = self.patched.get(name) {
            t.bytes = bytes;
        }
        Ok(t)
    }
}

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
    if let Some(c) = &ckpt {
        stack.verify(c)?;
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
    let manifest = Manifest::new(ModelInfo { name, family: family.to_string() }, Method { name: "diff".into(), hyperparameters: BTreeMap::new() });
    let tensors_changed = deltas.len();
    let encoded = patch::encode(manifest, deltas)?;
    crate::atomic::write(out, &encoded.bytes, false).map_err(io_err(out))?;
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
