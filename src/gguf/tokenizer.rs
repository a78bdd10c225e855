//! Build a Hugging Face `tokenizer.json` (and `tokenizer_config.json`) from
//! the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! Two kinds are supported. Byte-level BPE (`tokenizer.ggml.model = gpt2`), whose
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
//!
//! And Gemma's SentencePiece BPE (`tokenizer.ggml.model = llama` in a `gemma3` file), built
//! as transformers' GGUF loader builds it (`gemma_tokenizer`): tokens of two or more spaces
//! respelled with `▁`; merges derived from the vocabulary, every split of a token into two
//! tokens, ordered by the merged token's position in the file (Gemma's scores do not follow
//! its merge order), then by the longer left part; byte fallback, `<unk>` fused; spaces
//! replaced by `▁`, no prefix space; `<bos>` added in front when `add_bos_token` says so.
//! Control tokens become special added tokens, user-defined ones plain added tokens, both
//! matched as written.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::meta::Meta;
use super::{Arch, Error};

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

/// Build the tokenizer described by the GGUF metadata of a model of architecture `arch`.
pub(super) fn build(meta: &Meta, arch: Arch) -> Result<Tokenizer, Error> {
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    let types = meta.int_array("tokenizer.ggml.token_type")?;
    if types.len() != tokens.len() {
        return Err(meta.error("tokenizer.ggml.token_type", format!("{} entries for {} tokens", types.len(), tokens.len())));
    }
    let token_at = |key: &str| -> Result<Option<&str>, Error> {
        match meta.opt_usize(key)? {
            None => Ok(None),
            Some(id) => tokens.get(id).map(|t| Some(*t)).ok_or_else(|| meta.error(key, format!("id {id} is outside the vocabulary"))),
        }
    };
    let (tokenizer, add_bos) = match (model, arch) {
        ("gpt2", _) => (byte_level(meta, &tokens, &types)?, false),
        ("llama", Arch::Gemma3) => {
            let bos = token_at("tokenizer.ggml.bos_token_id")?;
            let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
            let unk = token_at("tokenizer.ggml.unknown_token_id")?.ok_or_else(|| meta.error("tokenizer.ggml.unknown_token_id", "missing"))?;
            (gemma(meta, &tokens, &types, unk, bos.filter(|_| add_bos))?, add_bos)
        }
        _ => return Err(Error::UnsupportedTokenizer { path: meta.path().to_path_buf(), model: model.to_string(), arch: arch.name().to_string() }),
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "bos_token": token_at("tokenizer.ggml.bos_token_id")?,
        "eos_token": token_at("tokenizer.ggml.eos_token_id")?,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id")?,
        "pad_token": token_at("tokenizer.ggml.padding_token_id")?,
        "model_max_length": meta.usize(&arch.key("context_length"))?,
    });
    if let Some(template) = meta.opt_string("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    Ok(Tokenizer { tokenizer, config, vocab_size: tokens.len() })
}

/// The `tokenizer.json` of a byte-level BPE vocabulary.
fn byte_level(meta: &Meta, tokens: &[&str], types: &[usize]) -> Result<Value, Error> {
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
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == CONTROL || t == USER_DEFINED)
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": t != CONTROL, "special": t == CONTROL,
            })
        })
        .collect();

    Ok(json!({
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
    }))
}

/// Whether Python's `str.isspace` holds for `c` (Unicode white space and the separators
/// U+001C..U+001F).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The `tokenizer.json` of Gemma's SentencePiece vocabulary (see the module doc), `<unk>` being
/// `unk` and `bos`, when given, added in front of every sequence.
fn gemma(meta: &Meta, tokens: &[&str], types: &[usize], unk: &str, bos: Option<&str>) -> Result<Value, Error> {
    if meta.opt_bool("tokenizer.ggml.add_space_prefix")? == Some(true) {
        return Err(meta.error("tokenizer.ggml.add_space_prefix", "a prefix space is not supported (Gemma adds none)"));
    }
    let spelled: Vec<Cow<str>> = tokens
        .iter()
        .map(|t| match t.contains(' ') && t.chars().all(py_space) {
            true => Cow::Owned("\u{2581}".repeat(t.chars().count())),
            false => Cow::Borrowed(*t),
        })
        .collect();
    let mut vocab = HashMap::with_capacity(spelled.len());
    for (id, token) in spelled.iter().enumerate() {
        if let Some(first) = vocab.insert(token.as_ref(), id) {
            return Err(meta.error("tokenizer.ggml.tokens", format!("token `{token}` appears twice (ids {first} and {id})")));
        }
    }
    let mut merges = Vec::new();
    for token in &spelled {
        for (at, _) in token.char_indices().skip(1).collect::<Vec<_>>().into_iter().rev() {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push([left, right]);
            }
        }
    }
    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|&(_, (token, &t))| t == CONTROL || (t == USER_DEFINED && vocab.contains_key(*token)))
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == CONTROL,
            })
        })
        .collect();
    let post_processor = bos.map(|bos| {
        let special = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
        let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        json!({
            "type": "TemplateProcessing",
            "single": [special(0), sequence("A", 0)],
            "pair": [special(0), sequence("A", 0), special(1), sequence("B", 1)],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        })
    });
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": post_processor,
        "decoder": {
            "type": "Sequence",
            "decoders": [{"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}],
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab.iter().map(|(t, id)| (t.to_string(), json!(id))).collect::<serde_json::Map<_, _>>(),
            "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value as V;
    use std::path::Path;

    #[test]
    fn gemma_merges_follow_token_order_and_spaces_are_respelled() {
        let tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "  ", "\u{2581}", "aba", "ba", "\n"];
        let types = [3, 3, 3, 2, 1, 1, 1, 4, 1, 1, 1, 4];
        let strings = |items: &[&str]| V::Array(items.iter().map(|s| V::String(s.to_string())).collect());
        let map: HashMap<String, V> = [
            ("tokenizer.ggml.model", V::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", V::Array(types.map(V::I32).to_vec())),
            ("tokenizer.ggml.bos_token_id", V::U32(2)),
            ("tokenizer.ggml.eos_token_id", V::U32(1)),
            ("tokenizer.ggml.unknown_token_id", V::U32(3)),
            ("tokenizer.ggml.add_bos_token", V::Bool(true)),
            ("gemma3.context_length", V::U32(64)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let built = build(&Meta::new(Path::new("tiny.gguf"), &map), Arch::Gemma3).unwrap();
        let json = &built.tokenizer;
        // Token by token in file order; within one, the longer left part first. "  " is "▁▁".
        let merges: Vec<[&str; 2]> = vec![["a", "b"], ["\u{2581}", "\u{2581}"], ["ab", "a"], ["a", "ba"], ["b", "a"]];
        assert_eq!(json["model"]["merges"], json!(merges));
        assert_eq!(json["model"]["vocab"]["\u{2581}\u{2581}"], json!(7));
        // Control tokens are special; "\n" is a plain added token; the respelled "  " and <unk> (type 2) are not added.
        let added: Vec<(u64, bool)> =
            json["added_tokens"].as_array().unwrap().iter().map(|t| (t["id"].as_u64().unwrap(), t["special"] == json!(true))).collect();
        assert_eq!(added, [(0, true), (1, true), (2, true), (11, false)]);
        assert_eq!(built.config["add_bos_token"], json!(true));

        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(json).unwrap()).unwrap();
        let enc = tok.encode("aba ab", true).unwrap();
        // <bos>, then "aba▁ab": a+b first, then ab+a.
        assert_eq!(enc.get_ids(), [2, 9, 8, 6]);
        assert_eq!(tok.decode(&[9, 8, 6], false).unwrap(), "aba ab");
    }
}
