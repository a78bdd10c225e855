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
    /// The special tokens its post-processor puts before a sequence's text.
    prefix: Vec<u32>,
}

pub const FILE: &str = "tokenizer.json";

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let bytes = crate::read_regular(&path, crate::MAX_METADATA_BYTES).map_err(|e| Error::Load { path: path.clone(), reason: e.source.to_string() })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Load { path: path.clone(), reason: e.to_string() })?;
        let probe = inner.encode("a", true).map_err(|e| Error::Load { path, reason: e.to_string() })?;
        let leading = probe.get_special_tokens_mask().iter().take_while(|&&m| m == 1).count();
        let prefix = probe.get_ids()[..leading].to_vec();
        Ok(Tokenizer { inner, prefix })
    }

    /// The special tokens every sequence starts with, as transformers adds them from
    /// `tokenizer.json`'s post-processor: Gemma's and Llama-3's `<bos>`; none for GPT-2 or
    /// SmolLM2.
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    /// Encodes `text` as the start of a sequence: [`Self::prefix`], then the text. The prefix
    /// tokens cover no bytes (offsets `(0, 0)`).
    pub fn encode_prompt(&self, text: &str) -> Result<Encoded> {
        let enc = self.encode(text)?;
        let ids = self.prefix.iter().copied().chain(enc.ids).collect();
        let offsets = self.prefix.iter().map(|_| (0, 0)).chain(enc.offsets).collect();
        Ok(Encoded { ids, offsets })
    }

    /// Ids of `text` as the start of a sequence.
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_prompt(text)?.ids)
    }

    /// Encodes `text` as it continues a sequence: no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Codec(e.to_string()))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    /// Ids of `text` as it continues a sequence.
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
