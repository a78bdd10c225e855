//! Part of the hostile-input catalogue (issue #17): small or odd inputs that once exhausted
//! memory, hung, crashed or misled. Each class has a generator here: forged patches that declare
//! huge tensors (sparse, low-rank, dense, huge ranks), configs with absurd values, 1 MB prompts,
//! FIFOs and devices in place of files, sharded checkpoints holding a tensor twice, weights
//! truncated under a running apply, symlink loops, truncated patches, bad UTF-8, closed pipes.
//!
//! The binary runs as users run it, with `RUST_BACKTRACE=1` (as on the project's machines),
//! its address space limited to about 2 GB (so a bomb aborts rather than passing silently on a
//! big machine) and a time limit (so a hang fails). Every case must end with a non-zero exit
//! status, exactly one `error: ` line on stderr naming the culprit, no panic and no backtrace.

mod common;

use common::{forge, tiny_model, tiny_specs, write_model, write_patch};
use factpatch::checkpoint::Checkpoint;
use factpatch::patch::Delta;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Address-space limit of every run, in KiB (`ulimit -v`).
const MEMORY_KIB: u64 = 2_000_000;
/// Wall-clock limit of every run, in seconds.
const SECONDS: u64 = 120;

fn arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs the binary with `args` under the memory and time limits, stdout as given.
fn run_with(args: &[&str], stdout: Stdio) -> Output {
    let cache = tempfile::tempdir().unwrap();
    let script = format!("ulimit -v {MEMORY_KIB}; exec timeout -s KILL {SECONDS} \"$0\" \"$@\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_factpatch"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("FACTPATCH_CACHE", cache.path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .output()
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    run_with(args, Stdio::piped())
}

/// The run failed cleanly: a non-zero exit (no signal, no time-out), exactly one `error: `
/// line on stderr containing every needle, no panic, no backtrace. Returns that line.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let what = format!("factpatch {}\nstatus {:?}\nstderr:\n{stderr}", args.join(" "), o.status);
    assert!(o.status.code().is_some_and(|c| c != 0 && c != 124 && c != 137), "not a clean failure: {what}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace") && !stderr.contains("Backtrace"), "panic or backtrace: {what}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {what}");
    assert!(lines[0].starts_with("error: "), "{what}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing: {what}");
    }
    eprintln!("{}\n  → {}", args.join(" "), lines[0]);
    lines[0].to_string()
}

// ---------------------------------------------------------------------------------------------
// Generators.

/// A forged patch for the tiny model's family, of `entries`.
/// One forged entry: tensor, dtype, shape, encoding (JSON), compressed payload.
type Forged<'a> = (&'a str, &'a str, Vec<usize>, serde_json::Value, Vec<u8>);

fn bomb(path: &Path, entries: &[Forged]) -> PathBuf {
    let mut json_entries = Vec::new();
    let mut frames = Vec::new();
    for (tensor, dtype, shape, encoding, frame) in entries {
        json_entries.push(serde_json::json!({
            "tensor": tensor, "dtype": dtype, "shape": shape, "base_blake3": "0".repeat(64),
            "encoding": encoding, "zlen": frame.len(), "raw_len": raw_len(encoding, shape),
        }));
        frames.push(frame.clone());
    }
    let manifest = serde_json::json!({
        "format": 1, "tool": "factpatch 0.1.0", "model": {"name": "tiny", "family": "llama"},
        "parent": null, "includes": [], "edits": [], "method": {"name": "forged", "hyperparameters": {}},
        "stats_id": null, "rect_k": null, "metrics": {}, "entries": json_entries,
    });
    std::fs::write(path, forge(&serde_json::to_vec(&manifest).unwrap(), &frames)).unwrap();
    path.to_path_buf()
}

/// The raw length `formats/patch.md` implies.
fn raw_len(encoding: &serde_json::Value, shape: &[usize]) -> u64 {
    let s = |v: &serde_json::Value| if v["vdtype"] == "F32" { 4 } else { 2 };
    let n: u64 = shape.iter().map(|&d| d as u64).product();
    match encoding["kind"].as_str().unwrap() {
        "dense" => n * s(encoding),
        "sparse" => encoding["nnz"].as_u64().unwrap() * (if encoding["index"] == "u32" { 4 } else { 8 } + s(encoding)),
        "low_rank" => (shape[0] + shape[1]) as u64 * encoding["ranks"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).sum::<u64>() * s(encoding),
        kind => panic!("{kind}"),
    }
}

/// One zstd frame of `n` zero bytes, compressed as it streams (never held whole).
fn zeros_frame(n: u64) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_checksum(true).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len() as u64) as usize;
        enc.write_all(&block[..k]).unwrap();
        left -= k as u64;
    }
    enc.finish().unwrap()
}

/// A sparse entry declaring a 2^17 × 2^17 tensor (2^34 elements) with one non-zero.
fn sparse_bomb(dir: &Path, name: &str) -> PathBuf {
    let mut raw = 5u64.to_le_bytes().to_vec();
    raw.extend_from_slice(&1f32.to_le_bytes());
    let enc = serde_json::json!({"kind": "sparse", "vdtype": "F32", "nnz": 1, "index": "u64"});
    bomb(&dir.join(name), &[("model.layers.0.mlp.down_proj.weight", "F32", vec![1 << 17, 1 << 17], enc, zstd::bulk::compress(&raw, 3).unwrap())])
}

/// A temporary copy of `fixtures/tiny-llama` with `config.json` edited and a word-level
/// tokenizer (its words are token ids below the model's vocabulary of 512).
fn tiny_llama(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let src = common::root().join("fixtures/tiny-llama");
    std::fs::copy(src.join("model.safetensors"), t.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(t.path().join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let words = ["[UNK]", "The", "Therefore", "Because", "I", "You", "Eiffel", "Tower", "is", "in", "Paris", "Rome", "a", ".", "city", "of"];
    let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(t.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    t
}

/// A request file (factpatch JSONL) whose one record has a prompt of about 1 MB.
fn long_prompt_requests(dir: &Path) -> PathBuf {
    let filler = "a ".repeat(500_000);
    let record = serde_json::json!({"prompt": format!("{filler}The {{}} is in"), "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"});
    let path = dir.join("long.jsonl");
    std::fs::write(&path, format!("{record}\n")).unwrap();
    path
}

/// A FIFO at `path` (nobody ever writes to it).
fn fifo(path: &Path) -> PathBuf {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
    path.to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// Class 4: tiny inputs that exhaust memory.

#[test]
fn sparse_bomb_is_refused_by_audit_and_merge() {
    let t = tempfile::tempdir().unwrap();
    let p = sparse_bomb(t.path(), "bomb.fpatch");
    fails(&["audit", arg(&p)], &[arg(&p), "elements"]);
    fails(&["audit", arg(&p), "--json"], &[arg(&p), "elements"]);
    let out = t.path().join("merged.fpatch");
    fails(&["merge", arg(&p), arg(&p), "--out", arg(&out)], &[arg(&p), "elements"]);
    fails(&["merge", arg(&p), "--out", arg(&out)], &[arg(&p), "elements"]);
    assert!(!out.exists());
}

#[test]
fn low_rank_bomb_is_refused() {
    let t = tempfile::tempdir().unwrap();
    // 2^17 × 2^15: 2^32 elements from a 320 KB payload of zeros.
    let shape = vec![1 << 17, 1 << 15];
    let raw = (shape[0] + shape[1]) as u64 * 2;
    let enc = serde_json::json!({"kind": "low_rank", "vdtype": "BF16", "ranks": [1]});
    let p = bomb(&t.path().join("lr.fpatch"), &[("model.layers.0.mlp.down_proj.weight", "F32", shape, enc, zeros_frame(raw))]);
    fails(&["audit", arg(&p)], &[arg(&p), "elements"]);
    let out = t.path().join("m.fpatch");
    fails(&["merge", arg(&p), arg(&p), "--out", arg(&out)], &[arg(&p)]);
    // A tiny tensor with an absurd rank: the payload alone would inflate to 1 GiB.
    let enc = serde_json::json!({"kind": "low_rank", "vdtype": "BF16", "ranks": [1 << 26]});
    let p = bomb(&t.path().join("rank.fpatch"), &[("model.layers.0.mlp.down_proj.weight", "F32", vec![4, 4], enc, zeros_frame(8 << 27))]);
    fails(&["audit", arg(&p)], &[arg(&p), "rank"]);
}

#[test]
fn dense_bomb_is_refused() {
    let t = tempfile::tempdir().unwrap();
    // 2^29 BF16 zeros: 1 GiB inflated, 2 GiB as f32, from a payload of a few hundred KB.
    let shape = vec![1 << 15, 1 << 14];
    let enc = serde_json::json!({"kind": "dense", "vdtype": "BF16"});
    let p = bomb(&t.path().join("dense.fpatch"), &[("model.layers.0.mlp.down_proj.weight", "BF16", shape, enc, zeros_frame(2 << 29))]);
    assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
    fails(&["audit", arg(&p)], &[arg(&p), "elements"]);
    let out = t.path().join("m.fpatch");
    fails(&["merge", arg(&p), "--out", arg(&out)], &[arg(&p), "elements"]);
    assert!(!out.exists());
}

#[test]
fn audit_with_the_model_checks_shapes_before_inflating() {
    let t = tempfile::tempdir().unwrap();
    let p = sparse_bomb(t.path(), "bomb.fpatch");
    let model = common::root().join("fixtures/tiny-llama");
    fails(&["audit", arg(&p), "--model", arg(&model)], &[arg(&p), "down_proj"]);
}

#[test]
fn megabyte_prompt_is_refused_by_compile_and_eval() {
    let model = tiny_llama(|_| {});
    let t = tempfile::tempdir().unwrap();
    let req = long_prompt_requests(t.path());
    let out = t.path().join("p.fpatch");
    let line =
        fails(&["compile", "--model", arg(model.path()), "--requests", arg(&req), "--method", "kn", "--out", arg(&out)], &[arg(&req), "record 1", "128"]);
    assert!(line.contains("tokens"), "{line}");
    assert!(!out.exists());
    fails(&["eval", "--model", arg(model.path()), "--requests", arg(&req)], &[arg(&req), "record 1", "128", "tokens"]);
    // Task files: a 1 MB BoolQ passage (item 2), a 1 MB NQ-open question, a window longer than the context.
    let filler = "a ".repeat(500_000);
    let boolq = t.path().join("boolq.jsonl");
    let short = serde_json::json!({"passage": "Paris is a city", "question": "is Paris a city", "answer": true});
    let long = serde_json::json!({"passage": filler, "question": "is Paris a city", "answer": true});
    std::fs::write(&boolq, format!("{short}\n{long}\n")).unwrap();
    fails(&["eval", "--model", arg(model.path()), "--general", &format!("boolq={}", arg(&boolq))], &[arg(&boolq), "item 2", "128", "tokens"]);
    let nq = t.path().join("nq.jsonl");
    std::fs::write(&nq, format!("{}\n", serde_json::json!({"question": filler, "answer": ["Paris"]}))).unwrap();
    fails(&["eval", "--model", arg(model.path()), "--general", &format!("nq-open={}", arg(&nq))], &[arg(&nq), "item 1", "128", "tokens"]);
    let text = t.path().join("wiki.txt");
    std::fs::write(&text, &filler).unwrap();
    fails(&["eval", "--model", arg(model.path()), "--general", &format!("perplexity={}", arg(&text)), "--seq-len", "100000"], &[arg(&text), "100000", "128"]);
}

#[test]
fn absurd_layer_count_is_refused() {
    let model = tiny_llama(|c| c["num_hidden_layers"] = 1_000_000_000.into());
    let config = model.path().join("config.json");
    fails(&["inspect-model", arg(model.path())], &[arg(&config), "num_hidden_layers"]);
    fails(&["generate", "--model", arg(model.path()), "The"], &[arg(&config), "num_hidden_layers"]);
    // Plausible counts must still match the layers stored.
    for n in [1, 3] {
        let model = tiny_llama(|c| c["num_hidden_layers"] = n.into());
        let config = model.path().join("config.json");
        fails(&["inspect-model", arg(model.path())], &[arg(&config), "num_hidden_layers", "holds 2 layer"]);
        fails(&["generate", "--model", arg(model.path()), "The"], &[arg(&config), "num_hidden_layers", "holds 2 layer"]);
    }
}

#[test]
fn absurd_position_count_is_refused() {
    let model = tiny_llama(|c| c["max_position_embeddings"] = 1_000_000_000_000_000u64.into());
    let config = model.path().join("config.json");
    fails(&["generate", "--model", arg(model.path()), "The", "--max-new-tokens", "2"], &[arg(&config), "max_position_embeddings"]);
}

#[test]
fn fifos_and_devices_are_not_read() {
    let t = tempfile::tempdir().unwrap();
    let pipe = fifo(&t.path().join("pipe"));
    fails(&["audit", arg(&pipe)], &[arg(&pipe), "not a regular file"]);
    fails(&["audit", "/dev/zero"], &["/dev/zero", "not a regular file"]);
    let out = t.path().join("m.fpatch");
    fails(&["merge", "/dev/zero", "--out", arg(&out)], &["/dev/zero", "not a regular file"]);
    let model = tiny_llama(|_| {});
    let o = t.path().join("p.fpatch");
    fails(&["compile", "--model", arg(model.path()), "--requests", arg(&pipe), "--method", "kn", "--out", arg(&o)], &[arg(&pipe), "not a regular file"]);
    fails(&["eval", "--model", arg(model.path()), "--requests", arg(&pipe)], &[arg(&pipe), "not a regular file"]);
    fails(&["stats", "--model", arg(model.path()), "--corpus", arg(&pipe), "--seq-len", "64", "--layers", "0"], &[arg(&pipe), "not a regular file"]);
    fails(&["eval", "--model", arg(model.path()), "--general", &format!("hellaswag={}", arg(&pipe))], &[arg(&pipe), "not a regular file"]);
    // The model folder's own files.
    let config = model.path().join("config.json");
    std::fs::remove_file(&config).unwrap();
    fifo(&config);
    fails(&["inspect-model", arg(model.path())], &[arg(&config), "not a regular file"]);
    let model = tiny_llama(|_| {});
    let weights = model.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    fifo(&weights);
    fails(&["inspect-model", arg(model.path())], &[arg(&weights), "not a regular file"]);
    let model = tiny_llama(|_| {});
    let tok = model.path().join("tokenizer.json");
    std::fs::remove_file(&tok).unwrap();
    fifo(&tok);
    fails(&["generate", "--model", arg(model.path()), "The"], &[arg(&tok), "not a regular file"]);
}

// ---------------------------------------------------------------------------------------------
// Class 3: a sharded checkpoint holding a tensor twice.

const DOWN0: &str = "model.layers.0.mlp.down_proj.weight";

#[test]
fn tensor_in_two_shards_is_refused() {
    let (t, _base, ckpt) = tiny_model();
    let patch = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], common::manifest("rome"), vec![(DOWN0, Delta::Dense(common::values(384, 9, 0.01)))]);
    // Two shards; the index puts DOWN0 in the second (as `write_model` does), the first holds it too.
    let dir = t.path().join("sharded");
    let specs = tiny_specs();
    write_model(&dir, &specs, 2);
    let first = dir.join("model-00001-of-00002.safetensors");
    let second = dir.join("model-00002-of-00002.safetensors");
    let bytes: Vec<Vec<u8>> = specs.iter().map(|s| s.1.encode(&s.3)).collect();
    let views: Vec<_> = specs
        .iter()
        .zip(&bytes)
        .enumerate()
        .filter(|(i, s)| i % 2 == 0 || s.0 .0 == DOWN0)
        .map(|(_, (s, b))| (s.0, safetensors::tensor::TensorView::new(s.1.to_safetensors(), s.2.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &first).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["weight_map"][DOWN0], "model-00002-of-00002.safetensors");

    let e = Checkpoint::open(&dir).err().expect("a tensor in two shards must be refused").to_string();
    for n in [arg(&first), arg(&second), DOWN0] {
        assert!(e.contains(n), "`{n}` missing: {e}");
    }
    let out = t.path().join("out");
    fails(&["apply", "--model", arg(&dir), "--patch", arg(&patch), "--out", arg(&out)], &[arg(&first), arg(&second), DOWN0]);
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Class 8: weights that shrink while being read.

#[test]
fn weights_truncated_under_a_running_apply_are_detected() {
    let (t, base, ckpt) = tiny_model();
    let patch = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], common::manifest("rome"), vec![(DOWN0, Delta::Dense(common::values(384, 9, 0.01)))]);
    drop(ckpt);
    let weights = base.join("model.safetensors");
    let ckpt = Checkpoint::open(&base).unwrap();
    // The file shrinks to its header after the checkpoint was opened (and mapped).
    let header = 8 + u64::from_le_bytes(std::fs::read(&weights).unwrap()[..8].try_into().unwrap());
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(header).unwrap();
    let stack = factpatch::apply::Stack::load(std::slice::from_ref(&patch)).unwrap();
    let e = stack.verify(&ckpt).expect_err("a shrunk base must be refused").to_string();
    assert!(e.contains(arg(&weights)) && e.contains("changed while being read"), "{e}");
    let out = t.path().join("out");
    let e = factpatch::apply::apply_to(&ckpt, &[patch], &out, &Default::default()).expect_err("a shrunk base must be refused").to_string();
    assert!(e.contains(arg(&weights)) && e.contains("changed while being read"), "{e}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(left.iter().all(|n| n == "base" || n == "p.fpatch"), "left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Class 9: messages.

#[test]
fn symlink_loop_is_named() {
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("config.json");
    std::os::unix::fs::symlink(&config, &config).unwrap();
    fails(&["inspect-model", arg(t.path())], &[arg(&config), "symbolic links"]);
    let looped = t.path().join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    fails(&["inspect-model", arg(&looped)], &["symbolic links"]);
}

#[test]
fn truncated_patch_says_truncated() {
    let (t, _base, ckpt) = tiny_model();
    let patch = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], common::manifest("rome"), vec![(DOWN0, Delta::Dense(common::values(384, 9, 0.01)))]);
    let bytes = std::fs::read(&patch).unwrap();
    for cut in [1, 10, 40, 200] {
        let p = t.path().join(format!("cut{cut}.fpatch"));
        std::fs::write(&p, &bytes[..bytes.len() - cut]).unwrap();
        fails(&["audit", arg(&p)], &[arg(&p), "truncated"]);
    }
    // A changed byte is still a hash mismatch.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 40] ^= 1;
    let p = t.path().join("flipped.fpatch");
    std::fs::write(&p, &flipped).unwrap();
    fails(&["audit", arg(&p)], &[arg(&p), "hash mismatch"]);
}

#[test]
fn invalid_utf8_in_a_request_file_names_the_line() {
    let model = tiny_llama(|_| {});
    let t = tempfile::tempdir().unwrap();
    let req = t.path().join("r.jsonl");
    let good = r#"{"prompt": "The {} is in", "subject": "Eiffel Tower", "target_new": "Rome"}"#;
    std::fs::write(&req, [good.as_bytes(), b"\n{\"prompt\": \"The {} is \xff in\", \"subject\": \"x\", \"target_new\": \"y\"}\n"].concat()).unwrap();
    let out = t.path().join("p.fpatch");
    fails(&["compile", "--model", arg(model.path()), "--requests", arg(&req), "--method", "kn", "--out", arg(&out)], &[arg(&req), "line 2", "UTF-8"]);
}

#[test]
fn inspect_suggests_layers_the_model_has() {
    let model = common::root().join("fixtures/tiny-llama");
    let o = run(&["inspect-model", arg(&model)]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    let line = stdout.lines().find(|l| l.contains("default edit layers")).expect("a default edit layers line");
    let list = &line[line.find("default edit layers").unwrap()..];
    let layers: Vec<usize> = list.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    assert!(!layers.is_empty() && layers.iter().all(|&l| l < 2), "{line}");
}

#[test]
fn errors_are_one_line_even_with_rust_backtrace() {
    let t = tempfile::tempdir().unwrap();
    let gguf = t.path().join("bad.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00garbage that is not a header").unwrap();
    fails(&["import-gguf", arg(&gguf), arg(&t.path().join("out"))], &[arg(&gguf)]);
    std::fs::write(&gguf, b"not a gguf at all").unwrap();
    fails(&["import-gguf", arg(&gguf), arg(&t.path().join("out"))], &[arg(&gguf)]);
}

#[test]
fn closed_stdout_ends_quietly() {
    let model = common::root().join("fixtures/tiny-llama");
    for args in [vec!["inspect-model", arg(&model), "--json"], vec!["inspect-model", arg(&model)], vec!["--help"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = run_with(&args, Stdio::from(writer));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.trim().is_empty(), "{args:?}: {stderr}");
        assert!(o.status.success() || o.status.signal() == Some(libc::SIGPIPE), "{args:?}: {:?}", o.status);
    }
}

/// The generators make what the issue describes: a bomb's file is a few hundred bytes.
#[test]
fn bombs_are_small() {
    let t = tempfile::tempdir().unwrap();
    let p = sparse_bomb(t.path(), "b.fpatch");
    assert!(std::fs::metadata(&p).unwrap().len() < 1024);
}
