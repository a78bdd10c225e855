//! Key statistics: exactness against a direct computation, sharding, the file format, the
//! cache, bad input, and (with the real model) keys against transformers.

mod common;

use factpatch::model::{Batch, Hooks, Model};
use factpatch::stats::{self, Error, Request, Shard, Stats};
use indicatif::ProgressBar;
use ndarray::Array2;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Deterministic English-like text: `n` paragraphs of varied length.
fn text(n: usize) -> String {
    let words = ["the", "union", "congress", "of", "state", "and", "people", "nation", "law", "we", "shall", "year"];
    (0..n)
        .map(|p| {
            let len = 5 + (p * 37) % 90;
            (0..len).map(|i| words[(p * 7 + i * i * 3 + i) % words.len()]).collect::<Vec<_>>().join(" ") + "."
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn max_rel_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Σ k kᵀ straight from captured keys, one outer product at a time.
fn direct(model: &Model, layer: usize, batches: &[Vec<Vec<u32>>], padded: bool) -> (Array2<f64>, u64) {
    let d = model.config.intermediate_size;
    let mut sum = Array2::<f64>::zeros((d, d));
    let mut n = 0;
    let hooks = Hooks { keys: vec![layer], stop_after: Some(layer), ..Hooks::default() };
    let mut add = |batch: &Batch| {
        let keys = model.forward(batch, &hooks, None).unwrap().keys[&layer].to_vec3::<f32>().unwrap();
        for (seq, mask) in keys.iter().zip(&batch.mask) {
            for (k, _) in seq.iter().zip(mask).filter(|(_, &m)| m) {
                for i in 0..d {
                    for j in 0..d {
                        sum[[i, j]] += k[i] as f64 * k[j] as f64;
                    }
                }
                n += 1;
            }
        }
    };
    for b in batches {
        if padded {
            add(&Batch::right_padded(b));
        } else {
            b.iter().for_each(|s| add(&Batch::right_padded(std::slice::from_ref(s))));
        }
    }
    (sum, n)
}

#[test]
fn tiny_statistics_equal_direct_computation() {
    let model = Model::load(&fixtures().join("tiny-llama")).unwrap();
    let docs: Vec<Vec<u32>> = (0..12u32).map(|i| (0..(7 + i * 23)).map(|j| (j * 31 + i * 7) % 512).collect()).collect();
    let plan = stats::plan(docs.iter().flat_map(|d| d.chunks(48).map(<[u32]>::to_vec)).collect(), Shard::ALL);
    assert_eq!(plan.tokens, docs.iter().map(|d| d.len() as u64).sum::<u64>());
    assert!(plan.batches.iter().any(|b| b.iter().any(|s| s.len() < b[0].len())), "some batch must be padded");
    let got = stats::accumulate(&model, &[0, 1], &[], &plan.batches, &ProgressBar::hidden()).unwrap();
    for layer in [0, 1] {
        // The same keys summed naively: equal up to f64 rounding.
        let (sum, n) = direct(&model, layer, &plan.batches, true);
        assert_eq!(got[&layer].count, n);
        assert!(max_rel_diff(&sum, &got[&layer].sum) < 1e-12);
        // Each chunk alone, unpadded: pads contribute nothing (f32 kernel rounding only).
        let (alone, n) = direct(&model, layer, &plan.batches, false);
        assert_eq!(got[&layer].count, n);
        let diff = max_rel_diff(&alone, &got[&layer].sum);
        assert!(diff < 1e-5, "layer {layer}: batched vs one by one {diff:e}");
    }
}

#[test]
fn sampling_caps_and_shards_partition_tokens() {
    // Every token is distinct: document i holds i·1000 + j.
    let docs: Vec<String> = (0..40).map(|i| (0..1 + i * 13).map(|j| (i * 1000 + j).to_string()).collect::<Vec<_>>().join(" ")).collect();
    let ids = |d: &str| Ok(d.split(' ').map(|x| x.parse().unwrap()).collect());
    let total: u64 = (0..40).map(|i| 1 + i * 13).sum();
    for cap in [None, Some(1000), Some(total + 5)] {
        let chunks = stats::sample(&docs, ids, 64, 9, cap).unwrap();
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= 64));
        let mut all: Vec<u32> = chunks.concat();
        assert_eq!(all.len() as u64, cap.map_or(total, |c| c.min(total)));
        assert_eq!(stats::plan(chunks.clone(), Shard::ALL).tokens, all.len() as u64);
        let mut union: Vec<u32> = (0..3).flat_map(|i| stats::plan(chunks.clone(), Shard { index: i, count: 3 }).batches.concat().concat()).collect();
        all.sort_unstable();
        union.sort_unstable();
        assert_eq!(all, union);
    }
    // Another seed samples other documents under a cap; the same seed the same ones.
    let a = stats::sample(&docs, ids, 64, 1, Some(500)).unwrap();
    assert_eq!(a, stats::sample(&docs, ids, 64, 1, Some(500)).unwrap());
    assert_ne!(a, stats::sample(&docs, ids, 64, 2, Some(500)).unwrap());
}

#[test]
fn sharded_and_merged_equals_unsharded() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::byte_level_tiny_llama(&dir.path().join("tiny-llama"));
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, text(60)).unwrap();
    let cache = dir.path().join("cache");
    let mut req = Request::new(&model, &[corpus]);
    req.layers = Some(vec![0, 1]);
    req.seq_len = 64;
    req.seed = 5;
    req.max_tokens = Some(9000);

    let whole = stats::run(&req, None, false, &cache, false).unwrap();
    assert!(!whole.cached);
    assert_eq!(whole.stats.meta.tokens, 9000);
    assert_eq!(whole.paths, vec![stats::cache_path(&cache, &whole.stats.meta.request_id())]);

    let shards: Vec<PathBuf> = (0..3)
        .map(|i| {
            let out = dir.path().join(format!("shard{i}.safetensors"));
            let r = Request { shard: Shard { index: i, count: 3 }, ..req.clone() };
            stats::run(&r, Some(&out), false, &cache, false).unwrap();
            out
        })
        .collect();
    let merged_path = dir.path().join("merged.safetensors");
    let merged = stats::merge_files(&shards, &merged_path, false, None).unwrap().stats;
    assert_eq!(merged.meta, whole.stats.meta, "a complete merge is the unsharded run");
    for (l, s) in &whole.stats.layers {
        assert_eq!(merged.layers[l].count, s.count);
        let diff = max_rel_diff(&s.sum, &merged.layers[l].sum);
        assert!(diff < 1e-12, "layer {l}: {diff:e}");
    }
    assert_eq!(Stats::read(&merged_path).unwrap(), merged);

    // Partial merges say which shards they hold; a shard cannot be counted twice.
    let partial = stats::merge_files(&shards[..2], &dir.path().join("p.safetensors"), false, None).unwrap().stats;
    assert_eq!((partial.meta.shards.clone(), partial.meta.shard_count), (vec![0, 1], 3));
    let twice = stats::merge_files(&[shards[0].clone(), shards[0].clone()], &dir.path().join("t.safetensors"), false, None);
    assert!(matches!(twice, Err(Error::Merge { .. })), "{twice:?}");

    // A compiler finds them by model and layers alone.
    let model_id = &whole.stats.meta.model;
    assert_eq!(stats::find_in_cache(&cache, model_id, &[1]).unwrap().unwrap().0, whole.paths[0]);
    assert!(stats::find_in_cache(&cache, model_id, &[1, 2]).unwrap().is_none());
    assert!(stats::find_in_cache(&cache, &"0".repeat(64), &[1]).unwrap().is_none());

    // Same request again: the cache answers, same bytes.
    let again = stats::run(&req, Some(&dir.path().join("copy.safetensors")), false, &cache, false).unwrap();
    assert!(again.cached);
    assert_eq!(again.id, whole.id);
    assert_eq!(stats::file_id(&dir.path().join("copy.safetensors")).unwrap(), whole.id);
}

#[test]
fn output_is_deterministic_and_jsonl_reads_text_fields() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::byte_level_tiny_llama(&dir.path().join("tiny-llama"));
    let corpus = dir.path().join("docs.jsonl");
    let lines: Vec<String> = text(20).split("\n\n").map(|p| serde_json::json!({"text": p, "id": 1}).to_string()).collect();
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    let mut req = Request::new(&model, &[corpus]);
    req.layers = Some(vec![1]);
    req.seq_len = 100;
    let a = stats::run(&req, None, false, &dir.path().join("c1"), false).unwrap();
    let b = stats::run(&req, None, false, &dir.path().join("c2"), false).unwrap();
    assert!(!b.cached);
    assert_eq!(a.id, b.id, "same inputs, same bytes");
    let plain = dir.path().join("docs.txt");
    std::fs::write(&plain, text(20)).unwrap();
    let c = stats::run(&Request { corpus: vec![plain], ..req.clone() }, None, false, &dir.path().join("c3"), false).unwrap();
    assert_eq!(a.stats.meta.tokens, c.stats.meta.tokens);
    assert_ne!(a.stats.meta.corpus, c.stats.meta.corpus);
    let d = stats::run(&Request { seed: 1, ..req }, None, false, &dir.path().join("c1"), false).unwrap();
    assert_ne!(d.stats.meta.request_id(), a.stats.meta.request_id());
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::byte_level_tiny_llama(&dir.path().join("tiny-llama"));
    let cache = dir.path().join("cache");
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let run = |corpus: Vec<PathBuf>, f: &dyn Fn(&mut Request)| {
        let mut req = Request::new(&model, &corpus);
        req.layers = Some(vec![1]);
        req.seq_len = 64;
        f(&mut req);
        let out = dir.path().join("out.safetensors");
        let r = stats::run(&req, Some(&out), false, &cache, false);
        assert!(!out.exists(), "a failed run leaves no output");
        r.unwrap_err()
    };
    let good = file("good.txt", text(5).as_bytes());
    let msg = |e: Error| e.to_string();
    assert!(matches!(run(vec![], &|_| ()), Error::EmptyCorpus(_)));
    assert!(matches!(run(vec![file("empty.txt", b"\n \n")], &|_| ()), Error::EmptyCorpus(_)));
    let e = run(vec![good.clone(), file("bin.txt", b"abc\0def")], &|_| ());
    assert!(matches!(e, Error::Binary { offset: 3, .. }) && msg(e).contains("bin.txt"));
    let e = run(vec![file("latin1.txt", b"caf\xe9")], &|_| ());
    assert!(matches!(e, Error::NotUtf8 { offset: 3, .. }) && msg(e).contains("latin1.txt"));
    let e = run(vec![file("x.jsonl", b"{\"text\": \"ok\"}\n{\"body\": 1}\n")], &|_| ());
    assert!(msg(e).contains("x.jsonl:2"));
    assert!(matches!(run(vec![good.clone()], &|r| r.layers = Some(vec![2])), Error::LayerOutOfRange { layer: 2, last: 1, .. }));
    assert!(matches!(run(vec![good.clone()], &|r| r.seq_len = 4096), Error::Invalid(_)));
    assert!(matches!(run(vec![dir.path().join("missing.txt")], &|_| ()), Error::Io(_)));
    assert!("3/3".parse::<Shard>().is_err() && "1/x".parse::<Shard>().is_err());
    assert_eq!(stats::parse_layers("2,4-6,5").unwrap(), vec![2, 4, 5, 6]);
    assert!(stats::parse_layers("8-4").is_err());

    // Merging statistics of different models, layers or seq-len.
    let mut req = Request::new(&model, &[good]);
    req.layers = Some(vec![0, 1]);
    req.seq_len = 32;
    let base = stats::compute(&stats::prepare(&req).unwrap(), false).unwrap();
    for (what, change) in [
        ("models", Box::new(|s: &mut Stats| s.meta.model = "0".repeat(64)) as Box<dyn Fn(&mut Stats)>),
        ("layers", Box::new(|s: &mut Stats| s.meta.layers = vec![0])),
        ("seq-len", Box::new(|s: &mut Stats| s.meta.seq_len = 64)),
    ] {
        let mut other = base.clone();
        change(&mut other);
        let e = Stats::merge(&[("a".into(), base.clone()), ("b".into(), other)]).unwrap_err();
        assert!(msg(e).contains(&format!("different {what}")), "{what}");
    }
    let bogus = file("bogus.safetensors", b"not a safetensors file");
    assert!(matches!(Stats::read(&bogus), Err(Error::Format { .. })));
}

/// The keys captured at layer 5 of SmolLM2 equal the input of `model.layers.5.mlp.down_proj`
/// hooked in transformers (fixtures/reference.py).
#[test]
fn smollm2_layer5_keys_match_transformers() {
    let reference = fixtures().join("reference/smollm2-keys.safetensors");
    let dir = fixtures().join("models/SmolLM2-135M-Instruct");
    if !dir.is_dir() {
        eprintln!("skipped: {} is missing (run fixtures/get-model.sh)", dir.display());
        return;
    }
    let bytes = std::fs::read(&reference).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let model = Model::load(&dir).unwrap();
    let mut checked = 0;
    for p in ["p0", "p2"] {
        let ids: Vec<u32> =
            st.tensor(&format!("{p}.input_ids")).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let want: Vec<f32> = st
            .tensor(&format!("{p}.layers.5.mlp.down_proj.input"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let hooks = Hooks { keys: vec![5], stop_after: Some(5), ..Hooks::default() };
        let got = model.forward(&Batch::right_padded(&[ids]), &hooks, None).unwrap().keys[&5].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{p}: {} tokens, max |Δ| {diff:e}, max |k| {scale}", got.len() / model.config.intermediate_size);
        assert!(diff <= 1e-5 * scale, "{p}: max |Δ| {diff:e} (scale {scale})");
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// On the real model and corpus: two shards of 512-token chunks merge into the unsharded run.
#[test]
fn smollm2_sharded_equals_unsharded() {
    let dir = fixtures().join("models/SmolLM2-135M-Instruct");
    let corpus = fixtures().join("corpus/sotu.txt");
    assert!(dir.is_dir() && corpus.is_file(), "run `bash fixtures/setup.sh` first");
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(corpus).unwrap();
    let part = tmp.path().join("sotu-part.txt");
    std::fs::write(&part, &text[..text[..300_000].rfind("\n\n").unwrap()]).unwrap();
    let mut req = Request::new(&dir, &[part]);
    req.max_tokens = Some(3000);
    let whole = stats::run(&req, None, false, tmp.path(), false).unwrap().stats;
    assert_eq!((whole.meta.layers.clone(), whole.meta.tokens), (vec![4, 5, 6, 7, 8], 3000));
    let parts: Vec<(PathBuf, Stats)> = (0..2)
        .map(|i| {
            let p = stats::prepare(&Request { shard: Shard { index: i, count: 2 }, ..req.clone() }).unwrap();
            (PathBuf::from(format!("shard{i}")), stats::compute(&p, false).unwrap())
        })
        .collect();
    let merged = Stats::merge(&parts).unwrap();
    assert_eq!(merged.meta, whole.meta);
    for (l, s) in &whole.layers {
        assert_eq!(merged.layers[l].count, 3000);
        let diff = max_rel_diff(&s.sum, &merged.layers[l].sum);
        assert!(diff < 1e-12, "layer {l}: {diff:e}");
    }
}
