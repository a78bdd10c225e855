//! Deployment stacks: a chain of real MEMIT patches, each compiled on top of the ones before
//! (`compile --on`), merged into one patch. Applying the merged patch gives the chain's weights
//! bit for bit, and `merge` writes each tensor in its smallest exact encoding: the chain's
//! low-rank groups while they are smaller than the dense delta, the dense sum once they are not.
//! The tiny Llama (down_proj 64 × 128) switches at total rank 43, so five 10-fact patches do.

mod common;
use common::{folder, root};
use factpatch::apply::{self, MergeOptions};
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::{request, Method};
use factpatch::patch::{Delta, Encoding, Patch};
use std::path::{Path, PathBuf};

const FACTS: usize = 10;

/// A chain of `n` patches of [`FACTS`] facts each on `model`, RECT at `rect_k`, in `dir`.
fn chain(model: &Path, dir: &Path, n: usize, rect_k: u32) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let spec = Spec {
            on: paths.clone(),
            stats: StatsSource::Corpus { files: vec![root().join("fixtures/corpus/sotu.txt")], tokens: 4_000 },
            cache: dir.join("cache"),
            // As in tests/families.rs: a random 2-layer model's keys are small.
            overrides: vec!["mom2_weight=1".into(), "clamp_norm=1000".into(), "v_steps=2".into(), format!("rect_k={rect_k}")],
            ..Spec::new(model, Method::Memit)
        };
        let facts: Vec<_> = (0..FACTS).map(|j| request::parse_fact(&format!("{{}} lives in|Person {i}-{j}|town {}", (i * 7 + j) % 11)).unwrap()).collect();
        let path = dir.join(format!("{rect_k}-{i}.fpatch"));
        std::fs::write(&path, Compiler::open(&spec).unwrap().patch(&facts).unwrap().patch.bytes).unwrap();
        paths.push(path);
    }
    paths
}

/// Merges `patches` (with `model` if given) and applies both the chain and the merge to `model`:
/// the merged patch, whose applied model must be the chain's, byte for byte.
fn merge_and_compare(model: &Path, dir: &Path, patches: &[PathBuf], with_model: bool, name: &str) -> Patch {
    let merged = dir.join(format!("{name}.fpatch"));
    let options = MergeOptions { model: with_model.then(|| model.to_path_buf()), ..Default::default() };
    apply::merge_with(patches, &merged, &options).unwrap();
    let (a, b) = (dir.join(format!("{name}-chain")), dir.join(format!("{name}-merged")));
    apply::apply(model, patches, &a).unwrap();
    apply::apply(model, std::slice::from_ref(&merged), &b).unwrap();
    assert!(folder(&a) == folder(&b), "{name}: the merged patch applies to other bytes than the chain");
    Patch::read(&merged).unwrap()
}

/// Σ over the groups of `U·Vᵀ`, each element summed over the rank in order from +0 and added
/// group by group, in f32 (`formats/patch.md`, "Low rank"), computed here from the factors.
fn sum_of_products(groups: &[factpatch::patch::Factors], rows: usize, cols: usize) -> Vec<f32> {
    let mut d = vec![0f32; rows * cols];
    for g in groups {
        for i in 0..rows {
            for j in 0..cols {
                let mut o = 0f32;
                for t in 0..g.rank {
                    o += g.u[i * g.rank + t] * g.v[j * g.rank + t];
                }
                d[i * cols + j] += o;
            }
        }
    }
    d
}

#[test]
fn a_merged_chain_applies_as_the_chain_in_its_smallest_encoding() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::byte_level_tiny_llama(&tmp.path().join("tiny"));
    let patches = chain(&model, tmp.path(), 5, 100);
    let groups_of = |p: &Patch, i: usize| match p.delta(i).unwrap() {
        Delta::LowRank(g) => g,
        _ => panic!("{}: entry {i} is not low-rank", p.path().display()),
    };
    let read: Vec<Patch> = patches.iter().map(|p| Patch::read(p).unwrap()).collect();
    assert!(read.iter().all(|p| p.manifest().entries.len() == 2), "MEMIT edits both layers of the tiny model");

    // Two patches: rank 20 in factors, (64 + 128)·20 values < 64·128, so the groups are kept.
    let two = merge_and_compare(&model, tmp.path(), &patches[..2], false, "two");
    for (i, e) in two.manifest().entries.iter().enumerate() {
        assert_eq!(e.encoding, Encoding::LowRank { vdtype: factpatch::checkpoint::Dtype::F32, ranks: vec![10, 10] }, "{}", e.tensor);
        assert_eq!(e.raw_len, (64 + 128) * 20 * 4);
        let expected: Vec<_> = read[..2].iter().flat_map(|p| groups_of(p, i)).collect();
        assert_eq!(groups_of(&two, i), expected, "{}: the chain's groups, in order", e.tensor);
    }

    // Five: rank 50, (64 + 128)·50 = 9,600 values > 8,192: the dense sum, computed here from the
    // chain's factors, is smaller and exact.
    let five = merge_and_compare(&model, tmp.path(), &patches, false, "five");
    for (i, e) in five.manifest().entries.iter().enumerate() {
        assert!(matches!(e.encoding, Encoding::Dense { .. }), "{}: {:?}", e.tensor, e.encoding);
        let groups: Vec<_> = read.iter().flat_map(|p| groups_of(p, i)).collect();
        let Delta::Dense(d) = five.delta(i).unwrap() else { unreachable!() };
        let expected = sum_of_products(&groups, 64, 128);
        assert!(d.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: merged dense delta ≠ the sum of the products", e.tensor);
        assert!(e.raw_len < (64 + 128) * 50 * 4);
    }
    // Merging merges: the first merge's groups count as its two patches'.
    let again = tmp.path().join("again.fpatch");
    let parts = [tmp.path().join("two.fpatch"), patches[2].clone(), patches[3].clone(), patches[4].clone()];
    apply::merge_with(&parts, &again, &MergeOptions::default()).unwrap();
    let again = Patch::read(&again).unwrap();
    assert_eq!(again.manifest().entries, five.manifest().entries, "merge(merge(P1, P2), P3…P5) = merge(P1…P5)");
}

#[test]
fn a_merged_rect_chain_needs_the_model_and_applies_as_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::byte_level_tiny_llama(&tmp.path().join("tiny"));
    let patches = chain(&model, tmp.path(), 3, 40);
    let out = tmp.path().join("no-model.fpatch");
    let err = apply::merge_with(&patches, &out, &MergeOptions::default()).unwrap_err();
    assert!(matches!(err, apply::Error::NeedsModel { .. }), "{err}");
    assert!(!out.exists());
    // RECT's masks are each against the weights as the patches before left them: the merged
    // patch stores their sum explicitly (sparse or dense, the smaller).
    let merged = merge_and_compare(&model, tmp.path(), &patches, true, "rect");
    for e in &merged.manifest().entries {
        let nnz = match e.encoding {
            Encoding::Sparse { nnz, .. } => nnz,
            Encoding::Dense { .. } => 64 * 128,
            ref other => panic!("{}: {other:?}", e.tensor),
        };
        assert!(nnz >= 64 * 128 * 40 / 100, "{}: at least one patch's 40% survive ({nnz})", e.tensor);
    }
}
