//! Patch benchmarks on SmolLM2-135M shapes: bytes per fact for each encoding of a 5-layer
//! rank-1 update, and apply time and peak RSS against `cp -r` of the same checkpoint.
//! Uses `fixtures/models/SmolLM2-135M-Instruct` (or `$FACTPATCH_BENCH_MODEL`) when present,
//! otherwise writes a synthetic BF16 checkpoint with the same shapes. Prints a table.

use factpatch::apply::{self, product};
use factpatch::checkpoint::{Checkpoint, Dtype};
use factpatch::patch::{self, BaseTensor, Delta, Factors, Manifest, Method, ModelInfo};
use factpatch::rect;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;
use common::values;

const LAYERS: [usize; 5] = [3, 4, 5, 6, 7];
const RECT_K: f64 = 20.0;

/// A synthetic SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, vocab 49152,
/// 9 heads, 3 KV heads (head dim 64), tied embeddings, BF16.
fn synthetic(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, i, kv) = (576, 1536, 192);
    let mut specs: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![49152, h]), ("model.norm.weight".into(), vec![h])];
    for l in 0..30 {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            specs.push((format!("{p}{n}"), s));
        }
    }
    let bytes: Vec<Vec<u8>> = specs.iter().enumerate().map(|(k, (_, s))| Dtype::BF16.encode(&values(s.iter().product(), k as u64, 0.05))).collect();
    let views: Vec<_> = specs.iter().zip(&bytes).map(|((n, s), b)| (n.clone(), TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())).collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","_name_or_path":"synthetic-SmolLM2-135M","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"tie_word_embeddings":true}"#,
    )
    .unwrap();
}

fn model_dir(scratch: &Path) -> (PathBuf, &'static str) {
    let candidates = [std::env::var("FACTPATCH_BENCH_MODEL").unwrap_or_default(), "fixtures/models/SmolLM2-135M-Instruct".into()];
    for c in candidates.iter().filter(|c| !c.is_empty()) {
        if Path::new(c).join("config.json").is_file() {
            return (PathBuf::from(c), "real SmolLM2-135M-Instruct");
        }
    }
    let dir = scratch.join("synthetic");
    synthetic(&dir);
    (dir, "synthetic BF16 checkpoint with SmolLM2-135M shapes")
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmHWM")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() {
    // Child mode: apply one patch and report this process's peak RSS.
    if let (Ok(model), Ok(p), Ok(out)) = (std::env::var("FP_MODEL"), std::env::var("FP_PATCH"), std::env::var("FP_OUT")) {
        let options = apply::ApplyOptions {
            sync: std::env::var("FP_SYNC").as_deref() != Ok("0"),
            hash_cache: std::env::var_os("FP_CACHE").map(PathBuf::from),
            ..Default::default()
        };
        let start = peak_rss_kib();
        let t = Instant::now();
        apply::apply_with(Path::new(&model), &[PathBuf::from(p)], Path::new(&out), &options).unwrap();
        println!("{} {} {start}", t.elapsed().as_secs_f64(), peak_rss_kib());
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (model, what) = model_dir(scratch.path());
    let ckpt = Checkpoint::open(&model).unwrap();
    let name = |l: usize| format!("model.layers.{l}.mlp.down_proj.weight");
    let shape = ckpt.tensor(&name(3)).unwrap().shape.to_vec();
    let (rows, cols) = (shape[0], shape[1]);
    let factors: Vec<Factors> =
        LAYERS.iter().map(|&l| Factors { rank: 1, u: values(rows, 10 + l as u64, 0.01), v: values(cols, 20 + l as u64, 1.0) }).collect();
    let bases: Vec<BaseTensor> = LAYERS.iter().map(|&l| BaseTensor::of(&ckpt.tensor(&name(l)).unwrap())).collect();
    let manifest = || {
        Manifest::new(
            ModelInfo { name: "SmolLM2-135M-Instruct".into(), family: "llama".into() },
            Method { name: "rome".into(), hyperparameters: Default::default() },
        )
    };
    let full: Vec<Vec<f32>> = factors.iter().map(|f| product(f, &shape)).collect();
    let masked: Vec<Vec<f32>> = LAYERS
        .iter()
        .zip(&full)
        .map(|(&l, d)| {
            let mut d = d.clone();
            rect::mask(&mut d, &ckpt.tensor(&name(l)).unwrap().to_f32(), RECT_K, 1e-6);
            d
        })
        .collect();
    let cases: Vec<(&str, Vec<Delta>)> = vec![
        ("dense f32 ΔW", full.iter().map(|d| Delta::Dense(d.clone())).collect()),
        ("dense bf16 ΔW (rounded)", full.iter().map(|d| Delta::Dense(d.iter().map(|&v| Dtype::BF16.round(v)).collect())).collect()),
        ("sparse (RECT-masked, explicit)", masked.iter().map(|d| Delta::explicit(d.clone())).collect()),
        ("low-rank f32 factors", factors.iter().map(|f| Delta::LowRank(vec![f.clone()])).collect()),
        ("low-rank + RECT (implicit)", factors.iter().map(|f| Delta::LowRankRect { factors: f.clone(), k: RECT_K, eps: 1e-6 }).collect()),
    ];
    println!("model: {what} ({})", model.display());
    println!("edit: rank-1 update of {} down_proj {:?} (5 layers), RECT k = {RECT_K}%", LAYERS.len(), shape);
    println!("\n| encoding | patch bytes (1 fact) | raw payload bytes |\n| --- | ---: | ---: |");
    let mut rect_patch = None;
    for (label, deltas) in cases {
        let bytes = patch::encode(manifest(), bases.iter().cloned().zip(deltas).collect()).unwrap().bytes;
        let p = patch::Patch::from_bytes(bytes.clone(), Path::new(label)).unwrap();
        let raw: u64 = p.manifest().entries.iter().map(|e| e.raw_len).sum();
        println!("| {label} | {} | {raw} |", bytes.len());
        let path = scratch.path().join(format!("{}.fp", label.split_whitespace().next().unwrap()));
        std::fs::write(&path, &bytes).unwrap();
        if label.starts_with("low-rank + RECT") {
            rect_patch = Some(path);
        }
    }
    let rect_patch = rect_patch.unwrap();
    let size: u64 = ckpt.files().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    println!(
        "\ncheckpoint: {size} bytes; largest touched tensor: {} bytes stored, {} bytes as f32",
        rows * cols * ckpt.tensor(&name(3)).unwrap().dtype.size(),
        rows * cols * 4
    );
    println!("\nRun 0 hashes the base (cold hash cache); runs 1-4 read its tensor hashes from the cache.");
    println!("\n| run | cp -r (s) | cp -r + sync (s) | apply (s) | apply --no-sync (s) | apply vs cp+sync | --no-sync vs cp | apply peak RSS (MiB) | RSS before apply (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    assert!(std::process::Command::new("sync").status().unwrap().success());
    let cache = scratch.path().join("hashes");
    // Applies the RECT patch in a child process: (seconds, peak RSS MiB, RSS before MiB).
    let apply = |out: &Path, sync: bool| -> (f64, f64, f64) {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("FP_MODEL", &model)
            .env("FP_PATCH", &rect_patch)
            .env("FP_OUT", out)
            .env("FP_SYNC", if sync { "1" } else { "0" })
            .env("FP_CACHE", &cache)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&child.stdout);
        let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
        assert_eq!(v.len(), 3, "child failed: {}", String::from_utf8_lossy(&child.stderr));
        std::fs::remove_dir_all(out).unwrap();
        (v[0], v[1] / 1024.0, v[2] / 1024.0)
    };
    for run in 0..5 {
        let cp_out = scratch.path().join(format!("cp{run}"));
        let t = Instant::now();
        assert!(std::process::Command::new("cp").arg("-r").arg(&model).arg(&cp_out).status().unwrap().success());
        let cp = t.elapsed().as_secs_f64();
        assert!(std::process::Command::new("sync").status().unwrap().success());
        let cp_sync = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&cp_out).unwrap();
        let (secs, rss, start) = apply(&scratch.path().join(format!("ap{run}")), true);
        let (fast, _, _) = apply(&scratch.path().join(format!("apn{run}")), false);
        println!("| {run} | {cp:.3} | {cp_sync:.3} | {secs:.3} | {fast:.3} | {:.2} | {:.2} | {rss:.1} | {start:.1} |", secs / cp_sync, fast / cp);
    }
}
