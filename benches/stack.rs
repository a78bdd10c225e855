//! Deployment stacks on SmolLM2-135M: the first 1,000 records of
//! `fixtures/data/edit/counterfact-easyedit-10k.json` as a chain of 100 MEMIT patches of 10
//! facts each, every one compiled on top of the ones before (`compile --on`), then, for stacks of
//! the first 1, 10 and 100 patches: the chain's bytes against the merged patch's (and the
//! encodings `merge` chose), the merge time, `apply` of the chain and of the merged patch (time
//! and peak RSS, each in a child process, `--no-sync`), and the largest difference in ulps
//! between the two applied models' weights.
//!
//! Merge and apply costs depend only on the tensors' shapes and the patches' ranks, not on how
//! well the edits succeed, so the chain is compiled cheaply: RECT off (plain low-rank patches,
//! rank 10 per patch and layer), one optimisation step per fact (`v_steps=1`) and one context
//! template (`templates=[[1,5]]`), MEMIT's default layers. The chain is kept in
//! `target/bench-stack/` and reused by later runs (delete it to compile it again).
//!
//! Run: `cargo bench --bench stack` (after `fixtures/setup.sh`); `FACTPATCH_BENCH_STACKS`
//! chooses the stack lengths (default `1,10,100`).

use factpatch::apply::{self, ApplyOptions, MergeOptions};
use factpatch::atomic::{self, Policy};
use factpatch::checkpoint::Checkpoint;
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::{request, Method};
use factpatch::patch::Patch;
use std::path::{Path, PathBuf};
use std::time::Instant;

const FACTS_PER_PATCH: usize = 10;
const SETTINGS: [&str; 4] = ["rect_k=100", "v_steps=1", "templates=[[1,5]]", "seed=0"];

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmHWM")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The chain of `n` patches in `dir`, compiling those not there yet, each on top of the ones before.
fn chain(root: &Path, model: &Path, dir: &Path, n: usize) -> Vec<PathBuf> {
    // The whole file holds a few facts edited twice with different targets; its first records do not.
    let text = std::fs::read_to_string(root.join("fixtures/data/edit/counterfact-easyedit-10k.json")).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let first = dir.join("requests.json");
    atomic::write(&first, &serde_json::to_vec(&records[..n * FACTS_PER_PATCH]).unwrap(), &Policy::rewrite()).unwrap();
    let reqs = request::read(&first).unwrap();
    let mut paths: Vec<PathBuf> = Vec::with_capacity(n);
    for i in 0..n {
        let path = dir.join(format!("{i:03}.fpatch"));
        if !path.exists() {
            let t = Instant::now();
            let spec = Spec {
                on: paths.clone(),
                overrides: SETTINGS.iter().map(|s| s.to_string()).collect(),
                stats: StatsSource::Corpus { files: vec![root.join("fixtures/corpus/sotu.txt")], tokens: 100_000 },
                ..Spec::new(model, Method::Memit)
            };
            let c = Compiler::open(&spec).unwrap().patch(&reqs[i * FACTS_PER_PATCH..(i + 1) * FACTS_PER_PATCH]).unwrap();
            atomic::write(&path, &c.patch.bytes, &Policy::new()).unwrap();
            eprintln!("compiled {} on {i} patches in {:.1} s", path.display(), t.elapsed().as_secs_f64());
        }
        paths.push(path);
    }
    paths
}

/// Applies `patches` to `model` in a child process (this bench re-run in child mode):
/// (seconds, peak RSS in MiB).
fn apply_child(model: &Path, patches: &[PathBuf], out: &Path, cache: &Path) -> (f64, f64) {
    let list = std::env::join_paths(patches).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("FP_MODEL", model)
        .env("FP_PATCHES", list)
        .env("FP_OUT", out)
        .env("FP_CACHE", cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&child.stdout);
    let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(v.len(), 2, "child failed: {}", String::from_utf8_lossy(&child.stderr));
    (v[0], v[1] / 1024.0)
}

/// The largest distance in ulps between the F32 tensors `names` of two checkpoints.
fn max_ulps(a: &Path, b: &Path, names: &[String]) -> u64 {
    let (a, b) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    // f32 bits as a monotonic integer line, so that the distance counts representable values.
    let line = |x: f32| if x.is_sign_negative() { -((x.to_bits() & 0x7fff_ffff) as i64) } else { x.to_bits() as i64 };
    let mut max = 0;
    for n in names {
        let (x, y) = (a.tensor(n).unwrap().to_f32(), b.tensor(n).unwrap().to_f32());
        max = x.iter().zip(y.iter()).map(|(&x, &y)| line(x).abs_diff(line(y))).fold(max, u64::max);
    }
    max
}

fn main() {
    factpatch::init_process();
    // Child mode: apply the patches and report the time and this process's peak RSS.
    if let (Some(model), Some(list), Some(out), Some(cache)) =
        (std::env::var_os("FP_MODEL"), std::env::var_os("FP_PATCHES"), std::env::var_os("FP_OUT"), std::env::var_os("FP_CACHE"))
    {
        let patches: Vec<PathBuf> = std::env::split_paths(&list).collect();
        let options = ApplyOptions { sync: false, hash_cache: Some(cache.into()), ..Default::default() };
        let t = Instant::now();
        apply::apply_with(Path::new(&model), &patches, Path::new(&out), &options).unwrap();
        println!("{} {}", t.elapsed().as_secs_f64(), peak_rss_kib());
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("fixtures/models/SmolLM2-135M-Instruct");
    assert!(model.join("config.json").is_file(), "run fixtures/setup.sh first");
    let stacks: Vec<usize> = std::env::var("FACTPATCH_BENCH_STACKS")
        .unwrap_or_else(|_| "1,10,100".into())
        .split(',')
        .map(|s| s.trim().parse().expect("FACTPATCH_BENCH_STACKS: stack lengths, e.g. 1,10,100"))
        .collect();
    let dir = root.join("target/bench-stack").join(SETTINGS.join(",").replace(['[', ']'], ""));
    let all = chain(root, &model, &dir, stacks.iter().copied().max().unwrap_or(0));
    let scratch = tempfile::tempdir_in(root.join("target")).unwrap();
    let cache = scratch.path().join("hashes");
    // Warm the tensor-hash cache (the model's identity) and the page cache before timing.
    apply_child(&model, &all[..1], &scratch.path().join("warm"), &cache);
    println!("model: {} (F32); chain: {} patches of {FACTS_PER_PATCH} facts, MEMIT {}", model.display(), all.len(), SETTINGS.join(" "));
    println!(
        "\n| patches | facts | chain bytes | merged bytes | merged entries | merge (s) | apply chain (s) | chain peak RSS (MiB) | apply merged (s) | merged peak RSS (MiB) | max ulps |"
    );
    println!("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &n in &stacks {
        let patches = &all[..n];
        let chain_bytes: u64 = patches.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
        let merged = scratch.path().join(format!("merged-{n}.fpatch"));
        let t = Instant::now();
        let summary = apply::merge_with(patches, &merged, &MergeOptions::default()).unwrap();
        let merge_s = t.elapsed().as_secs_f64();
        let m = Patch::read(&merged).unwrap();
        let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
        m.manifest().entries.iter().for_each(|e| *kinds.entry(e.encoding.kind()).or_default() += 1);
        let entries = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
        let (out_chain, out_merged) = (scratch.path().join(format!("chain-{n}")), scratch.path().join(format!("merged-{n}")));
        let (chain_s, chain_rss) = apply_child(&model, patches, &out_chain, &cache);
        let (merged_s, merged_rss) = apply_child(&model, &[merged], &out_merged, &cache);
        let names: Vec<String> = m.manifest().entries.iter().map(|e| e.tensor.clone()).collect();
        let ulps = max_ulps(&out_chain, &out_merged, &names);
        println!(
            "| {n} | {} | {chain_bytes} | {} | {entries} | {merge_s:.2} | {chain_s:.2} | {chain_rss:.0} | {merged_s:.2} | {merged_rss:.0} | {ulps} |",
            n * FACTS_PER_PATCH,
            summary.bytes
        );
        std::fs::remove_dir_all(&out_chain).unwrap();
        std::fs::remove_dir_all(&out_merged).unwrap();
    }
}
