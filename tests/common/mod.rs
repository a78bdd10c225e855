//! Shared test helpers: tiny checkpoints and hand-made patches, fixture paths, the real model,
//! and reference tensors.
#![allow(dead_code)]

use factpatch::checkpoint::{Checkpoint, Dtype, Tensors};
use factpatch::patch::{self, BaseTensor, Delta, Manifest, Method, ModelInfo};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor to write: name, dtype, shape, values.
pub type Spec = (&'static str, Dtype, Vec<usize>, Vec<f32>);

/// Deterministic pseudo-random values in [-scale, scale).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The standard tiny model: f32 and bf16 matrices, a 1-D norm, an f16 matrix.
pub fn tiny_specs() -> Vec<Spec> {
    vec![
        ("model.embed_tokens.weight", Dtype::BF16, vec![32, 16], values(512, 1, 1.0)),
        ("model.layers.0.mlp.down_proj.weight", Dtype::BF16, vec![16, 24], values(384, 2, 0.1)),
        ("model.layers.0.mlp.up_proj.weight", Dtype::F32, vec![24, 16], values(384, 3, 0.1)),
        ("model.layers.0.input_layernorm.weight", Dtype::F32, vec![16], values(16, 4, 1.0)),
        ("model.layers.1.mlp.down_proj.weight", Dtype::F16, vec![16, 24], values(384, 5, 0.1)),
    ]
}

/// Writes a model folder: config, a tokenizer file, weights in `shards` files (1 = single file).
pub fn write_model(dir: &Path, specs: &[Spec], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "_name_or_path": "tiny"}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let bytes: Vec<Vec<u8>> = specs.iter().map(|s| s.1.encode(&s.3)).collect();
    let mut weight_map = BTreeMap::new();
    for k in 0..shards {
        let file = if shards == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{shards:05}.safetensors", k + 1) };
        let views: Vec<_> = specs
            .iter()
            .zip(&bytes)
            .enumerate()
            .filter(|(i, _)| i % shards == k)
            .map(|(_, (s, b))| {
                weight_map.insert(s.0.to_string(), file.clone());
                (s.0, TensorView::new(s.1.to_safetensors(), s.2.clone(), b).unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// A temporary folder holding the tiny model at `base`, opened.
pub fn tiny_model() -> (tempfile::TempDir, PathBuf, Checkpoint) {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    write_model(&base, &tiny_specs(), 1);
    let ckpt = Checkpoint::open(&base).unwrap();
    (t, base, ckpt)
}

/// A manifest for the tiny model.
pub fn manifest(method: &str) -> Manifest {
    Manifest::new(ModelInfo { name: "tiny".into(), family: "llama".into() }, Method { name: method.into(), hyperparameters: BTreeMap::new() })
}

/// Writes a patch of `deltas` against the tensors of `ckpt` (after `overlay` patches, if any).
pub fn write_patch(path: &Path, ckpt: &Checkpoint, prior: &[PathBuf], m: Manifest, deltas: Vec<(&str, Delta)>) -> PathBuf {
    let stack = factpatch::apply::Stack::load(prior).unwrap();
    let overlay = factpatch::apply::Overlay::new(ckpt, &stack).unwrap();
    let deltas = deltas.into_iter().map(|(n, d)| (BaseTensor::of(&overlay.tensor(n).unwrap()), d)).collect();
    std::fs::write(path, patch::encode(m, deltas).unwrap().bytes).unwrap();
    path.to_path_buf()
}

/// Rank-`r` factors for a `rows × cols` tensor.
pub fn factors(rows: usize, cols: usize, r: usize, seed: u64, scale: f32) -> patch::Factors {
    patch::Factors { rank: r, u: values(rows * r, seed, scale), v: values(cols * r, seed + 100, 1.0) }
}

/// Every file in a folder, name → bytes.
pub fn folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Assembles a patch file by hand (per `formats/patch.md`) from a manifest and raw payloads.
pub fn forge(manifest_json: &[u8], payloads: &[Vec<u8>]) -> Vec<u8> {
    let m = zstd::bulk::compress(manifest_json, 3).unwrap();
    let mut out = b"FACTPTCH".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(m.len() as u64).to_le_bytes());
    out.extend_from_slice(&m);
    for p in payloads {
        out.extend_from_slice(p);
    }
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `fixtures/models/NAME` when it is a file, or a folder holding the file `inside`; else a panic
/// that names the command `fetch` to run first.
fn fixture_model(name: &str, inside: Option<&str>, fetch: &str) -> PathBuf {
    let path = root().join("fixtures/models").join(name);
    assert!(inside.map_or(path.clone(), |f| path.join(f)).is_file(), "{} is missing: run `{fetch}` first", path.display());
    path
}

/// The imported SmolLM2 folder; tells how to get it when missing.
pub fn smollm2() -> PathBuf {
    fixture_model("SmolLM2-135M-Instruct", Some("model.safetensors"), "bash fixtures/setup.sh")
}

/// The imported Gemma 3 270M folder; tells how to get it when missing.
pub fn gemma3_270m() -> PathBuf {
    fixture_model("gemma-3-270m", Some("model.safetensors"), "bash fixtures/get-model.sh gemma3-270m")
}

/// The verified SmolLM2 GGUF the folder is imported from; tells how to get it when missing.
pub fn smollm2_gguf() -> PathBuf {
    fixture_model("SmolLM2-135M-Instruct.Q4_1.gguf", None, "bash fixtures/setup.sh")
}

/// The verified Gemma 3 270M GGUF its folder is imported from; tells how to get it when missing.
pub fn gemma3_270m_gguf() -> PathBuf {
    fixture_model("gemma-3-270m.Q4_K_M.gguf", None, "bash fixtures/get-model.sh gemma3-270m")
}

/// A reference tensor: shape and values as f64 (floats) or i64 (ids).
pub struct Ref {
    pub shape: Vec<usize>,
    pub f: Vec<f64>,
    pub i: Vec<i64>,
}

/// Every tensor of a reference safetensors file.
pub fn read_ref(path: &Path) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = v.data();
            let (f, i) = match v.dtype() {
                StDtype::F32 => (data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(), vec![]),
                StDtype::I64 => (vec![], data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, Ref { shape: v.shape().to_vec(), f, i })
        })
        .collect()
}

pub fn ids(r: &Ref) -> Vec<u32> {
    r.i.iter().map(|&x| x as u32).collect()
}

/// A compile spec for SmolLM2 with `method` and these overrides: statistics from 20,000 tokens
/// of the SOTU corpus, cached under `target/`.
pub fn smollm2_spec(method: factpatch::edit::Method, overrides: &[&str]) -> factpatch::compile::Spec {
    let corpus = root().join("fixtures/corpus/sotu.txt");
    factpatch::compile::Spec {
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        stats: factpatch::compile::StatsSource::Corpus { files: vec![corpus], tokens: 20_000 },
        cache: root().join("target/test-stats"),
        ..factpatch::compile::Spec::new(&smollm2(), method)
    }
}

/// GPT-2's byte → printable character map, for a byte-level tokenizer with 256 ids.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// `fixtures/tiny-llama` with a byte-level tokenizer (ids 0-255 of its 512), at `dir`.
pub fn byte_level_tiny_llama(dir: &Path) -> PathBuf {
    byte_level(&root().join("fixtures/tiny-llama"), dir)
}

/// The tiny model at `src` (a vocabulary of at least 256) with a byte-level tokenizer, at `dir`.
pub fn byte_level(src: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars().into_iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir.to_path_buf()
}
