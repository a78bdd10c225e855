//! The patch file (`formats/patch.md`, version 1): manifest types, delta encodings,
//! canonical bytes, id, and a reader that verifies before it allocates.

use crate::checkpoint::{Dtype, TensorRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// First 8 bytes of every patch file.
pub const MAGIC: &[u8; 8] = b"FACTPTCH";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Prefix of a printed patch id.
pub const ID_PREFIX: &str = "fp1-";
const HEADER: usize = 24;
const TRAILER: usize = 32;
const MAX_MANIFEST: u64 = 64 << 20;
const MAX_ELEMENTS: u64 = 1 << 34;
const MAX_DIMS: usize = 8;
/// Most elements an entry's tensor may have when no model bounds it: a delta is materialised
/// as f32 without the base only by `audit` and `merge` without `--model`, and then holds at
/// most 2^28 elements, 1 GiB. With the model, the real tensor bounds it.
pub const MAX_UNBOUNDED_ELEMENTS: u64 = 1 << 28;
/// Most raw payload bytes an entry may have when no model bounds it: 1 GiB, what a dense f32
/// delta of [`MAX_UNBOUNDED_ELEMENTS`] elements takes.
pub const MAX_UNBOUNDED_RAW: u64 = MAX_UNBOUNDED_ELEMENTS * 4;
/// Most values the low-rank factors of one entry may hold, `(R + C)·Σr`: 2^28 (1 GiB as f32),
/// whatever the tensor. Real edits use a few per fact.
pub const MAX_FACTOR_VALUES: u64 = 1 << 28;
/// Frames up to this many raw bytes are compressed at level 19, larger ones at level 3.
const SMALL_FRAME: usize = 4 << 20;

/// Everything that can go wrong reading or writing a patch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The patch file could not be read.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// The file is shorter than its structure requires.
    #[error("{path}: truncated patch ({reason})")]
    Truncated { path: PathBuf, reason: String },
    /// The file does not start with the patch magic.
    #[error("{0}: not a factpatch patch (bad magic)")]
    BadMagic(PathBuf),
    /// The file has a format version or flags this build does not read.
    #[error("{path}: unsupported patch format version {version} (flags {flags})")]
    Unsupported { path: PathBuf, version: u32, flags: u32 },
    /// The trailing hash does not match the content.
    #[error("{path}: hash mismatch: file says {stored}, content hashes to {computed} (corrupt or altered)")]
    HashMismatch { path: PathBuf, stored: String, computed: String },
    /// The manifest is malformed or makes impossible claims.
    #[error("{path}: bad manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// Two entries name the same tensor.
    #[error("{path}: tensor `{name}` appears more than once")]
    DuplicateTensor { path: PathBuf, name: String },
    /// A compressed payload is corrupt or does not decompress to its declared size.
    #[error("{path}: tensor `{name}`: bad payload: {reason}")]
    Payload { path: PathBuf, name: String, reason: String },
    /// A delta value is NaN or infinite.
    #[error("{path}: tensor `{name}`: delta value {index} is not finite")]
    NonFinite { path: PathBuf, name: String, index: usize },
    /// An entry is too large to materialise without the model its tensor belongs to.
    #[error("{path}: tensor `{name}` declares {what}; without the base model at most {max} are materialised (give the model with --model)")]
    TooLarge { path: PathBuf, name: String, what: String, max: String },
    /// A delta handed to the writer does not fit its tensor.
    #[error("tensor `{name}`: invalid delta: {reason}")]
    InvalidDelta { name: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The patch manifest; field order is the canonical JSON order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub tool: String,
    pub model: ModelInfo,
    /// Identity (`Checkpoint::identity`, 64 hex digits) of the model folder the patch was made
    /// for, before any parent patch: every patch of a chain records the same. Absent in older
    /// files (then only the tensor hashes are checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Id of the patch this one was compiled on top of.
    pub parent: Option<String>,
    /// Ids of the patches merged into this one, in order; empty for compiled patches.
    pub includes: Vec<String>,
    pub edits: Vec<Edit>,
    /// Edits a later edit of the same subject and relation overrode when patches were merged
    /// (`merge --allow-override`): their weight changes are in the patch, their facts are not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overridden: Vec<Edit>,
    pub method: Method,
    pub stats_id: Option<String>,
    /// MEND: the id of the editor file (`formats/mend.md`) that made the patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub editor_id: Option<String>,
    pub rect_k: Option<f64>,
    pub metrics: BTreeMap<String, f64>,
    pub entries: Vec<Entry>,
}

/// The base model a patch was made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub family: String,
}

/// One fact edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub subject: String,
    pub relation: String,
    pub prompt: String,
    pub target_old: String,
    pub target_new: String,
}

/// How the patch was produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Method {
    pub name: String,
    pub hyperparameters: BTreeMap<String, serde_json::Value>,
}

/// One touched tensor: its base identity and its encoded delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub tensor: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub base_blake3: String,
    pub encoding: Encoding,
    pub zlen: u64,
    pub raw_len: u64,
}

/// Width of stored sparse index gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexWidth {
    U32,
    U64,
}

/// How an entry's payload encodes its delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Encoding {
    Dense { vdtype: Dtype },
    Sparse { vdtype: Dtype, nnz: u64, index: IndexWidth },
    LowRank { vdtype: Dtype, ranks: Vec<u32> },
    LowRankRect { vdtype: Dtype, rank: u32, k: f64, eps: f32 },
}

impl Encoding {
    /// Short name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Encoding::Dense { .. } => "dense",
            Encoding::Sparse { .. } => "sparse",
            Encoding::LowRank { .. } => "low_rank",
            Encoding::LowRankRect { .. } => "low_rank_rect",
        }
    }
}

/// Low-rank factors of a `rows × cols` delta: `u` is `rows × rank`, `v` is `cols × rank`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
}

/// A decoded delta, in the stored tensor's layout.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Dense(Vec<f32>),
    /// Strictly increasing flat indices and their values.
    Sparse {
        indices: Vec<u64>,
        values: Vec<f32>,
    },
    /// One group per compiled patch; each group is one contribution.
    LowRank(Vec<Factors>),
    /// Factors whose product is masked to the top-`k`% at apply time.
    LowRankRect {
        factors: Factors,
        k: f64,
        eps: f32,
    },
}

impl Delta {
    /// The bytes of the payload [`encode`] writes for this delta of a tensor of `shape` (its
    /// `raw_len`), or `None` where the format cannot hold it (low-rank factors beyond
    /// [`MAX_FACTOR_VALUES`]).
    pub fn payload_len(&self, shape: &[usize]) -> Option<u64> {
        expected_raw_len(shape, &encoding(shape, self)).ok()
    }

    /// The smallest exact explicit encoding of a full f32 delta: sparse or dense.
    pub fn explicit(values: Vec<f32>) -> Delta {
        let nnz = values.iter().filter(|v| **v != 0.0).count();
        let s = smallest_vdtype(values.iter().copied()).size();
        let iw = if values.len() as u64 <= u32::MAX as u64 { 4 } else { 8 };
        if nnz * (iw + s) < values.len() * s {
            let (indices, values) = values.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, v)| (i as u64, *v)).unzip();
            Delta::Sparse { indices, values }
        } else {
            Delta::Dense(values)
        }
    }
}

/// A tensor's identity in the checkpoint a patch applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub blake3: String,
}

impl BaseTensor {
    /// The identity of a stored tensor.
    pub fn of(t: &TensorRef) -> Self {
        BaseTensor { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec(), blake3: blake3::hash(t.bytes).to_hex().to_string() }
    }
}

impl Manifest {
    /// An empty manifest for `model`, made by `method`.
    pub fn new(model: ModelInfo, method: Method) -> Self {
        Manifest {
            format: VERSION,
            tool: crate::tool_version(),
            model,
            base_model: None,
            parent: None,
            includes: Vec::new(),
            edits: Vec::new(),
            overridden: Vec::new(),
            method,
            stats_id: None,
            editor_id: None,
            rect_k: None,
            metrics: BTreeMap::new(),
            entries: Vec::new(),
        }
    }
}

/// A patch's file bytes and its id.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// `fp1-…`, as [`Patch::id`] reads it back.
    pub id: String,
}

/// Encodes a patch: `manifest` without entries plus one delta per tensor.
/// Entries are sorted by name; `format` and `tool` are set here.
pub fn encode(mut manifest: Manifest, mut deltas: Vec<(BaseTensor, Delta)>) -> Result<Encoded> {
    deltas.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if let Some(w) = deltas.windows(2).find(|w| w[0].0.name == w[1].0.name) {
        return Err(Error::InvalidDelta { name: w[0].0.name.clone(), reason: "given twice".into() });
    }
    manifest.format = VERSION;
    manifest.tool = crate::tool_version();
    manifest.entries.clear();
    let mut frames = Vec::with_capacity(deltas.len());
    for (base, delta) in &deltas {
        check_delta(base, delta)?;
        let (encoding, raw) = encode_payload(&base.shape, delta);
        expected_raw_len(&base.shape, &encoding).map_err(|reason| Error::InvalidDelta { name: base.name.clone(), reason })?;
        let frame = compress(&raw);
        manifest.entries.push(Entry {
            tensor: base.name.clone(),
            dtype: base.dtype,
            shape: base.shape.clone(),
            base_blake3: base.blake3.clone(),
            encoding,
            zlen: frame.len() as u64,
            raw_len: raw.len() as u64,
        });
        frames.push(frame);
    }
    let json = serde_json::to_vec(&manifest).expect("manifest serializes");
    let mframe = compress(&json);
    let mut out = Vec::with_capacity(HEADER + mframe.len() + frames.iter().map(Vec::len).sum::<usize>() + TRAILER);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(mframe.len() as u64).to_le_bytes());
    out.extend_from_slice(&mframe);
    for f in &frames {
        out.extend_from_slice(f);
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    Ok(Encoded { bytes: out, id: format_id(hash.as_bytes()) })
}

/// The printed id of a patch whose trailer hash is `hash`.
pub fn format_id(hash: &[u8; 32]) -> String {
    format!("{ID_PREFIX}{}", blake3::Hash::from(*hash).to_hex())
}

fn compress(raw: &[u8]) -> Vec<u8> {
    let level = if raw.len() <= SMALL_FRAME { 19 } else { 3 };
    let mut c = zstd::bulk::Compressor::new(level).expect("valid zstd level");
    c.include_checksum(true).expect("zstd parameter");
    c.include_contentsize(true).expect("zstd parameter");
    c.compress(raw).expect("zstd compression of an in-memory buffer")
}

/// Decompresses one frame, refusing to produce more than `expected` bytes.
fn inflate(frame: &[u8], expected: u64) -> std::result::Result<Vec<u8>, String> {
    let dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(expected.min(16 << 20) as usize);
    dec.take(expected + 1).read_to_end(&mut out).map_err(|e| format!("zstd: {e}"))?;
    if out.len() as u64 != expected {
        let got = if out.len() as u64 > expected { format!("more than {expected}") } else { out.len().to_string() };
        return Err(format!("decompresses to {got} bytes, manifest says {expected}"));
    }
    Ok(out)
}

/// Smallest value dtype that holds every value exactly: BF16, then F16, then F32.
fn smallest_vdtype(values: impl Iterator<Item = f32> + Clone) -> Dtype {
    for d in [Dtype::BF16, Dtype::F16] {
        if values.clone().all(|v| d.round(v).to_bits() == v.to_bits()) {
            return d;
        }
    }
    Dtype::F32
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn check_delta(base: &BaseTensor, delta: &Delta) -> Result<()> {
    let bad = |reason: String| Err(Error::InvalidDelta { name: base.name.clone(), reason });
    let n = numel(&base.shape);
    let values: Box<dyn Iterator<Item = &f32>> = match delta {
        Delta::Dense(v) => {
            if v.len() != n {
                return bad(format!("{} values for {n} elements", v.len()));
            }
            Box::new(v.iter())
        }
        Delta::Sparse { indices, values } => {
            if indices.len() != values.len() {
                return bad("indices and values differ in length".into());
            }
            if indices.windows(2).any(|w| w[0] >= w[1]) || indices.last().is_some_and(|&i| i >= n as u64) {
                return bad("indices must be strictly increasing and below the element count".into());
            }
            Box::new(values.iter())
        }
        Delta::LowRank(groups) => {
            if groups.is_empty() {
                return bad("no factor groups".into());
            }
            for f in groups {
                check_factors(base, f)?;
            }
            Box::new(groups.iter().flat_map(|f| f.u.iter().chain(&f.v)))
        }
        Delta::LowRankRect { factors, k, eps } => {
            check_factors(base, factors)?;
            if !(0.0..=100.0).contains(k) || !eps.is_finite() || *eps <= 0.0 {
                return bad(format!("RECT needs 0 ≤ k ≤ 100 and a finite eps > 0 (k={k}, eps={eps})"));
            }
            Box::new(factors.u.iter().chain(&factors.v))
        }
    };
    let mut values = values;
    if values.any(|v| !v.is_finite()) {
        return bad("non-finite value".into());
    }
    Ok(())
}

fn check_factors(base: &BaseTensor, f: &Factors) -> Result<()> {
    let ok = base.shape.len() == 2 && f.rank > 0 && f.u.len() == base.shape[0] * f.rank && f.v.len() == base.shape[1] * f.rank;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidDelta { name: base.name.clone(), reason: format!("factors of rank {} do not fit shape {:?}", f.rank, base.shape) })
    }
}

/// How `delta` is written for a tensor of `shape`: its kind, with the smallest value dtype that
/// holds every value exactly.
fn encoding(shape: &[usize], delta: &Delta) -> Encoding {
    match delta {
        Delta::Dense(v) => Encoding::Dense { vdtype: smallest_vdtype(v.iter().copied()) },
        Delta::Sparse { indices, values } => {
            let index = if numel(shape) as u64 <= u32::MAX as u64 { IndexWidth::U32 } else { IndexWidth::U64 };
            Encoding::Sparse { vdtype: smallest_vdtype(values.iter().copied()), nnz: indices.len() as u64, index }
        }
        Delta::LowRank(groups) => Encoding::LowRank {
            vdtype: smallest_vdtype(groups.iter().flat_map(|f| f.u.iter().chain(&f.v)).copied()),
            ranks: groups.iter().map(|f| f.rank as u32).collect(),
        },
        Delta::LowRankRect { factors, k, eps } => {
            Encoding::LowRankRect { vdtype: smallest_vdtype(factors.u.iter().chain(&factors.v).copied()), rank: factors.rank as u32, k: *k, eps: *eps }
        }
    }
}

fn encode_payload(shape: &[usize], delta: &Delta) -> (Encoding, Vec<u8>) {
    let encoding = encoding(shape, delta);
    let raw = match (delta, &encoding) {
        (Delta::Dense(v), Encoding::Dense { vdtype }) => vdtype.encode(v),
        (Delta::Sparse { indices, values }, Encoding::Sparse { vdtype, index, .. }) => {
            let mut raw = Vec::new();
            let mut prev = 0;
            for &i in indices {
                let gap = i - prev;
                prev = i;
                match index {
                    IndexWidth::U32 => raw.extend_from_slice(&(gap as u32).to_le_bytes()),
                    IndexWidth::U64 => raw.extend_from_slice(&gap.to_le_bytes()),
                }
            }
            raw.extend_from_slice(&vdtype.encode(values));
            raw
        }
        (Delta::LowRank(groups), Encoding::LowRank { vdtype, .. }) => {
            groups.iter().flat_map(|f| [vdtype.encode(&f.u), vdtype.encode(&f.v)]).flatten().collect()
        }
        (Delta::LowRankRect { factors, .. }, Encoding::LowRankRect { vdtype, .. }) => {
            let mut raw = vdtype.encode(&factors.u);
            raw.extend_from_slice(&vdtype.encode(&factors.v));
            raw
        }
        _ => unreachable!("encoding() keeps the delta's kind"),
    };
    (encoding, raw)
}

/// A patch read from disk: hash verified, manifest validated; payloads decoded on demand.
pub struct Patch {
    path: PathBuf,
    bytes: Vec<u8>,
    manifest: Manifest,
    id: String,
    /// Start of each entry's frame in `bytes`.
    offsets: Vec<usize>,
}

impl std::fmt::Debug for Patch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Patch({}, {})", self.path.display(), self.id)
    }
}

impl Patch {
    /// Reads and verifies the patch at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::read_regular(path, crate::MAX_DATA_BYTES)?;
        Self::from_bytes(bytes, path)
    }

    /// Verifies `bytes` (named `path` in errors): structure, hash, then manifest.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let truncated = |reason: &str| Error::Truncated { path: path.clone(), reason: reason.into() };
        if bytes.len() < HEADER + TRAILER {
            return Err(if bytes.starts_with(&MAGIC[..bytes.len().min(8)]) { truncated("shorter than header and trailer") } else { Error::BadMagic(path) });
        }
        if &bytes[..8] != MAGIC {
            return Err(Error::BadMagic(path));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if version != VERSION || flags != 0 {
            return Err(Error::Unsupported { path, version, flags });
        }
        let mlen = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let body_end = bytes.len() - TRAILER;
        if mlen > MAX_MANIFEST || mlen > (body_end - HEADER) as u64 {
            return Err(truncated(&format!("manifest length {mlen} exceeds the file")));
        }
        let computed = blake3::hash(&bytes[..body_end]);
        let stored: [u8; 32] = bytes[body_end..].try_into().expect("32 bytes");
        let mend = HEADER + mlen as usize;
        if computed.as_bytes() != &stored {
            // A file cut short usually keeps its manifest: say so rather than "hash mismatch".
            if let Some(declared) = declared_len(&bytes[HEADER..mend]).filter(|&d| d > bytes.len() as u64) {
                return Err(truncated(&format!("{} bytes, but its manifest declares {declared}", bytes.len())));
            }
            return Err(Error::HashMismatch { path, stored: format_id(&stored), computed: format_id(computed.as_bytes()) });
        }
        let bad = |reason: String| Error::Manifest { path: path.clone(), reason };
        let json = inflate(&bytes[HEADER..mend], decompressed_len(&bytes[HEADER..mend], MAX_MANIFEST).map_err(bad)?).map_err(bad)?;
        let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        let offsets = validate(&manifest, &path, mend, body_end)?;
        Ok(Patch { id: format_id(&stored), path, bytes, manifest, offsets })
    }

    /// `fp1-…`: the blake3 of the file's canonical bytes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the patch was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The id of the last patch this one contains: itself, or the last one merged into it.
    pub fn tip(&self) -> &str {
        self.manifest.includes.last().map_or(&self.id, String::as_str)
    }

    /// Checks that every entry can be materialised without the model its tensors belong to: at
    /// most [`MAX_UNBOUNDED_ELEMENTS`] elements and [`MAX_UNBOUNDED_RAW`] payload bytes. Callers
    /// that decode or materialise deltas with no base tensor to bound them call it first.
    pub fn check_unbounded(&self) -> Result<()> {
        for e in &self.manifest.entries {
            let n = numel(&e.shape) as u64;
            let too_large =
                |what: String, max: u64, unit: &str| Error::TooLarge { path: self.path.clone(), name: e.tensor.clone(), what, max: format!("{max} {unit}") };
            if n > MAX_UNBOUNDED_ELEMENTS {
                return Err(too_large(format!("shape {:?} ({n} elements)", e.shape), MAX_UNBOUNDED_ELEMENTS, "elements"));
            }
            if e.raw_len > MAX_UNBOUNDED_RAW {
                return Err(too_large(format!("a payload of {} bytes", e.raw_len), MAX_UNBOUNDED_RAW, "bytes"));
            }
        }
        Ok(())
    }

    /// Decodes entry `i`'s delta, checking its size, structure and that every value is finite.
    pub fn delta(&self, i: usize) -> Result<Delta> {
        let e = &self.manifest.entries[i];
        let frame = &self.bytes[self.offsets[i]..self.offsets[i] + e.zlen as usize];
        let bad = |reason: String| Error::Payload { path: self.path.clone(), name: e.tensor.clone(), reason };
        let raw = inflate(frame, e.raw_len).map_err(bad)?;
        let delta = decode_payload(e, &raw).map_err(bad)?;
        let non_finite = match &delta {
            Delta::Dense(v) | Delta::Sparse { values: v, .. } => v.iter().position(|x| !x.is_finite()),
            Delta::LowRank(g) => g.iter().flat_map(|f| f.u.iter().chain(&f.v)).position(|x| !x.is_finite()),
            Delta::LowRankRect { factors: f, .. } => f.u.iter().chain(&f.v).position(|x| !x.is_finite()),
        };
        match non_finite {
            Some(index) => Err(Error::NonFinite { path: self.path.clone(), name: e.tensor.clone(), index }),
            None => Ok(delta),
        }
    }
}

/// The content size a zstd frame declares, bounded by `max`.
fn decompressed_len(frame: &[u8], max: u64) -> std::result::Result<u64, String> {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= max => Ok(n),
        Ok(Some(n)) => Err(format!("manifest claims {n} bytes, more than the {max} allowed")),
        _ => Err("manifest frame has no valid content size".into()),
    }
}

/// The file length a (hash-mismatching) file's manifest frame declares, if it can be read.
fn declared_len(mframe: &[u8]) -> Option<u64> {
    let json = inflate(mframe, decompressed_len(mframe, MAX_MANIFEST).ok()?).ok()?;
    let m: Manifest = serde_json::from_slice(&json).ok()?;
    m.entries.iter().try_fold((HEADER + TRAILER + mframe.len()) as u64, |acc, e| acc.checked_add(e.zlen))
}

/// The payload length an encoding implies for a tensor of `shape`, or why it is impossible.
fn expected_raw_len(shape: &[usize], encoding: &Encoding) -> std::result::Result<u64, String> {
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(format!("shape {shape:?} must have 1 to {MAX_DIMS} dimensions"));
    }
    let n = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).filter(|&n| n <= MAX_ELEMENTS);
    let n = n.ok_or_else(|| format!("shape {shape:?} is absurdly large"))?;
    // The values of low-rank factors of total rank `r`: (R + C)·r, bounded.
    let factor_values = |r: u64| match shape[..] {
        [rows, cols] => match (rows as u64 + cols as u64).checked_mul(r) {
            Some(v) if v <= MAX_FACTOR_VALUES => Ok(v),
            v => {
                let v = v.map_or("more than 2^64".to_string(), |v| v.to_string());
                Err(format!("low-rank factors of total rank {r} for shape {shape:?} hold {v} values, more than the {MAX_FACTOR_VALUES} allowed"))
            }
        },
        _ => Err(format!("low-rank encoding needs a 2-D tensor, shape is {shape:?}")),
    };
    let len = match encoding {
        Encoding::Dense { vdtype } => Some(n * vdtype.size() as u64),
        Encoding::Sparse { vdtype, nnz, index } => {
            if *nnz > n {
                return Err(format!("{nnz} non-zeros in {n} elements"));
            }
            let iw = match index {
                IndexWidth::U32 => 4,
                IndexWidth::U64 => 8,
            };
            Some(nnz * (iw + vdtype.size() as u64))
        }
        Encoding::LowRank { vdtype, ranks } => {
            if ranks.is_empty() || ranks.contains(&0) {
                return Err("low-rank groups must be non-empty with rank ≥ 1".into());
            }
            let r: u64 = ranks.iter().map(|&r| r as u64).sum();
            Some(factor_values(r)? * vdtype.size() as u64)
        }
        Encoding::LowRankRect { vdtype, rank, k, eps } => {
            if *rank == 0 || !(0.0..=100.0).contains(k) || !eps.is_finite() || *eps <= 0.0 {
                return Err(format!("RECT needs rank ≥ 1, 0 ≤ k ≤ 100, eps > 0 (rank {rank}, k {k}, eps {eps})"));
            }
            Some(factor_values(*rank as u64)? * vdtype.size() as u64)
        }
    };
    len.filter(|&l| l <= MAX_ELEMENTS * 8).ok_or_else(|| "payload size is absurdly large".to_string())
}

/// Checks the manifest against the file; returns each entry's frame offset.
fn validate(m: &Manifest, path: &Path, payload_start: usize, payload_end: usize) -> Result<Vec<usize>> {
    let bad = |reason: String| Error::Manifest { path: path.to_path_buf(), reason };
    if m.format != VERSION {
        return Err(bad(format!("format {} in a version-{VERSION} file", m.format)));
    }
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if let Some(b) = m.base_model.as_deref().filter(|b| !is_hex(b)) {
        return Err(bad(format!("base_model {b:?} is not 64 lowercase hex digits")));
    }
    let mut offsets = Vec::with_capacity(m.entries.len());
    let mut pos = payload_start as u64;
    for (i, e) in m.entries.iter().enumerate() {
        if i > 0 {
            let prev = &m.entries[i - 1].tensor;
            if *prev == e.tensor {
                return Err(Error::DuplicateTensor { path: path.to_path_buf(), name: e.tensor.clone() });
            }
            if *prev > e.tensor {
                return Err(bad(format!("entries not sorted: `{prev}` before `{}`", e.tensor)));
            }
        }
        let expected = expected_raw_len(&e.shape, &e.encoding).map_err(|r| bad(format!("tensor `{}`: {r}", e.tensor)))?;
        if e.raw_len != expected {
            return Err(bad(format!("tensor `{}`: raw_len {} but encoding implies {expected}", e.tensor, e.raw_len)));
        }
        if e.base_blake3.len() != 64 || !e.base_blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("tensor `{}`: base_blake3 is not 64 hex digits", e.tensor)));
        }
        offsets.push(pos as usize);
        pos = pos
            .checked_add(e.zlen)
            .filter(|&p| p <= payload_end as u64)
            .ok_or_else(|| Error::Truncated { path: path.to_path_buf(), reason: format!("payload of `{}` runs past the end of the file", e.tensor) })?;
    }
    if pos != payload_end as u64 {
        return Err(bad(format!("{} bytes after the last payload", payload_end as u64 - pos)));
    }
    Ok(offsets)
}

fn decode_payload(e: &Entry, raw: &[u8]) -> std::result::Result<Delta, String> {
    let n = numel(&e.shape) as u64;
    let factors = |raw: &[u8], vdtype: Dtype, rank: usize| {
        let split = e.shape[0] * rank * vdtype.size();
        Factors { rank, u: vdtype.decode(&raw[..split]), v: vdtype.decode(&raw[split..]) }
    };
    Ok(match &e.encoding {
        Encoding::Dense { vdtype } => Delta::Dense(vdtype.decode(raw)),
        Encoding::Sparse { vdtype, nnz, index } => {
            let iw = if *index == IndexWidth::U32 { 4 } else { 8 };
            let (idx, vals) = raw.split_at(*nnz as usize * iw);
            let mut indices = Vec::with_capacity(*nnz as usize);
            let mut prev: Option<u64> = None;
            for g in idx.chunks_exact(iw) {
                let gap = if iw == 4 { u32::from_le_bytes(g.try_into().expect("4")) as u64 } else { u64::from_le_bytes(g.try_into().expect("8")) };
                let i = match prev {
                    None => gap,
                    Some(_) if gap == 0 => return Err("sparse indices repeat".into()),
                    Some(p) => p.checked_add(gap).ok_or("sparse index overflows")?,
                };
                if i >= n {
                    return Err(format!("sparse index {i} outside {n} elements"));
                }
                indices.push(i);
                prev = Some(i);
            }
            Delta::Sparse { indices, values: vdtype.decode(vals) }
        }
        Encoding::LowRank { vdtype, ranks } => {
            let mut groups = Vec::with_capacity(ranks.len());
            let mut rest = raw;
            for &r in ranks {
                let len = (e.shape[0] + e.shape[1]) * r as usize * vdtype.size();
                let (g, tail) = rest.split_at(len);
                groups.push(factors(g, *vdtype, r as usize));
                rest = tail;
            }
            Delta::LowRank(groups)
        }
        Encoding::LowRankRect { vdtype, rank, k, eps } => Delta::LowRankRect { factors: factors(raw, *vdtype, *rank as usize), k: *k, eps: *eps },
    })
}
