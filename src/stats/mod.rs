//! Key statistics: the uncentred second moment C = E[k kᵀ] of the MLP keys (the input of the
//! down-projection) over generic text, which MEMIT and ROME need. One forward pass per batch
//! captures every requested layer; Σ k kᵀ is accumulated in f64 with a BLAS rank-k update.
//! The file format, sampling, sharding and the cache are specified in `formats/stats.md`.

mod accumulate;
mod cache;
mod corpus;
mod file;
mod run;

pub use accumulate::{accumulate, syrk_upper, Sums};
pub use cache::{cache_path, default_cache_dir, find_in_cache, store};
pub use corpus::{plan, sample, Corpus, Plan, Shard, BATCH_TOKENS};
pub use file::{file_id, read_meta, Meta, Stats, FORMAT, FORMAT_VERSION};
pub use run::{compute, find_or_compute, merge_files, parse_layers, prepare, run, Outcome, Prepared, Request};

use crate::{checkpoint, model, tokenize};
use std::path::PathBuf;

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
