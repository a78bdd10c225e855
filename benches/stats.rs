//! Key-statistics throughput on SmolLM2, layers 4-8 at seq-len 512, against the GEMM-bound
//! limit measured on this machine. Prints a table.
//!
//! Run: `cargo bench --bench stats` (after `fixtures/get-model.sh` and `fixtures/get-corpus.sh`;
//! `FACTPATCH_MODEL`, `FACTPATCH_CORPUS` and `STATS_TOKENS` override the defaults). The forward
//! pass multiplies with candle's own GEMM; the rank-k updates call OpenBLAS, which picks its
//! kernels from `OPENBLAS_CORETYPE` when it loads: compare e.g. `OPENBLAS_CORETYPE=SkylakeX`.

use candle_core::{Device, Tensor};
use factpatch::model::{Batch, Hooks, Model};
use factpatch::stats;
use factpatch::tokenize::Tokenizer;
use indicatif::ProgressBar;
use std::path::PathBuf;
use std::time::Instant;

fn secs<F: FnOnce() -> R, R>(f: F) -> (f64, R) {
    let t = Instant::now();
    let r = f();
    (t.elapsed().as_secs_f64(), r)
}

/// This process's CPU time (user + system), from /proc/self/stat, in seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Wall and CPU seconds of `f`.
fn timed<F: FnOnce()>(f: F) -> (f64, f64) {
    let c = cpu_secs();
    let (s, ()) = secs(f);
    (s, cpu_secs() - c)
}

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    (0..reps).map(|_| secs(&mut f).0).fold(f64::INFINITY, f64::min)
}

fn main() {
    factpatch::init_process();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let env_path = |k: &str, default: PathBuf| std::env::var_os(k).map(PathBuf::from).unwrap_or(default);
    let dir = env_path("FACTPATCH_MODEL", root.join("fixtures/models/SmolLM2-135M-Instruct"));
    let corpus = env_path("FACTPATCH_CORPUS", root.join("fixtures/corpus/sotu.txt"));
    let budget: u64 = std::env::var("STATS_TOKENS").ok().and_then(|s| s.parse().ok()).unwrap_or(16384);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{e}\n(run fixtures/get-model.sh first)"));
    let cfg = &model.config;
    let (layers, seq_len) = (vec![4, 5, 6, 7, 8], 512);
    let (h, d) = (cfg.hidden_size, cfg.intermediate_size);
    println!("OPENBLAS_CORETYPE={}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "<unset>".into()));
    println!("rayon threads {}, corpus {}", rayon::current_num_threads(), corpus.display());

    // The kernels: candle f32 GEMM (forward) and OpenBLAS f64 rank-k update (accumulation).
    let m = stats::BATCH_TOKENS;
    let mut sgemm = 0f64;
    for (k, n) in [(h, d), (d, h)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        let s = best_of(5, || drop(a.matmul(&w).unwrap()));
        sgemm += s / (2.0 * (m * k * n) as f64);
    }
    let sgemm_rate = 1.0 / (sgemm / 2.0);
    let x = Tensor::randn(0f32, 1.0, (1, m, d), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rows: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut c = vec![0f64; d * d];
    let syrk_s = best_of(3, || stats::syrk_upper(&mut c, &rows, d));
    let syrk_rate = (d * d * m) as f64 / syrk_s; // d(d+1)k flops for the upper triangle
    println!("\n| kernel | shape | GFLOP/s |\n|---|---|---|");
    println!("| candle sgemm (forward) | [{m}×{h}]·[{h}×{d}] and back | {:.1} |", sgemm_rate / 1e9);
    println!("| OpenBLAS dsyrk (accumulate) | [{d}×{m}]·[{m}×{d}], upper | {:.1} |", syrk_rate / 1e9);

    // The work: SOTU chunks of 512 tokens, as `factpatch stats` plans them.
    let tok = Tokenizer::open(&dir).unwrap();
    let corpus = stats::Corpus::read(&[corpus]).unwrap_or_else(|e| panic!("{e}\n(run fixtures/get-corpus.sh first)"));
    let ids = |d: &str| Ok(tok.ids(d)?);
    let (tok_s, chunks) = secs(|| stats::sample(&corpus.documents, ids, seq_len, 0, Some(budget)).unwrap());
    println!("\nsampled {} chunks of {} documents in {tok_s:.2} s (tokenizing only the documents needed)", chunks.len(), corpus.documents.len());
    let plan = stats::plan(chunks, stats::Shard::ALL);
    let n = plan.tokens as f64;

    let run = |hooks: &Hooks| {
        timed(|| {
            for b in &plan.batches {
                drop(model.forward(&Batch::right_padded(b), hooks, None).unwrap());
            }
        })
    };
    let fwd = run(&Hooks { stop_after: Some(8), ..Hooks::default() });
    let cap = run(&Hooks { keys: layers.clone(), stop_after: Some(8), ..Hooks::default() });
    let acc = timed(|| drop(stats::accumulate(&model, &layers, tok.prefix(), &plan.batches, &ProgressBar::hidden()).unwrap()));

    // GEMM-bound limit: weight GEMMs and attention to layer 8 at sgemm rate, updates at dsyrk rate.
    let per_layer = 2.0 * (h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h + 3 * h * d) as f64;
    let attention = 2.0 * 2.0 * (seq_len as f64 / 2.0) * (cfg.num_heads * cfg.head_dim) as f64;
    let fwd_flops = 9.0 * (per_layer + attention);
    let upd_flops = layers.len() as f64 * (d * d) as f64;
    let limit = 1.0 / (fwd_flops / sgemm_rate + upd_flops / syrk_rate);
    println!("\nper token: forward to layer 8 {:.1} MFLOP, updates {:.1} MFLOP (f64, upper triangles)", fwd_flops / 1e6, upd_flops / 1e6);
    let cores = rayon::current_num_threads() as f64;
    println!(
        "\n| {} tokens, layers 4-8, seq-len {seq_len}, {} batches | wall s | tokens/s | CPU s | tokens/s at {cores} busy cores (from CPU time) |\n|---|---|---|---|---|",
        plan.tokens,
        plan.batches.len()
    );
    for (label, (wall, cpu)) in [("forward to layer 8", fwd), ("forward + capture keys", cap), ("forward + accumulate (stats)", acc)] {
        println!("| {label} | {wall:.2} | {:.0} | {cpu:.2} | {:.0} |", n / wall, n * cores / cpu);
    }
    println!("| GEMM-bound limit | {:.2} | {limit:.0} | | |", n / limit);
    println!(
        "\naccumulation share {:.0}% of the stats CPU time; stats at {:.2}× the GEMM-bound time (wall), {:.2}× (CPU); peer (EasyEdit) ~102 tokens/s",
        100.0 * (acc.1 - cap.1).max(0.0) / acc.1,
        acc.0 / (n / limit),
        acc.1 / cores / (n / limit)
    );
}
