//! Do edits survive quantization? The first `FACTPATCH_BENCH_RECORDS` (default 50) CounterFact
//! records of `fixtures/data/edit/counterfact-easyedit-10k.json`, each a single edit
//! (`FACTPATCH_BENCH_METHOD`, default `memit`) of an unedited folder imported from a GGUF
//! (`FACTPATCH_BENCH_MODEL`: `smollm2`, the default, from its Q4_1 GGUF with SOTU statistics, or
//! `gemma3-270m`, from its Q4_K_M GGUF with Brown statistics; 100k tokens, as the demo), once per
//! RECT setting of `FACTPATCH_BENCH_RECT` (default `none,40`), evaluated by `eval`'s CounterFact
//! metrics (efficacy, paraphrase, neighbourhood) on:
//!
//! - (a) the f32 folder with the patch overlaid (`eval --patch`);
//! - (b) the GGUF `apply` writes with the touched tensors quantized again in their own type
//!   (`--touched-as own`), imported back;
//! - (c) the same with the touched tensors stored as f16 (`--touched-as f16`);
//! - (d) the PEFT LoRA adapter `export` makes (the factors exactly without RECT, else the rank
//!   `FACTPATCH_BENCH_LORA_RANK` (default 1) truncated SVD), as base + B·A in f32: the folder is
//!   the GGUF dequantized, so this is the adapter over the quantized base up to the runtime's
//!   rounding.
//!
//! Prints a line per record and a table per setting. Long (two compiles of a few seconds per
//! record): `RAYON_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice cargo bench --bench gguf_quant`;
//! its scratch files (a GGUF and its import at a time) go under `$TMPDIR`.

use factpatch::apply::ApplyOptions;
use factpatch::checkpoint::{self, Checkpoint};
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::request::{self, Request};
use factpatch::edit::Method;
use factpatch::eval::{self, edits, Models};
use factpatch::export;
use factpatch::gguf::{self, OutDtype, TouchedAs};
use factpatch::model::Model;
use factpatch::patch::{Delta, Factors};
use factpatch::rect;
use factpatch::tokenize::Tokenizer;
use std::path::{Path, PathBuf};

#[path = "../tests/common/mod.rs"]
mod common;

const VARIANTS: [&str; 5] =
    ["unedited", "(a) f32 folder + patch", "(b) GGUF, touched in own type again", "(c) GGUF, touched f16", "(d) LoRA adapter, base + B·A"];

/// A model the bench can edit: the imported folder, the GGUF it came from, its statistics corpus.
struct Subject {
    folder: PathBuf,
    gguf: PathBuf,
    corpus: &'static str,
}

/// The subject `FACTPATCH_BENCH_MODEL` names.
fn subject(name: &str) -> Subject {
    match name {
        "smollm2" => Subject { folder: common::smollm2(), gguf: common::smollm2_gguf(), corpus: "fixtures/corpus/sotu.txt" },
        "gemma3-270m" => Subject { folder: common::gemma3_270m(), gguf: common::gemma3_270m_gguf(), corpus: "fixtures/corpus/brown.txt" },
        other => panic!("FACTPATCH_BENCH_MODEL: `{other}` is none of smollm2, gemma3-270m"),
    }
}

/// A variable's value, or `default`.
fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The CounterFact metrics of `req` on `models`: efficacy, its magnitude, paraphrase, neighbourhood.
fn scores(models: &Models, tok: &Tokenizer, path: &Path, req: &Request) -> [f64; 4] {
    let report = edits::report(models, tok, path, std::slice::from_ref(req), &eval::Options::default()).unwrap();
    let c = &report.records[0].counterfact;
    [c.efficacy, c.efficacy_magnitude, c.paraphrase, c.neighborhood].map(|m| m.expect("CounterFact metrics of an EasyEdit record"))
}

/// The patch `export --format peft` turns `patch` into, read back as low-rank factors
/// (`U = B`, `V = Aᵀ`) against the folder `model`, written at `out`.
fn lora_patch(patch: &Path, model: &Path, rank: Option<usize>, dir: &Path) -> PathBuf {
    let adapter = dir.join("lora");
    let model_arg = rank.map(|_| model.to_path_buf());
    export::export(patch, &adapter, &export::Options { format: export::Format::Peft, rank, model: model_arg }).unwrap();
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(name).unwrap();
        (checkpoint::Dtype::F32.decode(t.data()), t.shape().to_vec())
    };
    let stack = factpatch::apply::Stack::load(&[patch.to_path_buf()]).unwrap();
    let deltas: Vec<(&str, Delta)> = stack
        .touched()
        .map(|name| {
            let module = name.strip_suffix(".weight").unwrap();
            let (a, a_shape) = f32s(&format!("base_model.model.{module}.lora_A.weight"));
            let (b, _) = f32s(&format!("base_model.model.{module}.lora_B.weight"));
            let (r, cols) = (a_shape[0], a_shape[1]);
            let v = (0..cols * r).map(|k| a[(k % r) * cols + k / r]).collect();
            (name, Delta::LowRank(vec![Factors { rank: r, u: b, v }]))
        })
        .collect();
    let out = dir.join("lora.fpatch");
    common::write_patch(&out, &Checkpoint::open(model).unwrap(), &[], common::manifest("lora"), deltas);
    std::fs::remove_dir_all(&adapter).unwrap();
    out
}

fn main() {
    let records: usize = env("FACTPATCH_BENCH_RECORDS", "50").parse().unwrap();
    let settings: Vec<f64> = env("FACTPATCH_BENCH_RECT", "none,40").split(',').map(|k| rect::parse_k(k).unwrap()).collect();
    let rank: usize = env("FACTPATCH_BENCH_LORA_RANK", "1").parse().unwrap();
    let method = env("FACTPATCH_BENCH_METHOD", "memit");
    let method = <Method as clap::ValueEnum>::from_str(&method, true).unwrap_or_else(|e| panic!("FACTPATCH_BENCH_METHOD: {e}"));
    let Subject { folder, gguf: file, corpus } = subject(&env("FACTPATCH_BENCH_MODEL", "smollm2"));
    let path = common::root().join("fixtures/data/edit/counterfact-easyedit-10k.json");
    let mut requests = request::records(&path).unwrap();
    requests.truncate(records);
    let requests = request::check(requests).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tok = Tokenizer::open(&folder).unwrap();
    let base = Model::load(&folder).unwrap();
    let options = ApplyOptions { sync: false, hash_cache: Some(checkpoint::default_hash_cache()), ..Default::default() };
    let mut tables = Vec::new();
    for k in settings {
        let setting = factpatch::experiment::setting_name(k);
        let spec = Spec {
            overrides: vec![format!("rect_k={k}")],
            stats: StatsSource::Corpus { files: vec![common::root().join(corpus)], tokens: 100_000 },
            ..Spec::new(&folder, method)
        };
        let compiler = Compiler::open(&spec).unwrap();
        let mut sums = [[0f64; 4]; VARIANTS.len()];
        let mut lost = 0;
        for (i, req) in requests.iter().enumerate() {
            let patch = scratch.path().join("edit.fpatch");
            std::fs::write(&patch, compiler.clone().patch(std::slice::from_ref(req)).unwrap().patch.bytes).unwrap();
            let mut row = vec![scores(&Models { base: base.clone(), patched: None, patch_ids: Vec::new() }, &tok, &path, req)];
            row.push(scores(&Models::load(&folder, std::slice::from_ref(&patch)).unwrap(), &tok, &path, req));
            for touched_as in [TouchedAs::Own, TouchedAs::F16] {
                let (out, imported) = (scratch.path().join("edited.gguf"), scratch.path().join("edited"));
                gguf::apply(&file, std::slice::from_ref(&patch), &out, &options, touched_as).unwrap();
                gguf::import(&out, &imported, OutDtype::F32).unwrap();
                let models = Models { base: base.clone(), patched: Some(Model::load(&imported).unwrap()), patch_ids: Vec::new() };
                row.push(scores(&models, &tok, &path, req));
                std::fs::remove_file(&out).unwrap();
                std::fs::remove_dir_all(&imported).unwrap();
            }
            let lora = lora_patch(&patch, &folder, (k < 100.0).then_some(rank), scratch.path());
            row.push(scores(&Models::load(&folder, &[lora]).unwrap(), &tok, &path, req));
            if row[1][0] == 1.0 && row[2][0] == 0.0 {
                lost += 1;
            }
            for (sum, s) in sums.iter_mut().zip(&row) {
                sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            }
            let text: Vec<String> = row.iter().map(|s| format!("{:.0}/{:+.3}/{:.0}/{:.0}", s[0], s[1], s[2], s[3])).collect();
            println!("RECT {setting} record {} ({}): {}", i + 1, req.origin, text.join("  "));
        }
        tables.push((setting, sums, lost));
    }
    let n = records as f64;
    println!("\n{method:?} on {}, one edit per record from the unedited model, records 1-{records}; means over the records.", folder.display());
    println!("(d): the adapter's factors exactly without RECT, their rank-{rank} truncated SVD with it.\n");
    println!("| RECT | model | efficacy | efficacy magnitude | paraphrase | neighbourhood | score (harmonic mean) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for (setting, sums, _) in &tables {
        for (variant, s) in VARIANTS.iter().zip(sums) {
            let [e, m, p, nb] = s.map(|x| x / n);
            println!("| {setting} | {variant} | {e:.2} | {m:+.3} | {p:.2} | {nb:.2} | {:.2} |", edits::harmonic_mean(&[e, p, nb]));
        }
    }
    for (setting, _, lost) in &tables {
        println!("\nRECT {setting}: (b) loses the edit (efficacy 1 in (a), 0 in (b)) in {lost} of {records} records.");
    }
}
