//! Import a llama-architecture GGUF file (as written by llama.cpp) into a
//! Hugging Face model folder: `model.safetensors` (dequantized weights),
//! `config.json` (LlamaForCausalLM), `generation_config.json`,
//! `tokenizer.json` and `tokenizer_config.json`.
//!
//! The import is all-or-nothing: everything is written into a staging folder
//! next to the destination and renamed into place only once complete.

mod apply;
mod meta;
mod tensors;
mod tokenizer;

pub use apply::{apply, is_gguf, TouchedAs, DEFAULT_TOUCHED_AS};

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

use meta::Meta;
pub use tensors::llama_gguf_name;

/// Floating-point type of the weights written to `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// 32-bit IEEE floats.
    F32,
    /// bfloat16, rounded to nearest even from the dequantized f32 values.
    Bf16,
}

impl OutDtype {
    /// The name Hugging Face uses for this type in `config.json`.
    fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The folder holding the imported model.
    pub out_dir: PathBuf,
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Number of weights in `model.safetensors`.
    pub parameters: u64,
    /// Vocabulary size of the model and its tokenizer.
    pub vocab_size: usize,
    /// Whether `lm_head` shares the token-embedding matrix (no `output.weight` in the GGUF).
    pub tie_word_embeddings: bool,
}

/// Why an import failed. Every message names the offending file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GGUF file could not be opened.
    #[error("{path}: cannot open GGUF file: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// The GGUF file is truncated or its header/tensor data is malformed.
    #[error("{path}: corrupt or truncated GGUF file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The GGUF describes a model architecture this importer does not handle.
    #[error("{path}: unsupported architecture `{arch}` (supported: llama)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A metadata key is missing, has the wrong type or an unsupported value.
    #[error("{path}: metadata `{key}`: {problem}")]
    Metadata { path: PathBuf, key: String, problem: String },
    /// A tensor is missing, unexpected, or has the wrong shape.
    #[error("{path}: tensor `{name}`: {problem}")]
    Tensor { path: PathBuf, name: String, problem: String },
    /// The tokenizer model named in the metadata is not supported.
    #[error("{path}: unsupported tokenizer model `{model}` (supported: gpt2)")]
    UnsupportedTokenizer { path: PathBuf, model: String },
    /// The pre-tokenizer named in the metadata is not supported.
    #[error("{path}: unsupported pre-tokenizer `{pre}` (supported: {})", tokenizer::SUPPORTED_PRE.join(", "))]
    UnsupportedPreTokenizer { path: PathBuf, pre: String },
    /// The output folder already exists and is not empty (or is not a folder).
    #[error("{path}: output directory already exists and is not empty")]
    OutputExists { path: PathBuf },
    /// Writing the output failed.
    #[error("{path}: cannot write: {reason}")]
    Write { path: PathBuf, reason: String },
    /// The GGUF version is one `apply` does not write (it handles versions 2 and 3).
    #[error("{path}: GGUF version {version} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    /// A patch does not fit the model or is refused, as for a model folder.
    #[error(transparent)]
    Apply(#[from] crate::apply::Error),
    /// Reading the model or writing the output failed.
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

/// Import `gguf` into a new Hugging Face model folder `out_dir`.
///
/// `out_dir` must not exist or be an empty folder; its parent is created if
/// needed. On error nothing is left behind in the destination.
pub fn import(gguf: &Path, out_dir: &Path, dtype: OutDtype) -> Result<ImportSummary, Error> {
    let staging = crate::atomic::AtomicDir::create(out_dir, &crate::atomic::Policy::new().reading([gguf])).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::OutputExists { path: out_dir.to_path_buf() },
        _ => Error::Write { path: out_dir.to_path_buf(), reason: e.to_string() },
    })?;

    let (file, _) = crate::open_regular(gguf, u64::MAX).map_err(|e| Error::Open { path: gguf.to_path_buf(), source: e.source })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::Corrupt { path: gguf.to_path_buf(), reason: e.to_string() })?;
    let meta = Meta::new(gguf, &content.metadata);
    let hparams = llama_hparams(gguf, &content)?;
    // Build the tokenizer before the (slow) weights so metadata errors surface first.
    let tok = tokenizer::build(&meta)?;
    if tok.vocab_size != hparams.vocab_size {
        return Err(meta.error("tokenizer.ggml.tokens", format!("{} tokens but the model's vocabulary has {}", tok.vocab_size, hparams.vocab_size)));
    }

    let weights = tensors::convert(gguf, &content, &mut reader, &hparams, dtype)?;
    let tie_word_embeddings = !weights.has_lm_head;
    let config = hparams.config_json(&meta, tie_word_embeddings, dtype)?;
    let generation = json!({
        "bos_token_id": meta.opt_usize("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": meta.opt_usize("tokenizer.ggml.eos_token_id")?,
    });

    let (weights_path, config_path) = (staging.path().join("model.safetensors"), staging.path().join("config.json"));
    write_json(&config_path, &config)?;
    weights.write(&weights_path)?;
    // safetensors writes through a private temp file (mode 0600): give it the
    // permissions of an ordinarily created file.
    fs::metadata(&config_path)
        .and_then(|m| fs::set_permissions(&weights_path, m.permissions()))
        .map_err(|e| Error::Write { path: weights_path.clone(), reason: e.to_string() })?;
    write_json(&staging.path().join("generation_config.json"), &generation)?;
    write_json(&staging.path().join("tokenizer.json"), &tok.tokenizer)?;
    write_json(&staging.path().join("tokenizer_config.json"), &tok.config)?;
    staging.commit(true).map_err(|e| Error::Write { path: out_dir.to_path_buf(), reason: e.to_string() })?;

    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        tensors: weights.len(),
        parameters: weights.parameters(),
        vocab_size: hparams.vocab_size,
        tie_word_embeddings,
    })
}

/// The dimensions of the llama model in `content` (read from `gguf`); another architecture is an error.
fn llama_hparams(gguf: &Path, content: &gguf_file::Content) -> Result<Hparams, Error> {
    let meta = Meta::new(gguf, &content.metadata);
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(Error::UnsupportedArchitecture { path: gguf.to_path_buf(), arch: arch.to_string() });
    }
    Hparams::read(&meta)
}

/// Model dimensions read from the `llama.*` metadata.
#[derive(Debug, Clone, Copy)]
struct Hparams {
    /// Width of the residual stream.
    hidden: usize,
    /// Width of the MLP.
    intermediate: usize,
    /// Number of decoder layers.
    layers: usize,
    /// Number of query heads.
    heads: usize,
    /// Number of key/value heads (grouped-query attention).
    kv_heads: usize,
    /// Vocabulary size.
    vocab_size: usize,
}

impl Hparams {
    /// Read and sanity-check the dimensions.
    fn read(meta: &Meta) -> Result<Self, Error> {
        let hidden = meta.usize("llama.embedding_length")?;
        let heads = meta.usize("llama.attention.head_count")?;
        let kv_heads = match meta.opt_usize("llama.attention.head_count_kv")? {
            Some(n) => n,
            None => heads,
        };
        let vocab_size = match meta.opt_usize("llama.vocab_size")? {
            Some(n) => n,
            None => meta.string_array("tokenizer.ggml.tokens")?.len(),
        };
        let hp =
            Hparams { hidden, intermediate: meta.usize("llama.feed_forward_length")?, layers: meta.usize("llama.block_count")?, heads, kv_heads, vocab_size };
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(meta.error("llama.attention.head_count", format!("{heads} heads, {kv_heads} kv heads and width {hidden} are inconsistent")));
        }
        if !hp.head_dim().is_multiple_of(2) {
            return Err(meta.error("llama.attention.head_count", format!("head dimension {} is odd", hp.head_dim())));
        }
        if let Some(rot) = meta.opt_usize("llama.rope.dimension_count")? {
            if rot != hp.head_dim() {
                return Err(meta.error("llama.rope.dimension_count", format!("partial rotary ({rot} of {}) is not supported", hp.head_dim())));
            }
        }
        if let Some(kind) = meta.opt_string("llama.rope.scaling.type")? {
            if kind != "none" {
                return Err(meta.error("llama.rope.scaling.type", format!("`{kind}` is not supported")));
            }
        }
        Ok(hp)
    }

    /// Width of one attention head.
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The Hugging Face `config.json` for this model.
    fn config_json(&self, meta: &Meta, tie: bool, dtype: OutDtype) -> Result<Value, Error> {
        Ok(json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": meta.f64("llama.attention.layer_norm_rms_epsilon")?,
            "rope_theta": meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            "max_position_embeddings": meta.usize("llama.context_length")?,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tie,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": meta.opt_usize("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": meta.opt_usize("tokenizer.ggml.eos_token_id")?,
            "pad_token_id": meta.opt_usize("tokenizer.ggml.padding_token_id")?,
            "torch_dtype": dtype.torch_name(),
        }))
    }
}

/// Write `value` as pretty JSON (keys sorted) with a trailing newline.
fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Write { path: path.to_path_buf(), reason: e.to_string() })?;
    text.push('\n');
    fs::write(path, text).map_err(|e| Error::Write { path: path.to_path_buf(), reason: e.to_string() })
}
