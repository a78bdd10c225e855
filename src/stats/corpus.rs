//! The corpus and how a run samples it: documents read from text and JSONL files, shuffled,
//! tokenized and cut into chunks, then packed into batches dealt out to shards.

use super::{Error, Result};
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Padded tokens per forward batch (sequences × longest). Fixed, so that a chunk always meets the
/// same kernels whichever shard it lands in. 1024 keeps SmolLM2's attention scores at seq-len 512
/// under glibc's 32 MiB mmap threshold (no page faults per op); it measured no slower than 512 or 2048.
pub const BATCH_TOKENS: usize = 1024;

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
            let bytes = crate::read_regular(path, crate::MAX_DATA_BYTES)?;
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
