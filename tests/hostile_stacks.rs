//! Hostile stacks, part of the hostile-input catalogue: patch stacks that cannot be right
//! (siblings compiled on the same base, a child before or without its parent, patches for
//! different models, a model that is not the patches' base) are refused by `merge` from the
//! patches alone and by `apply` before anything is written; overridden edits stay on record; and
//! the identity `apply` reports comes from bytes, never from a tensor-hash cache.

mod common;
use common::*;
use factpatch::apply::{self, ApplyOptions, Error};
use factpatch::checkpoint::Checkpoint;
use factpatch::patch::{Delta, Edit, Manifest, Patch};
use std::path::{Path, PathBuf};
use std::process::Output;

const UP0: &str = "model.layers.0.mlp.up_proj.weight";
const DOWN1: &str = "model.layers.1.mlp.down_proj.weight";
const EMBED: &str = "model.embed_tokens.weight";

fn identity(dir: &Path) -> String {
    Checkpoint::open(dir).unwrap().identity().unwrap().to_hex().to_string()
}

fn id(patch: &Path) -> String {
    Patch::read(patch).unwrap().id().to_string()
}

/// A manifest as compile writes it: the base model's identity and the parent's id, if any.
fn made_for(base: &Path, parent: Option<&Path>) -> Manifest {
    let mut m = manifest("rome");
    m.base_model = Some(identity(base));
    m.parent = parent.map(id);
    m
}

fn up0(seed: u64) -> Delta {
    Delta::LowRank(vec![factors(24, 16, 1, seed, 0.01)])
}

fn down1(seed: u64) -> Delta {
    Delta::LowRank(vec![factors(16, 24, 1, seed, 0.01)])
}

/// The tiny model with the embedding (a tensor no patch here touches) changed: another model
/// whose touched tensors are byte for byte the tiny model's.
fn other_model(dir: &Path) -> PathBuf {
    let specs: Vec<Spec> = tiny_specs().into_iter().map(|(n, d, s, v)| if n == EMBED { (n, d, s, values(v.len(), 99, 1.0)) } else { (n, d, s, v) }).collect();
    write_model(dir, &specs, 1);
    dir.to_path_buf()
}

fn fact(target: &str) -> Edit {
    Edit {
        subject: "France".into(),
        relation: "capital".into(),
        prompt: "The capital of France is".into(),
        target_old: "Paris".into(),
        target_new: target.into(),
    }
}

/// Checks that `err` says each of `needles`, and that `out` was not written.
fn refused(err: Error, needles: &[&str], out: &Path) -> Error {
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "the error does not say `{needle}`: {text}");
    }
    assert!(!out.exists(), "{} written", out.display());
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary with its caches in `cache`.
fn cli(cache: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_factpatch")).args(args).env("FACTPATCH_CACHE", cache).output().unwrap()
}

/// The binary's stdout, which must have succeeded.
fn cli_ok(cache: &Path, args: &[&str]) -> String {
    let o = cli(cache, args);
    assert!(o.status.success(), "factpatch {}\n{}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// The binary's one `error: ` line, which must have failed.
fn cli_err(cache: &Path, args: &[&str]) -> String {
    let o = cli(cache, args);
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert!(!o.status.success() && stderr.starts_with("error: ") && stderr.lines().count() == 1, "factpatch {}\n{stderr}", args.join(" "));
    stderr
}

/// The identity in `apply`'s line `applied …: OUT (identity HEX…)`.
fn printed_identity(stdout: &str) -> &str {
    let at = stdout.find("(identity ").expect("an identity") + "(identity ".len();
    &stdout[at..at + 64]
}

#[test]
fn siblings_compiled_on_the_same_base_do_not_merge() {
    let (t, base, ckpt) = tiny_model();
    let a = write_patch(&t.path().join("a.fp"), &ckpt, &[], made_for(&base, None), vec![(UP0, up0(1))]);
    let b = write_patch(&t.path().join("b.fp"), &ckpt, &[], made_for(&base, None), vec![(UP0, up0(2))]);
    let out = t.path().join("ab.fp");
    let err = apply::merge(&[a.clone(), b.clone()], &out, None, false).unwrap_err();
    let err = refused(err, &[s(&a), s(&b), UP0, "does not descend"], &out);
    assert!(matches!(err, Error::NotDescendant { .. }), "{err}");
    // With the model, its hashes tell, as they do to apply.
    let err = apply::merge(&[a.clone(), b.clone()], &out, Some(&base), false).unwrap_err();
    assert!(matches!(refused(err, &[s(&b), UP0], &out), Error::BaseMismatch { .. }));
    let err = apply::apply(&base, &[a.clone(), b.clone()], &t.path().join("o")).unwrap_err();
    assert!(matches!(refused(err, &[s(&b), UP0], &t.path().join("o")), Error::BaseMismatch { .. }));
    // Siblings that change different tensors are fine: the merge is the stack.
    let c = write_patch(&t.path().join("c.fp"), &ckpt, &[], made_for(&base, None), vec![(DOWN1, down1(3))]);
    apply::merge(&[a.clone(), c.clone()], &out, None, false).unwrap();
    apply::apply(&base, &[a, c], &t.path().join("stacked")).unwrap();
    apply::apply(&base, &[out], &t.path().join("merged")).unwrap();
    assert_eq!(folder(&t.path().join("stacked")), folder(&t.path().join("merged")));
}

#[test]
fn a_child_before_its_parent_is_refused() {
    let (t, base, ckpt) = tiny_model();
    let p = write_patch(&t.path().join("p.fp"), &ckpt, &[], made_for(&base, None), vec![(UP0, up0(1))]);
    // The child changes another tensor: only the parent link tells the order.
    let c = write_patch(&t.path().join("c.fp"), &ckpt, std::slice::from_ref(&p), made_for(&base, Some(&p)), vec![(DOWN1, down1(2))]);
    let out = t.path().join("out");
    for err in [apply::merge(&[c.clone(), p.clone()], &out, None, false).unwrap_err(), apply::apply(&base, &[c.clone(), p.clone()], &out).unwrap_err()] {
        let err = refused(err, &[s(&c), &id(&p), s(&p), "comes after it"], &out);
        assert!(matches!(err, Error::ParentAfterChild { .. }), "{err}");
    }
    // Its parent inside a later merged patch.
    let pc = t.path().join("pc.fp");
    apply::merge(&[p.clone(), c.clone()], &pc, None, false).unwrap();
    let g = write_patch(&t.path().join("g.fp"), &ckpt, &[p.clone(), c.clone()], made_for(&base, Some(&c)), vec![(UP0, up0(3))]);
    let err = apply::merge(&[g.clone(), pc.clone()], &out, None, false).unwrap_err();
    assert!(matches!(refused(err, &[s(&g), &id(&c), s(&pc)], &out), Error::ParentAfterChild { .. }));
    // In order, both are fine.
    apply::merge(&[pc.clone(), g.clone()], &out, None, false).unwrap();
    apply::apply(&base, &[pc, g], &t.path().join("applied")).unwrap();
}

#[test]
fn a_child_without_its_parent_is_refused_by_apply() {
    let (t, base, ckpt) = tiny_model();
    let p = write_patch(&t.path().join("p.fp"), &ckpt, &[], made_for(&base, None), vec![(UP0, up0(1))]);
    let c = write_patch(&t.path().join("c.fp"), &ckpt, std::slice::from_ref(&p), made_for(&base, Some(&p)), vec![(DOWN1, down1(2))]);
    let out = t.path().join("out");
    // Alone: every tensor it changes has its base hash, but the parent's change is missing.
    let err = apply::apply(&base, std::slice::from_ref(&c), &out).unwrap_err();
    let err = refused(err, &[s(&c), &id(&p), "not earlier in the stack", "--allow-other-base"], &out);
    assert!(matches!(err, Error::MissingParent { .. }), "{err}");
    // Allowing another base does not help when the model is the patch's own base.
    let allow = ApplyOptions { allow_other_base: true, ..Default::default() };
    let err = apply::apply_with(&base, std::slice::from_ref(&c), &out, &allow).unwrap_err();
    assert!(matches!(refused(err, &[s(&c), &id(&p), "the model is the patch's base"], &out), Error::MissingParent { .. }));
    // After another, parent-less patch.
    let other =
        write_patch(&t.path().join("other.fp"), &ckpt, &[], made_for(&base, None), vec![(EMBED, Delta::Sparse { indices: vec![3], values: vec![0.5] })]);
    let err = apply::apply(&base, &[other, c.clone()], &out).unwrap_err();
    assert!(matches!(refused(err, &[s(&c), &id(&p)], &out), Error::ParentChain { .. }));
    // On a model that has the parent applied, allowed: the same bytes as the whole stack.
    let with_parent = t.path().join("with-parent");
    apply::apply(&base, std::slice::from_ref(&p), &with_parent).unwrap();
    let err = apply::apply(&with_parent, std::slice::from_ref(&c), &out).unwrap_err();
    assert!(matches!(refused(err, &[s(&c), &id(&p)], &out), Error::MissingParent { .. }));
    apply::apply_with(&with_parent, std::slice::from_ref(&c), &out, &allow).unwrap();
    apply::apply(&base, &[p, c], &t.path().join("stacked")).unwrap();
    assert_eq!(folder(&out), folder(&t.path().join("stacked")));
}

#[test]
fn patches_for_different_models_do_not_merge() {
    let (t, a, ckpt_a) = tiny_model();
    let b = other_model(&t.path().join("b"));
    let ckpt_b = Checkpoint::open(&b).unwrap();
    assert_ne!(identity(&a), identity(&b));
    let pa = write_patch(&t.path().join("pa.fp"), &ckpt_a, &[], made_for(&a, None), vec![(UP0, up0(1))]);
    let pb = write_patch(&t.path().join("pb.fp"), &ckpt_b, &[], made_for(&b, None), vec![(DOWN1, down1(2))]);
    let out = t.path().join("out");
    let err = apply::merge(&[pa.clone(), pb.clone()], &out, None, false).unwrap_err();
    let err = refused(err, &[s(&pa), s(&pb), &identity(&a), &identity(&b), "different models"], &out);
    assert!(matches!(err, Error::DifferentBases { .. }), "{err}");
    // Applied to either model, one of them is for the other (though its tensor's bytes match).
    let err = apply::apply(&a, &[pa.clone(), pb.clone()], &out).unwrap_err();
    assert!(matches!(refused(err, &[s(&pb), &identity(&b), &identity(&a)], &out), Error::OtherBase { .. }));
    // diff records the model it starts from.
    let d = t.path().join("d.fp");
    apply::diff(&a, &b, &d).unwrap();
    assert_eq!(Patch::read(&d).unwrap().manifest().base_model, Some(identity(&a)));
    // A base_model that is not an identity is a malformed manifest.
    let good = Patch::read(&pa).unwrap();
    let mut json = serde_json::to_value(good.manifest()).unwrap();
    json["base_model"] = "not hex".into();
    let end = good.bytes().len() - 32;
    let payload = good.bytes()[end - good.manifest().entries[0].zlen as usize..end].to_vec();
    let forged = t.path().join("forged.fp");
    std::fs::write(&forged, forge(&serde_json::to_vec(&json).unwrap(), &[payload])).unwrap();
    let err = Patch::read(&forged).unwrap_err().to_string();
    assert!(err.contains("base_model") && err.contains(s(&forged)), "{err}");
}

#[test]
fn overridden_edits_stay_on_record() {
    let (t, base, ckpt) = tiny_model();
    let mut m1 = made_for(&base, None);
    m1.edits.push(fact("Lyon"));
    let p1 = write_patch(&t.path().join("p1.fp"), &ckpt, &[], m1, vec![(UP0, up0(1))]);
    let mut m2 = made_for(&base, Some(&p1));
    m2.edits.push(fact("Nice"));
    let p2 = write_patch(&t.path().join("p2.fp"), &ckpt, std::slice::from_ref(&p1), m2, vec![(UP0, up0(2))]);
    let merged = t.path().join("m.fp");
    let err = apply::merge(&[p1.clone(), p2.clone()], &merged, None, false).unwrap_err();
    assert!(matches!(refused(err, &["Lyon", "Nice", "--allow-override"], &merged), Error::Conflict(_)));
    let s = apply::merge(&[p1.clone(), p2.clone()], &merged, None, true).unwrap();
    assert_eq!(s.overridden.len(), 1);
    let m = Patch::read(&merged).unwrap().manifest().clone();
    assert_eq!(m.edits, [fact("Nice")], "the fact in force");
    assert_eq!(m.overridden, [fact("Lyon")], "the fact it overrode, whose weight change is in the patch");
    assert_eq!(m.base_model, Some(identity(&base)));
    let report = factpatch::audit::report(&merged, None).unwrap();
    let text = report.to_string();
    assert!(
        text.contains("\"Lyon\"") && text.contains("\"Nice\"") && text.contains("1 overridden edit(s)") && text.contains("overridden by → \"Nice\""),
        "{text}"
    );
    assert_eq!(serde_json::to_value(&report).unwrap()["manifest"]["overridden"][0]["target_new"], "Lyon");
    // Both weight changes, as applying the chain.
    apply::apply(&base, &[p1.clone(), p2.clone()], &t.path().join("stacked")).unwrap();
    apply::apply(&base, std::slice::from_ref(&merged), &t.path().join("merged")).unwrap();
    assert_eq!(folder(&t.path().join("stacked")), folder(&t.path().join("merged")));
    // Merged again, the record is kept.
    let mut m3 = made_for(&base, Some(&p2));
    m3.edits.push(fact("Paris"));
    let p3 = write_patch(&t.path().join("p3.fp"), &ckpt, &[p1, p2], m3, vec![(UP0, up0(3))]);
    let again = t.path().join("again.fp");
    apply::merge(&[merged, p3], &again, None, true).unwrap();
    let m = Patch::read(&again).unwrap().manifest().clone();
    assert_eq!((m.edits, m.overridden), (vec![fact("Paris")], vec![fact("Lyon"), fact("Nice")]));
}

#[test]
fn apply_refuses_another_base_unless_allowed() {
    let (t, a, _) = tiny_model();
    let b = other_model(&t.path().join("b"));
    let ckpt_b = Checkpoint::open(&b).unwrap();
    let cache = t.path().join("cache");
    // A patch for B whose tensor is byte for byte A's: only the recorded base tells.
    let p = write_patch(&t.path().join("p.fp"), &ckpt_b, &[], made_for(&b, None), vec![(UP0, up0(1))]);
    let out = t.path().join("out");
    let err = cli_err(&cache, &["apply", "--model", s(&a), "--patch", s(&p), "--out", s(&out)]);
    for needle in [s(&p), &identity(&a), &identity(&b), "--allow-other-base"] {
        assert!(err.contains(needle), "the error does not say `{needle}`: {err}");
    }
    assert!(!out.exists());
    let stdout = cli_ok(&cache, &["apply", "--model", s(&a), "--patch", s(&p), "--allow-other-base", "--out", s(&out)]);
    assert_eq!(printed_identity(&stdout), identity(&out));
    // Every touched tensor is still checked.
    let c = t.path().join("c");
    let specs: Vec<Spec> = tiny_specs().into_iter().map(|(n, d, s, v)| if n == UP0 { (n, d, s, values(v.len(), 98, 0.1)) } else { (n, d, s, v) }).collect();
    write_model(&c, &specs, 1);
    let q = write_patch(&t.path().join("q.fp"), &Checkpoint::open(&c).unwrap(), &[], made_for(&c, None), vec![(UP0, up0(1))]);
    let out2 = t.path().join("out2");
    let err = cli_err(&cache, &["apply", "--model", s(&a), "--patch", s(&q), "--allow-other-base", "--out", s(&out2)]);
    assert!(err.contains(UP0) && err.contains("differs from the patch's base"), "{err}");
    assert!(!out2.exists());
    // merge with the model checks the same.
    let merged = t.path().join("m.fp");
    let err = cli_err(&cache, &["merge", s(&p), "--model", s(&a), "--out", s(&merged)]);
    assert!(err.contains(&identity(&b)) && err.contains(&identity(&a)), "{err}");
    cli_ok(&cache, &["merge", s(&p), "--model", s(&a), "--allow-other-base", "--out", s(&merged)]);
}

#[test]
fn verify_output_reports_the_identity_of_the_bytes_whatever_the_hash_cache_holds() {
    let (t, base, ckpt) = tiny_model();
    let cache = t.path().join("cache");
    let p = write_patch(&t.path().join("p.fp"), &ckpt, &[], made_for(&base, None), vec![(UP0, up0(1))]);
    let first = t.path().join("first");
    let stdout = cli_ok(&cache, &["apply", "--model", s(&base), "--patch", s(&p), "--out", s(&first)]);
    let right = identity(&first);
    assert_eq!(printed_identity(&stdout), right);
    // Poison the base's remembered hashes: an untouched tensor and the patched one.
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("hashes")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mut hashes: std::collections::BTreeMap<String, String> = serde_json::from_slice(&std::fs::read(&entries[0]).unwrap()).unwrap();
    for name in [DOWN1, UP0] {
        hashes.insert(name.into(), blake3::hash(b"poison").to_hex().to_string());
    }
    std::fs::write(&entries[0], serde_json::to_vec(&hashes).unwrap()).unwrap();
    assert_ne!(ckpt.identity_cached(&cache.join("hashes")).unwrap().to_hex().to_string(), identity(&base), "the cache is poisoned");
    // The patch's recorded base is confirmed from the bytes; the output's identity is computed from them.
    for (name, extra) in [("second", None), ("verified", Some("--verify-output"))] {
        let out = t.path().join(name);
        let mut args = vec!["apply", "--model", s(&base), "--patch", s(&p), "--out", s(&out)];
        args.extend(extra);
        let stdout = cli_ok(&cache, &args);
        assert_eq!(printed_identity(&stdout), right, "{stdout}");
        assert_eq!(identity(&out), right);
        assert_eq!(stdout.contains("verified from the written bytes"), extra.is_some(), "{stdout}");
    }
    // The library reports the same with the poisoned cache, verified or not.
    let options = ApplyOptions { hash_cache: Some(cache.join("hashes")), verify_output: true, ..Default::default() };
    assert_eq!(apply::apply_with(&base, std::slice::from_ref(&p), &t.path().join("lib"), &options).unwrap().identity, right);

    // A patch that records no base leaves the cache unchecked: the copied tensors' hashes come
    // from it (as `cp`, apply does not read them), so the printed identity is the poisoned one,
    // while the bytes are right; --verify-output hashes them from the base and reports the truth.
    let anonymous = write_patch(&t.path().join("anonymous.fp"), &ckpt, &[], manifest("rome"), vec![(UP0, up0(1))]);
    let out = t.path().join("fast");
    let stdout = cli_ok(&cache, &["apply", "--model", s(&base), "--patch", s(&anonymous), "--out", s(&out)]);
    assert_eq!(identity(&out), right);
    assert_ne!(printed_identity(&stdout), right, "the copied tensors' hashes came from the cache");
    let out = t.path().join("checked");
    let stdout = cli_ok(&cache, &["apply", "--model", s(&base), "--patch", s(&anonymous), "--out", s(&out), "--verify-output"]);
    assert_eq!(printed_identity(&stdout), right, "{stdout}");
}
