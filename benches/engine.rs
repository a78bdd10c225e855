//! Forward-pass throughput on SmolLM2 and the GEMM rates behind it. Prints a table.
//!
//! Run: `cargo bench --bench engine` (after `fixtures/get-model.sh`). OpenBLAS reads
//! `OPENBLAS_CORETYPE` when it loads, so compare kernels with e.g.
//! `OPENBLAS_CORETYPE=SkylakeX cargo bench --bench engine`.

use candle_core::{Device, Tensor};
use factpatch::model::{Batch, Hooks, Model};
use ndarray::Array2;
use std::path::PathBuf;
use std::time::Instant;

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    factpatch::init_process();
    let dir = std::env::var_os("FACTPATCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/SmolLM2-135M-Instruct"));
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{e}\n(run fixtures/get-model.sh first)"));
    let cfg = &model.config;
    println!("OPENBLAS_CORETYPE={}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "<unset>".into()));
    println!("\n| GEMM f32 [m×k]·[k×n] | m | k | n | GFLOP/s |\n|---|---|---|---|---|");
    for (m, k, n) in [(1024, cfg.hidden_size, cfg.intermediate_size), (1024, cfg.intermediate_size, cfg.hidden_size)] {
        let flops = 2.0 * (m * k * n) as f64;
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let s = best_of(5, || drop(a.matmul(&wt).unwrap()));
        println!("| candle matmul | {m} | {k} | {n} | {:.1} |", flops / s / 1e9);
        let lin = factpatch::model::ops::Linear { weight: w.clone(), bias: None };
        let s = best_of(5, || drop(candle_core::Module::forward(&lin, &a).unwrap()));
        println!("| factpatch Linear (frozen) | {m} | {k} | {n} | {:.1} |", flops / s / 1e9);
        let aa = Array2::from_shape_vec((m, k), a.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
        let ww = Array2::from_shape_vec((n, k), w.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
        let s = best_of(5, || drop(aa.dot(&ww.t())));
        println!("| OpenBLAS sgemm (ndarray) | {m} | {k} | {n} | {:.1} |", flops / s / 1e9);
    }

    let (b, t) = (8, 128);
    let seqs: Vec<Vec<u32>> = (0..b).map(|i| (0..t).map(|j| ((i * 7919 + j * 104729) % 40000 + 100) as u32).collect()).collect();
    let batch = Batch::right_padded(&seqs);
    let per_layer = 2.0
        * (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            + cfg.num_heads * cfg.head_dim * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.intermediate_size) as f64;
    let head = 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64;
    println!("\n| forward, batch {b} × {t} | tokens/s | GEMM GFLOP/s (weights only) |\n|---|---|---|");
    for (label, stop, logits) in [("layers 0-8", Some(8), false), ("all layers", None, false), ("all layers + logits", None, true)] {
        let hooks = Hooks { stop_after: stop, ..Hooks::default() };
        let s = best_of(3, || {
            let tr = model.forward(&batch, &hooks, None).unwrap();
            if logits {
                drop(model.logits(&tr.hidden).unwrap());
            }
        });
        let layers = stop.map_or(cfg.num_layers, |l| l + 1) as f64;
        let flops = (b * t) as f64 * (layers * per_layer + if logits { head } else { 0.0 });
        println!("| {label} | {:.0} | {:.1} |", (b * t) as f64 / s, flops / s / 1e9);
    }
}
