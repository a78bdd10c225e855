//! MEND: the gradient factors sum to the weight gradient; the editor's training gradient matches
//! finite differences; training is seeded and resumes to the same editor bytes; editor files are
//! checked before use; MEND patches apply to the weights the compile produced.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{byte_level_tiny_llama, root};
use factpatch::compile::{Compiler, Spec};
use factpatch::edit::request::{Neighbor, Request};
use factpatch::edit::Method;
use factpatch::mend::factors::{gradient_factors, residual_before, target_nll, Sequence};
use factpatch::mend::{self, normalisation, Editor, Shape, TrainSpec, Training};
use factpatch::model::{Batch, Hooks, Model, WeightUpdate};
use factpatch::tokenize::Tokenizer;
use std::path::{Path, PathBuf};

fn sequences() -> Vec<Sequence> {
    vec![
        Sequence { ids: vec![5, 17, 42, 99, 7], targets: vec![(3, 7), (4, 21)] },
        Sequence { ids: vec![11, 12, 13], targets: vec![(2, 200)] },
        // No targets: shares the pass, gives no factors.
        Sequence { ids: vec![1, 2, 3, 4, 5, 6], targets: vec![] },
    ]
}

/// `∂L/∂W` of layer `layer`'s MLP output projection by autograd: a dense update `U·I` at zero.
fn weight_gradient(model: &Model, seqs: &[Sequence], layer: usize) -> Tensor {
    let (d_out, d_in) = (model.config.hidden_size, model.config.intermediate_size);
    let u = Var::zeros((d_out, d_in), DType::F64, model.device()).unwrap();
    let eye = Tensor::eye(d_in, DType::F64, model.device()).unwrap();
    let batch = Batch::right_padded(&seqs.iter().map(|s| s.ids.clone()).collect::<Vec<_>>());
    let hooks = Hooks { weight_updates: vec![WeightUpdate { layer, u: u.as_tensor().clone(), v: eye }], ..Hooks::default() };
    let hidden = model.forward(&batch, &hooks, None).unwrap().hidden;
    target_nll(model, &hidden, seqs).unwrap().backward().unwrap().get(u.as_tensor()).unwrap().clone()
}

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    diff / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

#[test]
fn gradient_factors_sum_to_the_weight_gradient() {
    for dir in ["fixtures/tiny-llama", "fixtures/tiny-gpt2", "fixtures/families/tiny-gemma3", "fixtures/families/tiny-gptj"] {
        let model = Model::load(&root().join(dir)).unwrap().to_dtype(DType::F64).unwrap();
        let layers = [0, model.config.num_layers - 1];
        let seqs = sequences();
        let fs = gradient_factors(&model, &seqs, &layers, None).unwrap();
        // Resumed from the residual entering the first layer: the same factors.
        let batch = Batch::right_padded(&seqs.iter().map(|s| s.ids.clone()).collect::<Vec<_>>());
        let later = gradient_factors(&model, &seqs, &layers[1..], residual_before(&model, &batch, layers[1]).unwrap().as_ref()).unwrap();
        for f in &fs {
            assert_eq!(f.inputs.dims()[0], 8, "{dir}: one factor per token of the sequences with targets");
            let sum = f.grads.t().unwrap().matmul(&f.inputs).unwrap();
            let reference = weight_gradient(&model, &seqs, f.layer);
            let rel = relative(&sum, &reference);
            assert!(rel <= 1e-6, "{dir} layer {}: Σ δ uᵀ differs from the weight gradient by {rel:e}", f.layer);
        }
        let rel = relative(&later[0].grads, &fs[1].grads);
        assert!(rel <= 1e-9, "{dir}: resumed factors differ by {rel:e}");
    }
}

fn record(subject: &str, new: &str, neighbour: &str) -> Request {
    Request {
        prompt: "{} lies in".into(),
        subject: subject.into(),
        target_new: new.into(),
        target_true: Some("Paris".into()),
        relation: None,
        paraphrases: vec![format!("Where is {subject}? It lies in")],
        neighbors: vec![Neighbor { prompt: format!("{neighbour} lies in"), answer: "Paris".into() }],
        generation_prompts: Vec::new(),
        origin: "test".into(),
    }
}

fn tiny_training(records: usize) -> Training {
    Training {
        layers: vec![0, 1],
        shape: Shape { rank: 8, ..Shape::default() },
        batch: 2,
        steps: 4,
        validate_every: 2,
        train_records: [1, records - 2],
        validation_records: [records - 1, records],
        norm_records: 4,
        lr: 1e-3,
        ..Training::defaults(2)
    }
}

#[test]
fn the_editors_training_gradient_matches_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = byte_level_tiny_llama(&tmp.path().join("m"));
    let model = Model::load(&dir).unwrap().to_dtype(DType::F64).unwrap();
    let tok = Tokenizer::open(&dir).unwrap();
    let reqs = [record("Eiffel", "Rome", "Louvre"), record("Orsay", "Oslo", "Pantheon")];
    let batch: Vec<&Request> = reqs.iter().collect();
    let tr = tiny_training(6);
    let seqs: Vec<Sequence> =
        reqs.iter().map(|r| Sequence::teacher_forced(tok.prompt_ids(&r.filled()).unwrap(), &tok.ids(&r.target_text()).unwrap())).collect();
    let norm = normalisation(&[gradient_factors(&model, &seqs, &tr.layers, None).unwrap()]).unwrap();
    let (d_in, d_out) = (model.config.intermediate_size, model.config.hidden_size);
    let editor = Editor::init(&tr.layers, d_in, d_out, tr.shape, norm, 3, model.device()).unwrap().to_dtype(DType::F64).unwrap();
    // Away from the identity start (zero `U`, every ReLU at its kink) and with a real step size.
    for (i, (name, var)) in editor.params.iter().enumerate() {
        let n = var.elem_count();
        let noise = Tensor::from_vec(common::values(n, i as u64, 0.3).iter().map(|&x| x as f64).collect::<Vec<_>>(), var.dims(), var.device()).unwrap();
        let base = if name == "step" { (var.ones_like().unwrap() * 0.05).unwrap() } else { var.as_tensor().clone() };
        var.set(&(base + noise * if name == "step" { 0.01 } else { 1.0 }).unwrap()).unwrap();
    }
    // A generic-text window joins the locality loss, as `text_locality` adds them.
    let text = vec![tok.ids("The cat sat on the mat.").unwrap()];
    let loss = |e: &Editor| mend::training_loss(&model, &tok, e, &batch, &text, &tr).unwrap().0;
    let grads = loss(&editor).backward().unwrap();
    let mut checked = 0;
    for (name, var) in &editor.params {
        let g: Vec<f64> = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1().unwrap();
        let values: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..values.len()).step_by(values.len().div_ceil(3)) {
            let h = 1e-6;
            let at = |x: f64| {
                let mut v = values.clone();
                v[i] = x;
                let e = editor.clone();
                let fresh = Var::from_tensor(&Tensor::from_vec(v, var.dims(), var.device()).unwrap()).unwrap();
                let mut e = Editor { params: e.params.clone(), ..e };
                e.params.insert(name.clone(), fresh);
                loss(&e).to_scalar::<f64>().unwrap()
            };
            let fd = (at(values[i] + h) - at(values[i] - h)) / (2.0 * h);
            let rel = (g[i] - fd).abs() / fd.abs().max(1e-6);
            assert!(rel <= 1e-4, "{name}[{i}]: autograd {} vs finite differences {fd} (relative {rel:e})", g[i]);
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked only {checked} elements");
}

/// A tiny model with a byte-level tokenizer and a request file of `n` records.
fn tiny_setup(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let model = byte_level_tiny_llama(&dir.join("model"));
    let subjects = ["Eiffel", "Orsay", "Louvre", "Pantheon", "Opera", "Bastille", "Concorde", "Marais", "Vendome", "Invalides"];
    let lines: Vec<String> =
        (0..n).map(|i| serde_json::to_string(&record(subjects[i], ["Rome", "Oslo", "Lima"][i % 3], subjects[(i + 1) % subjects.len()])).unwrap()).collect();
    let requests = dir.join("requests.jsonl");
    std::fs::write(&requests, lines.join("\n") + "\n").unwrap();
    (model, requests)
}

fn train(model: &Path, requests: &Path, out: &Path, training: Training) -> mend::TrainSummary {
    mend::train(&TrainSpec {
        model: model.into(),
        requests: requests.into(),
        exclude: Vec::new(),
        locality_corpus: None,
        out: out.into(),
        training,
        progress: false,
    })
    .unwrap()
}

#[test]
fn training_is_seeded_and_resumes_to_the_same_editor() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, requests) = tiny_setup(tmp.path(), 8);
    let tr = tiny_training(8);
    let a = train(&model, &requests, &tmp.path().join("a"), tr.clone());
    let again = train(&model, &requests, &tmp.path().join("again"), tr.clone());
    assert_eq!(a.id, again.id, "same seed, same editor");
    assert_eq!(a.steps, 4);
    // Two steps, then a rerun asking for four: it resumes from the checkpoint at step 2.
    let half = train(&model, &requests, &tmp.path().join("b"), Training { steps: 2, ..tr.clone() });
    assert_ne!(half.id, a.id, "two steps of training changed nothing");
    let resumed = train(&model, &requests, &tmp.path().join("b"), tr.clone());
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(resumed.id, a.id, "a resumed run ends with the uninterrupted run's editor");
    let csv = |d: &str| std::fs::read_to_string(tmp.path().join(d).join("training.csv")).unwrap();
    assert_eq!(csv("a"), csv("b"));
    assert_eq!(csv("a").lines().count(), 3, "a header and one row per validation");
    for png in ["training-loss.png", "training-validation.png"] {
        assert!(std::fs::metadata(tmp.path().join("a").join(png)).unwrap().len() > 1000, "{png} missing");
    }
    // Another seed is another editor; a folder of another run is refused.
    let other = Training { seed: 1, ..tr.clone() };
    assert_ne!(train(&model, &requests, &tmp.path().join("c"), other.clone()).id, a.id);
    let err =
        mend::train(&TrainSpec { model, requests, exclude: Vec::new(), locality_corpus: None, out: tmp.path().join("a"), training: other, progress: false })
            .unwrap_err()
            .to_string();
    assert!(err.contains("checkpoint.safetensors") && err.contains("another"), "{err}");
}

#[test]
fn damaged_or_mismatched_editors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, requests) = tiny_setup(tmp.path(), 8);
    let trained = train(&model, &requests, &tmp.path().join("run"), tiny_training(8));
    let bytes = std::fs::read(&trained.editor).unwrap();
    let cpu = candle_core::Device::Cpu;
    assert_eq!(mend::read(&trained.editor, &cpu).unwrap().id, trained.id);
    let broken = tmp.path().join("broken.safetensors");
    let refused = |b: &[u8]| {
        std::fs::write(&broken, b).unwrap();
        let e = mend::read(&broken, &cpu).err().expect("refused").to_string();
        assert!(e.contains("broken.safetensors"), "the error names the file: {e}");
        e
    };
    // A flipped bit in the last tensor's data, a truncated file, a file that is no editor.
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(refused(&flipped).contains("damaged"));
    refused(&bytes[..bytes.len() - 100]);
    let stats_like = bytes.windows(14).position(|w| w == b"factpatch-mend").unwrap();
    let mut other_format = bytes.clone();
    other_format[stats_like..stats_like + 14].copy_from_slice(b"factpatch-mxnd");
    assert!(refused(&other_format).contains("not a MEND editor"));

    // Compiling with it: on another model, on other layers, or for another method.
    let fact = factpatch::edit::request::parse_fact("{} lies in|Eiffel|Rome").unwrap();
    let spec = |m: &Path, method: Method, overrides: Vec<String>| Spec { editor: Some(trained.editor.clone()), overrides, ..Spec::new(m, method) };
    let other_model = common::byte_level(&root().join("fixtures/families/tiny-llama3"), &tmp.path().join("llama3"));
    let err = |s: Spec| Compiler::open(&s).err().expect("refused").to_string();
    assert!(err(spec(&other_model, Method::Mend, vec![])).contains("trained for the model"));
    assert!(err(spec(&model, Method::Mend, vec!["layers=[1]".into()])).contains("edits layers [0, 1]"));
    assert!(err(spec(&model, Method::Rome, vec![])).contains("--editor is MEND's"));
    assert!(err(Spec::new(&model, Method::Mend)).contains("--editor"));

    // The editor as trained: a patch of rank one per token, recording the editor, that applies
    // to exactly the compiled weights.
    let mut compiler = Compiler::open(&spec(&model, Method::Mend, vec!["rect_k=100".into()])).unwrap();
    let before = compiler.model.clone();
    let patch = compiler.patch(std::slice::from_ref(&fact)).unwrap().patch;
    let path = tmp.path().join("mend.fpatch");
    std::fs::write(&path, &patch.bytes).unwrap();
    let read = factpatch::patch::Patch::read(&path).unwrap();
    assert_eq!(read.manifest().editor_id.as_deref(), Some(trained.id.as_str()));
    assert_eq!(read.manifest().method.name, "mend");
    let out = tmp.path().join("edited");
    factpatch::apply::apply(&model, &[path], &out).unwrap();
    let applied = Model::load(&out).unwrap();
    let tok = Tokenizer::open(&model).unwrap();
    let tokens = tok.ids("Eiffel lies in").unwrap().len() + tok.ids(" Rome").unwrap().len() - 1;
    for i in 0..2 {
        match read.delta(i).unwrap() {
            factpatch::patch::Delta::LowRank(f) => assert_eq!(f[0].rank, tokens, "one rank per token of prompt and target"),
            other => panic!("a MEND patch without RECT is low-rank, not {other:?}"),
        }
    }
    for l in [0, 1] {
        let a: Vec<f32> = applied.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = compiler.model.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "layer {l}: the applied patch differs from the compiled weights");
        let change = (compiler.model.mlp_out_weight(l) - before.mlp_out_weight(l)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(change > 0.0, "layer {l}: MEND changed nothing");
    }
}
