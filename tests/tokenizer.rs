//! The tokenizers imported from the SmolLM2 and Gemma 3 270M GGUFs must tokenize exactly like
//! their references (`fixtures/reference/tokenization.json` and
//! `gemma3-270m-tokenization.json`, made by `fixtures/reference.py`; Gemma's by transformers'
//! tokenizer built from the GGUF): same ids, same offsets, on every string.

use std::path::PathBuf;

use serde::Deserialize;
use tokenizers::Tokenizer;

/// One reference tokenization.
#[derive(Deserialize)]
struct Case {
    /// The input string.
    text: String,
    /// Token ids, without special tokens added.
    ids: Vec<u32>,
    /// Offsets in Unicode code points (Python's).
    char_offsets: Vec<(usize, usize)>,
    /// Offsets in UTF-8 bytes (the Rust crate's default).
    byte_offsets: Vec<(usize, usize)>,
}

/// The reference file.
#[derive(Deserialize)]
struct Fixture {
    /// All cases.
    cases: Vec<Case>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tokenizer imported into `fixtures/models/MODEL`, which `fetch` makes.
fn tokenizer(model: &str, fetch: &str) -> Tokenizer {
    let path = root().join("fixtures/models").join(model).join("tokenizer.json");
    assert!(path.is_file(), "{} is missing: run `{fetch}` first", path.display());
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn smollm2_tokenizer() -> Tokenizer {
    tokenizer("SmolLM2-135M-Instruct", "bash fixtures/get-model.sh")
}

fn gemma3_tokenizer() -> Tokenizer {
    tokenizer("gemma-3-270m", "bash fixtures/get-model.sh gemma3-270m")
}

fn fixture(name: &str) -> Fixture {
    let path = root().join("fixtures/reference").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_and_byte_offsets_match(tok: &Tokenizer, fixture: &Fixture) {
    assert!(fixture.cases.len() >= 120, "only {} cases", fixture.cases.len());
    for case in &fixture.cases {
        let enc = tok.encode(case.text.as_str(), false).unwrap();
        assert_eq!(enc.get_ids(), case.ids.as_slice(), "ids of {:?}", case.text);
        assert_eq!(enc.get_offsets(), case.byte_offsets.as_slice(), "byte offsets of {:?}", case.text);
    }
}

fn char_offsets_match(tok: &Tokenizer, fixture: &Fixture) {
    for case in &fixture.cases {
        let enc = tok.encode_char_offsets(case.text.as_str(), false).unwrap();
        assert_eq!(enc.get_offsets(), case.char_offsets.as_slice(), "char offsets of {:?}", case.text);
    }
}

fn decoding_round_trips(tok: &Tokenizer, fixture: &Fixture) {
    for case in &fixture.cases {
        let text = tok.decode(&case.ids, false).unwrap();
        assert_eq!(text, case.text, "decode of {:?}", case.ids);
    }
}

#[test]
fn ids_and_byte_offsets_match_the_reference() {
    ids_and_byte_offsets_match(&smollm2_tokenizer(), &fixture("tokenization.json"));
}

#[test]
fn char_offsets_match_the_reference() {
    char_offsets_match(&smollm2_tokenizer(), &fixture("tokenization.json"));
}

#[test]
fn decoding_round_trips_the_reference() {
    decoding_round_trips(&smollm2_tokenizer(), &fixture("tokenization.json"));
}

#[test]
fn gemma3_ids_and_byte_offsets_match_transformers_from_the_gguf() {
    ids_and_byte_offsets_match(&gemma3_tokenizer(), &fixture("gemma3-270m-tokenization.json"));
}

#[test]
fn gemma3_char_offsets_match_transformers_from_the_gguf() {
    char_offsets_match(&gemma3_tokenizer(), &fixture("gemma3-270m-tokenization.json"));
}

#[test]
fn gemma3_decoding_round_trips() {
    decoding_round_trips(&gemma3_tokenizer(), &fixture("gemma3-270m-tokenization.json"));
}
