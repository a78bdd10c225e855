//! Signed patches: keygen → sign → verify, through the CLI; `apply --trusted` refuses unsigned,
//! untrusted and mismatched signatures before writing anything; the signatures are minisign's,
//! checked by the `minisign` program itself (Debian's package, installed by fixtures/setup.sh).

mod common;

use common::{factors, manifest, tiny_model, write_patch};
use factpatch::patch::Delta;
use std::path::Path;
use std::process::{Command, Output};

fn factpatch(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_factpatch")).args(args).env("FACTPATCH_CACHE", cache).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The single `error: ` line of a failed command.
fn error(out: Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    err
}

#[test]
fn signed_patches_verify_and_apply_only_with_a_trusted_key() {
    let (t, base, ckpt) = tiny_model();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cache = t.path().join("cache");
    let delta = Delta::LowRank(vec![factors(16, 24, 1, 7, 0.01)]);
    let patch = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], manifest("x"), vec![("model.layers.0.mlp.down_proj.weight", delta)]);
    let (alice, mallory) = (t.path().join("alice"), t.path().join("mallory"));
    ok(factpatch(&["keygen", "--out", &s(&alice)], &cache));
    ok(factpatch(&["keygen", "--out", &s(&mallory)], &cache));
    let (alice_pub, mallory_pub) = (format!("{}.pub", s(&alice)), format!("{}.pub", s(&mallory)));
    let out = |name: &str| s(&t.path().join(name));

    // Unsigned: refused by apply --trusted, nothing written; accepted without --trusted.
    let e = error(factpatch(&["apply", "--model", &s(&base), "--patch", &s(&patch), "--out", &out("a"), "--trusted", &alice_pub], &cache));
    assert!(e.contains("unsigned") && e.contains("p.fpatch"), "{e}");
    assert!(!t.path().join("a").exists());

    let signed = ok(factpatch(&["sign", &s(&patch), "--key", &format!("{}.key", s(&alice))], &cache));
    let key_id = signed.split("with key ").nth(1).and_then(|r| r.split(':').next()).unwrap().to_string();
    assert_eq!(key_id.len(), 16, "{signed}");
    let verified = ok(factpatch(&["verify", &s(&patch), "--trusted", &alice_pub], &cache));
    assert!(verified.contains(&key_id), "{verified}");
    ok(factpatch(&["apply", "--model", &s(&base), "--patch", &s(&patch), "--out", &out("b"), "--trusted", &mallory_pub, &alice_pub], &cache));
    assert!(t.path().join("b/model.safetensors").is_file());
    let audit = ok(factpatch(&["audit", &s(&patch), "--trusted", &alice_pub], &cache));
    assert!(audit.contains(&format!("signed by key {key_id}")) && audit.contains("verified"), "{audit}");

    // Signed, but by a key not trusted.
    let e = error(factpatch(&["apply", "--model", &s(&base), "--patch", &s(&patch), "--out", &out("c"), "--trusted", &mallory_pub], &cache));
    assert!(e.contains(&key_id) && e.contains("not among the trusted keys"), "{e}");
    assert!(!t.path().join("c").exists());

    // A signature moved onto another patch does not verify.
    let other = write_patch(
        &t.path().join("q.fpatch"),
        &ckpt,
        &[],
        manifest("x"),
        vec![("model.layers.0.mlp.down_proj.weight", Delta::LowRank(vec![factors(16, 24, 1, 8, 0.01)]))],
    );
    std::fs::copy(format!("{}.minisig", s(&patch)), format!("{}.minisig", s(&other))).unwrap();
    let e = error(factpatch(&["verify", &s(&other), "--trusted", &alice_pub], &cache));
    assert!(e.contains("does not verify"), "{e}");
    let e = error(factpatch(&["apply", "--model", &s(&base), "--patch", &s(&other), "--out", &out("d"), "--trusted", &alice_pub], &cache));
    assert!(e.contains("does not verify") && !t.path().join("d").exists(), "{e}");
    let audit = ok(factpatch(&["audit", &s(&other), "--trusted", &alice_pub], &cache));
    assert!(audit.contains("DOES NOT VERIFY"), "{audit}");

    // A key file that holds no key is named.
    std::fs::write(t.path().join("empty.pub"), "untrusted comment: nothing\n").unwrap();
    let e = error(factpatch(&["verify", &s(&patch), "--trusted", &out("empty.pub")], &cache));
    assert!(e.contains("empty.pub"), "{e}");

    // minisign itself verifies factpatch's signatures.
    let minisign = Command::new("minisign").arg("-v").output();
    assert!(minisign.is_ok() || std::env::var_os("CI").is_none(), "CI installs minisign (fixtures/setup.sh)");
    if minisign.is_ok() {
        let v = Command::new("minisign").args(["-V", "-q", "-m", &s(&patch), "-p", &alice_pub]).output().unwrap();
        assert!(v.status.success(), "minisign: {}", String::from_utf8_lossy(&v.stderr));
        let v = Command::new("minisign").args(["-V", "-q", "-m", &s(&other), "-p", &alice_pub]).output().unwrap();
        assert!(!v.status.success(), "minisign accepted a signature moved onto another patch");
    }
}
