//! `apply` onto a GGUF file, on the real SmolLM2 Q4_1 GGUF that the test model folder is
//! imported from: the demo's MEMIT patch, compiled on that folder, applied to the GGUF with
//! the touched tensors stored as Q4_1 again, f16 or f32, checked against `apply` onto the f32
//! folder; the same for a Gemma 3 270M Q4_K_M patch with a `(1 + w)` norm; every type candle
//! quantizes; and refusals, which must leave nothing behind.

mod common;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{factors, gemma3_270m, manifest, root, smollm2, smollm2_gguf, smollm2_spec, values, write_patch};
use factpatch::apply::{self, ApplyOptions, Stack};
use factpatch::checkpoint::{Checkpoint, Dtype, Tensors};
use factpatch::compile::Compiler;
use factpatch::edit::{request, Method};
use factpatch::gguf::{self, Error, OutDtype, TouchedAs};
use factpatch::patch::{self, BaseTensor, Delta, Factors};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The demo's fact compiled with MEMIT on the SmolLM2 folder (RECT 40%), once per run,
/// written into `dir`.
fn memit_patch(dir: &Path) -> PathBuf {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| {
        let mut compiler = Compiler::open(&smollm2_spec(Method::Memit, &[])).unwrap();
        let facts = [request::parse_fact("{} is located in the city of|The Eiffel Tower|Rome").unwrap()];
        compiler.patch(&facts).unwrap().patch.bytes
    });
    let path = dir.join("eiffel.fpatch");
    fs::write(&path, bytes).unwrap();
    path
}

/// Options for a test: no fsync, tensor hashes remembered in `dir/hashes`.
fn options(dir: &Path) -> ApplyOptions {
    ApplyOptions { sync: false, hash_cache: Some(dir.join("hashes")), ..Default::default() }
}

/// The GGUF name of a Hugging Face tensor of a layer (the few this file uses).
fn gguf_name(hf: &str) -> String {
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "mlp.down_proj.weight" => "ffn_down",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{part}.weight")
}

/// A GGUF file's bytes and its header as candle reads it.
struct GgufBytes {
    bytes: Vec<u8>,
    content: Content,
}

impl GgufBytes {
    fn read(path: &Path) -> Self {
        let bytes = fs::read(path).unwrap();
        let content = Content::read(&mut Cursor::new(&bytes)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        GgufBytes { bytes, content }
    }

    fn dtype(&self, name: &str) -> GgmlDType {
        self.content.tensor_infos[name].ggml_dtype
    }

    /// The stored bytes of tensor `name`.
    fn raw(&self, name: &str) -> &[u8] {
        let info = &self.content.tensor_infos[name];
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        &self.bytes[start..start + len]
    }

    /// Tensor `name` dequantized by candle, in the file's row order.
    fn values(&self, name: &str) -> Vec<f32> {
        let q = self.content.tensor(&mut Cursor::new(&self.bytes), name, &Device::Cpu).unwrap();
        q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Where the metadata section ends: at the first tensor info, found by its bytes (name
    /// length, name, number of dimensions).
    fn metadata_end(&self) -> usize {
        let (name, info) = self.content.tensor_infos.iter().min_by_key(|(_, i)| i.offset).unwrap();
        let mut needle = (name.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(name.as_bytes());
        needle.extend_from_slice(&(info.shape.rank() as u32).to_le_bytes());
        let head = &self.bytes[..self.content.tensor_data_offset as usize];
        head.windows(needle.len()).position(|w| w == needle).expect("the first tensor info")
    }
}

/// One quantization step, with room for the f16 rounding of the block's scale: an element
/// clamped at the top of a symmetric type's range (Q4_0, Q5_0) is up to a step away.
const ONE_STEP: f32 = 1.01;

/// The quantization step of element `k` of a tensor stored as `dtype` in `raw`: the block's
/// scale `|d|`, the f16 at the start of each block of the legacy types (Q4_0 to Q8_0).
fn step(dtype: GgmlDType, raw: &[u8], k: usize) -> f32 {
    let block = k / dtype.block_size() * dtype.type_size();
    half::f16::from_le_bytes([raw[block], raw[block + 1]]).to_f32().abs()
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn memit_patch_on_the_q4_1_gguf_matches_apply_on_the_folder() {
    let t = tempfile::tempdir().unwrap();
    let patch = memit_patch(t.path());
    let stack = Stack::load(std::slice::from_ref(&patch)).unwrap();
    let touched: Vec<String> = stack.touched().map(String::from).collect();
    assert_eq!(touched.len(), 5, "MEMIT edits layers 4-8: {touched:?}");
    let touched_gguf: BTreeSet<String> = touched.iter().map(|n| gguf_name(n)).collect();

    // The reference: the same patch applied onto the f32 folder imported from this GGUF.
    let folder = t.path().join("folder");
    let on_folder = apply::apply_with(&smollm2(), std::slice::from_ref(&patch), &folder, &options(t.path())).unwrap();
    let want = Checkpoint::open(&folder).unwrap();
    let base = GgufBytes::read(&smollm2_gguf());
    assert!(touched_gguf.iter().all(|n| base.dtype(n) == GgmlDType::Q4_1));

    for (touched_as, dtype) in [(TouchedAs::Own, GgmlDType::Q4_1), (TouchedAs::F16, GgmlDType::F16), (TouchedAs::F32, GgmlDType::F32)] {
        let out = t.path().join(format!("{touched_as:?}.gguf"));
        let s = gguf::apply(&smollm2_gguf(), std::slice::from_ref(&patch), &out, &options(t.path()), touched_as).unwrap();
        assert_eq!((s.tensors_patched, s.bytes_written), (5, fs::metadata(&out).unwrap().len()));

        // The metadata and every untouched tensor are the input's bytes; touched ones have the type asked for.
        let got = GgufBytes::read(&out);
        let end = base.metadata_end();
        assert!(end > 1_000_000, "the metadata holds the tokenizer: {end} bytes");
        assert!(got.bytes[..end] == base.bytes[..end], "{touched_as:?}: metadata bytes differ");
        assert_eq!(got.content.tensor_infos.len(), base.content.tensor_infos.len());
        for name in base.content.tensor_infos.keys() {
            if touched_gguf.contains(name) {
                assert_eq!(got.dtype(name), dtype, "{name}");
            } else {
                assert_eq!(got.dtype(name), base.dtype(name), "{name}");
                assert!(got.raw(name) == base.raw(name), "{touched_as:?}: untouched tensor {name} changed");
            }
        }
        if touched_as == TouchedAs::Own {
            let again = t.path().join("again.gguf");
            gguf::apply(&smollm2_gguf(), std::slice::from_ref(&patch), &again, &options(t.path()), touched_as).unwrap();
            assert!(fs::read(&again).unwrap() == got.bytes, "same inputs, other bytes");
            assert_eq!(got.bytes.len(), base.bytes.len());
            let header = base.content.tensor_data_offset as usize;
            assert!(got.bytes[..header] == base.bytes[..header], "re-quantized in place: the whole header is the input's");
        }

        // The output imports, and its import is the model the printed identity names.
        let imported = t.path().join(format!("{touched_as:?}-import"));
        gguf::import(&out, &imported, OutDtype::F32).unwrap();
        let import = Checkpoint::open(&imported).unwrap();
        assert_eq!(import.identity().unwrap().to_hex().to_string(), s.identity, "{touched_as:?}");

        // Each touched tensor against base + delta as `apply` writes it into the f32 folder.
        for name in &touched {
            let (got_t, want_t) = (import.tensor(name).unwrap(), want.tensor(name).unwrap());
            let (g, w) = (got_t.to_f32(), want_t.to_f32());
            match touched_as {
                TouchedAs::F32 => assert!(got_t.bytes == want_t.bytes, "{name}: f32 differs from apply onto the folder"),
                TouchedAs::F16 => assert!(g.iter().zip(w.iter()).all(|(g, w)| *g == half::f16::from_f32(*w).to_f32()), "{name}: not f16(base + delta)"),
                TouchedAs::Own => {
                    let raw = got.raw(&gguf_name(name));
                    for (k, (g, w)) in g.iter().zip(w.iter()).enumerate() {
                        let d = step(GgmlDType::Q4_1, raw, k);
                        assert!((g - w).abs() <= ONE_STEP * d, "{name}[{k}]: {g} is more than one step ({d}) from {w}");
                    }
                }
            }
        }
        if touched_as == TouchedAs::F32 {
            assert_eq!(s.identity, on_folder.identity, "the f32 output is the model apply writes into the folder");
        }
    }
}

/// On the real Gemma 3 270M Q4_K_M GGUF: a low-rank MLP edit and a change to a `(1 + w)` norm,
/// applied with the touched tensors as f32: the matrix imports back to the bytes `apply` writes
/// into the imported folder, and the norm is stored as llama.cpp stores it, 1 + that folder's
/// value (exactly; subtracting the 1 again on import rounds).
#[test]
fn gemma3_patch_on_the_q4_k_m_gguf_matches_apply_on_the_folder() {
    let t = tempfile::tempdir().unwrap();
    let (dir, gguf_path) = (gemma3_270m(), root().join("fixtures/models/gemma-3-270m.Q4_K_M.gguf"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (down, norm) = ("model.layers.6.mlp.down_proj.weight", "model.layers.6.post_feedforward_layernorm.weight");
    let deltas = vec![(down, Delta::LowRank(vec![factors(640, 2048, 2, 7, 0.01)])), (norm, Delta::Dense(values(640, 9, 0.05)))];
    let patch = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], manifest("memit"), deltas);
    let folder = t.path().join("folder");
    apply::apply_with(&dir, std::slice::from_ref(&patch), &folder, &options(t.path())).unwrap();
    let base = GgufBytes::read(&gguf_path);
    assert!(!matches!(base.dtype("blk.6.ffn_down.weight"), GgmlDType::F32 | GgmlDType::F16), "a quantized matrix");

    let out = t.path().join("edited.gguf");
    let s = gguf::apply(&gguf_path, std::slice::from_ref(&patch), &out, &options(t.path()), TouchedAs::F32).unwrap();
    assert_eq!(s.tensors_patched, 2);
    let got = GgufBytes::read(&out);
    for name in base.content.tensor_infos.keys() {
        if name != "blk.6.ffn_down.weight" && name != "blk.6.post_ffw_norm.weight" {
            assert!(got.raw(name) == base.raw(name), "untouched tensor {name} changed");
        }
    }
    let want = Checkpoint::open(&folder).unwrap();
    // The matrix imports back to the folder's bytes; the norm is stored as 1 + (the folder's w + δ).
    let imported = t.path().join("import");
    gguf::import(&out, &imported, OutDtype::F32).unwrap();
    assert!(Checkpoint::open(&imported).unwrap().tensor(down).unwrap().bytes == want.tensor(down).unwrap().bytes, "{down}: differs from apply onto the folder");
    let stored: Vec<f32> = want.tensor(norm).unwrap().to_f32().iter().map(|w| w + 1.0).collect();
    assert_eq!(got.values("blk.6.post_ffw_norm.weight"), stored, "{norm}: not 1 + the folder's value");
}

#[test]
fn q_and_k_edits_go_through_the_rotary_permutation_and_back() {
    let t = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&smollm2()).unwrap();
    let (q, k) = ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight");
    let rank1 = |name: &str, seed: u64| {
        let shape = ckpt.tensor(name).unwrap().shape.to_vec();
        Delta::LowRank(vec![Factors { rank: 1, u: values(shape[0], seed, 0.05), v: values(shape[1], seed + 1, 1.0) }])
    };
    let patch = write_patch(&t.path().join("qk.fpatch"), &ckpt, &[], manifest("rome"), vec![(q, rank1(q, 1)), (k, rank1(k, 3))]);
    let out = t.path().join("qk.gguf");
    let options = ApplyOptions { verify_output: true, ..options(t.path()) };
    let s = gguf::apply(&smollm2_gguf(), std::slice::from_ref(&patch), &out, &options, TouchedAs::F32).unwrap();
    let imported = t.path().join("import");
    gguf::import(&out, &imported, OutDtype::F32).unwrap();
    let import = Checkpoint::open(&imported).unwrap();
    let stack = Stack::load(&[patch]).unwrap();
    let overlay = apply::Overlay::new(&ckpt, &stack).unwrap();
    for name in [q, k] {
        assert!(import.tensor(name).unwrap().bytes == overlay.tensor(name).unwrap().bytes, "{name}");
    }
    assert_eq!(import.identity().unwrap().to_hex().to_string(), s.identity);
}

/// Every type candle reads from a GGUF file and quantizes (all it has but Q8_1 and Q8_K, which
/// it quantizes but does not read), one per layer's `ffn_down`, in a GGUF made from the real one.
const TYPES: [GgmlDType; 13] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::F32,
];

#[test]
fn every_type_candle_reads_is_quantized_again() {
    let t = tempfile::tempdir().unwrap();
    // The real GGUF with `blk.L.ffn_down` stored as TYPES[L], written by candle.
    let mixed = t.path().join("mixed.gguf");
    {
        let base = GgufBytes::read(&smollm2_gguf());
        let mut keys: Vec<&String> = base.content.metadata.keys().collect();
        keys.sort();
        let metadata: Vec<(&str, &gguf_file::Value)> = keys.into_iter().map(|k| (k.as_str(), &base.content.metadata[k])).collect();
        let mut names: Vec<&String> = base.content.tensor_infos.keys().collect();
        names.sort_by_key(|n| base.content.tensor_infos[*n].offset);
        let tensors: Vec<(&str, QTensor)> = names
            .into_iter()
            .map(|name| {
                let q = base.content.tensor(&mut Cursor::new(&base.bytes), name, &Device::Cpu).unwrap();
                let layer = name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".ffn_down.weight")).map(|l| l.parse::<usize>().unwrap());
                match layer.filter(|&l| l < TYPES.len()) {
                    Some(l) => (name.as_str(), QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), TYPES[l]).unwrap()),
                    None => (name.as_str(), q),
                }
            })
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
        gguf_file::write(&mut fs::File::create(&mixed).unwrap(), &metadata, &refs).unwrap();
    }
    let src = GgufBytes::read(&mixed);

    // A rank-1 change of every ffn_down, against its base as candle dequantizes it.
    let (rows, cols) = (576, 1536);
    let factors = |l: usize| Factors { rank: 1, u: values(rows, 10 + l as u64, 0.05), v: values(cols, 50 + l as u64, 1.0) };
    let deltas = (0..TYPES.len())
        .map(|l| {
            let name = format!("model.layers.{l}.mlp.down_proj.weight");
            let bytes = Dtype::F32.encode(&src.values(&format!("blk.{l}.ffn_down.weight")));
            let base = BaseTensor { name, dtype: Dtype::F32, shape: vec![rows, cols], blake3: blake3::hash(&bytes).to_hex().to_string() };
            (base, Delta::LowRank(vec![factors(l)]))
        })
        .collect();
    let patch = t.path().join("types.fpatch");
    fs::write(&patch, patch::encode(manifest("rome"), deltas).unwrap().bytes).unwrap();

    for touched_as in [TouchedAs::Own, TouchedAs::F16] {
        let out = t.path().join(format!("{touched_as:?}.gguf"));
        let options = ApplyOptions { verify_output: true, ..options(t.path()) };
        gguf::apply(&mixed, std::slice::from_ref(&patch), &out, &options, touched_as).unwrap();
        let got = GgufBytes::read(&out);
        for (l, &own) in TYPES.iter().enumerate() {
            let name = format!("blk.{l}.ffn_down.weight");
            // base + u vᵀ, each element as apply adds it (one f32 product, added where non-zero).
            let f = factors(l);
            let target: Vec<f32> = src
                .values(&name)
                .iter()
                .enumerate()
                .map(|(k, &w)| {
                    let d = f.u[k / cols] * f.v[k % cols];
                    if d != 0.0 {
                        w + d
                    } else {
                        w
                    }
                })
                .collect();
            let dtype = if touched_as == TouchedAs::Own { own } else { GgmlDType::F16 };
            assert_eq!(got.dtype(&name), dtype, "{name}");
            let expected = QTensor::quantize(&Tensor::from_vec(target.clone(), (rows, cols), &Device::Cpu).unwrap(), dtype).unwrap();
            assert!(got.raw(&name) == &*expected.data().unwrap(), "{name}: not {dtype:?} of base + delta");
            if touched_as == TouchedAs::Own && matches!(own, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0) {
                for (k, (g, w)) in got.values(&name).iter().zip(&target).enumerate() {
                    let d = step(own, got.raw(&name), k);
                    assert!((g - w).abs() <= ONE_STEP * d, "{name}[{k}]: {g} is more than one step ({d}) from {w}");
                }
            }
        }
    }
}

#[test]
fn another_base_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let patch = memit_patch(t.path());
    let base = GgufBytes::read(&smollm2_gguf());
    // A copy with one byte of a tensor changed (a Q8_0 or Q4_1 quant, past the block's scale).
    let altered = |tensor: &str, file: &str| -> PathBuf {
        let info = &base.content.tensor_infos[tensor];
        let mut bytes = base.bytes.clone();
        bytes[(base.content.tensor_data_offset + info.offset) as usize + 5] ^= 0x11;
        let path = t.path().join(file);
        fs::write(&path, bytes).unwrap();
        path
    };
    let out = t.path().join("out.gguf");
    let nothing_written = |what: &str| {
        let left: Vec<String> = listing(t.path()).into_iter().filter(|n| n.contains("out.gguf")).collect();
        assert!(left.is_empty(), "{what}: output or temporary left: {left:?}");
    };

    // Another model (the token embedding differs): its identity is not the patch's base.
    let other = altered("token_embd.weight", "other.gguf");
    let err = gguf::apply(&other, std::slice::from_ref(&patch), &out, &options(t.path()), TouchedAs::Own).unwrap_err();
    assert!(matches!(err, Error::Apply(apply::Error::OtherBase { .. })), "{err}");
    assert!(err.to_string().contains(&other.display().to_string()), "{err}");
    nothing_written("other base");
    // With --allow-other-base the tensor hashes decide: the touched ones are the patch's base.
    let allow = ApplyOptions { allow_other_base: true, ..options(t.path()) };
    gguf::apply(&other, std::slice::from_ref(&patch), &out, &allow, TouchedAs::Own).unwrap();
    fs::remove_file(&out).unwrap();

    // A touched tensor that differs is refused even then.
    let down = altered("blk.4.ffn_down.weight", "down.gguf");
    let err = gguf::apply(&down, std::slice::from_ref(&patch), &out, &allow, TouchedAs::Own).unwrap_err();
    assert!(matches!(&err, Error::Apply(apply::Error::BaseMismatch { name, .. }) if name == "model.layers.4.mlp.down_proj.weight"), "{err}");
    nothing_written("touched tensor differs");
    // Even when the hash cache lies about it, its entries altered to give the patch's base hash:
    // the patches are verified against the cache, but the tensor's bytes are checked again as
    // they are read for writing, and nothing is committed.
    let name = "model.layers.4.mlp.down_proj.weight";
    let stack = Stack::load(std::slice::from_ref(&patch)).unwrap();
    let expected = &stack.patches()[0].manifest().entries.iter().find(|e| e.tensor == name).unwrap().base_blake3;
    let mut lied = 0;
    for entry in fs::read_dir(t.path().join("hashes")).unwrap() {
        let path = entry.unwrap().path();
        let mut hashes: BTreeMap<String, String> = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        if hashes[name] != *expected {
            hashes.insert(name.to_string(), expected.clone());
            fs::write(&path, serde_json::to_vec(&hashes).unwrap()).unwrap();
            lied += 1;
        }
    }
    assert_eq!(lied, 1, "one cache entry, down.gguf's, had another hash");
    let err = gguf::apply(&down, std::slice::from_ref(&patch), &out, &allow, TouchedAs::Own).unwrap_err();
    assert!(matches!(&err, Error::Apply(apply::Error::BaseMismatch { name: n, .. }) if n == name), "{err}");
    nothing_written("the cache lied");

    // A patch made for the tiny llama fixture.
    let tiny = Checkpoint::open(&root().join("fixtures/tiny-llama")).unwrap();
    let mut m = manifest("rome");
    m.base_model = Some(tiny.identity().unwrap().to_hex().to_string());
    let name = "model.layers.0.mlp.down_proj.weight";
    let delta = Delta::LowRank(vec![Factors { rank: 1, u: values(64, 1, 0.1), v: values(128, 2, 1.0) }]);
    let tiny_patch = write_patch(&t.path().join("tiny.fpatch"), &tiny, &[], m, vec![(name, delta)]);
    let err = gguf::apply(&smollm2_gguf(), std::slice::from_ref(&tiny_patch), &out, &options(t.path()), TouchedAs::Own).unwrap_err();
    assert!(matches!(err, Error::Apply(apply::Error::OtherBase { .. })), "{err}");
    let err = gguf::apply(&smollm2_gguf(), &[tiny_patch], &out, &allow, TouchedAs::Own).unwrap_err();
    assert!(matches!(err, Error::Apply(apply::Error::ShapeMismatch { .. })), "{err}");
    nothing_written("tiny-llama patch");
}

#[test]
fn bad_gguf_files_are_refused_naming_them() {
    let t = tempfile::tempdir().unwrap();
    let patch = memit_patch(t.path());
    let bytes = fs::read(smollm2_gguf()).unwrap();
    let out = t.path().join("out.gguf");
    let refused = |file: &str, contents: &[u8], problem: &str| -> Error {
        let path = t.path().join(file);
        fs::write(&path, contents).unwrap();
        let err = gguf::apply(&path, std::slice::from_ref(&patch), &out, &options(t.path()), TouchedAs::Own).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains(problem), "{file}: {msg}");
        assert!(!out.exists() && !listing(t.path()).iter().any(|n| n.starts_with(".out.gguf")), "{file}: output left behind");
        err
    };
    assert!(matches!(refused("truncated.gguf", &bytes[..bytes.len() / 2], "does not lie inside the file"), Error::Corrupt { .. }));
    let mut v1 = bytes.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(refused("v1.gguf", &v1, "version 1"), Error::UnsupportedVersion { .. }));
    // candle's reader would divide by this alignment.
    let mut zero = Vec::new();
    gguf_file::write(&mut Cursor::new(&mut zero), &[("general.alignment", &gguf_file::Value::U32(0))], &[]).unwrap();
    assert!(matches!(refused("zero-alignment.gguf", &zero, "general.alignment"), Error::Metadata { .. }));
    // The output may not replace anything, an input least of all.
    let err = gguf::apply(&smollm2_gguf(), std::slice::from_ref(&patch), &patch, &options(t.path()), TouchedAs::Own).unwrap_err();
    assert!(err.to_string().contains("input"), "{err}");
}

#[test]
fn the_cli_applies_to_a_gguf_file() {
    let t = tempfile::tempdir().unwrap();
    let patch = memit_patch(t.path());
    let out = t.path().join("edited.gguf");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_factpatch")).args(args).env("FACTPATCH_CACHE", t.path().join("cache")).output().unwrap()
    };
    let (model, patch, out) = (smollm2_gguf().into_os_string(), patch.into_os_string(), out.into_os_string());
    let o = run(&["apply".as_ref(), "--model".as_ref(), &model, "--patch".as_ref(), &patch, "--out".as_ref(), &out, "--touched-as".as_ref(), "f32".as_ref()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("5 tensor(s) changed"));
    assert_eq!(GgufBytes::read(Path::new(&out)).dtype("blk.4.ffn_down.weight"), GgmlDType::F32);
    let folder = smollm2().into_os_string();
    let o = run(&[
        "apply".as_ref(),
        "--model".as_ref(),
        &folder,
        "--patch".as_ref(),
        &patch,
        "--out".as_ref(),
        t.path().join("x").as_os_str(),
        "--touched-as".as_ref(),
        "f16".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.starts_with("error: ") && err.contains("GGUF models only"), "{err}");
}
