//! Hugging Face checkpoint folders: `config.json` plus memory-mapped safetensors,
//! single-file or sharded (`model.safetensors.index.json`). Validated on open, read lazily.

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Everything that can go wrong opening or reading a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The folder has no `config.json`.
    #[error("{0}: no config.json here (not a Hugging Face model folder)")]
    MissingConfig(PathBuf),
    /// The folder has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{0}: no model.safetensors or model.safetensors.index.json here")]
    MissingWeights(PathBuf),
    /// A file could not be opened or read.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// A JSON file is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A safetensors file is truncated or its header is corrupt.
    #[error("{path}: not a valid safetensors file ({reason})")]
    Safetensors { path: PathBuf, reason: String },
    /// The shard index names a tensor that its shard does not hold.
    #[error("{path}: tensor `{name}` is listed in the index but missing from its shard")]
    IndexMismatch { path: PathBuf, name: String },
    /// A tensor the model needs is absent.
    #[error("{dir}: tensor `{name}` not found")]
    MissingTensor { dir: PathBuf, name: String },
    /// A tensor is stored in a dtype factpatch does not handle.
    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    /// Two weight files hold a tensor of the same name.
    #[error("tensor `{name}` is stored twice: in {first} and in {second}")]
    DuplicateTensor { name: String, first: PathBuf, second: PathBuf },
    /// A weight file changed (size or modification time) after it was opened and mapped.
    #[error("{path}: changed while being read ({what}); a checkpoint must not be modified while factpatch reads it")]
    Changed { path: PathBuf, what: String },
    /// A tensor's shape differs from what the model's config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `values` as little-endian f32 bytes: their own memory on a little-endian machine.
pub fn f32_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    match cfg!(target_endian = "little") {
        true => Cow::Borrowed(bytemuck::cast_slice(values)),
        false => Cow::Owned(Dtype::F32.encode(values)),
    }
}

/// Floating-point storage types of checkpoint tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    /// Bytes per element.
    #[inline]
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// Little-endian bytes to f32 values (exact for every dtype).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(bytes.len() / self.size());
        self.decode_into(bytes, &mut out);
        out
    }

    /// [`Dtype::decode`], appended to `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F32 => {
                // A copy of the bytes, then (on big-endian machines only) each value turned round.
                let start = out.len();
                out.resize(start + bytes.len() / 4, 0.0);
                bytemuck::cast_slice_mut::<f32, u8>(&mut out[start..]).copy_from_slice(&bytes[..bytes.len() / 4 * 4]);
                out[start..].iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
            }
            Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
            Dtype::BF16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        }
    }

    /// `bytes` as f32 values: borrowed when they are f32 in memory already (aligned, on a
    /// little-endian machine), else decoded into `buf`.
    pub fn as_f32<'a>(self, bytes: &'a [u8], buf: &'a mut Vec<f32>) -> &'a [f32] {
        if self == Dtype::F32 && cfg!(target_endian = "little") {
            if let Ok(values) = bytemuck::try_cast_slice(bytes) {
                return values;
            }
        }
        buf.clear();
        self.decode_into(bytes, buf);
        buf
    }

    /// f32 values to little-endian bytes, rounding to nearest-even once.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0; values.len() * self.size()];
        for (&v, o) in values.iter().zip(out.chunks_exact_mut(self.size())) {
            self.put(v, o);
        }
        out
    }

    /// Writes `v`, rounded to nearest-even, into `out` (exactly [`Dtype::size`] bytes).
    #[inline]
    pub fn put(self, v: f32, out: &mut [u8]) {
        match self {
            Dtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            Dtype::BF16 => out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }

    /// `v` rounded to nearest-even in this dtype, as f32.
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
            Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    fn from_safetensors(d: StDtype) -> Option<Self> {
        match d {
            StDtype::F32 => Some(Dtype::F32),
            StDtype::F16 => Some(Dtype::F16),
            StDtype::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// The same dtype as the safetensors crate names it.
    pub fn to_safetensors(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
        }
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    /// Kept open so reads keep working if the folder is renamed.
    file: File,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
    /// Size and modification time when opened: reads through the map are valid while they hold.
    stamp: Stamp,
}

/// A file's size and modification time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    /// The stamp of the open file `file` (at `path`).
    pub(crate) fn of(file: &File, path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().map_err(crate::io_err(path))?;
        Ok(Stamp { len: m.len(), mtime: (m.mtime(), m.mtime_nsec()) })
    }

    /// Fails with [`Error::Changed`] when `file` (at `path`) no longer has this stamp.
    pub(crate) fn check(&self, file: &File, path: &Path) -> Result<()> {
        let now = Stamp::of(file, path)?;
        if now == *self {
            return Ok(());
        }
        let what = match now.len == self.len {
            true => "modified".to_string(),
            false => format!("{} bytes when opened, {} now", self.len, now.len),
        };
        Err(Error::Changed { path: path.to_path_buf(), what })
    }
}

/// A borrowed view of one stored tensor.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Raw little-endian bytes, straight from the memory map.
    pub bytes: &'a [u8],
    /// The file that holds it.
    pub path: &'a Path,
    /// Where `bytes` start in that file.
    pub offset: usize,
}

impl<'a> TensorRef<'a> {
    /// The values as f32: borrowed straight from the map for aligned F32 tensors, else decoded.
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        match (self.dtype, cfg!(target_endian = "little")) {
            (Dtype::F32, true) => bytemuck::try_cast_slice(self.bytes).map_or_else(|_| Cow::Owned(self.dtype.decode(self.bytes)), Cow::Borrowed),
            _ => Cow::Owned(self.dtype.decode(self.bytes)),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened Hugging Face model folder.
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`, sorted by name.
    index: BTreeMap<String, usize>,
}

pub const CONFIG: &str = "config.json";
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Opens `dir`, memory-maps every weight file and validates every header.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = read_json(&config_path(dir)?)?;
        let files = weight_files(dir)?;
        let mut shards: Vec<Shard> = Vec::with_capacity(files.len());
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = map_shard(&dir.join(file))?;
            for name in shard.metadata.tensors().keys() {
                if let Some(&j) = index.get(name) {
                    let (first, second) = (shards[j].path.clone(), shard.path.clone());
                    return Err(Error::DuplicateTensor { name: name.clone(), first, second });
                }
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        let ckpt = Checkpoint { dir: dir.to_path_buf(), config, shards, index };
        ckpt.check_index()?;
        for name in ckpt.index.keys() {
            ckpt.tensor(name)?; // dtype check on every tensor, before anyone trusts it
        }
        Ok(ckpt)
    }

    /// Every tensor listed in a shard index must be where the index says.
    fn check_index(&self) -> Result<()> {
        let path = self.dir.join(INDEX);
        if !exists(&path)? {
            return Ok(());
        }
        let map = read_json(&path)?;
        let weight_map = map.get("weight_map").and_then(|m| m.as_object()).into_iter().flatten();
        for (name, file) in weight_map {
            let in_shard =
                self.index.get(name).is_some_and(|&i| Some(self.shards[i].path.file_name().unwrap_or_default()) == file.as_str().map(std::ffi::OsStr::new));
            if !in_shard {
                return Err(Error::IndexMismatch { path: path.clone(), name: name.clone() });
            }
        }
        Ok(())
    }

    /// The folder this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The weight files, in the order they were listed.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Names of the tensors stored in `file` (one of [`Checkpoint::files`]), in file order.
    pub fn names_in(&self, file: &Path) -> Vec<&str> {
        let Some(shard) = self.shards.iter().find(|s| s.path == file) else { return Vec::new() };
        let mut names: Vec<_> = shard.metadata.tensors().into_iter().map(|(n, info)| (info.data_offsets.0, n)).collect();
        names.sort();
        names.into_iter().filter_map(|(_, n)| self.index.get_key_value(&n).map(|(k, _)| k.as_str())).collect()
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A view of tensor `name`. Its file is checked to be as it was when opened (see
    /// [`Checkpoint::check_unchanged`]), so the view does not read past a truncated file's end.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let t = self.lookup(name)?;
        self.check_unchanged(&t)?;
        Ok(t)
    }

    /// Fails with [`Error::Changed`] when the file holding `t` no longer has the size and
    /// modification time it had when the checkpoint was opened. The weights are memory-mapped:
    /// reading a truncated file's map kills the process (SIGBUS), and a rewritten one gives
    /// other bytes. Check before reading a tensor's bytes, and after, before trusting them.
    pub fn check_unchanged(&self, t: &TensorRef) -> Result<()> {
        match self.shards.iter().find(|s| s.path == t.path) {
            Some(shard) => shard.check_unchanged(),
            None => Ok(()),
        }
    }

    /// [`Checkpoint::check_unchanged`] for every weight file.
    pub fn check_files_unchanged(&self) -> Result<()> {
        self.shards.iter().try_for_each(Shard::check_unchanged)
    }

    /// A view of tensor `name`, without checking its file.
    fn lookup(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, &i) = self.index.get_key_value(name).ok_or_else(|| Error::MissingTensor { dir: self.dir.clone(), name: name.to_string() })?;
        let shard = &self.shards[i];
        let info = shard.metadata.info(name).expect("index built from this shard's metadata");
        let dtype = Dtype::from_safetensors(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: shard.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        Ok(TensorRef {
            name: key,
            dtype,
            shape: &info.shape,
            bytes: &shard.mmap[shard.data_start + start..shard.data_start + end],
            path: &shard.path,
            offset: shard.data_start + start,
        })
    }

    /// Lets the kernel drop `t`'s pages from this process's resident memory once it has been
    /// read; they are read back from the file if touched again. Keeps streaming passes small.
    pub fn evict(&self, t: &TensorRef) {
        self.evict_range(t, 0..t.bytes.len());
    }

    /// [`Checkpoint::evict`] for the bytes `range` of `t` only (pages it shares with its
    /// neighbours go too, and are read back if touched).
    pub fn evict_range(&self, t: &TensorRef, range: std::ops::Range<usize>) {
        if let Some(shard) = self.shards.iter().find(|s| s.path == t.path) {
            // SAFETY: the map is read-only and backed by the file, so MADV_DONTNEED only drops
            // clean pages; later reads see the same bytes. A failure only means no eviction.
            let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, t.offset + range.start, range.len()) };
        }
    }

    /// The model's identity: blake3 over every tensor's name, dtype, shape and the blake3 of its
    /// bytes ([`Checkpoint::tensor_hashes`]), in name order.
    pub fn identity(&self) -> Result<blake3::Hash> {
        let names: Vec<&str> = self.names().collect();
        Ok(self.identity_of(&self.tensor_hashes(&names)?))
    }

    /// [`Checkpoint::identity`], with the tensor hashes remembered in `cache`
    /// (see [`Checkpoint::tensor_hashes_cached`]).
    pub fn identity_cached(&self, cache: &Path) -> Result<blake3::Hash> {
        let names: Vec<&str> = self.names().collect();
        Ok(self.identity_of(&self.tensor_hashes_cached(&names, cache)?))
    }

    /// [`Checkpoint::identity`] from the tensors' byte hashes, one for every tensor (a model
    /// with these tensors' names, dtypes and shapes and those bytes).
    pub fn identity_of(&self, hashes: &BTreeMap<String, blake3::Hash>) -> blake3::Hash {
        identity_from(self.index.keys().map(|name| {
            let t = self.lookup(name).expect("validated on open");
            (t.name, t.dtype, t.shape, &hashes[name])
        }))
    }

    /// [`Checkpoint::tensor_hashes`], remembered per weight file in `cache` under the file's
    /// identity on disk: device, inode, size, and modification and change times (any write
    /// moves the change time, which no user can set back). A model is hashed once, not at every
    /// apply or statistics lookup. A cache that cannot be read or written only costs a rehash.
    pub fn tensor_hashes_cached(&self, names: &[&str], cache: &Path) -> Result<BTreeMap<String, blake3::Hash>> {
        let mut out = BTreeMap::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let wanted: Vec<&str> = names.iter().copied().filter(|n| self.index.get(*n) == Some(&i)).collect();
            if wanted.is_empty() {
                continue;
            }
            let every: Vec<&str> = self.index.iter().filter(|(_, &s)| s == i).map(|(n, _)| n.as_str()).collect();
            let all = remembered_hashes(cache, &shard.path, &shard.file, "", &every, || self.tensor_hashes(&every))?;
            out.extend(wanted.into_iter().map(|n| (n.to_string(), all[n])));
        }
        Ok(out)
    }

    /// blake3 of each named tensor's bytes (what patches record as their base), computed in
    /// parallel from small reads rather than through the map, so resident memory stays flat.
    pub fn tensor_hashes(&self, names: &[&str]) -> Result<BTreeMap<String, blake3::Hash>> {
        use std::os::unix::fs::FileExt;
        names
            .par_iter()
            .map(|&name| {
                let t = self.tensor(name)?;
                let file = &self.shards[self.index[name]].file;
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; 1 << 18];
                let (mut pos, mut left) = (t.offset as u64, t.bytes.len());
                while left > 0 {
                    let n = left.min(buf.len());
                    file.read_exact_at(&mut buf[..n], pos).map_err(crate::io_err(t.path))?;
                    h.update_rayon(&buf[..n]);
                    pos += n as u64;
                    left -= n;
                }
                Ok((name.to_string(), h.finalize()))
            })
            .collect()
    }
}

/// The model identity ([`Checkpoint::identity`]) of tensors given as name, dtype, shape and
/// the blake3 of their bytes, in name order.
pub fn identity_from<'a>(tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a blake3::Hash)>) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for (name, dtype, shape, hash) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}{shape:?}").as_bytes());
        h.update(hash.as_bytes());
    }
    h.finalize()
}

/// The tensor hashes `compute` gives for the weight file `path` (open as `file`; `every` names
/// all its tensors), remembered in `cache` under the file's identity on disk (see
/// [`Checkpoint::tensor_hashes_cached`]) and `kind`, which tells apart hashes of different
/// readings of one file (empty for a safetensors file's bytes). A cache that cannot be read or
/// written only costs a recomputation.
pub(crate) fn remembered_hashes<E: From<crate::IoError>>(
    cache: &Path,
    path: &Path,
    file: &File,
    kind: &str,
    every: &[&str],
    compute: impl FnOnce() -> std::result::Result<BTreeMap<String, blake3::Hash>, E>,
) -> std::result::Result<BTreeMap<String, blake3::Hash>, E> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().map_err(crate::io_err(path))?;
    let place = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format!("{kind}{}|{}|{}|{}|{}.{}|{}.{}", place.display(), m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
    let entry = cache.join(format!("{}.json", &blake3::hash(key.as_bytes()).to_hex()[..32]));
    let remembered: Option<BTreeMap<String, blake3::Hash>> = crate::read_regular(&entry, crate::MAX_METADATA_BYTES)
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, String>>(&b).ok())
        .and_then(|r| r.into_iter().map(|(n, h)| Some((n, blake3::Hash::from_hex(h).ok()?))).collect());
    if let Some(all) = remembered.filter(|all| every.iter().all(|n| all.contains_key(*n))) {
        return Ok(all);
    }
    let all = compute()?;
    let text: BTreeMap<&str, String> = all.iter().map(|(n, h)| (n.as_str(), h.to_hex().to_string())).collect();
    let _ = std::fs::create_dir_all(cache)
        .and_then(|_| crate::atomic::write(&entry, &serde_json::to_vec(&text).expect("strings serialize"), &crate::atomic::Policy::rewrite()));
    Ok(all)
}

/// Where tensor hashes are remembered by default: `hashes/` in factpatch's cache folder.
pub fn default_hash_cache() -> PathBuf {
    crate::cache_root().join("hashes")
}

impl Shard {
    fn check_unchanged(&self) -> Result<()> {
        self.stamp.check(&self.file, &self.path)
    }
}

/// Whether `path` exists. Unlike `Path::exists`, an error other than "not found" (a symlink
/// loop, a permission problem) is reported rather than taken for absence.
fn exists(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(crate::io_err(path)(e).into()),
    }
}

/// `dir/config.json`, or [`Error::MissingConfig`] when there is none.
pub fn config_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(CONFIG);
    match exists(&path)? {
        true => Ok(path),
        false => Err(Error::MissingConfig(dir.to_path_buf())),
    }
}

/// The weight files of a folder: the single file, or the shards named by the index (sorted, unique).
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join(INDEX);
    if exists(&index)? {
        let map = read_json(&index)?;
        let files: std::collections::BTreeSet<String> = map
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Safetensors { path: index.clone(), reason: "no `weight_map` object".into() })?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if files.iter().any(|f| f.contains('/') || f.contains('\\')) {
            return Err(Error::Safetensors { path: index, reason: "shard names must be plain file names".into() });
        }
        return Ok(files.into_iter().collect());
    }
    if exists(&dir.join(SINGLE))? {
        return Ok(vec![SINGLE.to_string()]);
    }
    Err(Error::MissingWeights(dir.to_path_buf()))
}

fn map_shard(path: &Path) -> Result<Shard> {
    let (file, _) = crate::open_regular(path, u64::MAX)?;
    let stamp = Stamp::of(&file, path)?;
    // SAFETY: checkpoints are treated as immutable while open; factpatch never writes into a
    // base, and readers call `check_unchanged` around their reads to catch others who do.
    let mmap = unsafe { Mmap::map(&file) }.map_err(crate::io_err(path))?;
    let bad = |e: safetensors::SafeTensorError| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() };
    SafeTensors::deserialize(&mmap).map_err(bad)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
    Ok(Shard { path: path.to_path_buf(), file, mmap, data_start: 8 + header_len, metadata, stamp })
}

/// Reads and parses a JSON file, naming it in any error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::read_regular(path, crate::MAX_METADATA_BYTES)?;
    serde_json::from_slice(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// A source of named tensors: a checkpoint folder, or one with patches overlaid
/// (`apply::Overlay`). Models load from either.
pub trait Tensors {
    /// The model folder the tensors come from.
    fn dir(&self) -> &Path;
    /// Whether a tensor named `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// Tensor `name`.
    fn tensor(&self, name: &str) -> Result<TensorRef<'_>>;
    /// Tensor `name`, checked to have `shape`.
    fn tensor_with_shape(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(Error::Shape { path: t.path.to_path_buf(), name: name.to_string(), found: t.shape.to_vec(), expected: shape.to_vec() });
        }
        Ok(t)
    }
}

impl Tensors for Checkpoint {
    fn dir(&self) -> &Path {
        Checkpoint::dir(self)
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }

    fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        Checkpoint::tensor(self, name)
    }
}
