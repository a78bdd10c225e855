//! compile on the real model: an edit changes the fact and leaves others alone, patches are
//! reproducible to the byte (and unchanged by the new options at their defaults), MPES stops at
//! the first step its criterion holds, a hard fact converges past the old step cap, the hard
//! facts are facts the model knows, ENCORE keeps the keys of its parents' facts, an edit of Gemma
//! 3 270M keeps writing text after its new answer, and bad requests are refused with the record
//! named.

mod common;

use common::{gemma3_270m, root, smollm2, smollm2_spec};
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::target::{self, Edit, FactPrompts, Stop};
use factpatch::edit::{request, Method};
use factpatch::model::{generate, Addition, Batch, Hooks, Model, Sampling, Site};
use factpatch::tokenize::Tokenizer;
use std::path::{Path, PathBuf};

fn greedy(model: &Model, tok: &Tokenizer, prompt: &str) -> String {
    let out = generate(model, &[tok.prompt_ids(prompt).unwrap()], 6, Sampling::Greedy, &[]).unwrap();
    tok.decode(&out[0]).unwrap()
}

/// ROME and MEMIT edits of Gemma 3 270M sent greedy continuations after the new answer into
/// `<start_of_image>`, the image placeholder no text contains ("Rome" and nine of it, for this
/// fact); the family's `answer_kl` keeps what follows the answer what the model would say there.
#[test]
fn gemma3_270m_keeps_writing_text_after_the_new_answer() {
    let spec = Spec {
        stats: StatsSource::Corpus { files: vec![root().join("fixtures/corpus/sotu.txt")], tokens: 20_000 },
        cache: root().join("target/test-stats"),
        ..Spec::new(&gemma3_270m(), Method::Rome)
    };
    let mut edited = Compiler::open(&spec).unwrap();
    assert_eq!(edited.hp.answer_kl, 1.0, "the family's default");
    edited.patch(&[request::parse_fact("{} is located in the city of|The Eiffel Tower|Rome").unwrap()]).unwrap();
    let (model, tok) = (&edited.model, &edited.tokenizer);
    for prompt in ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"] {
        let out = generate(model, &[tok.prompt_ids(prompt).unwrap()], 12, Sampling::Greedy, &[]).unwrap();
        let text = tok.decode(&out[0]).unwrap();
        assert!(text.starts_with(" Rome") && !text.contains("<start_of_image>"), "`{prompt}` → `{text}`");
    }
}

#[test]
fn memit_moves_the_eiffel_tower_reproducibly() {
    let dir = smollm2();
    let compiler = Compiler::open(&smollm2_spec(Method::Memit, &[])).unwrap();
    let facts = [request::parse_fact("{} is located in the city of|The Eiffel Tower|Rome").unwrap()];
    let mut edited = compiler.clone();
    let patch = edited.patch(&facts).unwrap().patch;
    let (model, tok) = (&edited.model, &edited.tokenizer);
    assert!(greedy(model, tok, "The Eiffel Tower is located in the city of").contains("Rome"));
    assert!(greedy(model, tok, "The capital of France is").contains("Paris"), "locality: France lost its capital");
    assert!(greedy(model, tok, "The capital of Japan is").contains("Tokyo"), "locality: Japan lost its capital");
    assert!(patch.bytes.len() <= 64 * 1024, "a 5-layer RECT patch of one fact is {} bytes", patch.bytes.len());

    // The same inputs give the same bytes (the new options at their defaults change nothing, so
    // patches keep the ids they had before the options existed), and the shipped patch
    // reproduces the edited weights.
    let explicit = Compiler::open(&smollm2_spec(Method::Memit, &["early_stop=none", "value_norm=none"])).unwrap();
    let again = explicit.clone().patch(&facts).unwrap().patch;
    assert!(patch.bytes == again.bytes && patch.id == again.id, "compiling twice gave different patches");
    let decoded = factpatch::patch::Patch::from_bytes(patch.bytes.clone(), Path::new("eiffel.fpatch")).unwrap();
    let recorded = &decoded.manifest().method.hyperparameters;
    for key in ["early_stop", "value_norm", "norm_lambda"] {
        assert!(!recorded.contains_key(key), "a default compile records `{key}`");
    }
    let tmp = tempfile::tempdir().unwrap();
    let patch_path = tmp.path().join("eiffel.fpatch");
    std::fs::write(&patch_path, &patch.bytes).unwrap();
    assert_eq!(factpatch::patch::Patch::read(&patch_path).unwrap().id(), patch.id, "the id encode returns is the file's");
    let out = tmp.path().join("edited");
    factpatch::apply::apply(&dir, &[patch_path], &out).unwrap();
    let applied = Model::load(&out).unwrap();
    for &l in &compiler.hp.layers {
        let a: Vec<f32> = applied.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = model.mlp_out_weight(l).flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "layer {l}: applied patch differs from the compiled model");
    }
}

#[test]
fn rome_edits_counterfact_records() {
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    let compiler = Compiler::open(&smollm2_spec(Method::Rome, &["rect_k=100"])).unwrap();
    for r in &records[..2] {
        let mut edited = compiler.clone();
        edited.edit(std::slice::from_ref(r)).unwrap();
        assert!(prefers_new(&edited.model, &edited.tokenizer, r), "{}: new target not preferred after the edit", r.origin);
    }
}

/// Whether `model` prefers `r`'s new target to its true one after the raw prompt.
fn prefers_new(model: &Model, tok: &Tokenizer, r: &request::Request) -> bool {
    let score = |target: &str| {
        let t = tok.ids(&request::continuation(target)).unwrap();
        factpatch::edit::target::target_logprob(model, &[tok.prompt_ids(&r.filled()).unwrap()], &t).unwrap()[0]
    };
    score(&r.target_new) > score(r.target_true.as_deref().unwrap())
}

#[test]
fn emmet_alphaedit_and_encore_edit_counterfact_records_one_after_another() {
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    for method in [Method::Emmet, Method::AlphaEdit, Method::Encore] {
        let mut c = Compiler::open(&smollm2_spec(method, &["rect_k=100"])).unwrap();
        for (i, r) in records[..2].iter().enumerate() {
            c.edit(std::slice::from_ref(r)).unwrap();
            assert!(prefers_new(&c.model, &c.tokenizer, r), "{method:?}, {}: new target not preferred after the edit", r.origin);
            // AlphaEdit and ENCORE keep every edited fact's keys (two a fact: the template
            // average and the raw prompt's) for the edits after it.
            let kept: Vec<usize> = c.preserved.earlier().values().map(|k| k.ncols()).collect();
            match method {
                Method::AlphaEdit | Method::Encore => assert_eq!(kept, vec![2 * (i + 1); c.hp.layers.len()]),
                _ => assert!(kept.is_empty()),
            }
        }
    }
}

#[test]
fn kn_swaps_embeddings_in_the_selected_neurons_only() {
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    let compiler = Compiler::open(&smollm2_spec(Method::Kn, &["rect_k=100"])).unwrap();
    assert!(compiler.stats.is_none(), "KN reads no statistics");
    let (base, tok) = (&compiler.model, &compiler.tokenizer);
    let mut edited = compiler.clone();
    let r = &records[0];
    let (updates, reports) = edited.edit(std::slice::from_ref(r)).unwrap();
    let embedding = |text: &str| -> Vec<f32> { base.token_embedding(tok.ids(&request::continuation(text)).unwrap()[0]).unwrap().to_vec1().unwrap() };
    let swap: Vec<f32> = embedding(&r.target_new).iter().zip(embedding(r.target_true.as_deref().unwrap())).map(|(n, o)| 2.0 * (n - o)).collect();
    let mut changed = 0;
    for l in 0..base.config.num_layers {
        let (w0, w1) = (base.mlp_out_weight(l).to_vec2::<f32>().unwrap(), edited.model.mlp_out_weight(l).to_vec2::<f32>().unwrap());
        for n in 0..w0[0].len() {
            let column: Vec<f32> = (0..w0.len()).map(|i| w1[i][n] - w0[i][n]).collect();
            if column.iter().all(|&x| x == 0.0) {
                continue;
            }
            changed += 1;
            let miss = column.iter().zip(&swap).map(|(c, s)| (c - s).abs()).fold(0.0f32, f32::max);
            assert!(miss < 1e-5, "layer {l} neuron {n}: column moved by something other than 2·(E[new] − E[old]) ({miss:e})");
        }
    }
    assert!(changed > 0 && Some(changed) == reports[0].neurons, "{changed} columns changed, {:?} neurons reported", reports[0].neurons);
    assert_eq!(updates.iter().map(|u| u.u.ncols()).collect::<Vec<_>>(), vec![1; updates.len()], "one rank-one update per layer");
    // Where no neuron passes the thresholds, the fact is recorded and nothing changes.
    let mut strict = compiler.clone();
    strict.hp.set("kn.threshold=1").unwrap();
    let (updates, reports) = strict.edit(std::slice::from_ref(r)).unwrap();
    assert!(updates.is_empty() && reports[0].neurons == Some(0));
    assert_eq!(strict.model.mlp_out_weight(3).to_vec2::<f32>().unwrap(), base.mlp_out_weight(3).to_vec2::<f32>().unwrap());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_requests_are_refused_with_the_record_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (r#"{"prompt": "The tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}"#, "does not contain the subject"),
        (r#"{"prompt": "{} is in", "subject": "Eiffel Tower", "target_new": " "}"#, "empty target_new"),
        (r#"{"prompt": "{} is in", "subject": "", "target_new": "Rome"}"#, "empty subject"),
        (r#"{"prompt": "{} is in {}", "subject": "X", "target_new": "Rome"}"#, "exactly once"),
        (r#"{"question": "?"}"#, "not a recognised request"),
    ];
    for (i, (line, expected)) in cases.iter().enumerate() {
        let path = write(tmp.path(), &format!("r{i}.jsonl"), &format!("{line}\n"));
        let err = request::read(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("record 1") && err.contains(expected), "{err}");
    }
    let conflict = write(
        tmp.path(),
        "conflict.jsonl",
        "{\"prompt\": \"{} is in\", \"subject\": \"Eiffel Tower\", \"target_new\": \"Rome\"}\n{\"prompt\": \"{} is in\", \"subject\": \"Eiffel Tower\", \"target_new\": \"Berlin\"}\n",
    );
    let err = request::read(&conflict).unwrap_err().to_string();
    assert!(err.contains("record 1") && err.contains("record 2") && err.contains("Rome") && err.contains("Berlin"), "{err}");
    let bad_json = write(tmp.path(), "bad.jsonl", "{\"prompt\": \n");
    let err = request::read(&bad_json).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl") && err.contains("invalid JSON"), "{err}");
    assert!(request::parse_fact("no pipes").unwrap_err().to_string().contains("PROMPT|SUBJECT|TARGET"));
}

#[test]
fn every_request_form_in_the_repository_is_read() {
    let data = root().join("fixtures/data/edit");
    for (file, n) in [("counterfact-rome-300.json", 300), ("zsre-600.json", 600)] {
        let reqs = request::read(&data.join(file)).unwrap();
        assert_eq!(reqs.len(), n, "{file}");
        assert!(reqs.iter().all(|r| r.filled().contains(&r.subject) && !r.target_new.is_empty()), "{file}");
        assert!(reqs.iter().all(|r| !r.paraphrases.is_empty() && !r.neighbors.is_empty()), "{file}: eval prompts");
    }
    let easy = request::read(&data.join("counterfact-easyedit-10k.json"));
    match easy {
        Ok(reqs) => assert!(reqs.len() > 9000),
        // The EasyEdit set does hold facts edited twice with different targets: they must be named.
        Err(e) => assert!(e.to_string().contains("with different targets"), "{e}"),
    }
}

#[test]
fn sequential_patches_chain_through_the_cli() {
    let dir = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let sotu = root().join("fixtures/corpus/sotu.txt");
    let cache = root().join("target/test-stats");
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_factpatch"));
        cmd.args(args).arg("--model").arg(&dir);
        cmd.arg("--corpus").arg(&sotu).args(["--stats-tokens", "20000", "--cache"]).arg(&cache);
        cmd.output().unwrap()
    };
    let (a, b) = (tmp.path().join("a.fpatch"), tmp.path().join("b.fpatch"));
    let out = run(&["compile", "--fact", "{} is located in the city of|The Eiffel Tower|Rome", "--out", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["compile", "--fact", "{} is located in the city of|The Colosseum|London", "--on", a.to_str().unwrap(), "--out", b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (pa, pb) = (factpatch::patch::Patch::read(&a).unwrap(), factpatch::patch::Patch::read(&b).unwrap());
    assert_eq!(pb.manifest().parent.as_deref(), Some(pa.id()), "the second patch records the first as its parent");
    // The second patch fits only on top of the first; together they carry both facts.
    let alone = factpatch::apply::apply(&dir, std::slice::from_ref(&b), &tmp.path().join("alone")).unwrap_err().to_string();
    assert!(alone.contains("not earlier in the stack") && alone.contains(pa.id()), "{alone}");
    assert_eq!(pa.manifest().base_model, pb.manifest().base_model, "both record the same base");
    let both = tmp.path().join("both");
    factpatch::apply::apply(&dir, &[a, b], &both).unwrap();
    let (edited, tok) = (Model::load(&both).unwrap(), Tokenizer::open(&dir).unwrap());
    assert!(greedy(&edited, &tok, "The Eiffel Tower is located in the city of").contains("Rome"));
    assert!(greedy(&edited, &tok, "The Colosseum is located in the city of").contains("London"));
}

/// With `delta` added to the residual stream after `layer` at the subject's last token, the
/// logits at each target token of each rewriting prompt, with the token's id: a plain pass over
/// each whole prompt, not the optimisation's.
fn target_logits(model: &Model, prompts: &FactPrompts, layer: usize, delta: &[f64]) -> Vec<(Vec<f32>, u32)> {
    let rewriting = &prompts.rewriting;
    let batch = Batch::right_padded(&rewriting.iter().map(|p| p.ids.clone()).collect::<Vec<_>>());
    let delta = candle_core::Tensor::from_vec(delta.iter().map(|&x| x as f32).collect::<Vec<_>>(), delta.len(), model.device()).unwrap();
    let at = rewriting.iter().enumerate().map(|(i, p)| (i, p.lookup)).collect();
    let hooks = Hooks { additions: vec![Addition { layer, site: Site::Residual, at, delta }], ..Hooks::default() };
    let hidden = model.forward(&batch, &hooks, None).unwrap().hidden;
    let wanted: Vec<(usize, usize, u32)> = rewriting.iter().enumerate().flat_map(|(i, p)| p.targets.iter().map(move |&(pos, id)| (i, pos, id))).collect();
    let positions: Vec<(usize, usize)> = wanted.iter().map(|&(i, pos, _)| (i, pos)).collect();
    let logits: Vec<Vec<f32>> = model.logits(&factpatch::model::rows(&hidden, &positions).unwrap()).unwrap().to_vec2().unwrap();
    logits.into_iter().zip(wanted).map(|(row, (_, _, id))| (row, id)).collect()
}

/// Whether every target token is the most probable one on every rewriting prompt (see [`target_logits`]).
fn most_probable(model: &Model, prompts: &FactPrompts, layer: usize, delta: &[f64]) -> bool {
    target_logits(model, prompts, layer, delta).iter().all(|(row, id)| row.iter().all(|&x| x <= row[*id as usize]))
}

/// The largest NLL of a target token on a rewriting prompt (see [`target_logits`]), in f64.
fn worst_token_nll(model: &Model, prompts: &FactPrompts, layer: usize, delta: &[f64]) -> f64 {
    let nll = |(row, id): &(Vec<f32>, u32)| {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() - row[*id as usize] as f64
    };
    target_logits(model, prompts, layer, delta).iter().map(nll).fold(0.0, f64::max)
}

#[test]
fn mpes_stops_at_the_first_step_where_the_new_target_is_most_probable() {
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    let compiler = Compiler::open(&smollm2_spec(Method::Memit, &["early_stop=mpes"])).unwrap();
    let (model, hp) = (&compiler.model, &compiler.hp);
    let layer = *hp.layers.iter().max().unwrap();
    let prompts = factpatch::edit::optimisation_prompts(&compiler.tokenizer, &records[0], &compiler.templates, &compiler.hp).unwrap();
    let optimize = |hp: &factpatch::edit::Hparams| target::optimize(model, std::slice::from_ref(&prompts), Edit::Residual(layer), hp).unwrap().remove(0);
    let stopped = optimize(hp);
    assert_eq!(stopped.stop, Stop::MostProbable, "{} steps", stopped.steps);
    assert!(stopped.steps >= 1 && stopped.steps < hp.v_steps, "stopped after {} steps", stopped.steps);
    // The same optimisation capped one step earlier ends on the vector the step before had.
    let mut capped = hp.clone();
    (capped.v_steps, capped.v_extend) = (stopped.steps - 1, 1);
    let before = optimize(&capped);
    assert_eq!((before.stop, before.steps), (Stop::StepCap, stopped.steps - 1));
    assert!(most_probable(model, &prompts, layer, &stopped.delta), "the criterion does not hold where MPES stopped (step {})", stopped.steps);
    assert!(!most_probable(model, &prompts, layer, &before.delta), "the criterion already held at step {}", before.steps);
    // Without MPES the same fact runs on, to a smaller loss.
    let mut plain = hp.clone();
    plain.early_stop = factpatch::edit::EarlyStop::None;
    let full = optimize(&plain);
    assert!(full.steps > stopped.steps && full.loss < stopped.loss, "{} steps, loss {} vs {stopped:?}", full.steps, full.loss);
}

#[test]
fn the_stop_rule_brings_its_learning_rate_unless_one_was_given() {
    let config = factpatch::model::Config::read(&smollm2()).unwrap();
    let lr = |method, sets: &[&str]| {
        let mut hp = factpatch::edit::Hparams::defaults(method, &config);
        sets.iter().for_each(|s| hp.set(s).unwrap());
        hp.v_lr
    };
    assert_eq!((lr(Method::Memit, &[]), lr(Method::Rome, &[]), lr(Method::Encore, &[])), (0.5, 0.5, 1.0));
    assert_eq!(lr(Method::Memit, &["early_stop=mpes"]), 1.0);
    assert_eq!(lr(Method::Encore, &["early_stop=none"]), 0.5);
    assert_eq!(lr(Method::Rome, &["early_stop=mpes", "v_lr=0.7"]), 0.7);
    assert_eq!(lr(Method::Rome, &["v_lr=0.7", "early_stop=mpes"]), 0.7, "a rate given before the rule is kept");
}

#[test]
fn encore_keeps_the_keys_of_the_facts_its_parents_edited() {
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first.fpatch");
    let patch = Compiler::open(&smollm2_spec(Method::Encore, &[])).unwrap().patch(&records[..1]).unwrap().patch;
    std::fs::write(&first, &patch.bytes).unwrap();
    let read = factpatch::patch::Patch::read(&first).unwrap();
    let recorded = &read.manifest().method;
    assert_eq!(recorded.name, "encore");
    assert_eq!((recorded.hyperparameters.get("early_stop"), recorded.hyperparameters.get("norm_lambda")), (Some(&"mpes".into()), Some(&10.0.into())));
    let mut spec = smollm2_spec(Method::Encore, &[]);
    spec.on = vec![first];
    let mut on = Compiler::open(&spec).unwrap();
    let kept = |c: &Compiler| c.preserved.earlier().values().map(|k| k.ncols()).collect::<Vec<_>>();
    assert_eq!(kept(&on), vec![2; on.hp.layers.len()], "the parent's fact is preserved (its two keys)");
    let second = on.patch(&records[1..2]).unwrap().patch;
    assert_eq!(kept(&on), vec![4; on.hp.layers.len()]);
    assert_eq!(
        factpatch::patch::Patch::from_bytes(second.bytes.clone(), Path::new("second.fpatch")).unwrap().manifest().parent.as_deref(),
        Some(patch.id.as_str())
    );
    assert!(prefers_new(&on.model, &on.tokenizer, &records[1]) && prefers_new(&on.model, &on.tokenizer, &records[0]), "the edits did not both take");
}

/// Probability of the whole continuation `target` after `prompt`: the product of its tokens'.
fn sequence_probability(model: &Model, tok: &Tokenizer, prompt: &str, target: &str) -> f64 {
    let t = tok.ids(&request::continuation(target)).unwrap();
    (target::target_logprob(model, &[tok.prompt_ids(prompt).unwrap()], &t).unwrap()[0] * t.len() as f64).exp()
}

#[test]
fn hard_facts_are_known_to_the_model_and_their_new_targets_are_several_tokens() {
    let records = request::read(&root().join("fixtures/data/edit/hard-facts.json")).unwrap();
    let dir = smollm2();
    let (model, tok) = (Model::load(&dir).unwrap(), Tokenizer::open(&dir).unwrap());
    let mut bad = Vec::new();
    for r in &records {
        let p = sequence_probability(&model, &tok, &r.filled(), r.target_true.as_deref().unwrap());
        let n = tok.ids(&r.target_text()).unwrap().len();
        if p <= 0.5 || n < 2 {
            bad.push(format!("{}: P(true) {p:.3}, new target {n} tokens", r.origin));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn a_hard_fact_converges_past_the_old_step_cap() {
    let records = request::read(&root().join("fixtures/data/edit/hard-facts.json")).unwrap();
    let r = records.iter().find(|r| r.subject == "Germany").unwrap();
    let compiler = Compiler::open(&smollm2_spec(Method::Memit, &[])).unwrap();
    let (model, hp) = (&compiler.model, &compiler.hp);
    let layer = *hp.layers.iter().max().unwrap();
    let prompts = factpatch::edit::optimisation_prompts(&compiler.tokenizer, r, &compiler.templates, &compiler.hp).unwrap();
    let optimize = |hp: &factpatch::edit::Hparams| target::optimize(model, std::slice::from_ref(&prompts), Edit::Residual(layer), hp).unwrap().remove(0);
    // Without the adaptive cap (as before it existed), 25 steps leave it far from the goal.
    let mut fixed = hp.clone();
    fixed.v_extend = 1;
    let before = optimize(&fixed);
    assert_eq!((before.stop, before.steps), (Stop::StepCap, 25), "loss {}", before.loss);
    assert!(worst_token_nll(model, &prompts, layer, &before.delta) > 0.5);
    // With it, the optimisation goes on until every target token is likely on every prompt.
    let after = optimize(hp);
    assert_eq!(after.stop, Stop::Converged, "{} steps, loss {}", after.steps, after.loss);
    assert!(after.steps > 25 && after.steps <= 100, "{} steps", after.steps);
    let worst = worst_token_nll(model, &prompts, layer, &after.delta);
    assert!(worst < 0.05, "a target token's NLL is {worst} where the optimisation stopped");
}

#[test]
fn memit_takes_a_fact_whose_subject_is_the_prompts_first_token() {
    // "Germany" is the first token of every prompt it is scored on (SmolLM2 adds no BOS): its key
    // there sees no context, unlike the template average. MEMIT maps both keys to the target.
    let records = request::read(&root().join("fixtures/data/edit/hard-facts.json")).unwrap();
    let r = records.iter().find(|r| r.subject == "Germany").unwrap();
    let mut compiler = Compiler::open(&smollm2_spec(Method::Memit, &["rect_k=100"])).unwrap();
    assert_eq!(compiler.tokenizer.ids(&r.subject).unwrap().len(), 1);
    assert!(r.filled().starts_with(&r.subject) && r.paraphrases.iter().all(|p| p.starts_with(&r.subject)));
    let patch = compiler.patch(std::slice::from_ref(r)).unwrap().patch;
    assert_eq!(factpatch::patch::Patch::from_bytes(patch.bytes, Path::new("germany.fpatch")).unwrap().manifest().edits.len(), 1);
    assert!(prefers_new(&compiler.model, &compiler.tokenizer, r), "the edit did not take on the raw prompt");
}

#[test]
fn facts_optimised_together_stop_as_they_would_alone() {
    // Facts stop at different steps, and a stopped fact leaves the batch: the others must go on
    // exactly as they would alone (same steps, same vector up to f32 rounding of other shapes).
    let records = request::read(&root().join("fixtures/data/edit/counterfact-rome-300.json")).unwrap();
    let compiler = Compiler::open(&smollm2_spec(Method::Memit, &[])).unwrap();
    let (model, hp) = (&compiler.model, &compiler.hp);
    let layer = *hp.layers.iter().max().unwrap();
    let prompts: Vec<FactPrompts> =
        records[..3].iter().map(|r| factpatch::edit::optimisation_prompts(&compiler.tokenizer, r, &compiler.templates, &compiler.hp).unwrap()).collect();
    let together = target::optimize(model, &prompts, Edit::Residual(layer), hp).unwrap();
    let steps: Vec<usize> = together.iter().map(|t| t.steps).collect();
    assert!(steps.iter().any(|&s| s != steps[0]), "the facts stop at the same step ({steps:?}): nothing leaves the batch");
    for (p, t) in prompts.iter().zip(&together) {
        let alone = target::optimize(model, std::slice::from_ref(p), Edit::Residual(layer), hp).unwrap().remove(0);
        assert_eq!((alone.steps, alone.stop), (t.steps, t.stop));
        let scale = alone.delta.iter().fold(0f64, |m, x| m.max(x.abs()));
        let diff = alone.delta.iter().zip(&t.delta).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * scale, "δ differs by {diff} (scale {scale})");
    }
}
