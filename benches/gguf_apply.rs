//! `apply` onto the SmolLM2-135M-Instruct Q4_1 GGUF (98 MB) against `cp` of the same file, in
//! the same run: the demo's MEMIT patch (compiled on the imported folder, RECT 40%) applied with
//! the touched tensors stored each way `--touched-as` offers, timed in a child process (peak RSS
//! included); then, for each way, how much of the edit the stored tensors keep and what the
//! edited model answers. Prints tables.
//!
//! Run: `cargo bench --bench gguf_apply` (after `fixtures/setup.sh`); `FACTPATCH_BENCH_RUNS=N`
//! timed runs (default 5).

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use factpatch::apply::{ApplyOptions, Overlay, Stack};
use factpatch::checkpoint::{Checkpoint, Tensors};
use factpatch::compile::Compiler;
use factpatch::edit::{request, Method};
use factpatch::gguf::{self, OutDtype, TouchedAs};
use factpatch::model::{generate, Model, Sampling};
use factpatch::tokenize::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

const FACT: &str = "{} is located in the city of|The Eiffel Tower|Rome";
const PROMPT: &str = "The Eiffel Tower is located in the city of";
const MODES: [TouchedAs; 3] = [TouchedAs::Own, TouchedAs::F16, TouchedAs::F32];

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmHWM")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The `--touched-as` value of a mode.
fn name(mode: TouchedAs) -> &'static str {
    match mode {
        TouchedAs::Own => "own",
        TouchedAs::F16 => "f16",
        TouchedAs::F32 => "f32",
    }
}

fn main() {
    // Child mode: one apply, printing its seconds and this process's peak RSS (KiB).
    if let (Ok(patch), Ok(out), Ok(mode)) = (std::env::var("FP_PATCH"), std::env::var("FP_OUT"), std::env::var("FP_MODE")) {
        let mode = MODES.into_iter().find(|m| name(*m) == mode).unwrap();
        let options = ApplyOptions {
            sync: std::env::var("FP_SYNC").as_deref() == Ok("1"),
            hash_cache: std::env::var_os("FP_CACHE").map(PathBuf::from),
            ..Default::default()
        };
        let t = Instant::now();
        gguf::apply(&common::smollm2_gguf(), &[PathBuf::from(patch)], Path::new(&out), &options, mode).unwrap();
        println!("{} {}", t.elapsed().as_secs_f64(), peak_rss_kib());
        return;
    }
    let runs: usize = std::env::var("FACTPATCH_BENCH_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(5);
    let model = common::smollm2_gguf();
    let scratch = tempfile::tempdir().unwrap();
    let patch = scratch.path().join("eiffel.fpatch");
    let mut compiler = Compiler::open(&common::smollm2_spec(Method::Memit, &[])).unwrap();
    std::fs::write(&patch, compiler.patch(&[request::parse_fact(FACT).unwrap()]).unwrap().patch.bytes).unwrap();
    let stack = Stack::load(std::slice::from_ref(&patch)).unwrap();
    let size = std::fs::metadata(&model).unwrap().len();
    println!("model: {} ({size} bytes)", model.display());
    println!("patch: MEMIT, RECT 40%, `{FACT}`: {} bytes, {} tensors touched", std::fs::metadata(&patch).unwrap().len(), stack.touched().count());
    println!("load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());

    let cache = scratch.path().join("hashes");
    // One apply in a child process: (seconds, peak RSS MiB).
    let apply = |mode: TouchedAs, sync: bool, out: &Path| -> (f64, f64) {
        let child = Command::new(std::env::current_exe().unwrap())
            .env("FP_PATCH", &patch)
            .env("FP_OUT", out)
            .env("FP_MODE", name(mode))
            .env("FP_SYNC", if sync { "1" } else { "0" })
            .env("FP_CACHE", &cache)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&child.stdout);
        let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
        assert_eq!(v.len(), 2, "child failed: {}", String::from_utf8_lossy(&child.stderr));
        (v[0], v[1] / 1024.0)
    };
    let sync = || assert!(Command::new("sync").status().unwrap().success());
    let cold = scratch.path().join("cold.gguf");
    let (secs, rss) = apply(gguf::DEFAULT_TOUCHED_AS, false, &cold);
    std::fs::remove_file(&cold).unwrap();
    println!("\nfirst apply (cold hash cache: every tensor dequantized and hashed): {secs:.3} s, peak RSS {rss:.1} MiB");
    println!("\nRuns read the base's tensor hashes from the cache. cp is std::fs::copy; times in seconds.");
    println!("\n| run | cp | cp + sync | apply --no-sync own | f16 | f32 | apply own (synced) | f16 | f32 | --no-sync f16 / cp | synced f16 / (cp + sync) | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for run in 0..runs {
        sync();
        let copy = scratch.path().join("copy.gguf");
        let t = Instant::now();
        std::fs::copy(&model, &copy).unwrap();
        let cp = t.elapsed().as_secs_f64();
        sync();
        let cp_sync = t.elapsed().as_secs_f64();
        std::fs::remove_file(&copy).unwrap();
        let mut row = vec![cp, cp_sync];
        let mut rss: f64 = 0.0;
        for synced in [false, true] {
            for mode in MODES {
                sync();
                let out = scratch.path().join(format!("{}-{synced}.gguf", name(mode)));
                let (secs, peak) = apply(mode, synced, &out);
                std::fs::remove_file(&out).unwrap();
                row.push(secs);
                rss = rss.max(peak);
            }
        }
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.3}")).collect();
        println!("| {run} | {} | {:.2} | {:.2} | {rss:.1} |", cells.join(" | "), row[3] / row[0], row[6] / row[1]);
    }

    // What each way keeps of the edit: the touched tensors as stored, dequantized, against the
    // f32 base and base + delta as apply writes them into the imported folder.
    let folder = Checkpoint::open(&common::smollm2()).unwrap();
    let target = Overlay::new(&folder, &stack).unwrap();
    println!("\nΔ intended: base + delta − base in the f32 folder; Δ stored: the output's dequantized tensor − base.");
    println!("\n| --touched-as | output bytes | ⟨Δ stored, Δ intended⟩ / ‖Δ intended‖² | ‖Δ stored − Δ intended‖ / ‖Δ intended‖ | greedy continuation of \"{PROMPT}\" |");
    println!("| --- | ---: | ---: | ---: | --- |");
    let opts = ApplyOptions { sync: false, hash_cache: Some(cache.clone()), ..Default::default() };
    for mode in MODES {
        let out = scratch.path().join(format!("{}.gguf", name(mode)));
        gguf::apply(&model, std::slice::from_ref(&patch), &out, &opts, mode).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let content = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        let (mut dot, mut norm, mut err) = (0f64, 0f64, 0f64);
        for hf in stack.touched() {
            let layer = hf.strip_prefix("model.layers.").and_then(|r| r.strip_suffix(".mlp.down_proj.weight")).expect("MEMIT edits down_proj");
            let q = content.tensor(&mut std::io::Cursor::new(&bytes), &format!("blk.{layer}.ffn_down.weight"), &Device::Cpu).unwrap();
            let stored: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (w, t) = (folder.tensor(hf).unwrap().to_f32(), target.tensor(hf).unwrap().to_f32());
            for ((s, w), t) in stored.iter().zip(w.iter()).zip(t.iter()) {
                let (got, want) = ((s - w) as f64, (t - w) as f64);
                dot += got * want;
                norm += want * want;
                err += (got - want) * (got - want);
            }
        }
        let imported = scratch.path().join(format!("{}-import", name(mode)));
        gguf::import(&out, &imported, OutDtype::F32).unwrap();
        let (m, tok) = (Model::load(&imported).unwrap(), Tokenizer::open(&imported).unwrap());
        let ids = generate(&m, &[tok.ids(PROMPT).unwrap()], 6, Sampling::Greedy, &[]).unwrap();
        let text = tok.decode(&ids[0]).unwrap().replace('\n', " ");
        println!("| {} | {} | {:.3} | {:.3} | {text:?} |", name(mode), bytes.len(), dot / norm, (err / norm).sqrt());
        std::fs::remove_dir_all(&imported).unwrap();
    }
}
