//! Evaluation: each metric against values computed by hand or straight from a model's logits,
//! task-file errors naming file and line, patches overlaid in memory, and one small real run
//! on SmolLM2 (sane ranges, determinism).

mod common;

use common::{manifest, root, smollm2, values, write_patch};
use factpatch::checkpoint::Checkpoint;
use factpatch::edit::{request, target};
use factpatch::eval::tasks::{self, Items, Spec, Task};
use factpatch::eval::{answer, edits, fluency, general, score, Error, Models, Options, Plan};
use factpatch::model::{Batch, Hooks, Model};
use factpatch::patch::Delta;
use factpatch::tokenize::Tokenizer;
use std::path::PathBuf;

fn tiny() -> Model {
    Model::load(&root().join("fixtures/tiny-llama")).unwrap()
}

/// Per-position log-softmax of one sequence's logits, in f64, from a plain forward pass.
fn log_softmax_rows(model: &Model, ids: &[u32]) -> Vec<Vec<f64>> {
    let hidden = model.forward(&Batch::right_padded(&[ids.to_vec()]), &Hooks::default(), None).unwrap().hidden;
    let logits: Vec<Vec<Vec<f32>>> = model.logits(&hidden).unwrap().to_vec3().unwrap();
    logits[0]
        .iter()
        .map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            row.iter().map(|&x| x as f64 - lse).collect()
        })
        .collect()
}

#[test]
fn ngram_entropy_by_hand() {
    let text = "the cat, the cat sat.";
    assert_eq!(fluency::words(text), ["the", "cat", ",", "the", "cat", "sat", "."]);
    // Bigrams: (the, cat) twice and four others once, of 6; trigrams: 5 distinct.
    let h2 = (2.0 / 6.0) * 3f64.log2() + 4.0 * (1.0 / 6.0) * 6f64.log2();
    let h3 = 5f64.log2();
    let w = fluency::words(text);
    assert!((fluency::ngram_entropy(&w, 2) - h2).abs() < 1e-12);
    assert!((fluency::ngram_entropy(&w, 3) - h3).abs() < 1e-12);
    let expected = (2.0 / 3.0 * h2 + 4.0 / 3.0 * h3) / 2.0;
    assert!((fluency::text_entropy(text) - expected).abs() < 1e-12);
    // A text that only repeats itself has no entropy; the mean is over texts.
    assert_eq!(fluency::text_entropy("a a a a"), 0.0);
    assert_eq!(fluency::text_entropy(""), 0.0);
    let both = fluency::fluency(&["a a a a".to_string(), text.to_string()]);
    assert!((both - expected / 2.0).abs() < 1e-12);
}

#[test]
fn harmonic_mean_by_hand() {
    assert!((edits::harmonic_mean(&[1.0, 0.5, 0.25]) - 3.0 / 7.0).abs() < 1e-12);
    assert_eq!(edits::harmonic_mean(&[0.9, 0.0, 0.8]), 0.0);
    assert_eq!(edits::harmonic_mean(&[0.6, 0.6]), 0.6);
}

#[test]
fn token_accuracy_and_agreement_by_hand() {
    let s = score::Scored { tokens: vec![5, 6, 7, 8], logprobs: vec![-0.5, -1.0, -0.25, -2.25], argmax: vec![5, 0, 7, 1] };
    assert_eq!(s.accuracy(), 0.5);
    assert_eq!(s.sum(), -4.0);
    assert_eq!(s.mean(), -1.0);
    assert_eq!(score::agreement(&[1, 2, 3], &[1, 2, 4]), 2.0 / 3.0);
}

#[test]
fn choice_scores_match_plain_forward_passes() {
    let model = tiny();
    let items = vec![
        score::Choices { context: vec![3, 17, 42], continuations: vec![vec![7], vec![9, 11], vec![100, 2, 5]] },
        score::Choices { context: (1..12).collect(), continuations: vec![vec![300, 301], vec![4]] },
        score::Choices { context: vec![8], continuations: vec![vec![8, 8, 8, 8]] },
    ];
    let got = score::score(&model, &items).unwrap();
    for (item, scored) in items.iter().zip(&got) {
        let mut sums = Vec::new();
        for (cont, s) in item.continuations.iter().zip(scored) {
            let seq: Vec<u32> = item.context.iter().chain(cont).copied().collect();
            let lp = log_softmax_rows(&model, &seq);
            let n = item.context.len();
            for (j, &t) in cont.iter().enumerate() {
                let row = &lp[n - 1 + j];
                assert!((s.logprobs[j] - row[t as usize]).abs() < 1e-4, "{cont:?} token {j}: {} vs {}", s.logprobs[j], row[t as usize]);
                assert_eq!(s.argmax[j] as usize, general::best(row), "{cont:?} token {j}: argmax");
            }
            sums.push(cont.iter().enumerate().map(|(j, &t)| lp[n - 1 + j][t as usize]).sum::<f64>());
        }
        let ll: Vec<f64> = scored.iter().map(score::Scored::sum).collect();
        assert_eq!(general::best(&ll), general::best(&sums));
    }
    assert_eq!(general::best(&[1.0, 3.0, 3.0, -1.0]), 1, "the first of equals");
}

#[test]
fn perplexity_matches_the_logits() {
    let model = tiny();
    let ids: Vec<u32> = (0..250u32).map(|i| (i * 37 + 11) % 512).collect();
    let windows = score::windows(&ids, &[], 100);
    assert_eq!(windows.iter().map(|w| w.len()).collect::<Vec<_>>(), [100, 100, 50]);
    assert_eq!(score::windows(&ids[..201], &[], 100).len(), 2, "a one-token window predicts nothing");
    assert_eq!(score::windows(&ids[..201], &[1], 100).iter().map(|w| w.len()).collect::<Vec<_>>(), [99, 99, 3], "the prefix takes room; every window predicts");
    assert!(score::windows(&ids, &[1, 2], 2).is_empty(), "no room after the prefix");
    let lp = log_softmax_rows(&model, windows[0]);
    let nll: f64 = (1..100).map(|t| -lp[t - 1][windows[0][t] as usize]).sum();
    for chunk in [7, 100, 512] {
        let l = score::window_likelihood(&model, &[], windows[0], chunk).unwrap();
        assert_eq!(l.tokens, 99);
        assert!((l.nll - nll).abs() < 1e-3 * nll, "chunk {chunk}: {} vs {nll}", l.nll);
        assert!((l.perplexity() - (nll / 99.0).exp()).abs() < 1e-3);
        // With a prefix, every window token is predicted and the prefix is not.
        let (prefix, window) = (&windows[0][..2], &windows[0][2..]);
        let with = score::window_likelihood(&model, prefix, window, chunk).unwrap();
        let tail: f64 = (2..100).map(|t| -lp[t - 1][windows[0][t] as usize]).sum();
        assert_eq!(with.tokens, 98);
        assert!((with.nll - tail).abs() < 1e-3 * tail, "chunk {chunk} with a prefix: {} vs {tail}", with.nll);
    }
}

#[test]
fn answer_normalisation_and_numbers() {
    assert_eq!(answer::normalize("  The Beatles, an English band. "), "beatles english band");
    assert_eq!(answer::normalize("Théâtre  A-ha!"), "théâtre aha");
    assert!(answer::exact_match("the Beatles", &["Beatles".into()]));
    assert!(!answer::exact_match("Beatles band", &["Beatles".into(), "Wings".into()]));
    assert_eq!(answer::last_number("She makes $1,234.50 a day, then 18."), Some(18.0));
    assert_eq!(answer::last_number("costs $1,234.50"), Some(1234.5));
    assert_eq!(answer::last_number("from -3 to -7."), Some(-7.0));
    assert_eq!(answer::last_number("no digits"), None);
    assert_eq!(answer::gsm8k_gold("2+1=<<2+1=3>>3 bolts\n#### 70,000"), Some(70000.0));
    assert_eq!(answer::gsm8k_gold("no marker 5"), None);
}

/// The message `tasks::read` gives for `task` on a file holding `text`, and the file's path.
fn read_error(task: Task, text: &str) -> (String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("task.txt");
    std::fs::write(&path, text).unwrap();
    match tasks::read(task, &path) {
        Ok(_) => panic!("{task:?}: {text:?} was accepted"),
        Err(e) => (e.to_string(), path, dir),
    }
}

#[test]
fn malformed_task_files_name_file_and_line() {
    let item = "A man sits. he\n2\nstands.\nsits.\nruns.\nwalks.\n";
    let boolq = "{\"question\": \"q\", \"passage\": \"p\", \"answer\": true}\n";
    let cases = [
        (Task::HellaSwag, format!("{item}Next context\n1\nonly one ending\n"), 7, "truncated item: 3 of 6 lines (context, gold index, four endings)"),
        (Task::HellaSwag, format!("{item}{}", item.replace("\n2\n", "\n4\n")), 8, "gold index `4` is not 0, 1, 2 or 3"),
        (Task::HellaSwag, item.replace("runs.", " "), 5, "blank line inside an item (context, gold index, four endings)"),
        (Task::Sst2, "sentence\tlabel\ngood film \t1\nbad film \t2\n".into(), 3, "label `2` is not 0 or 1"),
        (Task::Sst2, "sentence\tlabel\nno label here\n".into(), 2, "1 tab-separated fields, expected 2 (sentence, label)"),
        (Task::Rte, "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n".into(), 2, "label `maybe` is not entailment or not_entailment"),
        (Task::BoolQ, format!("{boolq}{{oops\n"), 2, "invalid JSON: key must be a string at line 1 column 2"),
        (Task::BoolQ, boolq.replace("true", "\"yes\""), 1, "missing `answer` (true or false)"),
        (Task::Gsm8k, "{\"question\": \"q\", \"answer\": \"so 5\"}\n".into(), 1, "`answer` does not end with `#### N`"),
        (Task::NqOpen, "{\"question\": \"q\", \"answer\": []}\n".into(), 1, "missing `answer` (a list of strings)"),
    ];
    for (task, text, line, says) in cases {
        let (e, path, _dir) = read_error(task, &text);
        assert_eq!(e, format!("{}:{line}: {says}", path.display()), "{task:?}");
    }
    for task in [Task::Perplexity, Task::HellaSwag, Task::Sst2, Task::NqOpen] {
        let (e, path, _dir) = read_error(task, "\n\n");
        assert!(e.starts_with(&format!("{}: no ", path.display())), "{task:?}: {e}");
    }
    let (e, path, _dir) = read_error(Task::Rte, "index\tsentence1\tsentence2\tlabel\n");
    assert_eq!(e, format!("{}: no items", path.display()));
}

#[test]
fn task_files_become_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rte.tsv");
    std::fs::write(&path, "index\tsentence1\tsentence2\tlabel\n0\tA cat sat.\tAn animal sat.\tentailment\n").unwrap();
    let Items::Choices(items) = tasks::read(Task::Rte, &path).unwrap().items else { panic!("choices") };
    assert_eq!(items[0].prompt, "A cat sat.\nQuestion: An animal sat. True or False?\nAnswer:");
    assert_eq!((items[0].choices.clone(), items[0].gold), (vec!["True".to_string(), "False".to_string()], 0));
    std::fs::write(&path, "[header] How to cook [title] rice  well\n0\n[step] Boil.\nb\nc\nd\n").unwrap();
    let Items::Choices(items) = tasks::read(Task::HellaSwag, &path).unwrap().items else { panic!("choices") };
    assert_eq!(items[0].prompt, "How to cook. rice well");
    assert_eq!(items[0].choices[0], "Boil.");
}

#[test]
fn unknown_tasks_and_bad_specs() {
    let e = Spec::parse("squad=x.json").unwrap_err();
    assert!(matches!(e, Error::UnknownTask { .. }));
    assert_eq!(e.to_string(), "unknown task `squad` (known: perplexity, hellaswag, boolq, sst2, rte, nq-open, gsm8k)");
    for bad in ["hellaswag", "hellaswag=", "hellaswag:=x.txt", "hellaswag:0=x.txt", "hellaswag:-3=x.txt"] {
        assert!(matches!(Spec::parse(bad), Err(Error::TaskSpec(_))), "{bad}");
    }
    assert_eq!(Spec::parse("nq-open=a/b.jsonl").unwrap(), Spec { task: Task::NqOpen, path: PathBuf::from("a/b.jsonl"), limit: None });
    assert_eq!(Spec::parse("perplexity:20=c:/w.txt").unwrap(), Spec { task: Task::Perplexity, path: PathBuf::from("c:/w.txt"), limit: Some(20) });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_factpatch")).args(["eval", "--model", "nowhere", "--general", "squad=x.json"]).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr.lines().collect::<Vec<_>>(), ["error: unknown task `squad` (known: perplexity, hellaswag, boolq, sst2, rte, nq-open, gsm8k)"]);
}

#[test]
fn subsets_are_seeded_and_sorted() {
    let a = factpatch::eval::subset(1000, Some(20), 7);
    assert_eq!(a, factpatch::eval::subset(1000, Some(20), 7));
    assert_ne!(a, factpatch::eval::subset(1000, Some(20), 8));
    assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 20 && a[19] < 1000);
    assert_eq!(factpatch::eval::subset(5, Some(20), 7), [0, 1, 2, 3, 4]);
    assert_eq!(factpatch::eval::subset(3, None, 7), [0, 1, 2]);
}

#[test]
fn patches_are_overlaid_in_memory() {
    let dir = root().join("fixtures/tiny-llama");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let t = tempfile::tempdir().unwrap();
    let down = "model.layers.1.mlp.down_proj.weight";
    let delta = values(64 * 128, 5, 0.05);
    let p = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], manifest("rome"), vec![(down, Delta::Dense(delta.clone()))]);
    let models = Models::load(&dir, &[p]).unwrap();
    assert_eq!(models.patch_ids.len(), 1);
    let base: Vec<f32> = models.base.mlp_out_weight(1).flatten_all().unwrap().to_vec1().unwrap();
    let patched: Vec<f32> = models.evaluated().mlp_out_weight(1).flatten_all().unwrap().to_vec1().unwrap();
    for ((b, d), p) in base.iter().zip(&delta).zip(&patched) {
        assert_eq!(b + d, *p);
    }
    // Any tensor can be overlaid: the overlaid model computes what the applied folder does.
    let embed = write_patch(&t.path().join("e.fpatch"), &ckpt, &[], manifest("x"), vec![("model.embed_tokens.weight", Delta::Dense(vec![0.5; 512 * 64]))]);
    let overlaid = Models::load(&dir, std::slice::from_ref(&embed)).unwrap();
    factpatch::apply::apply(&dir, &[embed], &t.path().join("applied")).unwrap();
    let applied = factpatch::model::Model::load(&t.path().join("applied")).unwrap();
    let batch = factpatch::model::Batch::right_padded(&[vec![1, 2, 3, 4]]);
    let logits = |m: &factpatch::model::Model| -> Vec<f32> {
        let h = m.forward(&batch, &Default::default(), None).unwrap().hidden;
        m.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(logits(overlaid.evaluated()), logits(&applied));
    assert_ne!(logits(overlaid.evaluated()), logits(&overlaid.base));
}

#[test]
fn overlaid_stacks_are_checked_as_apply_checks_them() {
    let dir = root().join("fixtures/tiny-llama");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let t = tempfile::tempdir().unwrap();
    let identity = ckpt.identity().unwrap().to_hex().to_string();
    let made_for = |parent: Option<String>, base: &str| {
        let mut m = manifest("rome");
        m.base_model = Some(base.to_string());
        m.parent = parent;
        m
    };
    let (up, down) = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight");
    let p = write_patch(&t.path().join("p.fpatch"), &ckpt, &[], made_for(None, &identity), vec![(up, Delta::Dense(values(128 * 64, 1, 0.01)))]);
    let parent = factpatch::patch::Patch::read(&p).unwrap().id().to_string();
    let c = write_patch(
        &t.path().join("c.fpatch"),
        &ckpt,
        std::slice::from_ref(&p),
        made_for(Some(parent.clone()), &identity),
        vec![(down, Delta::Dense(values(64 * 128, 2, 0.01)))],
    );
    // The child alone: its parent's change would be missing from the evaluated model.
    let err = Models::load(&dir, std::slice::from_ref(&c)).err().expect("a child without its parent is refused").to_string();
    assert!(err.contains(c.to_str().unwrap()) && err.contains(&parent), "{err}");
    // A patch compiled for another model.
    let other = write_patch(&t.path().join("o.fpatch"), &ckpt, &[], made_for(None, &"ab".repeat(32)), vec![(up, Delta::Dense(values(128 * 64, 3, 0.01)))]);
    let err = Models::load(&dir, std::slice::from_ref(&other)).err().expect("another model's patch is refused").to_string();
    assert!(err.contains(other.to_str().unwrap()) && err.contains(&"ab".repeat(32)), "{err}");
    // The whole chain is fine.
    assert_eq!(Models::load(&dir, &[p, c]).unwrap().patch_ids.len(), 2);
}

/// The unedited SmolLM2 on 20 HellaSwag items or on two CounterFact records, seed 3.
fn real_plan(edits: bool) -> Plan {
    let data = root().join("fixtures/data");
    let (requests, tasks, limit) = match edits {
        true => (Some(data.join("edit/counterfact-rome-300.json")), vec![], 2),
        // The task's own count overrides --limit.
        false => (None, vec![Spec { task: Task::HellaSwag, path: data.join("general/hellaswag-val.txt"), limit: Some(20) }], 3),
    };
    Plan { model: smollm2(), patches: vec![], requests, tasks, options: Options { limit: Some(limit), seed: 3, fluency_length: 30, ..Options::default() } }
}

fn json<T: serde::Serialize>(x: &T) -> serde_json::Value {
    serde_json::to_value(x).unwrap()
}

#[test]
fn smollm2_small_run_is_sane_and_repeats() {
    let run = |plan: &Plan| factpatch::eval::run(plan).unwrap();
    let general = run(&real_plan(false)).general;
    assert_eq!((general[0].task, general[0].items), (Task::HellaSwag, 20));
    for m in &general[0].metrics {
        assert!((0.15..=0.9).contains(&m.value), "{}: {}", m.name, m.value);
    }
    let plan = real_plan(true);
    let edits = run(&plan).edits.unwrap();
    assert_eq!(edits.records.len(), 2);
    let tok = Tokenizer::open(&plan.model).unwrap();
    let model = Model::load(&plan.model).unwrap();
    let requests = request::read(plan.requests.as_ref().unwrap()).unwrap();
    for r in &edits.records {
        let (cf, req) = (&r.counterfact, &requests[r.record - 1]);
        // Efficacy and its magnitude agree with the editor's own target scoring.
        let prompt = [tok.prompt_ids(&req.filled()).unwrap()];
        let lp = |t: &str| target::target_logprob(&model, &prompt, &tok.ids(&request::continuation(t)).unwrap()).unwrap()[0];
        let (new, old) = (lp(&req.target_new), lp(req.target_true.as_deref().unwrap()));
        assert_eq!(cf.efficacy, Some((new > old) as u8 as f64));
        assert!((cf.efficacy_magnitude.unwrap() - (new.exp() - old.exp())).abs() < 1e-5);
        for v in [cf.paraphrase, cf.neighborhood, r.easyedit.reliability, r.easyedit.generalization] {
            assert!(v.is_some_and(|v| (0.0..=1.0).contains(&v)), "{r:?}");
        }
        assert_eq!(r.easyedit.locality, Some(1.0), "unedited: the model agrees with itself");
        assert!(cf.fluency.is_some_and(|f| f > 1.0 && f < 10.0), "{r:?}");
    }
    assert_eq!(edits.counterfact.last().map(|a| a.name), Some("score"));
    // The same seed picks the same records and gives the same numbers, generations included.
    assert_eq!(json(&run(&plan).edits), json(&Some(edits)));
}

#[test]
fn smollm2_metrics_follow_the_fields_present_and_the_patch() {
    let dir = smollm2();
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("requests.jsonl");
    let full = r#"{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris", "paraphrases": ["Where is the Eiffel Tower? It is in the city of"], "neighbors": [{"prompt": "The Louvre is located in the city of", "answer": "Paris"}, {"prompt": "The Colosseum is in", "answer": "Rome, the capital of Italy, famous for its ancient history and its food"}]}"#;
    let bare = r#"{"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "piano"}"#;
    std::fs::write(&path, format!("{full}\n{bare}\n")).unwrap();
    let requests = request::read(&path).unwrap();
    let tok = Tokenizer::open(&dir).unwrap();
    // A large random change to layer 5's MLP output projection.
    let down = "model.layers.5.mlp.down_proj.weight";
    let patch =
        write_patch(&t.path().join("p.fpatch"), &Checkpoint::open(&dir).unwrap(), &[], manifest("x"), vec![(down, Delta::Dense(values(576 * 1536, 9, 0.05)))]);
    let models = Models::load(&dir, &[patch]).unwrap();
    let report = edits::report(&models, &tok, &path, &requests, &Options::default()).unwrap();
    let [full, bare] = &report.records[..] else { panic!("two records") };
    // The bare record has no true target, paraphrases, neighbours or generation prompts.
    assert_eq!(bare.counterfact, edits::CounterFact::default());
    assert!(bare.easyedit.reliability.is_some() && bare.easyedit.generalization.is_none() && bare.easyedit.locality.is_none());
    // Only the neighbour answered by the true target counts for the neighbourhood score.
    let cf = &full.counterfact;
    assert!(cf.efficacy.is_some() && cf.paraphrase.is_some() && cf.fluency.is_none());
    assert!(matches!(cf.neighborhood, Some(x) if x == 0.0 || x == 1.0), "{cf:?}");
    // Locality compares the patched model's predictions with the unedited model's.
    let neighbors: Vec<score::Choices> = requests[0]
        .neighbors
        .iter()
        .map(|n| score::Choices { context: tok.prompt_ids(&n.prompt).unwrap(), continuations: vec![tok.ids(&request::continuation(&n.answer)).unwrap()] })
        .collect();
    let (post, pre) = (score::score(models.evaluated(), &neighbors).unwrap(), score::score(&models.base, &neighbors).unwrap());
    let agree: Vec<f64> = post.iter().zip(&pre).map(|(a, b)| score::agreement(&a[0].argmax, &b[0].argmax)).collect();
    let locality = full.easyedit.locality.unwrap();
    assert_eq!(locality, agree.iter().sum::<f64>() / agree.len() as f64);
    assert!(locality < 1.0, "the random patch changes some prediction: {agree:?}");
    // Aggregates count only the records that have each metric.
    let n = |name: &str| report.counterfact.iter().find(|a| a.name == name).map(|a| a.n);
    assert_eq!((n("efficacy"), n("score"), n("fluency")), (Some(1), Some(1), None));
    assert_eq!(report.easyedit.iter().map(|a| (a.name, a.n)).collect::<Vec<_>>(), [("reliability", 2), ("generalization", 1), ("locality", 1)]);
}
