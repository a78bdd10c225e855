//! `export`: patches as LoRA adapters. Real MEMIT patches of SmolLM2 (with and without RECT),
//! read back as PEFT and llama.cpp would read them, against the delta `apply` adds; truncated
//! SVDs against an independent dense computation; GPT-2's transposed `Conv1D` and adapters whose
//! ranks differ per tensor on hand-made patches of the tiny fixtures.
//!
//! Exactness bound: `apply` adds `D = Σ_t u_t·v_t` summed in f32 from +0 over the rank r, so
//! `|D − (B·A)_exact| ≤ (r + 1)·2⁻²⁴·Σ_t |u_t·v_t|` per element; `B·A` is computed here in f64
//! from the adapter's f32 values (exact for these sizes to far below that bound).

mod common;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use common::{factors, root, smollm2, smollm2_spec, write_patch};
use factpatch::apply::{standalone, Stack};
use factpatch::checkpoint::Checkpoint;
use factpatch::compile::Compiler;
use factpatch::edit::{request, Method};
use factpatch::export::{export, Error, Format, Options, Summary};
use factpatch::patch::{Delta, Manifest, Method as PatchMethod, ModelInfo, Patch};
use ndarray_linalg::SVD;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FACT: &str = "{} is located in the city of|The Eiffel Tower|Rome";

/// The demo fact compiled with MEMIT on SmolLM2, without RECT (low-rank) and with RECT 40, once
/// for the whole test binary: (folder, low-rank patch, RECT patch).
fn patches() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static PATCHES: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    PATCHES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let compiler = Compiler::open(&smollm2_spec(Method::Memit, &["rect_k=100"])).unwrap();
        let facts = [request::parse_fact(FACT).unwrap()];
        let write = |name: &str, rect_k: f64| {
            let mut c = compiler.clone();
            c.hp.rect_k = rect_k;
            let path = dir.path().join(name);
            std::fs::write(&path, c.patch(&facts).unwrap().patch.bytes).unwrap();
            path
        };
        let (low_rank, rect) = (write("memit.fpatch", 100.0), write("memit-rect40.fpatch", 40.0));
        (dir, low_rank, rect)
    })
}

fn options(format: Format, rank: Option<usize>, model: Option<&Path>) -> Options {
    Options { format, rank, model: model.map(Path::to_path_buf) }
}

/// Tensors by name: shape and f32 values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// An adapter's tensors, and the provenance in its metadata.
fn safetensors(path: &Path) -> (Tensors, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
            (name, (v.shape().to_vec(), v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        })
        .collect();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().expect("metadata");
    assert_eq!(meta.len(), 1, "one metadata key: {meta:?}");
    (tensors, serde_json::from_str(&meta["factpatch"]).unwrap())
}

/// Checks `d [out, in]` (row-major, `transposed`: stored `[in, out]`) against `scale·B·A`,
/// `B [out, r]`, `A [r, in]`, to the bound in the module doc; returns max |D − scale·B·A|.
fn check_product(what: &str, d: &[f32], b: &[f32], a: &[f32], (out, r, inp): (usize, usize, usize), scale: f64, transposed: bool) -> f64 {
    assert_eq!((b.len(), a.len(), d.len()), (out * r, r * inp, out * inp), "{what}: sizes");
    let mut worst = 0f64;
    for i in 0..out {
        for j in 0..inp {
            let (mut p, mut bound) = (0f64, 0f64);
            for t in 0..r {
                let x = b[i * r + t] as f64 * a[t * inp + j] as f64 * scale;
                p += x;
                bound += x.abs();
            }
            let dij = if transposed { d[j * out + i] } else { d[i * inp + j] } as f64;
            let err = (dij - p).abs();
            assert!(err <= (r + 1) as f64 * f32::EPSILON as f64 / 2.0 * bound, "{what}[{i}, {j}]: D = {dij}, B·A = {p}");
            worst = worst.max(err);
        }
    }
    worst
}

/// The delta `apply` adds for each entry of a patch without RECT, by tensor name.
fn deltas(patch: &Path) -> Tensors {
    let p = Patch::read(patch).unwrap();
    p.manifest().entries.iter().enumerate().map(|(i, e)| (e.tensor.clone(), (e.shape.clone(), standalone(&p.delta(i).unwrap(), &e.shape).unwrap()))).collect()
}

#[test]
fn a_memit_patch_exports_to_peft_exactly() {
    let (dir, patch, _) = patches();
    let out = dir.path().join("peft");
    let s = export(patch, &out, &options(Format::Peft, None, None)).unwrap();
    let p = Patch::read(patch).unwrap();
    assert_eq!(s.patch, p.id());
    assert!(s.tensors.iter().all(|t| t.exact && t.rank == 1 && t.relative_error < 1e-7), "{:?}", s.tensors);

    let (tensors, meta) = safetensors(&out.join("adapter_model.safetensors"));
    let layers = [4, 5, 6, 7, 8];
    let modules: Vec<String> = layers.iter().map(|l| format!("model.layers.{l}.mlp.down_proj")).collect();
    let names: Vec<String> = modules.iter().flat_map(|m| ["A", "B"].map(|x| format!("base_model.model.{m}.lora_{x}.weight"))).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(tensors.keys().cloned().collect::<Vec<_>>(), sorted, "PEFT's names");
    let mut worst = 0f64;
    for (m, (name, (shape, d))) in modules.iter().zip(deltas(patch)) {
        assert_eq!(name, format!("{m}.weight"));
        let (a_shape, a) = &tensors[&format!("base_model.model.{m}.lora_A.weight")];
        let (b_shape, b) = &tensors[&format!("base_model.model.{m}.lora_B.weight")];
        assert_eq!((a_shape.clone(), b_shape.clone()), (vec![1, 1536], vec![576, 1]), "{m}: PEFT's [r, in] and [out, r]");
        assert_eq!(shape, vec![576, 1536]);
        worst = worst.max(check_product(m, &d, b, a, (576, 1, 1536), 1.0, false));
    }
    eprintln!("PEFT export of {}: max |ΔW − B·A| {worst:.3e}", p.id());

    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["base_model_name_or_path"], "SmolLM2-135M-Instruct");
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_u64()), (Some(1), Some(1)));
    assert_eq!(config["target_modules"], serde_json::json!(modules));
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!((config["rank_pattern"].clone(), config["alpha_pattern"].clone()), (serde_json::json!({}), serde_json::json!({})));

    assert_eq!(meta["patch"], p.id());
    assert_eq!(meta["parent"], serde_json::Value::Null);
    assert_eq!(meta["edits"][0]["target_new"], "Rome");
    assert_eq!(meta["edits"][0]["subject"], "The Eiffel Tower");

    // Same inputs, same bytes.
    let again = dir.path().join("peft-again");
    export(patch, &again, &options(Format::Peft, None, None)).unwrap();
    assert_eq!(common::folder(&out), common::folder(&again));
}

#[test]
fn a_memit_patch_exports_to_a_llama_cpp_gguf_exactly() {
    let (dir, patch, _) = patches();
    let out = dir.path().join("memit.gguf");
    export(patch, &out, &options(Format::GgufLora, None, None)).unwrap();
    let mut file = std::fs::File::open(&out).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let meta = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(meta("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(meta("general.type").to_string().unwrap(), "adapter");
    assert_eq!(meta("adapter.type").to_string().unwrap(), "lora");
    let alpha = meta("adapter.lora.alpha").to_f32().unwrap();
    assert_eq!(alpha, 1.0);
    let provenance: serde_json::Value = serde_json::from_str(meta("factpatch.provenance").to_string().unwrap()).unwrap();
    assert_eq!(provenance["patch"], Patch::read(patch).unwrap().id());

    let model = Checkpoint::open(&smollm2()).unwrap();
    assert_eq!(content.tensor_infos.len(), 10);
    for (name, (shape, d)) in deltas(patch) {
        let layer: usize = name.split('.').nth(2).unwrap().parse().unwrap();
        let gguf = format!("blk.{layer}.ffn_down.weight");
        // ggml's ne lists dimensions fastest first: the reverse of candle's (PyTorch's) order.
        let ne = |n: &str| -> Vec<usize> {
            let info = &content.tensor_infos[n];
            assert_eq!(info.ggml_dtype, GgmlDType::F32, "{n}");
            info.shape.dims().iter().rev().copied().collect()
        };
        let (a_ne, b_ne) = (ne(&format!("{gguf}.lora_a")), ne(&format!("{gguf}.lora_b")));
        // llama.cpp's checks (llama-adapter.cpp): model ne[0] == a ne[0], model ne[1] == b ne[1], a ne[1] == b ne[0].
        let model_ne: Vec<usize> = model.tensor(&name).unwrap().shape.iter().rev().copied().collect();
        assert_eq!((a_ne[0], b_ne[1], a_ne[1]), (model_ne[0], model_ne[1], b_ne[0]), "{gguf}: shapes llama.cpp refuses");
        assert_eq!((a_ne, b_ne.clone()), (vec![1536, 1], vec![1, 576]));
        let mut read = |n: &str| -> Vec<f32> {
            let t = content.tensor(&mut file, &format!("{gguf}.{n}"), &Device::Cpu).unwrap();
            t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let r = b_ne[0];
        check_product(&gguf, &d, &read("lora_b"), &read("lora_a"), (shape[0], r, shape[1]), alpha as f64 / r as f64, false);
    }
}

/// `‖D − B·A‖_F / ‖D‖_F` computed densely in f64.
fn dense_relative_error(d: &[f32], b: &[f32], a: &[f32], (out, r, inp): (usize, usize, usize)) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for i in 0..out {
        for j in 0..inp {
            let p: f64 = (0..r).map(|t| b[i * r + t] as f64 * a[t * inp + j] as f64).sum();
            err += (d[i * inp + j] as f64 - p).powi(2);
            norm += (d[i * inp + j] as f64).powi(2);
        }
    }
    (err / norm).sqrt()
}

#[test]
fn a_rect_patch_needs_a_rank_and_the_model_and_gets_a_truncated_svd() {
    let (dir, low_rank, rect) = patches();
    let model = smollm2();
    let e = export(rect, &dir.path().join("no-rank"), &options(Format::Peft, None, None)).unwrap_err();
    assert!(matches!(e, Error::NotLowRank { .. }), "{e}");
    assert!(e.to_string().contains("is not low-rank") && e.to_string().contains("pass --rank R"), "{e}");
    let e = export(rect, &dir.path().join("no-model"), &options(Format::Peft, Some(4), None)).unwrap_err();
    assert!(matches!(e, Error::NeedsModel { .. }) && e.to_string().contains("pass --model DIR"), "{e}");
    let e = export(rect, &dir.path().join("too-big"), &options(Format::Peft, Some(577), Some(&model))).unwrap_err();
    assert!(matches!(e, Error::Rank { max: 576, .. }), "{e}");
    for refused in ["no-rank", "no-model", "too-big"] {
        assert!(!dir.path().join(refused).exists(), "{refused}: output written on error");
    }

    // The masked delta, as apply computes it, against the model.
    let p = Patch::read(rect).unwrap();
    let names: Vec<String> = p.manifest().entries.iter().map(|e| e.tensor.clone()).collect();
    let stack = Stack::new(vec![p]).unwrap();
    let ckpt = Checkpoint::open(&model).unwrap();
    let masked: Vec<Vec<f32>> = names.iter().map(|n| stack.delta_for(&ckpt.tensor(n).unwrap()).unwrap()).collect();

    let mut by_rank = BTreeMap::new();
    for rank in [4, 16, 576] {
        let out = dir.path().join(format!("rect-{rank}"));
        let s: Summary = export(rect, &out, &options(Format::Peft, Some(rank), Some(&model))).unwrap();
        let (tensors, _) = safetensors(&out.join("adapter_model.safetensors"));
        for ((t, name), d) in s.tensors.iter().zip(&names).zip(&masked) {
            assert!(!t.exact && t.rank == rank && &t.tensor == name);
            let m = name.strip_suffix(".weight").unwrap();
            let (a, b) = (&tensors[&format!("base_model.model.{m}.lora_A.weight")].1, &tensors[&format!("base_model.model.{m}.lora_B.weight")].1);
            let dense = dense_relative_error(d, b, a, (576, rank, 1536));
            assert!((dense - t.relative_error).abs() <= 1e-6 * dense.max(1e-12), "{name} rank {rank}: reported {}, dense {dense}", t.relative_error);
            by_rank.insert((name.clone(), rank), t.relative_error);
        }
    }
    for (i, name) in names.iter().enumerate() {
        // Eckart–Young: the truncated SVD's error is that of the singular values left out.
        let m = ndarray::Array2::from_shape_fn((576, 1536), |(r, c)| masked[i][r * 1536 + c] as f64);
        let (_, sv, _) = m.svd(false, false).unwrap();
        let total: f64 = sv.iter().map(|s| s * s).sum();
        for rank in [4, 16] {
            let optimal = (sv.iter().skip(rank).map(|s| s * s).sum::<f64>() / total).sqrt();
            let got = by_rank[&(name.clone(), rank)];
            assert!((got - optimal).abs() <= 1e-6 * optimal, "{name} rank {rank}: {got} vs the optimum {optimal}");
        }
        assert!(by_rank[&(name.clone(), 576)] < 1e-6, "{name}: full rank leaves {}", by_rank[&(name.clone(), 576)]);
        eprintln!(
            "{name}: relative error rank 4 {:.4}, 16 {:.4}, 576 {:.2e}",
            by_rank[&(name.clone(), 4)],
            by_rank[&(name.clone(), 16)],
            by_rank[&(name.clone(), 576)]
        );
    }

    // A low-rank patch through the SVD at its own rank loses nothing.
    let s = export(low_rank, &dir.path().join("svd-1"), &options(Format::GgufLora, Some(1), None)).unwrap();
    assert!(s.tensors.iter().all(|t| !t.exact && t.relative_error < 1e-6), "{:?}", s.tensors);
}

#[test]
fn outputs_are_never_replaced() {
    let (dir, patch, _) = patches();
    for (format, name) in [(Format::Peft, "kept"), (Format::GgufLora, "kept.gguf")] {
        let out = dir.path().join(name);
        export(patch, &out, &options(format, None, None)).unwrap();
        let before = if out.is_dir() { common::folder(&out) } else { BTreeMap::from([(String::new(), std::fs::read(&out).unwrap())]) };
        let e = export(patch, &out, &options(format, None, None)).unwrap_err();
        assert!(matches!(e, Error::Io(_)) && e.to_string().contains("already exists") && e.to_string().contains(name), "{e}");
        let after = if out.is_dir() { common::folder(&out) } else { BTreeMap::from([(String::new(), std::fs::read(&out).unwrap())]) };
        assert_eq!(before, after, "{name} changed");
    }
}

/// A manifest for a fixture model of `family`.
fn manifest(family: &str) -> Manifest {
    Manifest::new(ModelInfo { name: format!("tiny-{family}"), family: family.into() }, PatchMethod { name: "memit".into(), hyperparameters: BTreeMap::new() })
}

#[test]
fn gpt2_conv1d_weights_export_transposed() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&root().join("fixtures/tiny-gpt2")).unwrap();
    let name = "transformer.h.1.mlp.c_proj.weight"; // stored [in 256, out 64]
    let patch = write_patch(&dir.path().join("gpt2.fpatch"), &ckpt, &[], manifest("gpt2"), vec![(name, Delta::LowRank(vec![factors(256, 64, 2, 7, 0.01)]))]);
    let out = dir.path().join("peft");
    export(&patch, &out, &options(Format::Peft, None, None)).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["fan_in_fan_out"], true, "PEFT transposes B·A for Conv1D");
    assert_eq!(config["target_modules"], serde_json::json!(["transformer.h.1.mlp.c_proj"]));
    let (tensors, _) = safetensors(&out.join("adapter_model.safetensors"));
    let (a_shape, a) = &tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"];
    let (b_shape, b) = &tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"];
    assert_eq!((a_shape.clone(), b_shape.clone()), (vec![2, 256], vec![64, 2]), "PEFT's Conv1D shapes: A [r, in], B [out, r]");
    let (_, d) = &deltas(&patch)[name];
    check_product(name, d, b, a, (64, 2, 256), 1.0, true);

    let e = export(&patch, &dir.path().join("gpt2.gguf"), &options(Format::GgufLora, None, None)).unwrap_err();
    assert!(matches!(e, Error::GgufFamily { .. }) && e.to_string().contains("use --format peft"), "{e}");
}

#[test]
fn ranks_that_differ_get_patterns_and_padding() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&root().join("fixtures/tiny-llama")).unwrap();
    let (down0, down1) = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight");
    // As `merge` leaves two low-rank patches of one tensor: both groups, ranks 2 and 1.
    let deltas_in = vec![
        (down0, Delta::LowRank(vec![factors(64, 128, 2, 1, 0.01), factors(64, 128, 1, 2, 0.01)])),
        (down1, Delta::LowRank(vec![factors(64, 128, 1, 3, 0.01)])),
    ];
    let patch = write_patch(&dir.path().join("p.fpatch"), &ckpt, &[], manifest("llama"), deltas_in);
    let d = deltas(&patch);

    let out = dir.path().join("peft");
    let s = export(&patch, &out, &options(Format::Peft, None, None)).unwrap();
    assert_eq!(s.tensors.iter().map(|t| t.rank).collect::<Vec<_>>(), vec![3, 1]);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_u64()), (Some(3), Some(3)));
    let pattern = serde_json::json!({"model.layers.1.mlp.down_proj": 1});
    assert_eq!((config["rank_pattern"].clone(), config["alpha_pattern"].clone()), (pattern.clone(), pattern));
    let (tensors, _) = safetensors(&out.join("adapter_model.safetensors"));
    for (name, r) in [(down0, 3), (down1, 1)] {
        let m = name.strip_suffix(".weight").unwrap();
        let (a_shape, a) = &tensors[&format!("base_model.model.{m}.lora_A.weight")];
        let (_, b) = &tensors[&format!("base_model.model.{m}.lora_B.weight")];
        assert_eq!(a_shape, &vec![r, 128]);
        check_product(name, &d[name].1, b, a, (64, r, 128), 1.0, false);
    }

    // llama.cpp has one alpha per file: the rank-1 pair is padded with zeros to rank 3.
    let gguf = dir.path().join("p.gguf");
    export(&patch, &gguf, &options(Format::GgufLora, None, None)).unwrap();
    let mut file = std::fs::File::open(&gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(content.metadata["adapter.lora.alpha"].to_f32().unwrap(), 3.0);
    for (name, layer) in [(down0, 0), (down1, 1)] {
        let mut read = |n: &str| -> (Vec<usize>, Vec<f32>) {
            let t = content.tensor(&mut file, &format!("blk.{layer}.ffn_down.weight.{n}"), &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap())
        };
        let ((a_dims, a), (b_dims, b)) = (read("lora_a"), read("lora_b"));
        assert_eq!((a_dims, b_dims), (vec![3, 128], vec![64, 3]));
        if layer == 1 {
            assert!(a[128..].iter().all(|&x| x == 0.0) && b.chunks(3).all(|row| row[1] == 0.0 && row[2] == 0.0), "padding is not zero");
        }
        check_product(name, &d[name].1, &b, &a, (64, 3, 128), 3.0 / 3.0, false);
    }
}

#[test]
fn tensors_and_families_a_lora_cannot_carry_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&root().join("fixtures/tiny-llama")).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let patch = write_patch(&dir.path().join("q.fpatch"), &ckpt, &[], manifest("llama"), vec![(q, Delta::explicit(common::values(64 * 64, 1, 0.01)))]);
    let e = export(&patch, &dir.path().join("q"), &options(Format::Peft, Some(2), None)).unwrap_err();
    assert!(matches!(e, Error::UnsupportedTensor { .. }) && e.to_string().contains(q), "{e}");
    let down = "model.layers.0.mlp.down_proj.weight";
    let patch = write_patch(&dir.path().join("f.fpatch"), &ckpt, &[], manifest("falcon"), vec![(down, Delta::LowRank(vec![factors(64, 128, 1, 1, 0.01)]))]);
    let e = export(&patch, &dir.path().join("f"), &options(Format::Peft, None, None)).unwrap_err();
    assert!(matches!(e, Error::UnknownFamily { .. }) && e.to_string().contains("falcon"), "{e}");
    assert!(!dir.path().join("q").exists() && !dir.path().join("f").exists());
}
