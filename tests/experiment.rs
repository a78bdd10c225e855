//! Experiments on the real model: rows for every setting and evaluation, plots, and a resumed
//! run that ends exactly where an uninterrupted one does.

mod common;

use common::{root, smollm2_spec};
use factpatch::compile::Compiler;
use factpatch::edit::{request, Method};
use factpatch::eval::{self, tasks};
use factpatch::experiment::{self, RunFolder, Schedule, Setup};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

fn setup(out: &Path, method: Method, rects: &[f64]) -> Setup {
    let requests_path = root().join("fixtures/data/edit/counterfact-rome-300.json");
    let wiki = tasks::read(tasks::Task::Perplexity, &root().join("fixtures/data/text/wikitext-2-raw-test.txt")).unwrap();
    Setup {
        // Few optimisation steps: this checks the bookkeeping, not edit quality.
        compiler: Compiler::open(&smollm2_spec(method, &["v_steps=4"])).unwrap(),
        requests: request::read(&requests_path).unwrap()[..2].to_vec(),
        requests_path,
        rects: rects.to_vec(),
        general: vec![wiki],
        options: eval::Options { limit: Some(1), seq_len: Some(64), ..eval::Options::default() },
        out: out.to_path_buf(),
    }
}

#[test]
fn sequential_runs_resume_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    let rows = experiment::run(&setup(&whole, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap();
    for setting in ["none", "k=40"] {
        for x in [0, 1, 2] {
            let metrics: Vec<&str> = rows.iter().filter(|r| r.setting == setting && r.x == x).map(|r| r.metric.as_str()).collect();
            assert!(metrics.contains(&"perplexity/perplexity"), "{setting} after {x}: {metrics:?}");
            if x > 0 {
                assert!(["reliability", "generalization", "locality", "efficacy"].iter().all(|m| metrics.contains(m)), "{setting} after {x}: {metrics:?}");
            }
        }
    }
    // Both settings start from the same unedited model.
    let at0 = |s: &str| rows.iter().filter(|r| r.setting == s && r.x == 0).map(|r| r.value).collect::<Vec<_>>();
    assert_eq!(at0("none"), at0("k=40"));
    for png in ["reliability.png", "locality.png", "perplexity-perplexity.png", "rel-gen-loc.png"] {
        assert!(whole.join(png).is_file(), "{png}");
    }

    // Stopped after one edit, then continued: the same rows, to the byte.
    experiment::run(&setup(&resumed, Method::Memit, &[100.0, 40.0]), &Schedule::every(1, 1)).unwrap();
    experiment::run(&setup(&resumed, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap();
    let csv = |d: &Path| std::fs::read_to_string(d.join("results.csv")).unwrap();
    assert_eq!(csv(&resumed), csv(&whole));

    // Stopped after saving the state but before measuring: the evaluation is made on resuming.
    let without = |rows: &str| csv(&whole).lines().filter(|l| !l.starts_with(rows)).map(|l| format!("{l}\n")).collect::<String>();
    std::fs::write(resumed.join("results.csv"), without("k=40,2,")).unwrap();
    experiment::run(&setup(&resumed, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap();
    assert_eq!(csv(&resumed), csv(&whole));

    // A state that does not match the results is refused, not silently used.
    std::fs::write(resumed.join("results.csv"), without("k=40,1,")).unwrap();
    let e = experiment::run(&setup(&resumed, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap_err().to_string();
    assert!(e.contains("k=40.safetensors") && e.contains("after 2 edits"), "{e}");
    let state = resumed.join("state/k=40.safetensors");
    std::fs::copy(resumed.join("state/none.safetensors"), &state).unwrap();
    std::fs::write(resumed.join("results.csv"), csv(&whole)).unwrap();
    let e = experiment::run(&setup(&resumed, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap_err().to_string();
    assert!(e.contains("k=40.safetensors") && e.contains("setting `none`"), "{e}");
}

#[test]
fn batched_sequential_runs_edit_each_batch_in_one_solve() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("batched");
    let s = setup(&out, Method::Memit, &[100.0]);
    experiment::run(&s, &Schedule::Sequential { at: vec![2], batch: 2 }).unwrap();
    let mut direct = s.compiler.clone();
    direct.hp.rect_k = 100.0;
    direct.edit(&s.requests[..2]).unwrap();
    let saved = candle_core::safetensors::load(out.join("state/none.safetensors"), &candle_core::Device::Cpu).unwrap();
    for &l in &s.compiler.hp.layers {
        let (a, b) = (
            saved[&format!("layer.{l}")].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            direct.model.mlp_out_weight(l).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a == b, "layer {l}: the batched run differs from one solve of both facts");
    }
    let e = experiment::run(&s, &Schedule::Sequential { at: vec![1, 2], batch: 2 }).unwrap_err().to_string();
    assert!(e.contains("multiples of 2"), "{e}");
}

#[test]
fn alphaedit_runs_resume_with_the_keys_they_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    experiment::run(&setup(&whole, Method::AlphaEdit, &[100.0]), &Schedule::every(2, 1)).unwrap();
    experiment::run(&setup(&resumed, Method::AlphaEdit, &[100.0]), &Schedule::every(1, 1)).unwrap();
    experiment::run(&setup(&resumed, Method::AlphaEdit, &[100.0]), &Schedule::every(2, 1)).unwrap();
    for file in ["results.csv", "state/none.safetensors"] {
        assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap(), "{file} differs after resuming");
    }
}

/// A tensor of a saved state: name, dtype, shape, bytes.
type Saved = (String, Dtype, Vec<usize>, Vec<u8>);

#[test]
fn a_folder_resumes_only_the_experiment_that_made_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let s = setup(&out, Method::Memit, &[100.0]);
    let one = Schedule::every(1, 1);
    experiment::run(&s, &one).unwrap();
    let files = ["experiment.json", "results.csv", "state/none.safetensors"];
    let read = |file: &str| std::fs::read(out.join(file)).unwrap();
    let before: Vec<Vec<u8>> = files.iter().map(|f| read(f)).collect();
    let refused = |s: &Setup, schedule: &Schedule, expected: &str| {
        let e = experiment::run(s, schedule).unwrap_err().to_string();
        assert!(e.contains(expected), "expected `{expected}` in: {e}");
        for (file, bytes) in files.iter().zip(&before) {
            assert!(read(file) == *bytes, "{file} changed by a refused run");
        }
    };

    // Whatever decides the results may not change: it is named with both values.
    let recipe = out.join("experiment.json");
    let mut other = setup(&out, Method::Memit, &[100.0]);
    other.compiler.hp.v_steps = 5;
    refused(&other, &one, &format!("{}: holds another experiment: `compiler.hparams.v_steps` is 4 there, 5 here", recipe.display()));
    refused(&s, &Schedule::Sequential { at: vec![2], batch: 2 }, "`schedule.sequential.batch` is 1 there, 2 here");
    refused(
        &Setup { options: eval::Options { seq_len: Some(32), ..s.options.clone() }, ..setup(&out, Method::Memit, &[100.0]) },
        &one,
        "`options.seq_len` is 64 there, 32 here",
    );
    let copy = tmp.path().join("requests.json");
    std::fs::write(&copy, [std::fs::read(&s.requests_path).unwrap(), b"\n".to_vec()].concat()).unwrap();
    refused(&Setup { requests_path: copy, ..setup(&out, Method::Memit, &[100.0]) }, &one, "`requests` is");
    let mut no_tasks = setup(&out, Method::Memit, &[100.0]);
    no_tasks.general.clear();
    refused(&no_tasks, &one, "`general` is [{");
    // RECT settings and evaluation points may be added.
    let rows = experiment::run(&setup(&out, Method::Memit, &[100.0, 40.0]), &Schedule::every(2, 1)).unwrap();
    assert!(rows.iter().any(|r| r.setting == "k=40" && r.x == 2), "{rows:?}");
    assert!(read("experiment.json") == before[0]);

    // A folder with results that no recipe accounts for is refused.
    std::fs::rename(&recipe, tmp.path().join("recipe")).unwrap();
    let e = experiment::run(&s, &one).unwrap_err().to_string();
    assert!(e.contains("holds results but no experiment.json"), "{e}");
    std::fs::rename(tmp.path().join("recipe"), &recipe).unwrap();
    std::fs::write(&recipe, b"{\"compiler\": ").unwrap();
    let e = experiment::run(&s, &one).unwrap_err().to_string();
    assert!(e.contains("experiment.json: not JSON"), "{e}");
    std::fs::write(&recipe, &before[0]).unwrap();

    // A state file is data: tensors that do not fit the model are refused, not trusted.
    let state = out.join("state/none.safetensors");
    let saved = std::fs::read(&state).unwrap();
    let layer = s.compiler.hp.layers[0];
    let tampered = |edits: usize, change: &dyn Fn(&mut Vec<Saved>), expected: &str| {
        let st = SafeTensors::deserialize(&saved).unwrap();
        let mut tensors: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
        change(&mut tensors);
        let views = tensors.iter().map(|(n, d, shape, b)| (n.clone(), TensorView::new(*d, shape.clone(), b).unwrap()));
        let meta = HashMap::from([("state".to_string(), format!(r#"{{"edits":{edits},"setting":"none"}}"#))]);
        std::fs::write(&state, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        let e = experiment::run(&s, &Schedule::every(2, 1)).unwrap_err().to_string();
        assert!(e.contains("none.safetensors") && e.contains(expected), "expected `{expected}` in: {e}");
    };
    tampered(3, &|_| {}, "holds the state after 3 edits, more than the 2 records");
    let name = format!("layer.{layer}");
    let as_f64 = |t: &mut Vec<Saved>| {
        let w = t.iter_mut().find(|w| w.0 == name).unwrap();
        w.1 = Dtype::F64;
        w.2[1] /= 2;
    };
    let dims = s.compiler.model.mlp_out_weight(layer).dims().to_vec();
    tampered(2, &as_f64, &format!("tensor `{name}` is F64 [{}, {}], not the F32 {dims:?} this model needs", dims[0], dims[1] / 2));
    let keys = |shape: Vec<usize>, layer: usize| {
        move |t: &mut Vec<Saved>| t.push((format!("earlier_keys.{layer}"), Dtype::F64, shape.clone(), vec![0; 8 * shape.iter().product::<usize>()]))
    };
    tampered(2, &keys(vec![3], layer), &format!("tensor `earlier_keys.{layer}` is F64 [3]"));
    tampered(2, &keys(vec![7, 1], layer), &format!("tensor `earlier_keys.{layer}` is F64 [7, 1], not the F64 [{}, edits] this model needs", dims[1]));
    tampered(2, &keys(vec![3, 1], 999), "tensor `earlier_keys.999`: no edited layer 999");
}

#[test]
fn only_the_facts_a_run_edits_are_checked_against_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("requests.jsonl");
    let fact = |subject: &str, target: &str| format!("{{\"prompt\": \"{{}} is located in\", \"subject\": \"{subject}\", \"target_new\": \"{target}\"}}\n");
    std::fs::write(&path, [fact("Paris", "Rome"), fact("Oslo", "Bern"), fact("Paris", "Vienna")].concat()).unwrap();
    let mut s = setup(&tmp.path().join("out"), Method::Memit, &[100.0]);
    s.requests = request::records(&path).unwrap();
    s.requests_path = path;
    let e = experiment::run(&s, &Schedule::every(3, 3)).unwrap_err().to_string();
    assert!(e.contains("record 1") && e.contains("record 3") && e.contains("`Rome` vs `Vienna`"), "{e}");
    // Editing the first two only, the conflict later in the file does not matter: the run gets
    // past the check (and fails on the plan, which is checked next).
    let e = experiment::run(&s, &Schedule::Sequential { at: vec![1, 2], batch: 2 }).unwrap_err().to_string();
    assert!(e.contains("multiples of 2"), "{e}");
}

#[test]
fn evaluation_points_of_a_sequential_run() {
    let at = |s: Schedule| match s {
        Schedule::Sequential { at, .. } => at,
        Schedule::Batch { .. } => unreachable!(),
    };
    assert_eq!(at(Schedule::every(5, 2)), vec![2, 4, 5]);
    assert_eq!(at(Schedule::every(100, 50)), vec![50, 100]);
    assert_eq!(at(Schedule::every(3, 10)), vec![3]);
    assert!(at(Schedule::every(0, 1)).is_empty());
}

#[test]
fn runs_are_compared_in_one_csv_and_one_chart_per_metric() {
    let t = tempfile::tempdir().unwrap();
    let run = |name: &str, ppl: f64| {
        let dir = t.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // Settings may interleave in a results file made by other means than `experiment`.
        let rows = format!("setting,x,metric,value\nnone,0,perplexity,20\nnone,1,efficacy,1\nnone,1,perplexity,21\n40,1,perplexity,20.5\nnone,10,perplexity,{ppl}\n40,10,perplexity,22\n");
        std::fs::write(dir.join("results.csv"), rows).unwrap();
        dir
    };
    let runs = [run("memit", 23.0), run("kn", 4e12)].map(|dir| dir.to_str().unwrap().parse::<RunFolder>().unwrap());
    assert_eq!(runs[0].name, "memit");
    let out = t.path().join("cmp");
    factpatch::experiment::compare(&runs, &out).unwrap();
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().next(), Some("run,setting,x,metric,value"));
    assert!(csv.contains("memit,none,10,perplexity,23\n") && csv.contains("kn,none,10,perplexity,4000000000000\n"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 2 * 6);
    for chart in ["perplexity.png", "efficacy.png"] {
        let bytes = std::fs::read(out.join(chart)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{chart}");
    }
    let missing = RunFolder { name: "missing".into(), folder: t.path().join("missing") };
    let err = factpatch::experiment::compare(&[missing], &out).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("no results"), "{err}");
}

/// Folders given one name are one run: their rows under that name, as if one run had held them.
#[test]
fn folders_of_one_name_are_compared_as_one_run() {
    let t = tempfile::tempdir().unwrap();
    let run = |folder: &str, setting: &str| {
        let dir = t.path().join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("results.csv"), format!("setting,x,metric,value\n{setting},0,perplexity,20\n{setting},10,perplexity,21\n")).unwrap();
        format!("memit={}", dir.display()).parse::<RunFolder>().unwrap()
    };
    let (off, on) = (run("memit-none", "none"), run("memit-40", "k=40"));
    assert_eq!((off.name.as_str(), off.folder.as_path()), ("memit", t.path().join("memit-none").as_path()));
    let out = t.path().join("cmp");
    factpatch::experiment::compare(&[off.clone(), on.clone()], &out).unwrap();
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(
        csv,
        "run,setting,x,metric,value\nmemit,none,0,perplexity,20\nmemit,none,10,perplexity,21\nmemit,k=40,0,perplexity,20\nmemit,k=40,10,perplexity,21\n"
    );
    // One setting in two folders of one name would draw two runs as one line.
    let twin = run("memit-none-again", "none");
    let err = factpatch::experiment::compare(&[off.clone(), on, twin], &out).unwrap_err().to_string();
    assert!(err.contains("memit-none-again") && err.contains("setting `none` of run `memit`") && err.contains("memit-none;"), "{err}");
    let err = factpatch::experiment::compare(&[off.clone(), off.clone()], &out).unwrap_err().to_string();
    assert!(err.contains("setting `none` of run `memit` is also in"), "{err}");
    // A folder named like `k=40` stays a folder; a name with a comma is refused.
    assert_eq!("runs/k=40".parse::<RunFolder>().unwrap(), RunFolder { name: "k=40".into(), folder: "runs/k=40".into() });
    assert_eq!("./k=40".parse::<RunFolder>().unwrap().name, "k=40");
    assert!("runs/a,b".parse::<RunFolder>().unwrap_err().contains("`a,b`"));
}
