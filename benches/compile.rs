//! Compile speed and edit quality on SmolLM2 (or `FACTPATCH_BENCH_MODEL`, a model folder): seconds per fact for each method one fact at a
//! time (or all facts in one batch), each with RECT off and at 40%, and the CounterFact scores
//! of the edited model (probability comparison: new target more probable than the true one).
//!
//! Run: `cargo bench --bench compile` (after `fixtures/setup.sh`); `FACTPATCH_BENCH_REQUESTS`
//! names the requests file (default `fixtures/data/edit/counterfact-rome-300.json`),
//! `FACTPATCH_BENCH_FACTS` which of its records: `N` the first N (default 10), `A-B` records A
//! to B counted from 1, `all` every one,
//! `FACTPATCH_BENCH_RUNS` which runs: methods (`rome`, `memit`, `emmet`, `alphaedit`, `encore`,
//! `kn`, `mend` with `FACTPATCH_BENCH_EDITOR` naming the editor file), a `-batch` suffix for one batch of N, then `:KEY=VALUE` hyperparameter overrides
//! (default `rome,memit,memit:early_stop=mpes,encore,memit-batch`), and
//! `FACTPATCH_BENCH_RECT` the RECT settings (default `none,40`), `FACTPATCH_BENCH_STATS` a
//! statistics file covering the edited layers (default: 100k tokens of SOTU, cached). The `capped` column counts the
//! facts whose target optimisation stopped at its step cap; each of them, and each fact whose edit
//! does not take (efficacy 0), is listed on stderr with its steps and final loss.

use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::{request, target, target::Stop, Method};
use factpatch::model::Model;
use factpatch::tokenize::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// Share of prompts whose mean log-probability of `new` exceeds that of `old`.
fn prefers_new(m: &Model, tok: &Tokenizer, prompts: &[String], new: &str, old: &str) -> f64 {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.prompt_ids(p).unwrap()).collect();
    let lp = |t: &str| target::target_logprob(m, &ids, &tok.ids(&request::continuation(t)).unwrap()).unwrap();
    let (a, b) = (lp(new), lp(old));
    a.iter().zip(&b).filter(|(x, y)| x > y).count() as f64 / a.len().max(1) as f64
}

/// (efficacy, paraphrase, neighbourhood) summed over `reqs` on `m`.
fn scores(m: &Model, tok: &Tokenizer, reqs: &[request::Request]) -> [f64; 3] {
    let mut s = [0.0; 3];
    for r in reqs {
        let old = r.target_true.as_deref().unwrap_or_default();
        s[0] += prefers_new(m, tok, &[r.filled()], &r.target_new, old);
        s[1] += prefers_new(m, tok, &r.paraphrases, &r.target_new, old);
        let neighbours: Vec<String> = r.neighbors.iter().map(|x| x.prompt.clone()).collect();
        s[2] += 1.0 - prefers_new(m, tok, &neighbours, &r.target_new, old);
    }
    s
}

/// `text` split at the commas outside brackets (`memit:layers=[2,3],rome` is two runs).
fn top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn main() {
    factpatch::init_process();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("FACTPATCH_BENCH_MODEL").map_or_else(|_| root.join("fixtures/models/SmolLM2-135M-Instruct"), |p| root.join(p));
    let file = std::env::var("FACTPATCH_BENCH_REQUESTS").map_or_else(|_| root.join("fixtures/data/edit/counterfact-rome-300.json"), |p| root.join(p));
    let reqs = request::read(&file).unwrap_or_else(|e| panic!("{e}"));
    let (first, n) = match std::env::var("FACTPATCH_BENCH_FACTS").as_deref() {
        Ok("all") => (0, reqs.len()),
        Ok(v) => {
            let number = |x: &str| x.parse::<usize>().unwrap_or_else(|e| panic!("FACTPATCH_BENCH_FACTS: `{v}`: {e}"));
            match v.split_once('-').map(|(a, b)| (number(a), number(b))) {
                Some((a, b)) if 1 <= a && a <= b => (a - 1, b + 1 - a),
                Some(_) => panic!("FACTPATCH_BENCH_FACTS: `{v}` is not a range FIRST-LAST of records counted from 1"),
                None => (0, number(v)),
            }
        }
        Err(_) => (0, 10),
    };
    let reqs = &reqs[first.min(reqs.len())..(first + n).min(reqs.len())];
    let n = reqs.len();
    let spec = |method: Method, rect: f64, sets: &[String]| Spec {
        overrides: std::iter::once(format!("rect_k={rect}")).chain(sets.iter().cloned()).collect(),
        stats: std::env::var("FACTPATCH_BENCH_STATS")
            .map_or_else(|_| StatsSource::Corpus { files: vec![root.join("fixtures/corpus/sotu.txt")], tokens: 100_000 }, |f| StatsSource::File(f.into())),
        progress: true,
        editor: (method == Method::Mend)
            .then(|| root.join(std::env::var("FACTPATCH_BENCH_EDITOR").expect("mend needs FACTPATCH_BENCH_EDITOR: an editor file"))),
        ..Spec::new(&dir, method)
    };
    let unedited = Compiler::open(&spec(Method::Kn, 100.0, &[])).unwrap_or_else(|e| panic!("{e} (run fixtures/setup.sh first)"));
    let (base, tok) = (&unedited.model, &unedited.tokenizer);
    let pre = scores(base, tok, reqs);
    println!(
        "{n} records ({}-{}) of {}; unedited: efficacy {:.2}, paraphrase {:.2}, neighbourhood {:.2}",
        first + 1,
        first + n,
        file.display(),
        pre[0] / n as f64,
        pre[1] / n as f64,
        pre[2] / n as f64
    );
    println!("\n| method | RECT k | batch | s/fact | steps | capped | efficacy | paraphrase | neighbourhood |\n|---|---|---|---|---|---|---|---|---|");
    // FACTPATCH_BENCH_RUNS picks and orders the runs, e.g. `memit-batch,memit:early_stop=mpes,rome`.
    let runs = std::env::var("FACTPATCH_BENCH_RUNS").unwrap_or_else(|_| "rome,memit,memit:early_stop=mpes,encore,memit-batch".into());
    let runs: Vec<(Method, usize, Vec<String>)> = top_level(&runs)
        .into_iter()
        .map(|r| {
            let mut parts = r.trim().split(':');
            let name = parts.next().unwrap_or_default();
            let (name, batch) = name.strip_suffix("-batch").map_or((name, 1), |m| (m, n));
            let method = <Method as clap::ValueEnum>::from_str(name, true).unwrap_or_else(|e| panic!("FACTPATCH_BENCH_RUNS: `{r}`: {e}"));
            (method, batch, parts.map(String::from).collect())
        })
        .collect();
    let rects = std::env::var("FACTPATCH_BENCH_RECT").unwrap_or_else(|_| "none,40".into());
    let rects: Vec<f64> = rects.split(',').map(|k| factpatch::rect::parse_k(k.trim()).unwrap_or_else(|e| panic!("FACTPATCH_BENCH_RECT: {e}"))).collect();
    for (method, batch, sets) in runs {
        for &rect in &rects {
            // Statistics, AlphaEdit's projections and the context templates are made once per
            // run, outside the timed edits, as in real use.
            let mut compiler = Compiler::open(&spec(method, rect, &sets)).unwrap();
            compiler.preserved.prepare(&compiler.hp).unwrap();
            let (mut seconds, mut steps, mut capped, mut s) = (0.0, 0, 0, [0.0; 3]);
            for group in reqs.chunks(batch) {
                let mut c = compiler.clone();
                let t = Instant::now();
                let (_, reports) = c.edit(group).unwrap();
                seconds += t.elapsed().as_secs_f64();
                steps += reports.iter().map(|r| r.steps).sum::<usize>();
                for (r, report) in group.iter().zip(&reports) {
                    let g = scores(&c.model, tok, std::slice::from_ref(r));
                    (0..3).for_each(|i| s[i] += g[i]);
                    let taken = g[0] > 0.0;
                    capped += (report.stop == Some(Stop::StepCap)) as usize;
                    if report.stop == Some(Stop::StepCap) || !taken {
                        let why = if taken { "step cap" } else { "edit not taken" };
                        eprintln!("  {method:?} {}: {} → {}: {why}, {} steps, loss {:.3}", r.origin, r.subject, r.target_new, report.steps, report.loss);
                    }
                }
            }
            let k = if rect < 100.0 { format!("{rect}") } else { "none".into() };
            let f = n as f64;
            let name = [format!("{method:?}")].into_iter().chain(sets.iter().cloned()).collect::<Vec<_>>().join(" ");
            let steps = steps as f64 / f;
            println!("| {name} | {k} | {batch} | {:.2} | {steps:.1} | {capped} | {:.2} | {:.2} | {:.2} |", seconds / f, s[0] / f, s[1] / f, s[2] / f);
        }
    }
}
