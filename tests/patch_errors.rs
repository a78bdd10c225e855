//! Bad input gets a clear error and leaves no file behind.

mod common;
use common::*;
use factpatch::apply::{self, Error};
use factpatch::checkpoint::Checkpoint;
use factpatch::patch::{self, Delta, Patch};
use std::io::Write;
use std::path::{Path, PathBuf};

const UP0: &str = "model.layers.0.mlp.up_proj.weight";

struct Fixture {
    _t: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    good: PathBuf,
}

fn fixture() -> Fixture {
    let (t, base, ckpt) = tiny_model();
    let root = t.path().to_path_buf();
    let good = write_patch(&root.join("good.fp"), &ckpt, &[], manifest("rome"), vec![(UP0, Delta::LowRank(vec![factors(24, 16, 1, 3, 0.01)]))]);
    Fixture { _t: t, root, base, good }
}

/// Applies `patch` and checks that it fails without leaving anything in the folder.
fn refuse(f: &Fixture, patch: &Path) -> Error {
    let before: Vec<_> = std::fs::read_dir(&f.root).unwrap().map(|e| e.unwrap().file_name()).collect();
    let err = apply::apply(&f.base, &[patch.to_path_buf()], &f.root.join("out")).unwrap_err();
    let after: Vec<_> = std::fs::read_dir(&f.root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len(), "left files behind: {after:?}");
    assert!(!f.root.join("out").exists());
    assert!(err.to_string().contains(&patch.display().to_string()) || matches!(err, Error::OutputExists(_)), "{err}");
    err
}

fn write(f: &Fixture, name: &str, bytes: &[u8]) -> PathBuf {
    let p = f.root.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The good patch's manifest JSON, edited by `edit`, with `payloads` forged into a new file.
fn forged(f: &Fixture, name: &str, edit: impl FnOnce(&mut serde_json::Value), payloads: &[Vec<u8>]) -> PathBuf {
    let good = Patch::read(&f.good).unwrap();
    let mut json = serde_json::to_value(good.manifest()).unwrap();
    edit(&mut json);
    write(f, name, &forge(&serde_json::to_vec(&json).unwrap(), payloads))
}

fn dense_frame(values: &[f32]) -> Vec<u8> {
    zstd::bulk::compress(&factpatch::checkpoint::Dtype::F32.encode(values), 3).unwrap()
}

/// Sets entry 0 to a dense f32 delta with a payload of `zlen` bytes.
fn as_dense(zlen: usize) -> impl FnOnce(&mut serde_json::Value) {
    move |j| {
        let e = &mut j["entries"][0];
        e["encoding"] = serde_json::json!({"kind": "dense", "vdtype": "F32"});
        e["raw_len"] = (384 * 4).into();
        e["zlen"] = zlen.into();
    }
}

#[test]
fn truncated() {
    let f = fixture();
    let bytes = std::fs::read(&f.good).unwrap();
    for cut in [10, 30, bytes.len() - 1] {
        let p = write(&f, "cut.fp", &bytes[..cut]);
        let err = refuse(&f, &p);
        assert!(matches!(err, Error::Patch(patch::Error::Truncated { .. } | patch::Error::HashMismatch { .. })), "{err}");
    }
}

#[test]
fn flipped_byte_is_a_hash_mismatch() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.good).unwrap();
    for i in [30, bytes.len() / 2, bytes.len() - 40] {
        bytes[i] ^= 0x10;
        let p = write(&f, "flip.fp", &bytes);
        let err = refuse(&f, &p);
        assert!(matches!(err, Error::Patch(patch::Error::HashMismatch { .. })), "{err}");
        assert!(err.to_string().contains("hash mismatch"));
        bytes[i] ^= 0x10;
    }
    let err = refuse(&f, &write(&f, "junk.fp", b"definitely not a patch, just some text here........................"));
    assert!(matches!(err, Error::Patch(patch::Error::BadMagic(_))), "{err}");
}

#[test]
fn patch_for_another_base() {
    let f = fixture();
    let other = f.root.join("other");
    let mut specs = tiny_specs();
    specs[2].3[0] += 1.0;
    write_model(&other, &specs, 1);
    let err = apply::apply(&other, std::slice::from_ref(&f.good), &f.root.join("out")).unwrap_err();
    assert!(matches!(err, Error::BaseMismatch { .. }), "{err}");
    assert!(err.to_string().contains(UP0));
    assert!(!f.root.join("out").exists());
}

#[test]
fn wrong_shapes() {
    let f = fixture();
    let other = f.root.join("other");
    let mut specs = tiny_specs();
    specs[2].2 = vec![16, 24];
    write_model(&other, &specs, 1);
    let err = apply::apply(&other, std::slice::from_ref(&f.good), &f.root.join("out")).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // A delta that does not fit is refused by the writer too.
    let ckpt = Checkpoint::open(&f.base).unwrap();
    let t = patch::BaseTensor::of(&ckpt.tensor(UP0).unwrap());
    let e = patch::encode(manifest("x"), vec![(t, Delta::Dense(vec![0.0; 5]))]).unwrap_err();
    assert!(e.to_string().contains("5 values"), "{e}");
}

#[test]
fn non_finite_deltas() {
    let f = fixture();
    let mut v = vec![0.0f32; 384];
    v[7] = f32::NAN;
    let frame = dense_frame(&v);
    let p = forged(&f, "nan.fp", as_dense(frame.len()), &[frame]);
    let err = refuse(&f, &p);
    assert!(matches!(err, Error::Patch(patch::Error::NonFinite { index: 7, .. })), "{err}");
    // Finite factors whose product overflows are refused at apply time.
    let ckpt = Checkpoint::open(&f.base).unwrap();
    let big = patch::Factors { rank: 1, u: vec![1e20; 24], v: vec![1e20; 16] };
    let p = write_patch(&f.root.join("inf.fp"), &ckpt, &[], manifest("x"), vec![(UP0, Delta::LowRank(vec![big]))]);
    let err = refuse(&f, &p);
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}

#[test]
fn decompression_bomb() {
    let f = fixture();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    std::io::copy(&mut std::io::Read::take(std::io::repeat(0), 1 << 30), &mut enc).unwrap();
    let frame = enc.finish().unwrap();
    assert!(frame.len() < 1 << 20);
    let p = forged(&f, "bomb.fp", as_dense(frame.len()), &[frame]);
    let err = refuse(&f, &p);
    assert!(err.to_string().contains("more than 1536"), "{err}");
}

#[test]
fn absurd_sizes() {
    let f = fixture();
    let frame = dense_frame(&[0.0; 4]);
    let p = forged(
        &f,
        "absurd.fp",
        |j| {
            as_dense(frame.len())(j);
            j["entries"][0]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
            j["entries"][0]["raw_len"] = serde_json::json!(u64::MAX);
        },
        std::slice::from_ref(&frame),
    );
    let err = refuse(&f, &p);
    assert!(err.to_string().contains("absurdly large"), "{err}");
    let mut bytes = std::fs::read(&f.good).unwrap();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = refuse(&f, &write(&f, "mlen.fp", &bytes));
    assert!(matches!(err, Error::Patch(patch::Error::Truncated { .. })), "{err}");
}

#[test]
fn duplicate_tensors() {
    let f = fixture();
    let good = Patch::read(&f.good).unwrap();
    let e = good.manifest().entries[0].clone();
    let frame = good.bytes()[good.bytes().len() - 32 - e.zlen as usize..good.bytes().len() - 32].to_vec();
    let p = forged(
        &f,
        "dup.fp",
        |j| {
            let entry = j["entries"][0].clone();
            j["entries"] = serde_json::json!([entry.clone(), entry]);
        },
        &[frame.clone(), frame],
    );
    let err = refuse(&f, &p);
    assert!(matches!(err, Error::Patch(patch::Error::DuplicateTensor { .. })), "{err}");
}

#[test]
fn output_that_exists() {
    let f = fixture();
    let out = f.root.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::File::create(out.join("keep")).unwrap().write_all(b"x").unwrap();
    let err = apply::apply(&f.base, std::slice::from_ref(&f.good), &out).unwrap_err();
    assert!(matches!(err, Error::OutputExists(_)), "{err}");
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"x");
    let err = apply::merge(std::slice::from_ref(&f.good), &f.good, None, false).unwrap_err();
    assert!(matches!(err, Error::OutputExists(_)), "{err}");
    let err = apply::diff(&f.base, &f.base, &f.good).unwrap_err();
    assert!(matches!(err, Error::OutputExists(_)), "{err}");
}
