//! Build a Hugging Face `tokenizer.json` (and `tokenizer_config.json`) from
//! the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported. The
//! pre-tokenizer follows `tokenizer.ggml.pre`:
//! - `smollm`: `Sequence[Digits(individual_digits), ByteLevel(use_regex)]`,
//!   the layout of SmolLM/SmolLM2's own `tokenizer.json`;
//! - `gpt2` / `default` (or absent): `ByteLevel(use_regex)`.
//!
//! In both, `ByteLevel` neither adds a prefix space nor trims offsets in the
//! pre-tokenizer; the post-processor is `ByteLevel(trim_offsets=false)` and the
//! decoder `ByteLevel`, as transformers' GPT-2 converter writes them. Control
//! tokens (`token_type` 3) become special added tokens, user-defined ones
//! (`token_type` 4) non-special added tokens.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::meta::Meta;
use super::Error;

/// Pre-tokenizer names accepted in `tokenizer.ggml.pre`.
pub(super) const SUPPORTED_PRE: [&str; 3] = ["default", "gpt2", "smollm"];

/// llama.cpp's `token_type` for control (special) tokens.
const CONTROL: usize = 3;
/// llama.cpp's `token_type` for user-defined added tokens.
const USER_DEFINED: usize = 4;

/// The tokenizer files of an imported model.
pub(super) struct Tokenizer {
    /// Contents of `tokenizer.json`.
    pub(super) tokenizer: Value,
    /// Contents of `tokenizer_config.json`.
    pub(super) config: Value,
    /// Number of tokens in the vocabulary.
    pub(super) vocab_size: usize,
}

/// Build the tokenizer described by the GGUF metadata.
pub(super) fn build(meta: &Meta) -> Result<Tokenizer, Error> {
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::UnsupportedTokenizer { path: meta.path().to_path_buf(), model: model.to_string() });
    }
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
    });
    let pre = meta.opt_string("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "gpt2" | "default" => byte_level,
        other => return Err(Error::UnsupportedPreTokenizer { path: meta.path().to_path_buf(), pre: other.to_string() }),
    };
    if meta.opt_bool("tokenizer.ggml.add_bos_token")? == Some(true) {
        return Err(meta.error("tokenizer.ggml.add_bos_token", "adding BOS automatically is not supported"));
    }

    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    let types = meta.int_array("tokenizer.ggml.token_type")?;
    if types.len() != tokens.len() {
        return Err(meta.error("tokenizer.ggml.token_type", format!("{} entries for {} tokens", types.len(), tokens.len())));
    }
    let merges = meta.string_array("tokenizer.ggml.merges")?;
    if let Some((i, bad)) = merges.iter().enumerate().find(|(_, m)| m.split(' ').count() != 2) {
        return Err(meta.error("tokenizer.ggml.merges", format!("merge {i} `{bad}` is not two symbols")));
    }

    let mut vocab = BTreeMap::new();
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(*token, id) {
            return Err(meta.error("tokenizer.ggml.tokens", format!("token `{token}` appears twice (ids {first} and {id})")));
        }
    }
    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == CONTROL || t == USER_DEFINED)
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": t != CONTROL, "special": t == CONTROL,
            })
        })
        .collect();

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true,
        },
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let token_at = |key: &str| -> Result<Option<&str>, Error> {
        match meta.opt_usize(key)? {
            None => Ok(None),
            Some(id) => tokens.get(id).map(|t| Some(*t)).ok_or_else(|| meta.error(key, format!("id {id} is outside the vocabulary"))),
        }
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "bos_token": token_at("tokenizer.ggml.bos_token_id")?,
        "eos_token": token_at("tokenizer.ggml.eos_token_id")?,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id")?,
        "pad_token": token_at("tokenizer.ggml.padding_token_id")?,
        "model_max_length": meta.usize("llama.context_length")?,
    });
    if let Some(template) = meta.opt_string("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    Ok(Tokenizer { tokenizer, config, vocab_size: tokens.len() })
}
