//! The statistics file: per-layer sums and counts in safetensors, with metadata saying what
//! they were computed from; written, read, summed across shards and identified by its bytes.

use super::accumulate::Sums;
use super::{Error, Result};
use crate::atomic::{AtomicFile, Policy};
use crate::io_err;
use ndarray::Array2;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The `format` metadata value of a statistics file.
pub const FORMAT: &str = "factpatch-stats";
/// The version of `formats/stats.md` this module reads and writes.
pub const FORMAT_VERSION: &str = "1";

/// What a statistics set was computed from (the file's metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// [`Checkpoint::identity`](crate::checkpoint::Checkpoint::identity) of the model, hex.
    pub model: String,
    /// blake3 of `tokenizer.json`, hex.
    pub tokenizer: String,
    /// [`Corpus::hash`](super::Corpus::hash), hex.
    pub corpus: String,
    pub layers: Vec<usize>,
    /// The requested cap on tokens (`None`: the whole corpus).
    pub max_tokens: Option<u64>,
    pub seq_len: usize,
    pub seed: u64,
    /// The tokenizer's sequence-start tokens, put before every window and not summed (empty
    /// for tokenizers that add none; then absent from the file and the request).
    pub prefix: Vec<usize>,
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
        let text = if self.prefix.is_empty() { text } else { format!("{text}prefix {}\n", join(&self.prefix)) };
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
        .chain((!self.prefix.is_empty()).then(|| ("prefix", join(&self.prefix))))
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
            prefix: m.get("prefix").map(|p| list(p)).transpose()?.unwrap_or_default(),
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
    /// Writes the safetensors file atomically, as `policy` allows, and returns its id (blake3 of
    /// the file's bytes). The bytes depend only on the contents: header keys sorted, tensors in
    /// name order.
    pub fn write(&self, path: &Path, policy: &Policy) -> Result<String> {
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
        let file = AtomicFile::create(path, policy).map_err(io_err(path))?;
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
        let bytes = crate::read_regular(path, crate::MAX_DATA_BYTES)?;
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

/// The metadata of a statistics file, from its header alone.
pub fn read_meta(path: &Path) -> Result<Meta> {
    use std::io::Read;
    let bad = |problem: String| Error::Format { path: path.to_path_buf(), problem };
    let (mut f, _) = crate::open_regular(path, crate::MAX_DATA_BYTES)?;
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

/// The file id of a statistics file: blake3 of its bytes.
pub fn file_id(path: &Path) -> Result<String> {
    Ok(crate::hash_file(path, crate::MAX_DATA_BYTES)?)
}

fn join<T: ToString>(xs: &[T]) -> String {
    xs.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}
