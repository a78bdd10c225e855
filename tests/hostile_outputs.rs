//! Hostile outputs, part of the hostile-input catalogue (issue #17, "outputs and temporaries").
//! Generators, one per class:
//! - every verb that writes, its output pointed at what must never be replaced (an input of the
//!   command, a hard link or a symbolic link to one, a dangling link, a FIFO, a folder): refused,
//!   naming the path, everything left as it was; `--force` replaces a regular file only;
//! - temporaries that killed runs left (their process is gone): removed by the next run writing
//!   the same output, and nothing else is;
//! - two runs writing one path at once: exactly one wins, and the file is the winner's;
//! - symbolic links inside a model folder: reproduced as links when they lead inside it,
//!   refused otherwise, never followed;
//! - an output inside its input folder: refused.
//!
//! The binary runs as users run it, on the tiny fixture model with a byte-level tokenizer (so
//! that `stats` and `eval` take milliseconds), with its caches in the scratch folder.

mod common;

use common::{factors, manifest, values, write_model, write_patch};
use factpatch::atomic::{AtomicDir, AtomicFile, Policy};
use factpatch::checkpoint::{Checkpoint, Dtype};
use factpatch::patch::{Delta, Patch};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DOWN0: &str = "model.layers.0.mlp.down_proj.weight";
const DOWN1: &str = "model.layers.1.mlp.down_proj.weight";

/// A scratch folder with the model, a corpus, two patches, two statistics shards and an
/// experiment's results; the binary runs with its caches in it.
struct Scene {
    dir: tempfile::TempDir,
    model: PathBuf,
    corpus: PathBuf,
    patches: [PathBuf; 2],
    shards: [PathBuf; 2],
    run: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = common::byte_level_tiny_llama(&dir.path().join("model"));
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "the union of the state and the people shall be one nation under law.\n\n".repeat(60)).unwrap();
        let ckpt = Checkpoint::open(&model).unwrap();
        let patch = |name: &str, tensor: &str, seed: u64| {
            write_patch(&dir.path().join(name), &ckpt, &[], manifest("rome"), vec![(tensor, Delta::LowRank(vec![factors(64, 128, 1, seed, 0.01)]))])
        };
        let patches = [patch("a.fpatch", DOWN0, 1), patch("b.fpatch", DOWN1, 2)];
        drop(ckpt);
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("results.csv"), "setting,x,metric,value\nnone,0,reliability,0.1\nnone,1,reliability,0.9\n").unwrap();
        let shards = [dir.path().join("s0.safetensors"), dir.path().join("s1.safetensors")];
        let scene = Scene { dir, model, corpus, patches, shards, run };
        for (i, shard) in scene.shards.iter().enumerate() {
            scene.ok(&scene.stats_args(shard, &[&format!("--shard={i}/2")]));
        }
        scene
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[OsString]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_factpatch")).args(args).env("FACTPATCH_CACHE", self.path("cache")).output().unwrap()
    }

    /// Runs `args`, which must succeed; returns stdout.
    fn ok(&self, args: &[OsString]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "factpatch {args:?}\n{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// `stats` of the model and corpus, written to `out`.
    fn stats_args(&self, out: &Path, extra: &[&str]) -> Vec<OsString> {
        let mut a = args(&["stats", "--layers", "0-1", "--seq-len", "64", "--tokens", "2000", "--model"]);
        a.extend([self.model.clone().into(), "--corpus".into(), self.corpus.clone().into(), "--cache".into(), self.path("cache/stats").into()]);
        a.extend([OsString::from("--out"), out.into()]);
        a.extend(extra.iter().map(OsString::from));
        a
    }

    fn eval_args(&self, csv: &Path, extra: &[&str]) -> Vec<OsString> {
        let mut a = args(&["eval", "--limit", "1", "--seq-len", "32", "--model"]);
        a.extend([self.model.clone().into(), "--patch".into(), self.patches[0].clone().into()]);
        a.extend([OsString::from(format!("--general=perplexity={}", self.corpus.display())), "--csv".into(), csv.into()]);
        a.extend(extra.iter().map(OsString::from));
        a
    }
}

fn args(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

/// What is at `path`, to tell it is untouched: its type, and its bytes, link target or entries.
fn snapshot(path: &Path) -> String {
    let Ok(m) = std::fs::symlink_metadata(path) else { return "nothing".into() };
    let t = m.file_type();
    if t.is_symlink() {
        format!("link to {:?}", std::fs::read_link(path).unwrap())
    } else if t.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        format!("folder {names:?}")
    } else if t.is_fifo() {
        "FIFO".into()
    } else {
        format!("file {}", blake3::hash(&std::fs::read(path).unwrap()).to_hex())
    }
}

/// What an output path may hold that must never be replaced.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// One of the command's inputs itself.
    Input,
    /// A hard link to an input: another name, the same file.
    HardLink,
    /// A symbolic link to an input.
    LinkToInput,
    /// A symbolic link to nothing (yet).
    DanglingLink,
    Fifo,
    /// A folder holding a file.
    Folder,
}

impl Hostile {
    const ALL: [Hostile; 6] = [Hostile::Input, Hostile::HardLink, Hostile::LinkToInput, Hostile::DanglingLink, Hostile::Fifo, Hostile::Folder];

    /// Makes it at `dir/name` (the input itself for `Input`), for `input`; returns the path.
    fn make(self, dir: &Path, name: &str, input: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let at = dir.join(name);
        match self {
            Hostile::Input => return input.to_path_buf(),
            Hostile::HardLink => std::fs::hard_link(input, &at).unwrap(),
            Hostile::LinkToInput => symlink(input, &at).unwrap(),
            Hostile::DanglingLink => symlink(dir.join("nowhere"), &at).unwrap(),
            Hostile::Fifo => assert!(Command::new("mkfifo").arg(&at).status().unwrap().success()),
            Hostile::Folder => {
                std::fs::create_dir(&at).unwrap();
                std::fs::write(at.join("keep.txt"), "kept").unwrap();
            }
        }
        at
    }

    /// What the error says, for a verb that can replace a regular file (`--force`, rewrites).
    fn reason(self) -> &'static str {
        match self {
            Hostile::Input | Hostile::HardLink => "is an input of this command",
            Hostile::LinkToInput | Hostile::DanglingLink => "is not a regular file (a symbolic link)",
            Hostile::Fifo => "is not a regular file (a FIFO)",
            Hostile::Folder => "is not a regular file (a folder)",
        }
    }
}

/// A command line for an output path.
type CommandLine<'a> = Box<dyn Fn(&Path) -> Vec<OsString> + 'a>;

/// A verb that writes: its inputs, the name its output file gets in a case folder, its command
/// line for an output path, and whether it can replace a file (so the error says why not).
struct Verb<'a> {
    name: &'a str,
    inputs: Vec<PathBuf>,
    file: &'a str,
    args: CommandLine<'a>,
    replaces: bool,
}

/// `verb`, then `--out OUT`.
fn with_out(verb: &[&str], out: &Path) -> Vec<OsString> {
    [args(verb), vec!["--out".into(), out.into()]].concat()
}

fn verbs(s: &Scene) -> Vec<Verb<'_>> {
    let weights = s.model.join("model.safetensors");
    let (p0, p1) = (&s.patches[0], &s.patches[1]);
    vec![
        Verb {
            name: "stats",
            inputs: vec![weights.clone(), s.model.join("config.json"), s.model.join("tokenizer.json"), s.corpus.clone()],
            file: "stats.safetensors",
            args: Box::new(|out| s.stats_args(out, &[])),
            replaces: true,
        },
        Verb {
            name: "stats --force",
            inputs: vec![weights.clone(), s.corpus.clone()],
            file: "stats.safetensors",
            args: Box::new(|out| s.stats_args(out, &["--force"])),
            replaces: true,
        },
        Verb {
            name: "stats merge --force",
            inputs: vec![s.shards[0].clone()],
            file: "merged.safetensors",
            args: Box::new(|out| {
                [args(&["stats", "merge"]), vec![s.shards[0].clone().into(), s.shards[1].clone().into(), "--force".into(), "--out".into(), out.into()]].concat()
            }),
            replaces: true,
        },
        Verb {
            name: "eval --csv",
            inputs: vec![weights.clone(), s.model.join("config.json"), p0.clone(), s.corpus.clone()],
            file: "eval.csv",
            args: Box::new(|out| s.eval_args(out, &[])),
            replaces: true,
        },
        Verb {
            name: "eval --csv --force",
            inputs: vec![weights.clone(), p0.clone(), s.corpus.clone()],
            file: "eval.csv",
            args: Box::new(|out| s.eval_args(out, &["--force"])),
            replaces: true,
        },
        Verb {
            name: "compare (the experiments' writer)",
            inputs: vec![s.run.join("results.csv")],
            file: "results.csv",
            args: Box::new(|out| with_out(&["compare", s.run.to_str().unwrap()], out.parent().unwrap())),
            replaces: true,
        },
        Verb {
            name: "merge",
            inputs: vec![p0.clone()],
            file: "merged.fpatch",
            args: Box::new(|out| with_out(&["merge", p0.to_str().unwrap(), p1.to_str().unwrap()], out)),
            replaces: false,
        },
        Verb {
            name: "diff",
            inputs: vec![weights.clone()],
            file: "diff.fpatch",
            args: Box::new(|out| with_out(&["diff", "--from", s.model.to_str().unwrap(), "--to", s.model.to_str().unwrap()], out)),
            replaces: false,
        },
        Verb {
            name: "apply",
            inputs: vec![p0.clone(), weights.clone()],
            file: "edited",
            args: Box::new(|out| with_out(&["apply", "--model", s.model.to_str().unwrap(), "--patch", p0.to_str().unwrap()], out)),
            replaces: false,
        },
        Verb {
            name: "export --format peft",
            inputs: vec![p0.clone()],
            file: "adapter",
            args: Box::new(|out| with_out(&["export", p0.to_str().unwrap(), "--format", "peft"], out)),
            replaces: false,
        },
        Verb {
            name: "export --format gguf-lora",
            inputs: vec![p0.clone()],
            file: "adapter.gguf",
            args: Box::new(|out| with_out(&["export", p0.to_str().unwrap(), "--format", "gguf-lora"], out)),
            replaces: false,
        },
        Verb {
            name: "audit --heatmap",
            inputs: vec![p0.clone()],
            file: "heatmap.png",
            args: Box::new(|out| [args(&["audit", p0.to_str().unwrap(), "--model", s.model.to_str().unwrap(), "--heatmap"]), vec![out.into()]].concat()),
            replaces: false,
        },
    ]
}

#[test]
fn outputs_never_replace_inputs_links_fifos_or_folders() {
    let s = Scene::new();
    // Every file a case could touch, to check that none was.
    let watched: Vec<PathBuf> = [s.model.join("model.safetensors"), s.model.join("config.json"), s.model.join("tokenizer.json"), s.corpus.clone()]
        .into_iter()
        .chain(s.patches.iter().cloned())
        .chain(s.shards.iter().cloned())
        .chain([s.run.join("results.csv")])
        .collect();
    let before: Vec<String> = watched.iter().map(|p| snapshot(p)).collect();
    let mut case = 0;
    for verb in verbs(&s) {
        // Each verb works on a fresh path: the cases below are refusals, not failures.
        let fresh = s.path(&format!("fresh-{case}")).join(verb.file);
        std::fs::create_dir(fresh.parent().unwrap()).unwrap();
        case += 1;
        let o = s.run(&(verb.args)(&fresh));
        assert!(o.status.success(), "{}: {}", verb.name, String::from_utf8_lossy(&o.stderr));
        for input in &verb.inputs {
            for hostile in Hostile::ALL {
                if matches!(hostile, Hostile::Input | Hostile::HardLink | Hostile::LinkToInput) || input == &verb.inputs[0] {
                    let dir = s.path(&format!("case-{case}"));
                    case += 1;
                    let out = hostile.make(&dir, verb.file, input);
                    let was = snapshot(&out);
                    let o = s.run(&(verb.args)(&out));
                    let stderr = String::from_utf8_lossy(&o.stderr);
                    let what = format!("{} onto {hostile:?} of {}: {stderr}", verb.name, input.display());
                    assert!(!o.status.success(), "{what}");
                    assert!(stderr.starts_with("error: ") && stderr.contains(out.to_str().unwrap()), "the error does not name the path: {what}");
                    if verb.replaces {
                        assert!(stderr.contains(hostile.reason()), "the error does not say `{}`: {what}", hostile.reason());
                    }
                    assert_eq!(snapshot(&out), was, "{what}");
                    assert!(!dir.join("nowhere").exists(), "written through the link: {what}");
                    let left: Vec<_> =
                        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("tmp")).collect();
                    assert!(left.is_empty(), "temporaries left: {left:?}: {what}");
                }
            }
        }
    }
    let after: Vec<String> = watched.iter().map(|p| snapshot(p)).collect();
    assert_eq!(before, after, "an input changed");
    let left: Vec<_> = walk(s.dir.path()).into_iter().filter(|n| n.contains("factpatch-tmp")).collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn force_replaces_a_regular_file_that_is_no_input() {
    let s = Scene::new();
    type Forced<'a> = Box<dyn Fn(&Path, bool) -> Vec<OsString> + 'a>;
    let cases: [(&str, Forced); 3] = [
        ("stats", Box::new(|out, force| s.stats_args(out, if force { &["--force"] } else { &[] }))),
        (
            "stats merge",
            Box::new(|out, force| {
                let mut a = args(&["stats", "merge"]);
                a.extend([s.shards[0].clone().into(), s.shards[1].clone().into(), "--out".into(), out.into()]);
                a.extend(force.then(|| "--force".into()));
                a
            }),
        ),
        ("eval --csv", Box::new(|out, force| s.eval_args(out, if force { &["--force"] } else { &[] }))),
    ];
    for (i, (name, cmd)) in cases.iter().enumerate() {
        let out = s.path(&format!("old-{i}"));
        std::fs::write(&out, "an older file").unwrap();
        let o = s.run(&cmd(&out, false));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains("exists: pass --force to replace it"), "{name}: {stderr}");
        assert_eq!(std::fs::read(&out).unwrap(), b"an older file", "{name}");
        s.ok(&cmd(&out, true));
        assert_ne!(std::fs::read(&out).unwrap(), b"an older file", "{name}: not replaced");
        assert!(std::fs::symlink_metadata(&out).unwrap().is_file());
    }
}

/// The id of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn temporaries_of_dead_runs_are_removed_by_the_next_run() {
    let s = Scene::new();
    let (dead, alive) = (dead_pid(), std::process::id());
    let dir = s.path("outputs");
    std::fs::create_dir(&dir).unwrap();
    // What killed runs left: a file or a folder of junk under each output's temporary name.
    let leave = |name: &str, folder: bool| {
        let p = dir.join(name);
        if folder {
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("stale-extra.txt"), vec![b'x'; 4096]).unwrap();
        } else {
            std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        }
        p
    };
    let (model, patch) = (s.model.to_str().unwrap(), s.patches[0].to_str().unwrap());
    for (out, folder, command) in [
        ("merged.fpatch", false, args(&["merge", patch, "--out", dir.join("merged.fpatch").to_str().unwrap()])),
        ("stats.safetensors", false, s.stats_args(&dir.join("stats.safetensors"), &[])),
        ("edited", true, args(&["apply", "--model", model, "--patch", patch, "--out", dir.join("edited").to_str().unwrap()])),
    ] {
        let stale = [
            leave(&format!(".{out}.factpatch-tmp.{dead}.0123456789abcdef"), folder),
            leave(&format!(".{out}.factpatch-tmp.{dead}.fedcba9876543210"), !folder),
            leave(&format!(".{out}.tmp-{dead}"), folder), // as earlier versions named them
        ];
        let kept = [
            leave(&format!(".{out}.factpatch-tmp.{alive}.0123456789abcdef"), folder), // a live run's
            leave(&format!(".{out}.factpatch-tmp.{dead}.not-hex"), folder),
            leave(&format!(".other-{out}.factpatch-tmp.{dead}.0123456789abcdef"), folder), // another output's
            leave(&format!("{out}.factpatch-tmp.{dead}.0123456789abcdef"), folder),
        ];
        s.ok(&command);
        for p in &stale {
            assert!(!p.exists(), "{out}: left {}", p.display());
        }
        for p in &kept {
            assert!(p.exists(), "{out}: removed {}", p.display());
        }
        if folder {
            assert!(!dir.join(out).join("stale-extra.txt").exists(), "a stale temporary shipped in the output");
        }
    }
}

/// A model with one 256 KiB tensor, and two patches of it whose merges take a while (0.1 s).
fn big_patches(dir: &Path) -> [PathBuf; 2] {
    let model = dir.join("big");
    write_model(&model, &[(DOWN0, Dtype::F32, vec![256, 256], values(1 << 16, 1, 0.1))], 1);
    let ckpt = Checkpoint::open(&model).unwrap();
    let patch = |name: &str, seed| write_patch(&dir.join(name), &ckpt, &[], manifest("diff"), vec![(DOWN0, Delta::explicit(values(1 << 16, seed, 0.001)))]);
    [patch("p.fpatch", 2), patch("q.fpatch", 3)]
}

#[test]
fn of_two_concurrent_merges_to_one_path_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let [p, q] = big_patches(dir.path());
    let out = dir.path().join("merged.fpatch");
    for round in 0..4 {
        let _ = std::fs::remove_file(&out);
        let spawn = |patch: &Path| {
            Command::new(env!("CARGO_BIN_EXE_factpatch"))
                .args([OsString::from("merge"), patch.into(), "--out".into(), out.clone().into()])
                .env("FACTPATCH_CACHE", dir.path().join("cache"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(&p), spawn(&q));
        let results = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let winners: Vec<&Output> = results.iter().filter(|o| o.status.success()).collect();
        let text = |o: &Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(winners.len(), 1, "round {round}: {} and {}", text(&results[0]), text(&results[1]));
        let loser = results.iter().find(|o| !o.status.success()).unwrap();
        assert!(String::from_utf8_lossy(&loser.stderr).contains("exists"), "round {round}: {}", text(loser));
        // `merged 1 patches into OUT (ID, N bytes)`
        let stdout = String::from_utf8_lossy(&winners[0].stdout).into_owned();
        let printed = stdout.split_once(" (").and_then(|(_, r)| r.split_once(',')).map(|(id, _)| id.to_string()).unwrap();
        assert_eq!(Patch::read(&out).unwrap().id(), printed, "round {round}: the file is not the winner's");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("tmp")).collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
}

#[test]
fn temporaries_are_unique_and_of_two_writers_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.fpatch");
    let temps =
        || std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".x.fpatch.factpatch-tmp.")).count();
    let (mut a, mut b) = (AtomicFile::create(&dest, &Policy::new()).unwrap(), AtomicFile::create(&dest, &Policy::new()).unwrap());
    assert_eq!(temps(), 2, "one process, two writers: two temporaries");
    a.write_all(b"first").unwrap();
    b.write_all(b"second").unwrap();
    a.commit().unwrap();
    let e = b.commit().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"first");
    assert_eq!(temps(), 0);
    // Folders too; a rewrite replaces a regular file.
    let folder = dir.path().join("out");
    let (c, d) = (AtomicDir::create(&folder, &Policy::new()).unwrap(), AtomicDir::create(&folder, &Policy::new()).unwrap());
    assert_ne!(c.path(), d.path());
    std::fs::write(d.path().join("d.txt"), "d").unwrap();
    c.commit(true).unwrap();
    assert!(d.commit(true).is_err());
    assert!(!folder.join("d.txt").exists());
    factpatch::atomic::write(&dest, b"third", &Policy::rewrite()).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"third");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only x.fpatch and out/");
}

#[test]
fn links_in_a_model_folder_are_reproduced_inside_or_refused_never_followed() {
    let s = Scene::new();
    let outside = s.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("credentials"), "secret").unwrap();
    let apply =
        |out: &Path| s.run(&args(&["apply", "--model", s.model.to_str().unwrap(), "--patch", s.patches[0].to_str().unwrap(), "--out", out.to_str().unwrap()]));
    // Each refused on its own: the output never appears, nothing of it is left.
    std::fs::create_dir(s.model.join("nested")).unwrap();
    std::fs::write(s.model.join("nested/notes.txt"), "notes").unwrap();
    let refused: [(&str, PathBuf); 7] = [
        ("secrets", "../outside".into()),                     // a folder outside
        ("nested/creds", "../../outside/credentials".into()), // a file outside
        ("absolute.json", s.model.join("config.json")),       // absolute, even to inside
        ("dangling", "missing.json".into()),                  // nothing
        ("loop-a", "loop-b".into()),                          // a loop (loop-b below)
        ("nested/up", "../../model/tokenizer.json".into()),   // out of the folder and back
        ("escape", "sub/../model/config.json".into()),        // inside by its text, out via `sub -> .`
    ];
    for (link, target) in &refused {
        let at = s.model.join(link);
        symlink(target, &at).unwrap();
        match *link {
            "loop-a" => symlink("loop-a", s.model.join("loop-b")).unwrap(),
            "escape" => symlink(".", s.model.join("sub")).unwrap(), // kept for the links below
            _ => {}
        }
        let out = s.path(&format!("refused-{}", link.replace('/', "-")));
        let o = apply(&out);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{link} -> {target:?} copied: {stderr}");
        assert!(stderr.contains(at.to_str().unwrap()) && stderr.contains("symbolic link"), "{link}: {stderr}");
        assert!(!out.exists(), "{link}");
        std::fs::remove_file(&at).unwrap();
        let _ = std::fs::remove_file(s.model.join("loop-b"));
    }
    let left: Vec<_> = std::fs::read_dir(s.dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("tmp")).collect();
    assert!(left.is_empty(), "{left:?}");

    // Links that lead inside are reproduced as links: `sub -> .` is not a loop to copy. The
    // weights may be links to anywhere (a Hugging Face cache): they are read, not copied.
    symlink("config.json", s.model.join("alias.json")).unwrap();
    symlink("../config.json", s.model.join("nested/config.json")).unwrap();
    symlink("sub/nested/notes.txt", s.model.join("notes.txt")).unwrap();
    std::fs::rename(s.model.join("model.safetensors"), outside.join("blob")).unwrap();
    symlink(outside.join("blob"), s.model.join("model.safetensors")).unwrap();
    let out = s.path("edited");
    let o = apply(&out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (link, target) in [("sub", "."), ("alias.json", "config.json"), ("nested/config.json", "../config.json"), ("notes.txt", "sub/nested/notes.txt")] {
        assert_eq!(std::fs::read_link(out.join(link)).unwrap(), Path::new(target), "{link}");
    }
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "notes");
    assert!(std::fs::symlink_metadata(out.join("model.safetensors")).unwrap().is_file());
    assert!(std::fs::symlink_metadata(out.join("nested")).unwrap().is_dir());
    let names: Vec<_> = walk(&out);
    assert!(!names.iter().any(|n| n.contains("credentials") || n.contains("secrets")), "{names:?}");
}

/// Every path below `dir`, links not followed.
fn walk(dir: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        all.push(e.path().display().to_string());
        if e.file_type().unwrap().is_dir() {
            all.extend(walk(&e.path()));
        }
    }
    all
}

#[test]
fn apply_refuses_an_output_inside_its_model_folder() {
    let s = Scene::new();
    let before = walk(&s.model);
    for out in [s.model.join("sub"), s.model.join("a/b"), s.model.join("."), s.model.clone(), s.dir.path().to_path_buf()] {
        let o = s.run(&args(&["apply", "--model", s.model.to_str().unwrap(), "--patch", s.patches[0].to_str().unwrap(), "--out", out.to_str().unwrap()]));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: {stderr}", out.display());
        assert!(stderr.contains("input") || stderr.contains("exists"), "{}: {stderr}", out.display());
        assert_eq!(walk(&s.model), before, "{}: the model folder changed", out.display());
    }
    let o = s.run(&args(&[
        "apply",
        "--model",
        s.model.to_str().unwrap(),
        "--patch",
        s.patches[0].to_str().unwrap(),
        "--out",
        s.model.join("sub").to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is inside the input folder"), "{}", String::from_utf8_lossy(&o.stderr));
}
