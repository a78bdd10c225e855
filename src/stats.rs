//! Key statistics: the uncentred second moment C = E[k kᵀ] of the MLP keys (the input of the
//! down-projection) over generic text, which MEMIT and ROME need. One forward pass per batch
//! captures every requested layer; Σ k kᵀ is accumulated in f64 with a BLAS rank-k update.
//! The file format, sampling, sharding and the cache are specified in `formats/stats.md`.

use crate::atomic::AtomicFile;
use crate::checkpoint::{self, Checkpoint};
use crate::model::{self, Batch, Hooks, Model};
use crate::tokenize::{self, Tokenizer};
use crate::{io_err, tool_version};
use indicatif::{ProgressBar, ProgressStyle};
// Links OpenBLAS (through its LAPACK backend), which provides the CBLAS `dsyrk` used here.
use ndarray::Array2;
use ndarray_linalg as _;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The `format` metadata value of a statistics file.
pub const FORMAT: &str = "factpatch-stats";
/// The version of `formats/stats.md` this module reads and writes.
pub const FORMAT_VERSION: &str = "1";
/// Padded tokens per forward batch (sequences × longest). Fixed, so that a chunk always meets the
/// same kernels whichever shard it lands in. 1024 keeps SmolLM2's attention scores at seq-len 512
/// under glibc's 32 MiB mmap threshold (no page faults per op); it measured no slower than 512 or 2048.
pub const BATCH_TOKENS: usize = 1024;

/// Everything that can go wrong computing, reading or merging statistics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// A corpus file holds a NUL byte: it is binary, not text.
    #[error("{path}: binary file (NUL byte at offset {offset}); the corpus must be plain text or JSONL")]
    Binary { path: PathBuf, offset: usize },
    /// A corpus file is not valid UTF-8.
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    /// A JSONL line is not an object with a string `text` field.
    #[error("{path}:{line}: {problem}")]
    Jsonl { path: PathBuf, line: usize, problem: String },
    /// No corpus file was given, or the files hold no tokens.
    #[error("empty corpus: {0}")]
    EmptyCorpus(String),
    /// An option has an unusable value (layers, shard, seq-len, tokens).
    #[error("{0}")]
    Invalid(String),
    /// A requested layer is outside the model.
    #[error("layer {layer} out of range: {model} has layers 0-{last}")]
    LayerOutOfRange { layer: usize, model: PathBuf, last: usize },
    /// A statistics file is malformed or of an unknown format.
    #[error("{path}: not a factpatch statistics file: {problem}")]
    Format { path: PathBuf, problem: String },
    /// Two statistics files cannot be summed.
    #[error("cannot merge {a} with {b}: {problem}")]
    Merge { a: PathBuf, b: PathBuf, problem: String },
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] tokenize::Error),
    /// The checkpoint could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One shard of a run: the batches whose index is `index` mod `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole run.
    pub const ALL: Shard = Shard { index: 0, count: 1 };
}

impl FromStr for Shard {
    type Err = Error;
    /// Parses `i/n` with `0 <= i < n`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("shard `{s}`: expected i/n with 0 <= i < n, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Parses a layer list: `4-8`, `5`, `3,5,7` or a mix (`2,4-6`). Sorted, without repeats.
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = || Error::Invalid(format!("layers `{s}`: expected e.g. 4-8 or 3,5,7"));
    let mut layers = Vec::new();
    for part in s.split(',') {
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        match part.split_once('-') {
            Some((a, b)) if num(a)? <= num(b)? => layers.extend(num(a)?..=num(b)?),
            Some(_) => return Err(bad()),
            None => layers.push(num(part)?),
        }
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

fn join<T: ToString>(xs: &[T]) -> String {
    xs.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// The documents of a corpus, in file order, and the hash that identifies them.
pub struct Corpus {
    pub documents: Vec<String>,
    pub hash: blake3::Hash,
}

impl Corpus {
    /// Reads plain-text files (documents separated by blank lines) and JSONL files (`.jsonl`,
    /// one document per line in its `text` field).
    pub fn read(files: &[PathBuf]) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::EmptyCorpus("no corpus file given".into()));
        }
        let mut hash = blake3::Hasher::new();
        hash.update(b"factpatch corpus 1\n");
        let mut documents = Vec::new();
        for path in files {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            if let Some(offset) = bytes.iter().position(|&b| b == 0) {
                return Err(Error::Binary { path: path.clone(), offset });
            }
            let text = std::str::from_utf8(&bytes).map_err(|e| Error::NotUtf8 { path: path.clone(), offset: e.valid_up_to() })?;
            let jsonl = path.extension().is_some_and(|e| e == "jsonl");
            hash.update(if jsonl { b"jsonl " } else { b"text  " });
            hash.update(blake3::hash(&bytes).as_bytes());
            if jsonl {
                documents.extend(jsonl_documents(path, text)?);
            } else {
                documents.extend(paragraphs(text));
            }
        }
        if documents.is_empty() {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            return Err(Error::EmptyCorpus(format!("{} hold(s) no text", names.join(", "))));
        }
        Ok(Corpus { documents, hash: hash.finalize() })
    }
}

/// Blank-line separated blocks of `text`, lines joined by `\n`.
fn paragraphs(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                docs.push(current.join("\n"));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    docs
}

fn jsonl_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |problem: String| Error::Jsonl { path: path.to_path_buf(), line: i + 1, problem };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => docs.push(s.clone()),
            Some(serde_json::Value::String(_)) => {}
            _ => return Err(bad("expected an object with a string `text` field".into())),
        }
    }
    Ok(docs)
}

/// Documents tokenized together, in parallel, while sampling.
const TOKENIZE_GROUP: usize = 64;

/// The chunks a run reads, whatever its shard: documents in an order shuffled with `seed`
/// (Fisher–Yates driven by SplitMix64), each tokenized by `ids` and cut into chunks of at most
/// `seq_len` tokens, until `max_tokens` in all (the last chunk cut short). Only the documents
/// needed are tokenized, so a small sample of a large corpus is quick.
pub fn sample<F>(documents: &[String], ids: F, seq_len: usize, seed: u64, max_tokens: Option<u64>) -> Result<Vec<Vec<u32>>>
where
    F: Fn(&str) -> Result<Vec<u32>> + Sync,
{
    let mut order: Vec<usize> = (0..documents.len()).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut left = max_tokens.unwrap_or(u64::MAX);
    let mut chunks = Vec::new();
    for group in order.chunks(TOKENIZE_GROUP) {
        let tokenized = group.par_iter().map(|&d| ids(&documents[d])).collect::<Result<Vec<_>>>()?;
        for chunk in tokenized.iter().flat_map(|t| t.chunks(seq_len.max(1))) {
            let take = (chunk.len() as u64).min(left) as usize;
            if take == 0 {
                return Ok(chunks);
            }
            chunks.push(chunk[..take].to_vec());
            left -= take as u64;
        }
    }
    Ok(chunks)
}

/// The batches one shard reads and how many tokens they hold.
#[derive(Debug)]
pub struct Plan {
    pub batches: Vec<Vec<Vec<u32>>>,
    pub tokens: u64,
}

/// Sorts a run's chunks by length (longest first, stable), packs them into batches of at most
/// [`BATCH_TOKENS`] padded tokens and keeps batch `j` if `j mod n` is this shard's index. The
/// shards of a run thus partition exactly its tokens, and each batch is the same in any shard.
pub fn plan(mut chunks: Vec<Vec<u32>>, shard: Shard) -> Plan {
    chunks.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let mut batches: Vec<Vec<Vec<u32>>> = Vec::new();
    for c in chunks {
        match batches.last_mut() {
            Some(b) if (b.len() + 1) * b[0].len() <= BATCH_TOKENS => b.push(c),
            _ => batches.push(vec![c]),
        }
    }
    let batches: Vec<_> = batches.into_iter().enumerate().filter(|(j, _)| j % shard.count == shard.index).map(|(_, b)| b).collect();
    let tokens = batches.iter().flatten().map(|c| c.len() as u64).sum();
    Plan { batches, tokens }
}

/// SplitMix64: a tiny generator whose output is fixed by this code, not by a crate version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Σ k kᵀ over some tokens of one layer, and how many tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Sums {
    /// `[intermediate, intermediate]`, symmetric.
    pub sum: Array2<f64>,
    pub count: u64,
}

impl Sums {
    /// E[k kᵀ]: the sum divided by the count.
    pub fn second_moment(&self) -> Array2<f64> {
        &self.sum / self.count.max(1) as f64
    }
}

/// Runs the model over `batches` once each, stopping after the highest of `layers`, and sums
/// k kᵀ over every real (non-pad) token of every layer. `progress` advances by tokens.
pub fn accumulate(model: &Model, layers: &[usize], batches: &[Vec<Vec<u32>>], progress: &ProgressBar) -> Result<BTreeMap<usize, Sums>> {
    let d = model.config.intermediate_size;
    let hooks = Hooks { keys: layers.to_vec(), stop_after: layers.iter().max().copied(), ..Hooks::default() };
    // Upper triangles only until the end (dsyrk); mirrored below.
    let mut upper: BTreeMap<usize, Vec<f64>> = layers.iter().map(|&l| (l, vec![0f64; d * d])).collect();
    let mut count = 0u64;
    let mut rows = Vec::new();
    for seqs in batches {
        let batch = Batch::right_padded(seqs);
        let trace = model.forward(&batch, &hooks, None)?;
        let t = batch.seq_len();
        let real: usize = seqs.iter().map(Vec::len).sum();
        for (layer, keys) in &trace.keys {
            let keys = keys.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            rows.clear();
            for (s, seq) in seqs.iter().enumerate() {
                rows.extend(keys[s * t * d..(s * t + seq.len()) * d].iter().map(|&k| k as f64));
            }
            syrk_upper(&mut upper.get_mut(layer).expect("hooked layer")[..], &rows, d);
        }
        count += real as u64;
        progress.inc(real as u64);
    }
    Ok(upper
        .into_iter()
        .map(|(l, u)| {
            let mut sum = Array2::from_shape_vec((d, d), u).expect("d × d");
            for i in 0..d {
                for j in 0..i {
                    sum[[i, j]] = sum[[j, i]];
                }
            }
            (l, Sums { sum, count })
        })
        .collect())
}

/// `c[i][j] += Σ_r a[r][i]·a[r][j]` for `i <= j`; `a` is row-major `[rows, d]`, `c` row-major `[d, d]`.
pub fn syrk_upper(c: &mut [f64], a: &[f64], d: usize) {
    let k = a.len() / d;
    if k == 0 {
        return;
    }
    assert!(c.len() == d * d && a.len() == k * d && d <= i32::MAX as usize && k <= i32::MAX as usize);
    // SAFETY: the slices hold exactly the [k, d] and [d, d] row-major matrices the call reads/writes.
    unsafe {
        cblas_sys::cblas_dsyrk(
            cblas_sys::CblasRowMajor,
            cblas_sys::CblasUpper,
            cblas_sys::CblasTrans,
            d as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            d as i32,
            1.0,
            c.as_mut_ptr(),
            d as i32,
        );
    }
}

/// What a statistics set was computed from (the file's metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// [`Checkpoint::identity`] of the model, hex.
    pub model: String,
    /// blake3 of `tokenizer.json`, hex.
    pub tokenizer: String,
    /// [`Corpus::hash`], hex.
    pub corpus: String,
    pub layers: Vec<usize>,
    /// The requested cap on tokens (`None`: the whole corpus).
    pub max_tokens: Option<u64>,
    pub seq_len: usize,
    pub seed: u64,
    /// Shards of the run summed here, out of `shard_count` (a complete run is `[0]` of 1).
    pub shards: Vec<usize>,
    pub shard_count: usize,
    /// Tokens summed.
    pub tokens: u64,
    /// The factpatch version that wrote the file.
    pub tool: String,
}

impl Meta {
    /// The id of the request these statistics answer (everything but shards, tokens and tool):
    /// the name of the file in the cache.
    pub fn request_id(&self) -> String {
        let max = self.max_tokens.map_or("all".to_string(), |n| n.to_string());
        let text = format!(
            "factpatch stats request {FORMAT_VERSION}\nmodel {}\ntokenizer {}\ncorpus {}\nlayers {}\nmax_tokens {max}\nseq_len {}\nseed {}\n",
            self.model,
            self.tokenizer,
            self.corpus,
            join(&self.layers),
            self.seq_len,
            self.seed
        );
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }

    /// Whether every shard of the run is summed in.
    pub fn is_complete(&self) -> bool {
        self.shards.len() == self.shard_count
    }

    fn to_map(&self) -> BTreeMap<String, String> {
        let max = self.max_tokens.map_or("all".to_string(), |n| n.to_string());
        [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("model", self.model.clone()),
            ("tokenizer", self.tokenizer.clone()),
            ("corpus", self.corpus.clone()),
            ("layers", join(&self.layers)),
            ("max_tokens", max),
            ("seq_len", self.seq_len.to_string()),
            ("seed", self.seed.to_string()),
            ("shards", format!("{}/{}", join(&self.shards), self.shard_count)),
            ("tokens", self.tokens.to_string()),
            ("tool", self.tool.clone()),
            ("request", self.request_id()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_map(m: &std::collections::HashMap<String, String>, path: &Path) -> Result<Self> {
        let bad = |problem: String| Error::Format { path: path.to_path_buf(), problem };
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| bad(format!("metadata lacks `{k}`")));
        let num = |k: &str| get(k)?.parse::<u64>().map_err(|_| bad(format!("metadata `{k}` is not a number")));
        if m.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("metadata `format` is not `{FORMAT}`")));
        }
        if get("format_version")? != FORMAT_VERSION {
            return Err(bad(format!("format version {} (this factpatch reads {FORMAT_VERSION})", get("format_version")?)));
        }
        let list = |s: &str| -> Result<Vec<usize>> { s.split(',').map(|x| x.parse().map_err(|_| bad(format!("bad list `{s}` in metadata")))).collect() };
        let shards = get("shards")?;
        let (idx, n) = shards.split_once('/').ok_or_else(|| bad(format!("bad `shards` `{shards}`")))?;
        let max = get("max_tokens")?;
        let meta = Meta {
            model: get("model")?,
            tokenizer: get("tokenizer")?,
            corpus: get("corpus")?,
            layers: list(&get("layers")?)?,
            max_tokens: if max == "all" { None } else { Some(num("max_tokens")?) },
            seq_len: num("seq_len")? as usize,
            seed: num("seed")?,
            shards: list(idx)?,
            shard_count: n.parse().map_err(|_| bad(format!("bad `shards` `{shards}`")))?,
            tokens: num("tokens")?,
            tool: get("tool")?,
        };
        if get("request")? != meta.request_id() {
            return Err(bad("metadata `request` does not match the other fields".into()));
        }
        Ok(meta)
    }
}

/// A statistics set: per-layer sums and counts, and what they were computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub meta: Meta,
    pub layers: BTreeMap<usize, Sums>,
}

/// Writes everything through blake3, so the file's id is known when it is written.
struct Hashing<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[derive(serde::Serialize)]
struct TensorEntry {
    dtype: &'static str,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl Stats {
    /// Writes the safetensors file atomically and returns its id (blake3 of the file's bytes).
    /// The bytes depend only on the contents: header keys sorted, tensors in name order.
    pub fn write(&self, path: &Path) -> Result<String> {
        // Names sort as BTreeMap keys; offsets follow the same order.
        let mut tensors: BTreeMap<String, (usize, bool)> = BTreeMap::new();
        for &l in self.layers.keys() {
            tensors.insert(format!("layers.{l}.count"), (l, true));
            tensors.insert(format!("layers.{l}.sum"), (l, false));
        }
        let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        header.insert("__metadata__".into(), serde_json::to_value(self.meta.to_map()).expect("strings"));
        let mut offset = 0;
        for (name, &(l, is_count)) in &tensors {
            let d = self.layers[&l].sum.nrows();
            let (dtype, shape, len) = if is_count { ("U64", vec![1], 8) } else { ("F64", vec![d, d], d * d * 8) };
            let entry = TensorEntry { dtype, shape, data_offsets: [offset, offset + len] };
            header.insert(name.clone(), serde_json::to_value(entry).expect("plain struct"));
            offset += len;
        }
        let mut json = serde_json::to_vec(&header).expect("plain map");
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let file = AtomicFile::create(path, true).map_err(io_err(path))?;
        let mut w = Hashing { inner: io::BufWriter::with_capacity(1 << 20, file), hash: blake3::Hasher::new() };
        let mut body = || -> io::Result<()> {
            w.write_all(&(json.len() as u64).to_le_bytes())?;
            w.write_all(&json)?;
            for &(l, is_count) in tensors.values() {
                let s = &self.layers[&l];
                if is_count {
                    w.write_all(&s.count.to_le_bytes())?;
                } else {
                    w.write_all(&s.sum.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
                }
            }
            Ok(())
        };
        body().map_err(io_err(path))?;
        let id = w.hash.finalize().to_hex().to_string();
        w.inner.into_inner().map_err(|e| e.into_error()).and_then(AtomicFile::commit).map_err(io_err(path))?;
        Ok(id)
    }

    /// Reads and checks a statistics file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let bad = |problem: String| Error::Format { path: path.to_path_buf(), problem };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let map = header.metadata().as_ref().ok_or_else(|| bad("no metadata".into()))?;
        let meta = Meta::from_map(map, path)?;
        let mut layers = BTreeMap::new();
        for &l in &meta.layers {
            let get = |name: String| st.tensor(&name).map_err(|_| bad(format!("tensor `{name}` missing")));
            let count = get(format!("layers.{l}.count"))?;
            let sum = get(format!("layers.{l}.sum"))?;
            let d = sum.shape().first().copied().unwrap_or(0);
            if count.dtype() != safetensors::Dtype::U64 || count.shape() != [1] || sum.dtype() != safetensors::Dtype::F64 || sum.shape() != [d, d] {
                return Err(bad(format!("layer {l}: expected U64 [1] count and F64 [d, d] sum")));
            }
            let values: Vec<f64> = sum.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
            let count = u64::from_le_bytes(count.data().try_into().expect("8 bytes"));
            if count != meta.tokens {
                return Err(bad(format!("layer {l} counts {count} tokens, the metadata {}", meta.tokens)));
            }
            layers.insert(l, Sums { sum: Array2::from_shape_vec((d, d), values).expect("d × d"), count });
        }
        Ok(Stats { meta, layers })
    }

    /// Sums statistics of disjoint shards of the same run. When the shards complete the run, the
    /// result is the unsharded run's (same metadata, sums equal up to f64 rounding).
    pub fn merge(parts: &[(PathBuf, Stats)]) -> Result<Stats> {
        let ((first_path, first), rest) = parts.split_first().ok_or_else(|| Error::Invalid("nothing to merge".into()))?;
        let mut out = first.clone();
        for (path, s) in rest {
            let (a, b) = (&out.meta, &s.meta);
            let mismatch =
                |what: &str, x: String, y: String| Error::Merge { a: first_path.clone(), b: path.clone(), problem: format!("different {what} ({x} vs {y})") };
            let checks = [
                ("models", a.model.clone(), b.model.clone()),
                ("tokenizers", a.tokenizer.clone(), b.tokenizer.clone()),
                ("layers", join(&a.layers), join(&b.layers)),
                ("seq-len", a.seq_len.to_string(), b.seq_len.to_string()),
                ("corpora", a.corpus.clone(), b.corpus.clone()),
                ("seeds", a.seed.to_string(), b.seed.to_string()),
                ("token caps", format!("{:?}", a.max_tokens), format!("{:?}", b.max_tokens)),
                ("shard counts", a.shard_count.to_string(), b.shard_count.to_string()),
            ];
            if let Some((what, x, y)) = checks.into_iter().find(|(_, x, y)| x != y) {
                return Err(mismatch(what, x, y));
            }
            if let Some(dup) = b.shards.iter().find(|i| a.shards.contains(i)) {
                return Err(Error::Merge { a: first_path.clone(), b: path.clone(), problem: format!("shard {dup}/{} would be counted twice", a.shard_count) });
            }
            out.meta.shards.extend_from_slice(&b.shards);
            out.meta.shards.sort_unstable();
            out.meta.tokens += b.tokens;
            for (l, sums) in &s.layers {
                let acc = out.layers.get_mut(l).expect("same layers checked");
                if acc.sum.dim() != sums.sum.dim() {
                    return Err(mismatch("key sizes", format!("{:?}", acc.sum.dim()), format!("{:?}", sums.sum.dim())));
                }
                acc.sum += &sums.sum;
                acc.count += sums.count;
            }
        }
        if out.meta.is_complete() {
            out.meta.shards = vec![0];
            out.meta.shard_count = 1;
        }
        Ok(out)
    }
}

/// What to compute statistics of.
#[derive(Clone, Debug)]
pub struct Request {
    /// A Hugging Face model folder (with `tokenizer.json`).
    pub model: PathBuf,
    /// Plain-text or `.jsonl` files.
    pub corpus: Vec<PathBuf>,
    /// Layers to capture (`None`: the family's MEMIT defaults).
    pub layers: Option<Vec<usize>>,
    /// Cap on the tokens of the whole run, all shards together (`None`: the whole corpus).
    pub max_tokens: Option<u64>,
    pub seq_len: usize,
    pub seed: u64,
    pub shard: Shard,
}

impl Request {
    /// A request with the defaults: family layers, whole corpus, seq-len 512, seed 0, unsharded.
    pub fn new(model: &Path, corpus: &[PathBuf]) -> Self {
        Request { model: model.into(), corpus: corpus.to_vec(), layers: None, max_tokens: None, seq_len: 512, seed: 0, shard: Shard::ALL }
    }
}

/// A request with its inputs read and identified, ready to compute. The weights are loaded
/// only by [`compute`]: a cache hit never reads them.
pub struct Prepared {
    /// The model folder.
    pub model: PathBuf,
    pub tokenizer: Tokenizer,
    pub corpus: Corpus,
    /// The result's metadata, but for `tokens`.
    pub meta: Meta,
    pub shard: Shard,
}

/// Checks the request and identifies its model (by tensor hashes, cached), tokenizer and corpus.
pub fn prepare(req: &Request) -> Result<Prepared> {
    // Cheap checks first: the configuration and the options; then the corpus.
    let cfg = &model::Config::read(&req.model)?;
    let layers = req.layers.clone().unwrap_or_else(|| cfg.family.default_edit_layers.to_vec());
    if layers.is_empty() {
        return Err(Error::Invalid("no layers requested".into()));
    }
    if let Some(&layer) = layers.iter().find(|&&l| l >= cfg.num_layers) {
        return Err(Error::LayerOutOfRange { layer, model: req.model.clone(), last: cfg.num_layers - 1 });
    }
    if req.seq_len == 0 || req.seq_len > cfg.max_positions {
        return Err(Error::Invalid(format!("seq-len {} must be between 1 and the model's {} positions", req.seq_len, cfg.max_positions)));
    }
    if req.max_tokens == Some(0) {
        return Err(Error::Invalid("--tokens must be positive".into()));
    }
    let tok_path = req.model.join(tokenize::FILE);
    let tokenizer_hash = blake3::hash(&std::fs::read(&tok_path).map_err(io_err(&tok_path))?);
    let tokenizer = Tokenizer::open(&req.model)?;
    let corpus = Corpus::read(&req.corpus)?;
    let meta = Meta {
        model: Checkpoint::open(&req.model)?.identity_cached(&crate::checkpoint::default_hash_cache())?.to_hex().to_string(),
        tokenizer: tokenizer_hash.to_hex().to_string(),
        corpus: corpus.hash.to_hex().to_string(),
        layers,
        max_tokens: req.max_tokens,
        seq_len: req.seq_len,
        seed: req.seed,
        shards: vec![req.shard.index],
        shard_count: req.shard.count,
        tokens: 0,
        tool: tool_version(),
    };
    Ok(Prepared { model: req.model.clone(), tokenizer, corpus, meta, shard: req.shard })
}

/// Tokenizes, plans and accumulates; with `progress`, shows a bar with tokens/s and ETA.
pub fn compute(p: &Prepared, progress: bool) -> Result<Stats> {
    let spinner = if progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    spinner.set_message(format!("stats: sampling {} documents", p.corpus.documents.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let ids = |d: &str| Ok(p.tokenizer.ids(d)?);
    let chunks = sample(&p.corpus.documents, ids, p.meta.seq_len, p.meta.seed, p.meta.max_tokens)?;
    spinner.finish_and_clear();
    if chunks.is_empty() {
        return Err(Error::EmptyCorpus(format!("{} document(s) but no tokens", p.corpus.documents.len())));
    }
    let plan = plan(chunks, p.shard);
    let bar = if progress { ProgressBar::new(plan.tokens) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("stats {bar:30} {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}").expect("valid template"));
    let model = Model::load(&p.model)?;
    let layers = accumulate(&model, &p.meta.layers, &plan.batches, &bar)?;
    bar.finish_and_clear();
    Ok(Stats { meta: Meta { tokens: plan.tokens, ..p.meta.clone() }, layers })
}

/// The statistics cache: `$FACTPATCH_CACHE/stats`, else `~/.cache/factpatch/stats`.
pub fn default_cache_dir() -> PathBuf {
    crate::cache_root().join("stats")
}

/// Where the cache keeps the complete statistics of a request.
pub fn cache_path(cache: &Path, request_id: &str) -> PathBuf {
    cache.join(format!("{request_id}.safetensors"))
}

/// Stores complete statistics in the cache under their request id; returns the path and file id.
pub fn store(cache: &Path, stats: &Stats) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let path = cache_path(cache, &stats.meta.request_id());
    let id = stats.write(&path)?;
    Ok((path, id))
}

/// The outcome of [`run`] or [`merge_files`].
#[derive(Debug)]
pub struct Outcome {
    pub stats: Stats,
    /// Every file written or reused (all hold the same bytes).
    pub paths: Vec<PathBuf>,
    /// The file id: blake3 of the file's bytes.
    pub id: String,
    /// Whether the statistics came from the cache.
    pub cached: bool,
}

/// Complete statistics for `req` from the cache, computing and storing them only when absent.
/// This is what the compiler calls.
pub fn find_or_compute(req: &Request, cache: &Path, progress: bool) -> Result<Outcome> {
    if req.shard != Shard::ALL {
        return Err(Error::Invalid("the cache holds complete runs only: use shard 0/1".into()));
    }
    let p = prepare(req)?;
    let path = cache_path(cache, &p.meta.request_id());
    if path.is_file() {
        if let Ok(stats) = Stats::read(&path) {
            if stats.meta.request_id() == p.meta.request_id() && stats.meta.is_complete() {
                let id = file_id(&path)?;
                return Ok(Outcome { stats, paths: vec![path], id, cached: true });
            }
        }
    }
    let stats = compute(&p, progress)?;
    let (path, id) = store(cache, &stats)?;
    Ok(Outcome { stats, paths: vec![path], id, cached: false })
}

/// `factpatch stats`: an unsharded run goes through the cache (and is copied to `out` if
/// given); a shard needs `out` and bypasses the cache.
pub fn run(req: &Request, out: Option<&Path>, cache: &Path, progress: bool) -> Result<Outcome> {
    if req.shard != Shard::ALL {
        let out = out.ok_or_else(|| Error::Invalid(format!("shard {} needs --out (shards are not cached)", req.shard)))?;
        return write_out(compute(&prepare(req)?, progress)?, out, None);
    }
    let mut outcome = find_or_compute(req, cache, progress)?;
    if let Some(out) = out {
        outcome.stats.write(out)?;
        outcome.paths.push(out.to_path_buf());
    }
    Ok(outcome)
}

/// The best complete statistics in `cache` for `model` (its identity, hex) covering `layers`,
/// whatever corpus they came from: the most tokens, then the smallest file name. Reads headers
/// only. This lets a compiler use existing statistics without knowing how they were made.
pub fn find_in_cache(cache: &Path, model: &str, layers: &[usize]) -> Result<Option<(PathBuf, Meta)>> {
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(cache)(e).into()),
    };
    let mut best: Option<(PathBuf, Meta)> = None;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
        let Ok(meta) = read_meta(&path) else { continue };
        let fits = meta.model == model && meta.is_complete() && layers.iter().all(|l| meta.layers.contains(l));
        if fits && best.as_ref().is_none_or(|(_, b)| meta.tokens > b.tokens) {
            best = Some((path, meta));
        }
    }
    Ok(best)
}

/// The metadata of a statistics file, from its header alone.
pub fn read_meta(path: &Path) -> Result<Meta> {
    use std::io::Read;
    let bad = |problem: String| Error::Format { path: path.to_path_buf(), problem };
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("shorter than a header".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 24 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|_| bad("truncated header".into()))?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__")]
        metadata: std::collections::HashMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    Meta::from_map(&h.metadata, path)
}

fn write_out(stats: Stats, out: &Path, cache: Option<&Path>) -> Result<Outcome> {
    let id = stats.write(out)?;
    let mut paths = vec![out.to_path_buf()];
    if let Some(cache) = cache.filter(|_| stats.meta.is_complete()) {
        paths.push(store(cache, &stats)?.0);
    }
    Ok(Outcome { stats, paths, id, cached: false })
}

/// `factpatch stats merge`: sums shard files into `out`; a completed run also goes to `cache`.
pub fn merge_files(inputs: &[PathBuf], out: &Path, cache: Option<&Path>) -> Result<Outcome> {
    let parts = inputs.iter().map(|p| Ok((p.clone(), Stats::read(p)?))).collect::<Result<Vec<_>>>()?;
    write_out(Stats::merge(&parts)?, out, cache)
}

/// The file id of a statistics file: blake3 of its bytes.
pub fn file_id(path: &Path) -> Result<String> {
    Ok(blake3::hash(&std::fs::read(path).map_err(io_err(path))?).to_hex().to_string())
}
