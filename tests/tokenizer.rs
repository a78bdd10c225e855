//! The tokenizer imported from the SmolLM2 GGUF must tokenize exactly like the
//! reference (`fixtures/reference/tokenization.json`, made by
//! `fixtures/reference.py`): same ids, same offsets, on every string.

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

fn smollm2_tokenizer() -> Tokenizer {
    let path = root().join("fixtures/models/SmolLM2-135M-Instruct/tokenizer.json");
    assert!(path.is_file(), "{} is missing: run fixtures/get-model.sh first", path.display());
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture() -> Fixture {
    let path = root().join("fixtures/reference/tokenization.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn ids_and_byte_offsets_match_the_reference() {
    let tok = smollm2_tokenizer();
    let cases = fixture().cases;
    assert!(cases.len() >= 120, "only {} cases", cases.len());
    for case in &cases {
        let enc = tok.encode(case.text.as_str(), false).unwrap();
        assert_eq!(enc.get_ids(), case.ids.as_slice(), "ids of {:?}", case.text);
        assert_eq!(enc.get_offsets(), case.byte_offsets.as_slice(), "byte offsets of {:?}", case.text);
    }
}

#[test]
fn char_offsets_match_the_reference() {
    let tok = smollm2_tokenizer();
    for case in &fixture().cases {
        let enc = tok.encode_char_offsets(case.text.as_str(), false).unwrap();
        assert_eq!(enc.get_offsets(), case.char_offsets.as_slice(), "char offsets of {:?}", case.text);
    }
}

#[test]
fn decoding_round_trips() {
    let tok = smollm2_tokenizer();
    for case in &fixture().cases {
        let text = tok.decode(&case.ids, false).unwrap();
        assert_eq!(text, case.text, "decode of {:?}", case.ids);
    }
}
