//! Tokenizers from `tokenizer.json` (the `tokenizers` crate, pure Rust).

use std::path::{Path, PathBuf};

/// A tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `tokenizer.json` is missing or malformed.
    #[error("{path}: cannot load tokenizer: {reason}")]
    Load { path: PathBuf, reason: String },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Token ids with the byte span of the input each one covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

pub const FILE: &str = "tokenizer.json";

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let bytes = crate::read_regular(&path, crate::MAX_METADATA_BYTES).map_err(|e| Error::Load { path: path.clone(), reason: e.source.to_string() })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Load { path, reason: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Encodes `text` without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Codec(e.to_string()))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    /// Ids only.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode(text)?.ids)
    }

    /// Decodes ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Codec(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The last token whose byte span overlaps `span` (a byte range of the encoded text): where a
/// subject ends, however it was split into tokens.
pub fn last_token_in(offsets: &[(usize, usize)], span: (usize, usize)) -> Option<usize> {
    offsets.iter().rposition(|&(a, b)| a < span.1 && b > span.0)
}
