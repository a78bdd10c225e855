//! Causal tracing on the real model: the corrupted subject loses the answer, restoring the last
//! token's final hidden state brings back exactly the clean probability, the subject's own tokens
//! carry the fact in the early and middle layers, and a trace is reproducible from its seed.

mod common;

use candle_core::IndexOp;
use common::smollm2;
use factpatch::model::{Batch, Hooks, Model, Restore, Site};
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
    assert!(err("{} is in", "The Eiffel Tower", Options { window: 0, ..Options::default() }).contains("a window of at least one layer"));
}

/// A restored state is the given one: setting layer 3's whole residual stream to another
/// prompt's (of the same length) gives that prompt's output.
#[test]
fn a_restore_sets_the_state() {
    let dir = smollm2();
    let (model, tok) = (Model::load(&dir).unwrap(), Tokenizer::open(&dir).unwrap());
    let (a, b) = (tok.prompt_ids("The Eiffel Tower is in").unwrap(), tok.prompt_ids("My favourite food is hot pizza").unwrap());
    assert_eq!(a.len(), b.len());
    let run = |ids: &[u32], hooks: &Hooks| model.forward(&Batch::right_padded(&[ids.to_vec()]), hooks, None).unwrap();
    let clean_b = run(&b, &Hooks { residuals: vec![3], ..Hooks::default() });
    let at: Vec<(usize, usize)> = (0..b.len()).map(|p| (0, p)).collect();
    let values = clean_b.residuals[&3].i(0).unwrap();
    let restored = run(&a, &Hooks { restores: vec![Restore { layer: 3, site: Site::Residual, at, values }], ..Hooks::default() });
    let max = |t: &candle_core::Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // x + (v − x) is v to rounding: within an ulp of the largest activation.
    let (gap, scale) = (max(&(restored.hidden - &clean_b.hidden).unwrap()), max(&clean_b.hidden));
    assert!(gap <= 1e-6 * scale, "max |Δ| {gap} of {scale}");
}

fn synthetic(tokens: usize, subject: std::ops::Range<usize>, value: impl Fn(usize, usize) -> f64) -> trace::CausalTrace {
    let layers = 4;
    let per_kind: Vec<Vec<f64>> = (0..layers).map(|l| (0..tokens).map(|p| value(l, p)).collect()).collect();
    trace::CausalTrace {
        tokens: (0..tokens).map(|i| format!("t{i}")).collect(),
        subject,
        answer: " x".into(),
        clean: 0.8,
        corrupted: 0.1,
        noise: 1.0,
        restored: vec![per_kind; 3],
        window: 10,
    }
}

#[test]
fn traces_average_by_token_class() {
    // <bos>, then the subject at 1..4, then two tokens, then the last.
    let a = synthetic(7, 1..4, |l, p| 0.1 + (l * 10 + p) as f64 / 100.0);
    assert_eq!(a.classes(), [None, Some(0), Some(1), Some(2), Some(3), Some(4), Some(5)]);
    // A one-token subject is its last token; no middle, no further tokens.
    let b = synthetic(3, 0..1, |l, _| if l == 2 { 0.9 } else { 0.1 });
    assert_eq!(b.classes(), [Some(2), Some(3), Some(5)]);
    let avg = trace::average(&[a, b]);
    assert_eq!((avg.facts, avg.counts), (2, [1, 1, 2, 2, 1, 2]));
    // Effects are P restored − P corrupted, class means per fact, then means over facts.
    let last_subject = &avg.effect[1][trace::LAST_SUBJECT];
    assert_eq!(last_subject.len(), 4);
    for (l, got) in last_subject.iter().enumerate() {
        let want = ((l * 10 + 3) as f64 / 100.0 + if l == 2 { 0.8 } else { 0.0 }) / 2.0;
        assert!((got - want).abs() < 1e-12, "layer {l}: {got} vs {want}");
    }
    assert_eq!(avg.edit_layers(1), 2..3);
    assert_eq!(avg.edit_layers(2), 2..4);
    assert_eq!(avg.edit_layers(9), 0..4, "clipped to the layers there are");
}

#[test]
fn restoration_windows_are_centred_and_clipped() {
    assert_eq!(Kind::Mlp.window(0, 10, 30), 0..5);
    assert_eq!(Kind::Mlp.window(12, 10, 30), 7..17);
    assert_eq!(Kind::Attention.window(28, 10, 30), 23..30);
    assert_eq!(Kind::Mlp.window(4, 1, 30), 4..5);
    assert_eq!(Kind::Hidden.window(4, 10, 30), 4..5);
}
