//! `apply` onto the SmolLM2-135M-Instruct Q4_1 GGUF (98 MB) against `cp` of the same file, in
//! the same run: the demo's MEMIT patch (compiled on the imported folder, RECT 40%) applied with
//! the touched tensors stored each way `--touched-as` offers, each by the `factpatch apply`
//! command in a child process, as cp is: wall clock, CPU time and peak RSS. Then, for each way,
//! how much of the edit the stored tensors keep and what the edited model answers. Prints tables.
//!
//! Run: `cargo bench --bench gguf_apply` (after `fixtures/setup.sh`); `FACTPATCH_BENCH_RUNS=N`
//! timed runs (default 5).

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use factpatch::apply::{ApplyOptions, Overlay, Stack};
use factpatch::checkpoint::{Checkpoint, Tensors};
use factpatch::gguf::{self, OutDtype, TouchedAs};
use factpatch::model::{generate, Model, Sampling};
use factpatch::tokenize::Tokenizer;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

const FACT: &str = "{} is located in the city of|The Eiffel Tower|Rome";
const PROMPT: &str = "The Eiffel Tower is located in the city of";
const MODES: [TouchedAs; 3] = [TouchedAs::Own, TouchedAs::F16, TouchedAs::F32];

/// The `--touched-as` value of a mode.
fn name(mode: TouchedAs) -> &'static str {
    match mode {
        TouchedAs::Own => "own",
        TouchedAs::F16 => "f16",
        TouchedAs::F32 => "f32",
    }
}

/// Runs `cmd` to completion, its standard output discarded: wall-clock seconds, CPU seconds (user +
/// system) and peak RSS in MiB of the process.
fn timed(cmd: &mut Command) -> (f64, f64, f64) {
    let t = Instant::now();
    #[allow(clippy::zombie_processes, reason = "reaped by wait4 below, which also gives its resource use")]
    let child = cmd.stdout(Stdio::null()).spawn().unwrap();
    let (mut status, mut r) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, filling the zeroed rusage and status it is given.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut r) };
    let wall = t.elapsed().as_secs_f64();
    assert!(pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{cmd:?} failed");
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (wall, secs(r.ru_utime) + secs(r.ru_stime), r.ru_maxrss as f64 / 1024.0)
}

fn main() {
    let runs: usize = std::env::var("FACTPATCH_BENCH_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(5);
    let model = common::smollm2_gguf();
    let scratch = tempfile::tempdir().unwrap();
    let patch = scratch.path().join("eiffel.fpatch");
    // Compiled by the command too: a child's peak RSS counts the memory of the process it was
    // started from, which must stay small until the timed runs are done.
    let root = common::root();
    let compile = Command::new(env!("CARGO_BIN_EXE_factpatch"))
        .args(["compile", "--method", "memit", "--rect", "40", "--stats-tokens", "20000", "--fact", FACT, "--model"])
        .arg(common::smollm2())
        .arg("--corpus")
        .arg(root.join("fixtures/corpus/sotu.txt"))
        .arg("--cache")
        .arg(root.join("target/test-stats"))
        .arg("--out")
        .arg(&patch)
        .status()
        .unwrap();
    assert!(compile.success(), "factpatch compile failed");
    let stack = Stack::load(std::slice::from_ref(&patch)).unwrap();
    let size = std::fs::metadata(&model).unwrap().len();
    println!("model: {} ({size} bytes)", model.display());
    println!("patch: MEMIT, RECT 40%, `{FACT}`: {} bytes, {} tensors touched", std::fs::metadata(&patch).unwrap().len(), stack.touched().count());
    println!("load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());

    // The hash cache lives in the scratch folder: the first apply fills it.
    let cache = scratch.path().join("cache");
    let apply = |mode: TouchedAs, sync: bool, out: &Path| -> (f64, f64, f64) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_factpatch"));
        cmd.env("FACTPATCH_CACHE", &cache).arg("apply").arg("--model").arg(&model).arg("--patch").arg(&patch).arg("--out").arg(out);
        cmd.args(["--touched-as", name(mode)]).args((!sync).then_some("--no-sync"));
        let measured = timed(&mut cmd);
        std::fs::remove_file(out).unwrap();
        measured
    };
    let sync = || assert!(Command::new("sync").status().unwrap().success());
    let (secs, _, rss) = apply(gguf::DEFAULT_TOUCHED_AS, false, &scratch.path().join("cold.gguf"));
    println!("\nfirst apply (cold hash cache: every tensor dequantized and hashed): {secs:.3} s, peak RSS {rss:.1} MiB");
    println!("\nRuns read the base's tensor hashes from the cache. Seconds: wall clock, and CPU (user + system) of the child");
    println!("process, which the machine's load does not inflate. Apply is --no-sync unless synced, as cp is.");
    println!("\n| run | cp | cp CPU | cp + sync | apply own | f16 | f32 | f16 CPU | f16 synced | f16 / cp | f16 / cp, CPU | f16 synced / (cp + sync) | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for run in 0..runs {
        sync();
        let copy = scratch.path().join("copy.gguf");
        let t = Instant::now();
        let (cp, cp_cpu, _) = timed(Command::new("cp").arg(&model).arg(&copy));
        sync();
        let cp_sync = t.elapsed().as_secs_f64();
        std::fs::remove_file(&copy).unwrap();
        let mut walls = Vec::new();
        let (mut f16_cpu, mut rss) = (0.0, 0f64);
        for mode in MODES {
            sync();
            let (secs, cpu, peak) = apply(mode, false, &scratch.path().join(format!("{}.gguf", name(mode))));
            walls.push(secs);
            rss = rss.max(peak);
            if mode == TouchedAs::F16 {
                f16_cpu = cpu;
            }
        }
        sync();
        let (synced, _, _) = apply(TouchedAs::F16, true, &scratch.path().join("synced.gguf"));
        println!(
            "| {run} | {cp:.3} | {cp_cpu:.3} | {cp_sync:.3} | {:.3} | {:.3} | {:.3} | {f16_cpu:.3} | {synced:.3} | {:.2} | {:.2} | {:.2} | {rss:.1} |",
            walls[0],
            walls[1],
            walls[2],
            walls[1] / cp,
            f16_cpu / cp_cpu,
            synced / cp_sync
        );
    }

    // What each way keeps of the edit: the touched tensors as stored, dequantized, against the
    // f32 base and base + delta as apply writes them into the imported folder.
    let folder = Checkpoint::open(&common::smollm2()).unwrap();
    let target = Overlay::new(&folder, &stack).unwrap();
    println!("\nΔ intended: base + delta − base in the f32 folder; Δ stored: the output's dequantized tensor − base.");
    println!("\n| --touched-as | output bytes | ⟨Δ stored, Δ intended⟩ / ‖Δ intended‖² | ‖Δ stored − Δ intended‖ / ‖Δ intended‖ | greedy continuation of \"{PROMPT}\" |");
    println!("| --- | ---: | ---: | ---: | --- |");
    let opts = ApplyOptions { sync: false, hash_cache: Some(cache.join("hashes")), ..Default::default() };
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
        let ids = generate(&m, &[tok.prompt_ids(PROMPT).unwrap()], 6, Sampling::Greedy, &[]).unwrap();
        let text = tok.decode(&ids[0]).unwrap().replace('\n', " ");
        println!("| {} | {} | {:.3} | {:.3} | {text:?} |", name(mode), bytes.len(), dot / norm, (err / norm).sqrt());
        std::fs::remove_dir_all(&imported).unwrap();
    }
}
