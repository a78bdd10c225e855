//! Every family table against Hugging Face transformers (fixtures/families, made by
//! `fixtures/reference.py --only families`): logits at every position of three prompts and of
//! their right-padded batch, keys and residuals at both layers; a MEMIT patch on each tiny model,
//! which reproduces the compiled weights bit for bit; and unsupported configs refused naming the
//! file and key.

mod common;

use common::{ids, read_ref, root, Ref};
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::target::{self, Edit};
use factpatch::edit::{optimisation_prompts, request, Method};
use factpatch::model::{Addition, Batch, Config, Hooks, Model, Site};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tiny model folder → the family table it must load with.
const FAMILIES: [(&str, &str); 11] = [
    ("tiny-llama3", "llama"),
    ("tiny-mistral", "mistral"),
    ("tiny-qwen2", "qwen2"),
    ("tiny-qwen3", "qwen3"),
    ("tiny-phi3", "phi3"),
    ("tiny-gemma2", "gemma2"),
    ("tiny-gemma3", "gemma3_text"),
    ("tiny-gemma3-multimodal", "gemma3"),
    ("tiny-gpt-neox", "gpt_neox"),
    ("tiny-gpt-neox-sequential", "gpt_neox"),
    ("tiny-gptj", "gptj"),
];

fn dir(name: &str) -> PathBuf {
    root().join("fixtures/families").join(name)
}

/// Max |Δ| between `got` rows (one per position, the first `len`) and `want [.., len, width]` at row offset `at`.
fn worst(got: &[Vec<f32>], want: &Ref, at: usize, len: usize) -> f64 {
    let width = *want.shape.last().unwrap();
    got.iter()
        .take(len)
        .enumerate()
        .flat_map(|(t, row)| row.iter().zip(&want.f[(at + t) * width..][..width]).map(|(a, b)| (*a as f64 - b).abs()))
        .fold(0.0, f64::max)
}

fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

fn check_logits(name: &str, what: &str, got: &[Vec<f32>], want: &Ref, at: usize, len: usize) {
    let width = *want.shape.last().unwrap();
    for (t, row) in got.iter().take(len).enumerate() {
        assert_eq!(argmax(row), argmax(&want.f[(at + t) * width..][..width]), "{name} {what} position {t}: argmax differs");
    }
    let d = worst(got, want, at, len);
    assert!(d <= 1e-4, "{name} {what}: max |Δlogit| = {d:e}");
}

#[test]
fn every_family_matches_transformers() {
    for (name, family) in FAMILIES {
        let model = Model::load(&dir(name)).unwrap();
        assert_eq!(model.config.family.name, family);
        let refs: BTreeMap<String, Ref> = read_ref(&dir(name).join("reference.safetensors"));
        let mut prompts = Vec::new();
        for p in 0..3 {
            let input = ids(&refs[&format!("p{p}.input_ids")]);
            let hooks = Hooks { keys: vec![0, 1], residuals: vec![0, 1], ..Hooks::default() };
            let trace = model.forward(&Batch::right_padded(std::slice::from_ref(&input)), &hooks, None).unwrap();
            let logits: Vec<Vec<Vec<f32>>> = model.logits(&trace.hidden).unwrap().to_vec3().unwrap();
            check_logits(name, &format!("p{p}"), &logits[0], &refs[&format!("p{p}.logits")], 0, input.len());
            for l in 0..2 {
                for (kind, got) in [("keys", &trace.keys[&l]), ("residual", &trace.residuals[&l])] {
                    let got: Vec<Vec<Vec<f32>>> = got.to_vec3().unwrap();
                    let d = worst(&got[0], &refs[&format!("p{p}.{kind}.{l}")], 0, input.len());
                    assert!(d <= 1e-4, "{name} p{p} {kind} at layer {l}: max |Δ| = {d:e}");
                }
            }
            prompts.push(input);
        }
        let batch = Batch::right_padded(&prompts);
        assert_eq!(ids(&refs["batch.input_ids"]).len(), batch.len() * batch.seq_len());
        let logits: Vec<Vec<Vec<f32>>> = model.logits(&model.forward(&batch, &Hooks::default(), None).unwrap().hidden).unwrap().to_vec3().unwrap();
        for (row, p) in prompts.iter().enumerate() {
            check_logits(name, &format!("batch row {row}"), &logits[row], &refs["batch.logits"], row * batch.seq_len(), p.len());
        }
    }
}

#[test]
fn memit_patches_reproduce_the_compiled_weights_in_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = root().join("fixtures/corpus/sotu.txt");
    for (name, _) in FAMILIES {
        let model = common::byte_level(&dir(name), &tmp.path().join(name));
        // Statistics from the corpus, in windows of the tiny model's 128 positions (the default
        // window, 512 tokens, is longer than its context).
        let spec = Spec {
            stats: StatsSource::Corpus { files: vec![corpus.clone()], tokens: 4_000 },
            cache: tmp.path().join("cache"),
            // A random 2-layer model's keys are small: the real models' covariance weight (1500)
            // and norm clamp would hold the update back.
            overrides: [vec!["mom2_weight=1".into(), "clamp_norm=1000".into(), "v_steps=60".into()], parallel_layers(&model)].concat(),
            ..Spec::new(&model, Method::Memit)
        };
        let compiler = Compiler::open(&spec).unwrap();
        // A short prompt: Mistral's window of 4 must reach from its end to the subject.
        let fact = request::parse_fact("{} in|Eiffel|Rome").unwrap();
        let mut edited = compiler.clone();
        let patch = edited.patch(std::slice::from_ref(&fact)).unwrap().patch;
        // A random 2-layer model barely moves (see docs/families.md), but the update is real.
        for &l in &compiler.hp.layers {
            let delta = (edited.model.mlp_out_weight(l) - compiler.model.mlp_out_weight(l)).unwrap().abs().unwrap().max_all().unwrap();
            assert!(delta.to_scalar::<f32>().unwrap() > 0.0, "{name} layer {l}: MEMIT changed nothing");
        }

        let path = tmp.path().join(format!("{name}.fpatch"));
        std::fs::write(&path, &patch.bytes).unwrap();
        let out = tmp.path().join(format!("{name}-edited"));
        factpatch::apply::apply(&model, &[path], &out).unwrap();
        let applied = Model::load(&out).unwrap();
        for &l in &compiler.hp.layers {
            let a: Vec<f32> = applied.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = edited.model.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
            assert!(a == b, "{name} layer {l}: the applied patch differs from the compiled weights");
        }
    }
}

/// MEMIT's layers where blocks are parallel: layer 1 only. Layer 0's MLP then reads the token
/// embedding alone, so over the byte-level corpus (about 70 distinct bytes) its 128 keys span too
/// few directions for their second moment to be invertible.
fn parallel_layers(model: &Path) -> Vec<String> {
    if Config::read(model).unwrap().parallel_residual {
        vec!["layers=[1]".into()]
    } else {
        Vec::new()
    }
}

/// A copy of `src`'s weights with its config edited.
fn edited(tmp: &Path, src: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = tempfile::tempdir_in(tmp).unwrap().keep();
    std::fs::copy(dir(src).join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir(src).join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    d
}

/// The config file of [`edited`] and the error loading it.
fn load_err(tmp: &Path, src: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (PathBuf, String) {
    let d = edited(tmp, src, edit);
    let err = Model::load(&d).err().expect("loads").to_string();
    (d.join("config.json"), err)
}

/// A change to a `config.json`.
type ConfigEdit = Box<dyn FnOnce(&mut serde_json::Value)>;

#[test]
fn unsupported_configs_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        ("tiny-qwen3", Box::new(|c| c["model_type"] = "qwen9".into()), "model_type `qwen9`"),
        ("tiny-llama3", Box::new(|c| c["rope_parameters"]["rope_type"] = "yarn".into()), "`rope_parameters.rope_type` is `yarn`"),
        ("tiny-llama3", Box::new(|c| c["rope_parameters"]["factor"] = "eight".into()), "`rope_parameters.factor` must be a positive number"),
        (
            "tiny-mistral",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("rope_parameters");
                c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0});
            }),
            "`rope_scaling.rope_type` is `dynamic`",
        ),
        ("tiny-qwen2", Box::new(|c| c["use_sliding_window"] = true.into()), "`use_sliding_window` is true"),
        ("tiny-qwen3", Box::new(|c| c["hidden_act"] = "gelu".into()), "`hidden_act` is `gelu`"),
        ("tiny-mistral", Box::new(|c| c["num_attention_heads"] = "four".into()), "`num_attention_heads` must be a positive integer"),
        ("tiny-mistral", Box::new(|c| c["sliding_window"] = 0.into()), "`sliding_window` must be a positive integer"),
        ("tiny-phi3", Box::new(|c| c["rope_parameters"]["partial_rotary_factor"] = 1.5.into()), "`rope_parameters.partial_rotary_factor` must rotate"),
        ("tiny-phi3", Box::new(|c| c["rope_parameters"]["rope_type"] = "longrope".into()), "`rope_parameters.rope_type` is `longrope`"),
        ("tiny-gemma2", Box::new(|c| c["hidden_activation"] = "gelu".into()), "`hidden_activation` is `gelu`"),
        ("tiny-gemma2", Box::new(|c| c["layer_types"] = serde_json::json!(["sliding_attention"])), "`layer_types` has 1 entries, but the model has 2"),
        ("tiny-gemma2", Box::new(|c| c["layer_types"][1] = "chunked_attention".into()), "`layer_types` entry 1 is `chunked_attention`"),
        ("tiny-gemma2", Box::new(|c| c["final_logit_softcapping"] = "high".into()), "`final_logit_softcapping` must be a positive number or null"),
        ("tiny-gemma2", Box::new(|c| c["use_bidirectional_attention"] = true.into()), "`use_bidirectional_attention` is true"),
        ("tiny-gemma3", Box::new(|c| c["attn_logit_softcapping"] = 50.0.into()), "`attn_logit_softcapping` is set, but Gemma 3"),
        (
            "tiny-gemma3",
            Box::new(|c| c["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()),
            "`rope_parameters.full_attention.rope_type` is `yarn`",
        ),
        ("tiny-gemma3-multimodal", Box::new(|c| c["text_config"] = serde_json::Value::Null), "`text_config` is missing"),
        (
            "tiny-gemma3-multimodal",
            Box::new(|c| c["text_config"]["attn_logit_softcapping"] = 50.0.into()),
            "`text_config.attn_logit_softcapping` is set, but Gemma 3",
        ),
        ("tiny-gemma3", Box::new(|c| c["rope_parameters"]["sliding_attention"] = 3.into()), "`rope_parameters.sliding_attention` must be an object"),
        ("tiny-gpt-neox", Box::new(|c| c["hidden_act"] = "relu".into()), "`hidden_act` is `relu`"),
        ("tiny-gpt-neox", Box::new(|c| c["attention_bias"] = false.into()), "`attention_bias` is false"),
        ("tiny-gpt-neox", Box::new(|c| c["use_parallel_residual"] = "yes".into()), "`use_parallel_residual` must be true or false"),
        ("tiny-gpt-neox", Box::new(|c| c["rope_parameters"]["rope_type"] = "dynamic".into()), "`rope_parameters.rope_type` is `dynamic`"),
        ("tiny-gpt-neox", Box::new(|c| c["num_attention_heads"] = 5.into()), "`num_attention_heads` must divide hidden_size"),
        ("tiny-gptj", Box::new(|c| c["rotary_dim"] = 18.into()), "`rotary_dim` must be even and at most the head size"),
        ("tiny-gptj", Box::new(|c| c["activation_function"] = "gelu".into()), "`activation_function` is `gelu`"),
        (
            "tiny-gemma3",
            Box::new(|c| c["rope_parameters"]["full_attention"]["factor"] = serde_json::Value::Null),
            "`rope_parameters.full_attention.factor` is missing",
        ),
    ];
    for (src, edit, want) in cases {
        let (path, err) = load_err(tmp.path(), src, edit);
        assert!(err.contains(&path.display().to_string()) && err.contains(want), "{src}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // A tensor the table names but the checkpoint lacks: Llama weights under the Qwen3 table.
    let (path, err) = load_err(tmp.path(), "tiny-llama3", |c| c["model_type"] = "qwen3".into());
    let folder = path.parent().unwrap().display().to_string();
    assert!(err.contains(&folder) && err.contains("model.layers.0.self_attn.q_norm.weight"), "{err}");
}

#[test]
fn the_gguf_names_come_from_the_table() {
    assert_eq!(factpatch::gguf::llama_gguf_name("model.layers.3.mlp.down_proj.weight").as_deref(), Some("blk.3.ffn_down.weight"));
    assert_eq!(factpatch::gguf::llama_gguf_name("model.layers.3.self_attn.q_norm.weight"), None, "not in the Llama table");
}

/// A family's default edit layers are a slice of any length: each table's must be non-empty and
/// ascending, and ROME's index must point into them (`edit_layers` and the ROME default rely on it).
#[test]
fn every_table_has_ascending_edit_layers_and_a_rome_layer_among_them() {
    for f in factpatch::model::FAMILIES {
        let layers = f.default_edit_layers;
        assert!(!layers.is_empty() && layers.windows(2).all(|w| w[0] < w[1]), "{}: {layers:?}", f.name);
        assert!(f.rome_layer_index < layers.len(), "{}: ROME's index {} is outside {layers:?}", f.name, f.rome_layer_index);
    }
    let gemma = factpatch::model::FAMILIES.iter().find(|f| f.name == "gemma3_text").unwrap();
    assert_eq!((gemma.edit_layers(18), gemma.edit_layers(2)), (vec![2, 3, 4], vec![0, 1]), "Gemma 3 270M's 18 layers, a tiny model's 2");
}

/// The logits of every prompt of `name`'s reference under `model`.
fn all_logits(model: &Model, refs: &BTreeMap<String, Ref>) -> Vec<Vec<Vec<f32>>> {
    (0..3)
        .map(|p| {
            let input = ids(&refs[&format!("p{p}.input_ids")]);
            let hidden = model.forward(&Batch::right_padded(&[input]), &Hooks::default(), None).unwrap().hidden;
            model.logits(&hidden).unwrap().to_vec3().unwrap().remove(0)
        })
        .collect()
}

#[test]
fn a_gemma3_config_in_the_transformers_4_form_loads_the_same_model() {
    // `rope_theta`, `rope_local_base_freq`, `rope_scaling` for the global layers and
    // `sliding_window_pattern` in place of `rope_parameters` and `layer_types`.
    let tmp = tempfile::tempdir().unwrap();
    let new = Model::load(&dir("tiny-gemma3")).unwrap();
    let folder = edited(tmp.path(), "tiny-gemma3", |c| {
        let o = c.as_object_mut().unwrap();
        let rope = o.remove("rope_parameters").unwrap();
        o.remove("layer_types");
        o.insert("rope_theta".into(), rope["full_attention"]["rope_theta"].clone());
        o.insert("rope_local_base_freq".into(), rope["sliding_attention"]["rope_theta"].clone());
        o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": rope["full_attention"]["factor"]}));
        o.insert("sliding_window_pattern".into(), 2.into());
    });
    let old = Model::load(&folder).unwrap();
    assert_eq!((old.config.rope, old.config.local_rope), (new.config.rope, new.config.local_rope));
    assert_eq!(old.config.full_attention_layers, vec![1]);
    let refs = read_ref(&dir("tiny-gemma3").join("reference.safetensors"));
    assert!(all_logits(&old, &refs) == all_logits(&new, &refs), "the two forms compute different logits");
}

#[test]
fn a_gpt_neox_config_in_the_transformers_4_form_loads_the_same_model() {
    // `rotary_pct` and `rotary_emb_base` in place of `rope_parameters`.
    let tmp = tempfile::tempdir().unwrap();
    let new = Model::load(&dir("tiny-gpt-neox")).unwrap();
    let folder = edited(tmp.path(), "tiny-gpt-neox", |c| {
        let o = c.as_object_mut().unwrap();
        let rope = o.remove("rope_parameters").unwrap();
        o.insert("rotary_pct".into(), rope["partial_rotary_factor"].clone());
        o.insert("rotary_emb_base".into(), rope["rope_theta"].clone());
    });
    let old = Model::load(&folder).unwrap();
    assert_eq!(old.config.rope, new.config.rope);
    assert_eq!(new.config.rope.unwrap().rotary_dim, 4, "a quarter of 16 dimensions");
    let refs = read_ref(&dir("tiny-gpt-neox").join("reference.safetensors"));
    assert!(all_logits(&old, &refs) == all_logits(&new, &refs), "the two forms compute different logits");
}

#[test]
fn an_mlp_output_addition_reaches_the_residual_as_the_forward_pass_adds_it() {
    // `Model::add_to_mlp_output` (the target optimisation's shortcut) against a full pass with the
    // vector added at `Site::MlpOut`: through Gemma's post-MLP norm, and plainly elsewhere.
    for (name, _) in FAMILIES {
        let model = Model::load(&dir(name)).unwrap();
        let batch = Batch::right_padded(&[vec![5, 17, 42, 99, 7, 3], vec![11, 12, 13]]);
        let at = vec![(0, 3), (1, 2)];
        let d = model.config.hidden_size;
        let delta = candle_core::Tensor::from_vec(common::values(2 * d, 9, 0.5), (2, d), model.device()).unwrap();
        for layer in 0..model.config.num_layers {
            let base = model.forward(&batch, &Hooks { residuals: vec![layer], mlp_outputs: vec![layer], ..Hooks::default() }, None).unwrap();
            let short = model.add_to_mlp_output(layer, &base.residuals[&layer], &base.mlp_outputs[&layer], &at, &delta).unwrap();
            let addition = Addition { layer, site: Site::MlpOut, at: at.clone(), delta: delta.clone() };
            let hooks = Hooks { residuals: vec![layer], additions: vec![addition], ..Hooks::default() };
            let full = model.forward(&batch, &hooks, None).unwrap();
            let gap: f32 = (short - &full.residuals[&layer]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let moved: f32 = (&full.residuals[&layer] - &base.residuals[&layer]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(gap <= 1e-5 && moved > 1e-2, "{name} layer {layer}: |shortcut − pass| = {gap:e}, the addition moved the residual by {moved:e}");
        }
    }
}

#[test]
fn memit_lands_its_target_at_the_family_edit_point() {
    // The target is optimised at the last edited layer's residual output, or, where a norm follows
    // the MLP (Gemma), at its down projection's output; the patch (RECT off) must move that value
    // for the raw prompt most of the way to the target (the solve fits the template-averaged key).
    let tmp = tempfile::tempdir().unwrap();
    let corpus = root().join("fixtures/corpus/sotu.txt");
    for (name, _) in FAMILIES {
        let model = common::byte_level(&dir(name), &tmp.path().join(name));
        let spec = Spec {
            stats: StatsSource::Corpus { files: vec![corpus.clone()], tokens: 4_000 },
            cache: tmp.path().join("cache"),
            overrides: [vec!["mom2_weight=1".into(), "clamp_norm=1000".into(), "v_steps=60".into(), "rect_k=100".into()], parallel_layers(&model)].concat(),
            ..Spec::new(&model, Method::Memit)
        };
        let compiler = Compiler::open(&spec).unwrap();
        let fact = request::parse_fact("{} in|Eiffel|Rome").unwrap();
        let last = *compiler.hp.layers.iter().max().unwrap();
        let at_mlp = !compiler.model.config.family.mlp_joins_residual();
        assert_eq!(at_mlp, name.starts_with("tiny-gemma"), "{name}");
        let edit = if at_mlp { Edit::MlpOut(last) } else { Edit::Residual(last) };
        let prompts = optimisation_prompts(&compiler.tokenizer, &fact, &compiler.templates, &compiler.hp).unwrap();
        let t = target::optimize(&compiler.model, &[prompts], edit, &compiler.hp).unwrap().remove(0);
        let mut edited = compiler.clone();
        edited.patch(std::slice::from_ref(&fact)).unwrap();
        let raw = target::prompt(&compiler.tokenizer, "{} in", "Eiffel", None, &fact).unwrap();
        let hooks = Hooks { residuals: vec![last], mlp_outputs: vec![last], ..Hooks::default() };
        let trace = edited.model.forward(&Batch::right_padded(std::slice::from_ref(&raw.ids)), &hooks, None).unwrap();
        let now = if at_mlp { &trace.mlp_outputs[&last] } else { &trace.residuals[&last] };
        let now: Vec<f32> = now.get(0).unwrap().get(raw.lookup).unwrap().to_vec1().unwrap();
        let gap = now.iter().zip(t.init.iter().zip(&t.delta)).map(|(v, (h, d))| (*v as f64 - h - d).powi(2)).sum::<f64>().sqrt();
        let norm = t.delta.iter().map(|d| d * d).sum::<f64>().sqrt();
        assert!(norm > 0.0 && gap < 0.4 * norm, "{name}: ‖after − target‖ = {gap:.4}, ‖δ‖ = {norm:.4}");
        if at_mlp {
            // Only the target's direction passes the norm: it keeps the norm of the output it replaces.
            let length = |v: Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let (target, init) = (length(t.init.iter().zip(&t.delta).map(|(h, d)| h + d).collect()), length(t.init.clone()));
            assert!((target - init).abs() <= 1e-9 * init, "{name}: ‖target‖ = {target}, ‖init‖ = {init}");
        }
    }
}
