//! Exact round trips: merge, diff, RECT vs explicit sparse, sharded folders, determinism.

mod common;
use common::*;
use factpatch::apply::{self, product, Stack};
use factpatch::checkpoint::{Checkpoint, Dtype, Tensors};
use factpatch::patch::{Delta, Edit, Patch};
use factpatch::rect;
use std::io::Write;
use std::path::PathBuf;

const DOWN0: &str = "model.layers.0.mlp.down_proj.weight";
const UP0: &str = "model.layers.0.mlp.up_proj.weight";
const DOWN1: &str = "model.layers.1.mlp.down_proj.weight";

fn edit(subject: &str, target: &str) -> Edit {
    Edit {
        subject: subject.into(),
        relation: "capital".into(),
        prompt: format!("The capital of {subject} is"),
        target_old: "old".into(),
        target_new: target.into(),
    }
}

fn rect_delta(seed: u64, k: f64) -> Delta {
    Delta::LowRankRect { factors: factors(16, 24, 1, seed, 0.01), k, eps: 1e-6 }
}

#[test]
fn low_rank_apply_matches_hand_computation() {
    let (t, base, ckpt) = tiny_model();
    let f = factors(24, 16, 2, 7, 0.01);
    let p = write_patch(&t.path().join("p"), &ckpt, &[], manifest("rome"), vec![(UP0, Delta::LowRank(vec![f.clone()]))]);
    let out = t.path().join("out");
    let summary = apply::apply(&base, &[p], &out).unwrap();
    let got = Checkpoint::open(&out).unwrap();
    assert_eq!(summary.identity, got.identity().unwrap().to_hex().to_string());
    let w = ckpt.tensor(UP0).unwrap().to_f32();
    let new = got.tensor(UP0).unwrap().to_f32();
    for i in 0..24 {
        for j in 0..16 {
            let d = (0.0f32 + f.u[i * 2] * f.v[j * 2]) + f.u[i * 2 + 1] * f.v[j * 2 + 1];
            let want = if d == 0.0 { w[i * 16 + j] } else { w[i * 16 + j] + d };
            assert_eq!(new[i * 16 + j].to_bits(), want.to_bits());
        }
    }
    assert_eq!(got.tensor(DOWN0).unwrap().bytes, ckpt.tensor(DOWN0).unwrap().bytes);
    let (a, b) = (folder(&base), folder(&out));
    assert_eq!(a["tokenizer.json"], b["tokenizer.json"]);
    assert_eq!(a["config.json"], b["config.json"]);
    assert_eq!(a.len(), b.len());
}

/// A stack mixing every encoding; patch 2 is compiled on top of patch 1.
fn stack(dir: &std::path::Path, base: &std::path::Path) -> Vec<PathBuf> {
    let ckpt = Checkpoint::open(base).unwrap();
    let mut m1 = manifest("rome");
    m1.edits.push(edit("France", "Paris"));
    let p1 = write_patch(
        &dir.join("p1"),
        &ckpt,
        &[],
        m1,
        vec![(DOWN0, Delta::LowRank(vec![factors(16, 24, 1, 11, 0.02)])), (UP0, Delta::LowRank(vec![factors(24, 16, 1, 12, 0.02)]))],
    );
    let mut m2 = manifest("rome");
    m2.parent = Some(Patch::read(&p1).unwrap().id().to_string());
    m2.edits.push(edit("Spain", "Madrid"));
    m2.rect_k = Some(10.0);
    let p2 = write_patch(&dir.join("p2"), &ckpt, std::slice::from_ref(&p1), m2, vec![(DOWN0, rect_delta(13, 10.0))]);
    let mut m3 = manifest("memit");
    m3.edits.push(edit("Italy", "Rome"));
    let dense = values(384, 14, 0.001);
    let p3 = write_patch(
        &dir.join("p3"),
        &ckpt,
        &[p1.clone(), p2.clone()],
        m3,
        vec![
            (UP0, Delta::LowRank(vec![factors(24, 16, 2, 15, 0.02)])),
            (DOWN1, Delta::Dense(dense)),
            ("model.layers.0.input_layernorm.weight", Delta::Sparse { indices: vec![1, 5, 9], values: vec![0.5, -0.25, 1e-3] }),
        ],
    );
    vec![p1, p2, p3]
}

#[test]
fn apply_of_merge_equals_applying_the_stack() {
    let (t, base, _) = tiny_model();
    let patches = stack(t.path(), &base);
    apply::apply(&base, &patches, &t.path().join("stacked")).unwrap();
    let merged = t.path().join("merged.fp");
    let s = apply::merge(&patches, &merged, Some(&base), false).unwrap();
    let m = Patch::read(&merged).unwrap();
    assert_eq!(m.manifest().includes.len(), 3);
    assert_eq!(m.manifest().edits.len(), 3);
    assert_eq!(m.id(), s.id);
    apply::apply(&base, std::slice::from_ref(&merged), &t.path().join("via_merge")).unwrap();
    assert_eq!(folder(&t.path().join("stacked")), folder(&t.path().join("via_merge")));
    // Merging is deterministic.
    apply::merge(&patches, &t.path().join("merged2.fp"), Some(&base), false).unwrap();
    assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(t.path().join("merged2.fp")).unwrap());
    // Without RECT overlaps the model is not needed, and low-rank stays low-rank.
    let mut m = manifest("memit");
    m.parent = Some(Patch::read(&patches[0]).unwrap().id().to_string());
    let ckpt = Checkpoint::open(&base).unwrap();
    let deltas = vec![(UP0, Delta::LowRank(vec![factors(24, 16, 2, 15, 0.02)])), (DOWN1, Delta::Dense(values(384, 14, 0.001)))];
    let q = write_patch(&t.path().join("q"), &ckpt, &patches[..1], m, deltas);
    let lr = [patches[0].clone(), q];
    let merged_lr = t.path().join("lr.fp");
    let no_parent = apply::merge(&lr, &merged_lr, None, false).unwrap();
    assert!(Patch::read(&merged_lr).unwrap().manifest().entries.iter().any(|e| e.encoding.kind() == "low_rank"));
    assert!(no_parent.bytes < 10_000);
    apply::apply(&base, &lr, &t.path().join("lr_stacked")).unwrap();
    apply::apply(&base, &[merged_lr], &t.path().join("lr_merged")).unwrap();
    assert_eq!(folder(&t.path().join("lr_stacked")), folder(&t.path().join("lr_merged")));
    // Out of order: p2 was compiled on top of p1.
    let err = apply::apply(&base, &[patches[1].clone(), patches[0].clone()], &t.path().join("bad")).unwrap_err();
    assert!(matches!(err, apply::Error::ParentAfterChild { .. }), "{err}");
}

#[test]
fn merging_low_rank_stacks_concatenates_exactly() {
    let (t, base, ckpt) = tiny_model();
    let p1 = write_patch(&t.path().join("a"), &ckpt, &[], manifest("rome"), vec![(DOWN0, Delta::LowRank(vec![factors(16, 24, 3, 21, 0.05)]))]);
    let child = |parent: &PathBuf| {
        let mut m = manifest("rome");
        m.parent = Some(Patch::read(parent).unwrap().id().to_string());
        m
    };
    let p2 = write_patch(&t.path().join("b"), &ckpt, std::slice::from_ref(&p1), child(&p1), vec![(DOWN0, Delta::LowRank(vec![factors(16, 24, 2, 22, 0.05)]))]);
    let p3 = write_patch(&t.path().join("c"), &ckpt, &[p1.clone(), p2.clone()], child(&p2), vec![(DOWN0, Delta::LowRank(vec![factors(16, 24, 1, 23, 0.05)]))]);
    let m12 = t.path().join("m12");
    apply::merge(&[p1.clone(), p2.clone()], &m12, None, false).unwrap();
    let m123 = t.path().join("m123");
    apply::merge(&[m12.clone(), p3.clone()], &m123, None, false).unwrap();
    let e = Patch::read(&m123).unwrap().manifest().entries[0].clone();
    assert_eq!(e.encoding.kind(), "low_rank");
    apply::apply(&base, &[p1, p2, p3], &t.path().join("s")).unwrap();
    apply::apply(&base, &[m123], &t.path().join("m")).unwrap();
    assert_eq!(folder(&t.path().join("s")), folder(&t.path().join("m")));
}

#[test]
fn conflicting_facts_are_refused_unless_overridden() {
    let (t, _, ckpt) = tiny_model();
    let mut m1 = manifest("rome");
    m1.edits.push(edit("France", "Paris"));
    let p1 = write_patch(&t.path().join("a"), &ckpt, &[], m1, vec![(UP0, Delta::LowRank(vec![factors(24, 16, 1, 1, 0.01)]))]);
    let mut m2 = manifest("rome");
    m2.parent = Some(Patch::read(&p1).unwrap().id().to_string());
    m2.edits.push(edit("France", "Lyon"));
    let p2 = write_patch(&t.path().join("b"), &ckpt, std::slice::from_ref(&p1), m2, vec![(UP0, Delta::LowRank(vec![factors(24, 16, 1, 2, 0.01)]))]);
    let out = t.path().join("m");
    let err = apply::merge(&[p1.clone(), p2.clone()], &out, None, false).unwrap_err().to_string();
    assert!(err.contains("France") && err.contains("Paris") && err.contains("Lyon"), "{err}");
    assert!(!out.exists());
    let s = apply::merge(&[p1, p2], &out, None, true).unwrap();
    assert_eq!(s.overridden.len(), 1);
    let edits = Patch::read(&out).unwrap().manifest().edits.clone();
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0].target_new, "Lyon");
}

#[test]
fn rect_and_explicit_sparse_give_identical_checkpoints() {
    let (t, base, ckpt) = tiny_model();
    let implicit = write_patch(&t.path().join("r"), &ckpt, &[], manifest("rome"), vec![(DOWN0, rect_delta(31, 5.0))]);
    let Delta::LowRankRect { factors: f, k, eps } = rect_delta(31, 5.0) else { unreachable!() };
    let mut full = product(&f, &[16, 24]);
    rect::mask(&mut full, &ckpt.tensor(DOWN0).unwrap().to_f32(), k, eps);
    assert_eq!(full.iter().filter(|v| **v != 0.0).count(), rect::keep_count(5.0, 384));
    let explicit = write_patch(&t.path().join("s"), &ckpt, &[], manifest("rome"), vec![(DOWN0, Delta::explicit(full))]);
    assert_eq!(Patch::read(&explicit).unwrap().manifest().entries[0].encoding.kind(), "sparse");
    apply::apply(&base, &[implicit], &t.path().join("a")).unwrap();
    apply::apply(&base, &[explicit], &t.path().join("b")).unwrap();
    assert_eq!(folder(&t.path().join("a")), folder(&t.path().join("b")));
}

#[test]
fn apply_of_diff_reproduces_the_target() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    write_model(&a, &tiny_specs(), 1);
    // A fine-tune: every tensor perturbed, some strongly, some elements untouched.
    let tuned: Vec<Spec> = tiny_specs()
        .into_iter()
        .enumerate()
        .map(|(i, (n, dt, s, v))| {
            let noise = values(v.len(), 50 + i as u64, 0.05);
            let v = v.iter().zip(&noise).enumerate().map(|(j, (x, e))| if j % 3 == 0 { *x } else { x * (1.0 + e) + e * 1e-3 }).collect();
            (n, dt, s, v)
        })
        .collect();
    let b = t.path().join("b");
    write_model(&b, &tuned, 1);
    let p = t.path().join("d.fp");
    let s = apply::diff(&a, &b, &p).unwrap();
    assert_eq!(s.tensors_changed, 5);
    apply::apply(&a, &[p], &t.path().join("a+d")).unwrap();
    assert_eq!(folder(&b), folder(&t.path().join("a+d")));
}

#[test]
fn sharded_checkpoints_stream_through() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    write_model(&base, &tiny_specs(), 3);
    let ckpt = Checkpoint::open(&base).unwrap();
    assert_eq!(ckpt.files().count(), 3);
    let patches = stack(t.path(), &base);
    let out = t.path().join("out");
    let s = apply::apply(&base, &patches, &out).unwrap();
    assert_eq!(s.tensors_patched, 4);
    let (a, b) = (folder(&base), folder(&out));
    assert_eq!(a["model.safetensors.index.json"], b["model.safetensors.index.json"]);
    let got = Checkpoint::open(&out).unwrap();
    let stack = Stack::load(&patches).unwrap();
    let overlay = apply::Overlay::new(&ckpt, &stack).unwrap();
    for name in ckpt.names() {
        let want = stack.patched(&ckpt.tensor(name).unwrap()).unwrap();
        assert_eq!(got.tensor(name).unwrap().bytes, &want[..], "{name}");
        assert_eq!(overlay.tensor(name).unwrap().bytes, &want[..], "{name}");
    }
    assert_eq!(got.tensor("model.embed_tokens.weight").unwrap().bytes, ckpt.tensor("model.embed_tokens.weight").unwrap().bytes);
}

#[test]
fn encoding_is_deterministic_and_smallest_exact() {
    let (t, _, ckpt) = tiny_model();
    let bf16_exact: Vec<f32> = values(384, 9, 0.01).iter().map(|&v| Dtype::BF16.round(v)).collect();
    let a = write_patch(&t.path().join("a"), &ckpt, &[], manifest("x"), vec![(DOWN1, Delta::Dense(bf16_exact.clone()))]);
    let b = write_patch(&t.path().join("b"), &ckpt, &[], manifest("x"), vec![(DOWN1, Delta::Dense(bf16_exact))]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let p = Patch::read(&a).unwrap();
    assert!(p.id().starts_with("fp1-") && p.id().len() == 68);
    assert_eq!(p.manifest().entries[0].raw_len, 384 * 2);
}

#[test]
fn tensors_larger_than_a_chunk_stream_exactly() {
    // Rows that straddle apply's chunks, RECT ties from repeated factor values, every encoding.
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    let (r, c) = (97, 611);
    let w: Vec<f32> = values(r * c, 3, 0.05).iter().enumerate().map(|(i, v)| if i % 101 == 0 { 0.0 } else { *v }).collect();
    let specs: Vec<Spec> = vec![
        (DOWN0, Dtype::F32, vec![r, c], w.clone()),
        (UP0, Dtype::BF16, vec![r, c], w.iter().map(|&v| Dtype::BF16.round(v)).collect()),
        (DOWN1, Dtype::F16, vec![c, r], w.iter().map(|&v| Dtype::F16.round(v)).collect()),
        ("model.layers.1.mlp.up_proj.weight", Dtype::F32, vec![c, r], w.clone()),
    ];
    write_model(&base, &specs, 1);
    let ckpt = Checkpoint::open(&base).unwrap();
    let mut f = factors(r, c, 2, 21, 0.01);
    f.v.iter_mut().step_by(7).for_each(|v| *v = 0.5);
    let sparse: Vec<(u64, f32)> = (0..r * c).step_by(13).map(|i| (i as u64, 1e-3 * ((i % 7) as f32 - 3.0))).collect();
    let deltas = vec![
        (DOWN0, Delta::LowRankRect { factors: f.clone(), k: 37.0, eps: 1e-6 }),
        (UP0, Delta::LowRank(vec![f.clone(), factors(r, c, 1, 22, 0.01)])),
        (DOWN1, Delta::Sparse { indices: sparse.iter().map(|s| s.0).collect(), values: sparse.iter().map(|s| s.1).collect() }),
        ("model.layers.1.mlp.up_proj.weight", Delta::Dense(values(r * c, 23, 1e-3))),
    ];
    let p = write_patch(&t.path().join("p"), &ckpt, &[], manifest("memit"), deltas);
    let out = t.path().join("out");
    apply::apply(&base, std::slice::from_ref(&p), &out).unwrap();
    let got = Checkpoint::open(&out).unwrap();
    let stack = Stack::load(&[p]).unwrap();
    for name in ckpt.names() {
        let want = stack.patched(&ckpt.tensor(name).unwrap()).unwrap();
        assert_eq!(got.tensor(name).unwrap().bytes, &want[..], "{name}");
        assert_ne!(got.tensor(name).unwrap().bytes, ckpt.tensor(name).unwrap().bytes, "{name}");
    }
}

#[test]
fn tensor_hashes_are_cached_under_the_files_identity_on_disk() {
    let (t, base, ckpt) = tiny_model();
    let cache = t.path().join("hashes");
    let names: Vec<&str> = ckpt.names().collect();
    let fresh = ckpt.tensor_hashes(&names).unwrap();
    assert_eq!(ckpt.tensor_hashes_cached(&names[..2], &cache).unwrap(), names[..2].iter().map(|n| (n.to_string(), fresh[*n])).collect());
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one entry per weight file, holding all its tensors");
    // Read back, not recomputed: a planted hash comes back while the file is unchanged.
    let mut planted: std::collections::BTreeMap<String, String> = serde_json::from_slice(&std::fs::read(&entries[0]).unwrap()).unwrap();
    planted.insert(DOWN0.into(), blake3::hash(b"planted").to_hex().to_string());
    std::fs::write(&entries[0], serde_json::to_vec(&planted).unwrap()).unwrap();
    assert_eq!(ckpt.tensor_hashes_cached(&[DOWN0], &cache).unwrap()[DOWN0], blake3::hash(b"planted"));
    // A corrupt entry is recomputed.
    std::fs::write(&entries[0], b"{not json").unwrap();
    assert_eq!(ckpt.identity_cached(&cache).unwrap(), ckpt.identity().unwrap());
    // A file written again (here: the same bytes, a new modification time) has another
    // identity on disk: the stale entry is not used.
    std::fs::write(&entries[0], serde_json::to_vec(&planted).unwrap()).unwrap();
    let file = base.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all(&bytes).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)).unwrap();
    let reopened = Checkpoint::open(&base).unwrap();
    assert_eq!(reopened.tensor_hashes_cached(&[DOWN0], &cache).unwrap()[DOWN0], fresh[DOWN0]);
    // Applying with the cache and without the fsync writes the same model, with the same identity.
    let p = write_patch(&t.path().join("p"), &reopened, &[], manifest("rome"), vec![(UP0, Delta::LowRank(vec![factors(24, 16, 1, 5, 0.01)]))]);
    let plain = apply::apply(&base, std::slice::from_ref(&p), &t.path().join("plain")).unwrap();
    let options = apply::ApplyOptions { sync: false, hash_cache: Some(cache), ..Default::default() };
    let fast = apply::apply_with(&base, &[p], &t.path().join("fast"), &options).unwrap();
    assert_eq!(plain.identity, fast.identity);
    assert_eq!(folder(&t.path().join("plain")), folder(&t.path().join("fast")));
}
