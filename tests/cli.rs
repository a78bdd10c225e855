//! The `factpatch` binary as users run it. On SmolLM2: compile → audit → apply → generate, a
//! second fact compiled on top of the first with the statistics found in the cache, then merge
//! and diff, whose patches must reproduce the applied weights to the byte. Then bad inputs, at
//! least one per verb: a non-zero exit, one `error: ` line on stderr naming the culprit, and
//! nothing written at the output path.

mod common;

use common::{factors, folder, manifest, root, smollm2, tiny_model, write_patch};
use factpatch::patch::{Delta, Edit};
use std::path::Path;
use std::process::{Command, Output};

const RELATION: &str = "{} is located in the city of";
const PROMPT: &str = "The Eiffel Tower is located in the city of";

/// A `--fact` of the relation above.
fn fact(subject: &str, target: &str) -> String {
    format!("{RELATION}|{subject}|{target}")
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A scratch folder for outputs; the binary runs with its tensor-hash cache in another, so that
/// nothing touches the user's home.
struct Cli {
    out: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Cli {
    fn new() -> Self {
        Cli { out: tempfile::tempdir().unwrap(), cache: tempfile::tempdir().unwrap() }
    }

    /// `name` in the scratch folder.
    fn path(&self, name: &str) -> String {
        arg(&self.out.path().join(name)).to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_factpatch")).args(args).env("FACTPATCH_CACHE", self.cache.path()).output().unwrap()
    }

    /// Runs `args`, which must succeed; returns stdout and stderr.
    fn ok(&self, args: &[&str]) -> (String, String) {
        let o = self.run(args);
        let (stdout, stderr) = (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap());
        assert!(o.status.success(), "factpatch {}\n{stderr}", args.join(" "));
        (stdout, stderr)
    }

    /// Runs `args`, which must fail with one `error: ` line on stderr containing each of
    /// `needles`, and leave the `--out` path (if any) as it was.
    fn fails(&self, args: &[&str], needles: &[&str]) {
        let out = args.iter().position(|a| *a == "--out").map(|i| Path::new(args[i + 1]));
        let before = out.and_then(|p| std::fs::read(p).ok());
        let o = self.run(args);
        let stderr = String::from_utf8(o.stderr).unwrap();
        let what = format!("factpatch {}\n{stderr}", args.join(" "));
        assert!(!o.status.success(), "{what}");
        assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "not one `error: ` line: {what}");
        for needle in needles {
            assert!(stderr.contains(needle), "the error does not say `{needle}`: {what}");
        }
        if let Some(out) = out {
            assert!(before == std::fs::read(out).ok() && (before.is_some() || !out.exists()), "{} written: {what}", out.display());
        }
    }
}

/// The patch id in `compile`'s last line, `patch fp1-…: 1 fact(s), …`.
fn compiled_id(stdout: &str) -> &str {
    let id = stdout.lines().find_map(|l| l.strip_prefix("patch ")?.split_once(": 1 fact(s), ")).map(|(id, _)| id);
    id.filter(|id| id.starts_with("fp1-")).unwrap_or_else(|| panic!("no `patch fp1-…: 1 fact(s)` line in\n{stdout}"))
}

#[test]
fn compile_audit_apply_generate_merge_diff() {
    let cli = Cli::new();
    let base = smollm2();
    let base = arg(&base);
    let (corpus, stats) = (root().join("fixtures/corpus/sotu.txt"), root().join("target/test-stats"));
    let (eiffel, colosseum) = (cli.path("eiffel.fpatch"), cli.path("colosseum.fpatch"));

    // The statistics request is the other tests': computed once, then found in target/.
    let stats_args = ["--corpus", arg(&corpus), "--stats-tokens", "20000", "--cache", arg(&stats)];
    let (stdout, stderr) = cli.ok(&[&["compile", "--model", base, "--fact", &fact("The Eiffel Tower", "Rome"), "--out", &eiffel][..], &stats_args].concat());
    let id = compiled_id(&stdout);
    assert!(stderr.contains("statistics "), "{stderr}");

    let (json, _) = cli.ok(&["audit", &eiffel, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["id"], id);
    let tensors: Vec<&str> = report["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(tensors, (4..=8).map(|l| format!("model.layers.{l}.mlp.down_proj.weight")).collect::<Vec<_>>(), "MEMIT's default layers");
    let identity = factpatch::checkpoint::Checkpoint::open(&smollm2()).unwrap().identity().unwrap().to_hex().to_string();
    assert_eq!(report["manifest"]["base_model"], identity.as_str(), "the base model's identity is recorded");
    let edit = &report["manifest"]["edits"][0];
    assert_eq!([&edit["subject"], &edit["target_new"], &edit["prompt"]], ["The Eiffel Tower", "Rome", RELATION], "{edit}");

    let edited = cli.path("edited");
    let (stdout, _) = cli.ok(&["apply", "--model", base, "--patch", &eiffel, "--out", &edited]);
    assert!(stdout.starts_with("applied 1 patch(es), 5 tensor(s) changed") && stdout.contains("(identity "), "{stdout}");
    let generate = |model: &str| cli.ok(&["generate", "--model", model, "--max-new-tokens", "6", PROMPT]).0;
    let (before, after) = (generate(base), generate(&edited));
    assert!(before.starts_with(PROMPT) && !before.contains("Rome"), "base: {before}");
    assert!(after.starts_with(PROMPT) && after.contains("Rome"), "edited: {after}");

    // A second fact on top of the first: no --corpus, the cache's statistics are found.
    let on = ["compile", "--model", base, "--fact", &fact("The Colosseum", "London"), "--on", &eiffel, "--cache", arg(&stats), "--out", &colosseum];
    let (stdout, stderr) = cli.ok(&on);
    assert!(stderr.lines().any(|l| l.starts_with("statistics ") && l.contains("(found: ")), "{stderr}");
    let (json, _) = cli.ok(&["audit", &colosseum, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((&report["id"], &report["manifest"]["parent"]), (&compiled_id(&stdout).into(), &id.into()), "the parent is the first patch");
    assert_eq!(report["manifest"]["base_model"], identity.as_str(), "every patch of a chain records the same base");

    // Both patches are RECT on the same tensors: merging them needs the base model. (The later
    // applies skip the fsync: the files are compared, not kept.)
    let merged = cli.path("merged.fpatch");
    let (stdout, _) = cli.ok(&["merge", &eiffel, &colosseum, "--model", base, "--out", &merged]);
    assert!(stdout.starts_with("merged 2 patches"), "{stdout}");
    let (in_sequence, at_once) = (cli.path("in-sequence"), cli.path("at-once"));
    cli.ok(&["apply", "--model", base, "--patch", &eiffel, &colosseum, "--no-sync", "--out", &in_sequence]);
    cli.ok(&["apply", "--model", base, "--patch", &merged, "--no-sync", "--out", &at_once]);
    assert!(folder(Path::new(&in_sequence)) == folder(Path::new(&at_once)), "the merged patch gives other bytes than the two in sequence");

    // diff is exact (`apply::diff`): its patch rebuilds the edited folder to the byte.
    let diff = cli.path("diff.fpatch");
    let (stdout, _) = cli.ok(&["diff", "--from", base, "--to", &edited, "--out", &diff]);
    assert!(stdout.starts_with("5 tensor(s) differ"), "{stdout}");
    let rebuilt = cli.path("rebuilt");
    cli.ok(&["apply", "--model", base, "--patch", &diff, "--no-sync", "--out", &rebuilt]);
    assert!(folder(Path::new(&rebuilt)) == folder(Path::new(&edited)), "the diff's patch does not rebuild the edited model");
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_culprit_and_write_nothing() {
    let cli = Cli::new();
    let smol = smollm2();
    let smol = arg(&smol);
    let (llama, gpt2) = (root().join("fixtures/tiny-llama"), root().join("fixtures/tiny-gpt2"));
    let (llama, gpt2) = (arg(&llama), arg(&gpt2));
    let (out, existing) = (cli.path("out"), cli.path("existing"));
    std::fs::write(&existing, b"keep me").unwrap();

    // Two small patches setting the same fact to different targets, and broken patch files.
    let (_t, _, ckpt) = tiny_model();
    let patch = |name: &str, target: &str, prior: &[std::path::PathBuf]| {
        let mut m = manifest("rome");
        let prompt = RELATION.to_string();
        m.edits.push(Edit { subject: "France".into(), relation: prompt.clone(), prompt, target_old: "Paris".into(), target_new: target.into() });
        let delta = Delta::LowRank(vec![factors(24, 16, 1, prior.len() as u64, 0.01)]);
        write_patch(&cli.out.path().join(name), &ckpt, prior, m, vec![("model.layers.0.mlp.up_proj.weight", delta)])
    };
    let lyon = patch("lyon.fpatch", "Lyon", &[]);
    let nice = patch("nice.fpatch", "Nice", std::slice::from_ref(&lyon));
    let (lyon, nice) = (arg(&lyon), arg(&nice));
    let (garbage, truncated) = (cli.path("garbage.fpatch"), cli.path("truncated.fpatch"));
    std::fs::write(&garbage, b"this is not a patch at all, only some bytes").unwrap();
    let bytes = std::fs::read(lyon).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (missing, empty_cache) = (cli.path("no-such-model"), cli.path("empty-cache"));
    std::fs::create_dir(&empty_cache).unwrap();
    let rome = fact("The Eiffel Tower", "Rome");

    cli.fails(&["compile", "--model", smol, "--fact", "no pipes here", "--out", &out], &["--fact `no pipes here`", "PROMPT|SUBJECT|TARGET"]);
    cli.fails(&["compile", "--model", smol, "--fact", &rome, "--cache", &empty_cache, "--out", &out], &[&empty_cache, "add --corpus"]);
    cli.fails(&["compile", "--model", smol, "--fact", &rome, "--out", &existing], &[&existing, "exists"]);
    let bogus = ["compile", "--model", smol, "--fact", &rome, "--set", "early_stop=bogus", "--out", &out];
    cli.fails(&bogus, &["--set early_stop=bogus", "unknown variant `bogus`", "`none`", "`mpes`"]);
    cli.fails(
        &["compile", "--model", smol, "--method", "kn", "--fact", &rome, "--set", "early_stop=mpes", "--out", &out],
        &["Kn has no hyperparameter `early_stop`"],
    );
    cli.fails(
        &["compile", "--model", smol, "--method", "rome", "--fact", &rome, "--set", "value_norm=anchored", "--out", &out],
        &["Rome has no hyperparameter `value_norm`"],
    );
    cli.fails(&["apply", "--model", llama, "--patch", &garbage, "--out", &out], &[&garbage, "not a factpatch patch"]);
    cli.fails(&["apply", "--model", &missing, "--patch", lyon, "--out", &out], &[&missing]);
    cli.fails(&["generate", "--model", &missing, "Paris is"], &[&missing]);
    cli.fails(&["audit", &truncated, "--json"], &[&truncated]);
    cli.fails(&["merge", lyon, nice, "--out", &out], &[lyon, nice, "France", "--allow-override"]);
    cli.fails(&["merge", lyon, nice, "--allow-override", "--out", &existing], &[&existing, "exists"]);
    cli.fails(&["diff", "--from", llama, "--to", gpt2, "--out", &out], &[llama, gpt2, "not the same architecture"]);
    cli.fails(&["diff", "--from", llama, "--to", llama, "--out", &existing], &[&existing, "exists"]);
    cli.fails(&["export", &garbage, "--format", "peft", "--out", &out], &[&garbage, "not a factpatch patch"]);
    cli.fails(&["export", lyon, "--format", "peft", "--rank", "17", "--out", &out], &[lyon, "--rank 17", "up_proj"]);
    cli.fails(&["export", lyon, "--format", "gguf-lora", "--out", &existing], &[&existing, "exists"]);

    let mut names: Vec<String> = std::fs::read_dir(cli.out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["empty-cache", "existing", "garbage.fpatch", "lyon.fpatch", "nice.fpatch", "truncated.fpatch"], "left behind");
}
