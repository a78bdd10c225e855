//! Causal tracing on the real model: the corrupted subject loses the answer, restoring the last
//! token's final hidden state brings back exactly the clean probability, the subject's own tokens
//! carry the fact in the early and middle layers, and a trace is reproducible from its seed.

mod common;

use common::smollm2;
use factpatch::model::Model;
use factpatch::tokenize::Tokenizer;
use factpatch::trace::{self, Kind, Options};

#[test]
fn tracing_the_eiffel_tower_finds_its_subject_and_restores_exactly() {
    let dir = smollm2();
    let (model, tok) = (Model::load(&dir).unwrap(), Tokenizer::open(&dir).unwrap());
    let opts = Options { samples: 3, ..Options::default() };
    let t = trace::trace(&model, &tok, "{} is located in the city of", "The Eiffel Tower", "Paris", opts).unwrap();
    assert_eq!(t.answer, " Paris");
    assert!(t.clean > 0.5 && t.corrupted < 0.1 * t.clean, "clean {} corrupted {}", t.clean, t.corrupted);
    let (layers, tokens) = (model.config.num_layers, t.tokens.len());
    let hidden = &t.restored[Kind::ALL.iter().position(|&k| k == Kind::Hidden).unwrap()];
    assert_eq!((hidden.len(), hidden[0].len()), (layers, tokens));
    // The last layer's state at the last token is all the output depends on.
    let restored = hidden[layers - 1][tokens - 1];
    assert!((restored - t.clean).abs() < 1e-5, "restored {restored} vs clean {}", t.clean);
    // A subject token's state in the first half of the layers brings back most of the answer;
    // a state after the subject and before the last token brings back next to nothing.
    let best_subject = t.subject.clone().flat_map(|p| hidden[..layers / 2].iter().map(move |row| row[p])).fold(0f64, f64::max);
    assert!(best_subject > 0.5 * t.clean, "best subject restoration {best_subject}");
    let after = t.subject.end; // " is"
    let best_after = hidden.iter().map(|row| row[after]).fold(0f64, f64::max);
    assert!(best_after < 0.1 * t.clean, "restoring {:?} gave {best_after}", t.tokens[after]);
    // Reproducible from the seed; another seed draws other noise.
    let again = trace::trace(&model, &tok, "{} is located in the city of", "The Eiffel Tower", "Paris", opts).unwrap();
    assert_eq!(again.restored, t.restored);
    let other = trace::trace(&model, &tok, "{} is located in the city of", "The Eiffel Tower", "Paris", Options { seed: 1, ..opts }).unwrap();
    assert_ne!(other.corrupted, t.corrupted);
}

#[test]
fn a_bad_fact_or_option_is_one_clear_error() {
    let dir = smollm2();
    let (model, tok) = (Model::load(&dir).unwrap(), Tokenizer::open(&dir).unwrap());
    let err = |template: &str, subject: &str, opts: Options| trace::trace(&model, &tok, template, subject, "Paris", opts).unwrap_err().to_string();
    assert!(err("{} is in", "", Options::default()).contains("cannot be located"));
    assert!(err("is located in", "The Eiffel Tower", Options::default()).contains("no {}"));
    assert!(err("{} is in", "The Eiffel Tower", Options { samples: 0, ..Options::default() }).contains("at least one noise draw"));
    assert!(err("{} is in", "The Eiffel Tower", Options { noise_scale: -1.0, ..Options::default() }).contains("positive noise scale"));
}
