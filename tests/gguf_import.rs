//! GGUF import on small GGUF files built here: a correct import (names,
//! rotary un-permutation, config, tokenizer, determinism) and every
//! rejected input, which must name the file and leave nothing behind.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use factpatch::gguf::{import, Error, OutDtype};
use safetensors::SafeTensors;

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 16;
const TOKENS: [&str; 5] = ["<|endoftext|>", "a", "b", "ab", "Ġ"];

/// A deterministic `rows x cols` matrix (row-major) whose entries are all distinct.
fn matrix(seed: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| (seed * 1000 + i) as f32 / 64.0).collect()
}

/// llama.cpp's rotary permutation of q/k rows: each head's rows
/// `[x_0..x_{d/2}, y_0..y_{d/2}]` become `[x_0, y_0, x_1, y_1, ...]`.
fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let half = w.len() / cols / heads / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let r = h * 2 * half + t * half + i;
                out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
}

/// The Hugging Face-ordered weights of the tiny model: (GGUF name, shape, values).
fn tiny_weights() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![TOKENS.len(), HIDDEN]),
        ("output_norm.weight", vec![HIDDEN]),
        ("blk.0.attn_q.weight", vec![q, HIDDEN]),
        ("blk.0.attn_k.weight", vec![kv, HIDDEN]),
        ("blk.0.attn_v.weight", vec![kv, HIDDEN]),
        ("blk.0.attn_output.weight", vec![HIDDEN, q]),
        ("blk.0.attn_norm.weight", vec![HIDDEN]),
        ("blk.0.ffn_norm.weight", vec![HIDDEN]),
        ("blk.0.ffn_gate.weight", vec![INTER, HIDDEN]),
        ("blk.0.ffn_up.weight", vec![INTER, HIDDEN]),
        ("blk.0.ffn_down.weight", vec![HIDDEN, INTER]),
    ];
    shapes
        .into_iter()
        .enumerate()
        .map(|(seed, (name, shape))| {
            let rows = shape[0];
            let cols = shape.get(1).copied().unwrap_or(1);
            (name.to_string(), shape, matrix(seed, rows, cols))
        })
        .collect()
}

/// Write a tiny llama GGUF to `path`; `arch`, `pre` and `model` override the architecture,
/// pre-tokenizer and tokenizer model names.
fn write_tiny_gguf(path: &Path, arch: &str, pre: &str, model: &str) {
    use gguf_file::Value as V;
    let strings = |items: &[&str]| V::Array(items.iter().map(|s| V::String(s.to_string())).collect());
    let metadata: Vec<(&str, V)> = vec![
        ("general.architecture", V::String(arch.into())),
        ("llama.block_count", V::U32(1)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(INTER as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", V::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.vocab_size", V::U32(TOKENS.len() as u32)),
        ("tokenizer.ggml.model", V::String(model.into())),
        ("tokenizer.ggml.pre", V::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&TOKENS)),
        ("tokenizer.ggml.token_type", V::Array([3, 1, 1, 1, 1].map(V::I32).to_vec())),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id", V::U32(0)),
        ("tokenizer.ggml.eos_token_id", V::U32(0)),
    ];
    let tensors: Vec<(String, QTensor)> = tiny_weights()
        .into_iter()
        .map(|(name, shape, values)| {
            let cols = shape.get(1).copied().unwrap_or(1);
            let values = match name.as_str() {
                "blk.0.attn_q.weight" => permute(&values, HEADS, cols),
                "blk.0.attn_k.weight" => permute(&values, KV_HEADS, cols),
                _ => values,
            };
            let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
            (name, QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// A temp dir holding a valid tiny GGUF, and the output path next to it.
fn setup(arch: &str, pre: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, arch, pre, "gpt2");
    let out = dir.path().join("out").join("model");
    (dir, gguf, out)
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Import must fail, naming `gguf` and containing `problem`, with no output left.
fn assert_rejected(gguf: &Path, out: &Path, problem: &str) -> Error {
    let err = import(gguf, out, OutDtype::F32).expect_err("import should fail");
    let msg = err.to_string();
    assert!(msg.contains(&gguf.display().to_string()), "message does not name the file: {msg}");
    assert!(msg.contains(problem), "message does not say `{problem}`: {msg}");
    assert!(!out.exists(), "output {} left behind", out.display());
    let parent = out.parent().unwrap();
    if parent.exists() {
        assert_eq!(listing(parent), Vec::<String>::new(), "staging leftovers");
    }
    err
}

#[test]
fn imports_tiny_llama_with_hf_names_and_unpermuted_qk() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    let summary = import(&gguf, &out, OutDtype::F32).unwrap();
    assert_eq!(summary.tensors, 11);
    assert!(summary.tie_word_embeddings);
    assert_eq!(listing(&out), ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let hf = |gguf: &str| -> String {
        match gguf {
            "token_embd.weight" => "model.embed_tokens.weight".into(),
            "output_norm.weight" => "model.norm.weight".into(),
            other => {
                let part = other.trim_start_matches("blk.0.").trim_end_matches(".weight");
                let hf_part = match part {
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    _ => "mlp.down_proj",
                };
                format!("model.layers.0.{hf_part}.weight")
            }
        }
    };
    for (name, shape, values) in tiny_weights() {
        let t = st.tensor(&hf(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let got: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(got, values, "{name} differs from the Hugging Face original");
    }

    let config: serde_json::Value = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["num_key_value_heads"], KV_HEADS);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["torch_dtype"], "float32");

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("ab a<|endoftext|>", false).unwrap();
    assert_eq!(enc.get_ids(), [3, 4, 1, 0]);
    assert_eq!(enc.get_offsets(), [(0, 2), (2, 3), (3, 4), (4, 17)]);
}

#[test]
fn import_is_deterministic_and_bf16_halves_the_weights() {
    let (dir, gguf, out) = setup("llama", "gpt2");
    import(&gguf, &out, OutDtype::F32).unwrap();
    let again = dir.path().join("again");
    import(&gguf, &again, OutDtype::F32).unwrap();
    for name in listing(&out) {
        assert_eq!(fs::read(out.join(&name)).unwrap(), fs::read(again.join(&name)).unwrap(), "{name}");
    }
    let bf16 = dir.path().join("bf16");
    import(&gguf, &bf16, OutDtype::Bf16).unwrap();
    let bytes = fs::read(bf16.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("model.norm.weight").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
    let first = half::bf16::from_le_bytes([t.data()[0], t.data()[1]]);
    assert_eq!(first.to_f32(), matrix(1, HIDDEN, 1)[0]);
}

#[test]
fn truncated_tensor_data_is_rejected() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    let bytes = fs::read(&gguf).unwrap();
    fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(assert_rejected(&gguf, &out, "truncated"), Error::Corrupt { .. }));
}

#[test]
fn truncated_header_is_rejected() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    let bytes = fs::read(&gguf).unwrap();
    fs::write(&gguf, &bytes[..200]).unwrap();
    assert!(matches!(assert_rejected(&gguf, &out, "truncated"), Error::Corrupt { .. }));
}

#[test]
fn corrupt_magic_is_rejected() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    let mut bytes = fs::read(&gguf).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    fs::write(&gguf, &bytes).unwrap();
    let err = assert_rejected(&gguf, &out, "magic");
    assert!(matches!(err, Error::Corrupt { .. }));
}

#[test]
fn unsupported_architecture_is_rejected() {
    let (_dir, gguf, out) = setup("gpt2", "smollm");
    let err = assert_rejected(&gguf, &out, "unsupported architecture `gpt2`");
    assert!(matches!(err, Error::UnsupportedArchitecture { .. }));
}

#[test]
fn unsupported_pre_tokenizer_is_rejected_listing_supported_ones() {
    let (_dir, gguf, out) = setup("llama", "qwen2");
    let err = assert_rejected(&gguf, &out, "unsupported pre-tokenizer `qwen2` (supported: default, gpt2, smollm)");
    assert!(matches!(err, Error::UnsupportedPreTokenizer { .. }));
}

#[test]
fn sentencepiece_tokenizer_outside_gemma_is_rejected() {
    let (_dir, gguf, out) = setup("llama", "default");
    write_tiny_gguf(&gguf, "llama", "default", "llama");
    let err = assert_rejected(&gguf, &out, "unsupported tokenizer model `llama` for architecture `llama` (supported: gpt2; llama with gemma3)");
    assert!(matches!(err, Error::UnsupportedTokenizer { .. }));
}

#[test]
fn missing_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("absent.gguf");
    let out = dir.path().join("out").join("model");
    assert!(matches!(assert_rejected(&gguf, &out, "cannot open"), Error::Open { .. }));
}

#[test]
fn existing_non_empty_output_is_refused_and_kept() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = import(&gguf, &out, OutDtype::F32).expect_err("must refuse");
    let msg = err.to_string();
    assert!(matches!(err, Error::OutputExists { .. }));
    assert!(msg.contains(&out.display().to_string()) && msg.contains("not empty"), "{msg}");
    assert_eq!(listing(&out), ["keep.txt"]);
    assert_eq!(listing(out.parent().unwrap()), ["model"]);
}

#[test]
fn existing_empty_output_is_filled() {
    let (_dir, gguf, out) = setup("llama", "smollm");
    fs::create_dir_all(&out).unwrap();
    import(&gguf, &out, OutDtype::F32).unwrap();
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(listing(out.parent().unwrap()), ["model"]);
}
