//! Import a llama- or gemma3-architecture GGUF file (as written by llama.cpp) into a
//! Hugging Face model folder: `model.safetensors` (dequantized weights),
//! `config.json` (LlamaForCausalLM or Gemma3ForCausalLM), `generation_config.json`,
//! `tokenizer.json` and `tokenizer_config.json`.
//!
//! The import is all-or-nothing: everything is written into a staging folder
//! next to the destination and renamed into place only once complete.

mod apply;
mod header;
mod meta;
mod tensors;
mod tokenizer;

pub use apply::{apply, is_gguf, TouchedAs, DEFAULT_TOUCHED_AS};

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::model::Family;
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
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, gemma3)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A metadata key is missing, has the wrong type or an unsupported value.
    #[error("{path}: metadata `{key}`: {problem}")]
    Metadata { path: PathBuf, key: String, problem: String },
    /// A tensor is missing, unexpected, or has the wrong shape.
    #[error("{path}: tensor `{name}`: {problem}")]
    Tensor { path: PathBuf, name: String, problem: String },
    /// The tokenizer model named in the metadata is not supported for the file's architecture.
    #[error("{path}: unsupported tokenizer model `{model}` for architecture `{arch}` (supported: gpt2; llama with gemma3)")]
    UnsupportedTokenizer { path: PathBuf, model: String, arch: String },
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
    // SAFETY: factpatch never writes into an input; a file truncated by another program while
    // mapped ends the process with an error naming it (`sigbus`).
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Open { path: gguf.to_path_buf(), source: e })?;
    let header = header::read(gguf, &bytes, |_| true)?;
    let (content, mut reader) = (&header.content, Cursor::new(&bytes[..]));
    let meta = Meta::of(gguf, &header);
    let hparams = Hparams::read(&meta)?;
    // Build the tokenizer before the (slow) weights so metadata errors surface first.
    let tok = tokenizer::build(&meta, hparams.arch)?;
    if tok.vocab_size != hparams.vocab_size {
        return Err(meta.error("tokenizer.ggml.tokens", format!("{} tokens but the model's vocabulary has {}", tok.vocab_size, hparams.vocab_size)));
    }

    let weights = tensors::convert(gguf, content, &mut reader, &hparams, dtype)?;
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

/// The architectures `import-gguf` reads (`general.architecture`), each with its family table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// `llama`: the Llama family (SmolLM2, Llama 2 and 3).
    Llama,
    /// `gemma3`: the Gemma 3 text model.
    Gemma3,
}

impl Arch {
    /// The architecture named by `general.architecture`; another is an error.
    fn read(meta: &Meta) -> Result<Self, Error> {
        match meta.string("general.architecture")? {
            "llama" => Ok(Arch::Llama),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(Error::UnsupportedArchitecture { path: meta.path().to_path_buf(), arch: other.to_string() }),
        }
    }

    /// The GGUF's name for it, the prefix of its metadata keys.
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Its metadata key `ARCH.suffix`.
    fn key(self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name())
    }

    /// Its family table, which names every tensor.
    fn family(self) -> &'static Family {
        let name = match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3_text",
        };
        crate::model::FAMILIES.iter().copied().find(|f| f.name == name).expect("the family is built in")
    }
}

/// Model dimensions read from the `ARCH.*` metadata.
#[derive(Debug, Clone, Copy)]
struct Hparams {
    /// The architecture.
    arch: Arch,
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
    /// Width of one attention head (`ARCH.attention.key_length`, else `hidden / heads`).
    head_dim: usize,
    /// Vocabulary size.
    vocab_size: usize,
}

/// Every `n`-th layer of a Gemma 3 model attends fully, the others in a sliding window
/// (llama.cpp's Gemma 3 sets this pattern; the GGUF does not record it).
const GEMMA3_FULL_ATTENTION_EVERY: usize = 6;

impl Hparams {
    /// Read and sanity-check the dimensions.
    fn read(meta: &Meta) -> Result<Self, Error> {
        let arch = Arch::read(meta)?;
        let key = |suffix: &str| arch.key(suffix);
        let hidden = meta.usize(&key("embedding_length"))?;
        let heads = meta.usize(&key("attention.head_count"))?;
        let kv_heads = meta.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(heads);
        let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
            Some(n) => n,
            None => meta.array_len("tokenizer.ggml.tokens")?,
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(meta.error(&key("attention.head_count"), format!("{heads} heads and {kv_heads} kv heads are inconsistent")));
        }
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => return Err(meta.error(&key("attention.head_count"), format!("{heads} heads do not divide width {hidden}"))),
        };
        if let Some(v) = meta.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(meta.error(&key("attention.value_length"), format!("{v} differs from the key length {head_dim}")));
            }
        }
        let hp = Hparams {
            arch,
            hidden,
            intermediate: meta.usize(&key("feed_forward_length"))?,
            layers: meta.usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(meta.error(&key("attention.head_count"), format!("head dimension {head_dim} is zero or odd")));
        }
        if let Some(rot) = meta.opt_usize(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(meta.error(&key("rope.dimension_count"), format!("partial rotary ({rot} of {head_dim}) is not supported")));
            }
        }
        hp.rope_scaling(meta)?;
        Ok(hp)
    }

    /// The factor of linear rotary scaling (`ARCH.rope.scaling.type` `linear`, Gemma 3 only),
    /// none for `none` or no type; another type is an error.
    fn rope_scaling(&self, meta: &Meta) -> Result<Option<f64>, Error> {
        let kind_key = self.arch.key("rope.scaling.type");
        match meta.opt_string(&kind_key)? {
            None | Some("none") => Ok(None),
            Some("linear") if self.arch == Arch::Gemma3 => meta.f64(&self.arch.key("rope.scaling.factor")).map(Some),
            Some(kind) => Err(meta.error(&kind_key, format!("`{kind}` is not supported"))),
        }
    }

    /// The Hugging Face `config.json` for this model.
    fn config_json(&self, meta: &Meta, tie: bool, dtype: OutDtype) -> Result<Value, Error> {
        let key = |suffix: &str| self.arch.key(suffix);
        let mut config = json!({
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
            "max_position_embeddings": meta.usize(&key("context_length"))?,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tie,
            "attention_bias": false,
            "bos_token_id": meta.opt_usize("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": meta.opt_usize("tokenizer.ggml.eos_token_id")?,
            "pad_token_id": meta.opt_usize("tokenizer.ggml.padding_token_id")?,
            "torch_dtype": dtype.torch_name(),
        });
        let extra = match self.arch {
            Arch::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "rope_theta": meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
                "mlp_bias": false,
            }),
            // What llama.cpp's Gemma 3 assumes beyond the metadata: the full-attention pattern, the
            // sliding layers' rotary base (10000 unless `rope.freq_base_swa` says), and queries scaled
            // by the head width, except in the 27B model (62 layers) by `hidden / heads`.
            Arch::Gemma3 => {
                let mut full = json!({"rope_type": "default", "rope_theta": meta.f64(&key("rope.freq_base"))?});
                if let Some(factor) = self.rope_scaling(meta)? {
                    full = json!({"rope_type": "linear", "rope_theta": full["rope_theta"], "factor": factor});
                }
                let sliding = meta.opt_f64(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0);
                let layer_types: Vec<&str> =
                    (0..self.layers).map(|i| if (i + 1) % GEMMA3_FULL_ATTENTION_EVERY == 0 { "full_attention" } else { "sliding_attention" }).collect();
                let scalar = if self.layers == 62 { self.hidden / self.heads } else { self.head_dim };
                json!({
                    "architectures": ["Gemma3ForCausalLM"],
                    "model_type": "gemma3_text",
                    "hidden_activation": "gelu_pytorch_tanh",
                    "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": sliding}},
                    "sliding_window": meta.usize(&key("attention.sliding_window"))?,
                    "layer_types": layer_types,
                    "query_pre_attn_scalar": scalar,
                    "attn_logit_softcapping": null,
                    "final_logit_softcapping": meta.opt_f64(&key("final_logit_softcapping"))?,
                })
            }
        };
        let (Value::Object(config_map), Value::Object(extra)) = (&mut config, extra) else { unreachable!("both are objects") };
        config_map.extend(extra);
        Ok(config)
    }
}

/// Write `value` as pretty JSON (keys sorted) with a trailing newline.
fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Write { path: path.to_path_buf(), reason: e.to_string() })?;
    text.push('\n');
    fs::write(path, text).map_err(|e| Error::Write { path: path.to_path_buf(), reason: e.to_string() })
}
