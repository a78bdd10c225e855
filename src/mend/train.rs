//! Training a MEND editor (Mitchell et al. 2022, §3.2 and Algorithm 1). Each step takes a batch of
//! edits: the gradient factors of the edit loss on their rewrite prompts go through the editor,
//! and the model with the resulting update must then predict the new targets after the rewrite
//! and paraphrase prompts (edit loss, weighted `edit_weight`) and keep its next-token
//! distributions after unrelated prompts — the records' neighbourhood prompts — (KL to the
//! unedited model, weighted `locality_weight`). The update enters the forward pass as
//! `W + U·Vᵀ` with ordinary matmuls, so the gradient reaches the editor while the model's weights
//! stay frozen; Adam trains the editor only. Records are drawn in a seeded order, the state is
//! checkpointed at every validation, and a rerun resumes from the checkpoint: the same command
//! gives the same editor bytes, interrupted or not.

use super::editor::{normalisation, Editor, Shape};
use super::factors::{self, gradient_factors, kl, residual_before, target_nll, Sequence};
use super::file::{self, Meta};
use super::{Error, Result};
use crate::adam::Adam;
use crate::atomic::Policy;
use crate::checkpoint::Checkpoint;
use crate::edit::request::{self, Request};
use crate::eval::{self, Models};
use crate::model::{self, Batch, Model, WeightUpdate};
use crate::plot;
use crate::tokenize::Tokenizer;
use candle_core::Tensor;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The training settings; the defaults are the paper's where it has one.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Training {
    /// The layers whose MLP output projections are edited.
    pub layers: Vec<usize>,
    pub shape: Shape,
    /// Adam's learning rate for the network (the paper's 1e-6).
    pub lr: f64,
    /// Adam's learning rate for the step sizes `α_ℓ` (the paper's 1e-4).
    pub step_lr: f64,
    /// `c_edit` (0.1) and `c_loc` (1.0).
    pub edit_weight: f64,
    pub locality_weight: f64,
    /// Edits per step (the paper's 10).
    pub batch: usize,
    /// Steps in all; a longer run of the same settings resumes a shorter one.
    pub steps: usize,
    /// The gradient's norm is clipped to this (the paper's 100).
    pub grad_clip: f64,
    /// The records trained on and validated on, 1-based and inclusive: disjoint.
    pub train_records: [usize; 2],
    pub validation_records: [usize; 2],
    /// Steps between validations (each also writes a checkpoint).
    pub validate_every: usize,
    /// Per record, how many paraphrases join the edit loss and neighbourhood prompts the locality loss.
    pub paraphrases: usize,
    pub locality_prompts: usize,
    /// Windows of generic text (from the run's locality corpus) that join the locality loss each
    /// step, as the paper's unrelated passages do; absent: neighbourhood prompts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_locality: Option<TextLocality>,
    /// Training records whose factors set the normalisation.
    pub norm_records: usize,
    pub seed: u64,
}

impl Training {
    /// The defaults for a model of `num_layers` layers: the last three layers' MLP output
    /// projections (the peers edit the last three layers' MLP matrices of Llama models),
    /// records 1,001-9,500 trained on and 9,501-9,600 validated on (records 1-1,000 of the
    /// CounterFact set are the evaluation records of the other experiments).
    pub fn defaults(num_layers: usize) -> Self {
        Training {
            layers: (num_layers.saturating_sub(3)..num_layers).collect(),
            shape: Shape::default(),
            lr: 1e-6,
            step_lr: 1e-4,
            edit_weight: 0.1,
            locality_weight: 1.0,
            batch: 10,
            steps: 1000,
            grad_clip: 100.0,
            train_records: [1001, 9500],
            validation_records: [9501, 9600],
            validate_every: 100,
            paraphrases: 1,
            locality_prompts: 2,
            text_locality: None,
            norm_records: 100,
            seed: 0,
        }
    }

    fn check(&self, config: &model::Config, records: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Settings(m));
        if self.layers.is_empty() || self.layers.iter().any(|&l| l >= config.num_layers) {
            return bad(format!("layers {:?} must be non-empty and below {}", self.layers, config.num_layers));
        }
        let [a, b] = self.train_records;
        let [c, d] = self.validation_records;
        if a == 0 || a > b || c == 0 || c > d || b > records || d > records {
            return bad(format!("record ranges {a}-{b} (training) and {c}-{d} (validation) must be 1-based, ordered and within the file's {records} records"));
        }
        if a <= d && c <= b {
            return bad(format!("training records {a}-{b} and validation records {c}-{d} overlap"));
        }
        if self.batch == 0 || self.validate_every == 0 || self.norm_records == 0 || self.shape.rank == 0 {
            return bad("batch, validate_every, norm_records and rank must be positive".into());
        }
        if ![self.lr, self.step_lr, self.edit_weight, self.locality_weight, self.grad_clip, self.shape.step_init].iter().all(|x| x.is_finite() && *x >= 0.0) {
            return bad("learning rates, loss weights, the clip and the initial step must be finite and ≥ 0".into());
        }
        Ok(())
    }

    /// `training` with one setting replaced: `KEY=JSON` (a dot for nested keys, e.g. `shape.rank=512`).
    pub fn set(&self, assignment: &str) -> Result<Self> {
        let bad = |why: String| Error::Settings(format!("--set {assignment}: {why}"));
        let (key, value) = assignment.split_once('=').ok_or_else(|| bad("expected KEY=JSON".into()))?;
        let value: serde_json::Value = serde_json::from_str(value).map_err(|e| bad(format!("the value is not JSON ({e})")))?;
        let mut json = serde_json::to_value(self).expect("plain struct");
        // Settings left out of the record when absent still exist.
        json.as_object_mut().expect("a struct").entry("text_locality").or_insert(serde_json::Value::Null);
        let mut slot = &mut json;
        for part in key.split('.') {
            slot = slot.as_object_mut().and_then(|m| m.get_mut(part)).ok_or_else(|| bad(format!("no training setting `{key}`")))?;
        }
        *slot = value;
        serde_json::from_value(json).map_err(|e| bad(e.to_string()))
    }

    /// Everything but `steps`: what makes two runs the same run.
    fn request_json(&self) -> String {
        serde_json::to_string(&Training { steps: 0, ..self.clone() }).expect("plain struct")
    }
}

/// Generic-text windows in the locality loss: `windows` a step, `tokens` long.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextLocality {
    pub windows: usize,
    pub tokens: usize,
}

/// What to train.
#[derive(Clone, Debug)]
pub struct TrainSpec {
    pub model: PathBuf,
    /// CounterFact-style records (`formats/requests.md`) with paraphrases and neighbourhood prompts.
    pub requests: PathBuf,
    /// Request files held out: no record about one of their subjects is trained or validated on
    /// (the evaluation records of the other experiments).
    pub exclude: Vec<PathBuf>,
    /// Plain text the generic locality windows come from (with `Training::text_locality`).
    pub locality_corpus: Option<PathBuf>,
    /// The run folder: `editor.safetensors`, `checkpoint.safetensors`, `training.csv` and the
    /// charts. A rerun resumes the run it holds.
    pub out: PathBuf,
    pub training: Training,
    pub progress: bool,
}

/// What a training run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub editor: PathBuf,
    /// Records trained on and validated on, after the held-out subjects.
    pub records: [usize; 2],
    /// The editor file's id.
    pub id: String,
    pub steps: usize,
    /// The step it resumed from (0: a fresh run).
    pub resumed_from: usize,
    pub seconds: f64,
    /// The last validation: efficacy, paraphrase, neighbourhood (CounterFact protocol).
    pub validation: Option<[f64; 3]>,
}

/// One validation row of `training.csv`.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    step: usize,
    /// Means over the steps since the previous row.
    loss: f64,
    edit_loss: f64,
    locality_loss: f64,
    efficacy: f64,
    paraphrase: f64,
    neighborhood: f64,
}

const CSV_HEADER: &str = "step,loss,edit_loss,locality_loss,efficacy,paraphrase,neighborhood";

/// Trains (or resumes training) an editor as `spec` says; see the module documentation.
pub fn train(spec: &TrainSpec) -> Result<TrainSummary> {
    let started = Instant::now();
    let tr = &spec.training;
    let config = model::Config::read(&spec.model)?;
    let requests = request::records(&spec.requests)?;
    tr.check(&config, requests.len())?;
    let ckpt = Checkpoint::open(&spec.model)?;
    let identity = ckpt.identity_cached(&crate::checkpoint::default_hash_cache())?.to_hex().to_string();
    let hash = |p: &Path| -> Result<String> { Ok(crate::hash_file(p, crate::MAX_DATA_BYTES)?) };
    let mut request_text = format!("factpatch mend request {}\nmodel {identity}\nrequests {}\n", file::FORMAT_VERSION, hash(&spec.requests)?);
    let mut held_out = std::collections::BTreeSet::new();
    for path in &spec.exclude {
        request_text += &format!("exclude {}\n", hash(path)?);
        held_out.extend(request::records(path)?.into_iter().map(|r| r.subject));
    }
    let tok = Tokenizer::open(&spec.model)?;
    let text = match (&spec.locality_corpus, tr.text_locality) {
        (Some(path), Some(t)) if t.windows > 0 && t.tokens > 0 => {
            request_text += &format!("locality_corpus {}\n", hash(path)?);
            let ids = tok.ids(&crate::read_regular_text(path, crate::MAX_DATA_BYTES)?)?;
            if ids.len() <= t.tokens {
                return Err(Error::Settings(format!("{}: {} tokens, fewer than one locality window of {}", path.display(), ids.len(), t.tokens)));
            }
            Some((ids, t))
        }
        (None, None) => None,
        _ => return Err(Error::Settings("text_locality (windows and tokens > 0) and a locality corpus go together".into())),
    };
    request_text += &format!("training {}\n", tr.request_json());
    let request_id = blake3::hash(request_text.as_bytes()).to_hex().to_string();
    let model = Model::from_checkpoint(config.clone(), &ckpt, &model::default_device()?)?;
    let policy = Policy::rewrite().reading([spec.model.clone(), spec.requests.clone()].into_iter().chain(spec.exclude.iter().cloned()));
    std::fs::create_dir_all(&spec.out).map_err(crate::io_err(&spec.out))?;
    let (editor_path, checkpoint_path, csv_path) =
        (spec.out.join("editor.safetensors"), spec.out.join("checkpoint.safetensors"), spec.out.join("training.csv"));
    let (d_in, d_out) = (config.intermediate_size, config.hidden_size);
    let records = |[a, b]: [usize; 2]| -> Vec<Request> {
        requests[a - 1..b].iter().filter(|r| !held_out.contains(&r.subject)).map(|r| Request { generation_prompts: Vec::new(), ..r.clone() }).collect()
    };
    let (train_set, validation_set) = (records(tr.train_records), records(tr.validation_records));
    if train_set.is_empty() || validation_set.is_empty() {
        return Err(Error::Settings("no training or no validation records are left after the held-out subjects".into()));
    }

    let (mut editor, mut adam, mut rows, start) = if checkpoint_path.exists() {
        let f = file::read(&checkpoint_path, model.device())?;
        if f.meta.request != request_id {
            let problem = "holds a training run of another model, request file or settings: choose another --out, or delete the folder to start over".into();
            return Err(Error::Mismatch { path: checkpoint_path, problem });
        }
        let adam = f.adam.ok_or_else(|| Error::File { path: checkpoint_path.clone(), problem: "a checkpoint without optimiser state".into() })?;
        let rows = read_rows(&csv_path, f.meta.steps)?;
        (f.editor, adam, rows, f.meta.steps)
    } else {
        let seqs: Vec<Sequence> = train_set.iter().take(tr.norm_records).map(|r| rewrite(&tok, r)).collect::<Result<_>>()?;
        let mut samples = Vec::new();
        for chunk in seqs.chunks(tr.batch) {
            samples.push(gradient_factors(&model, chunk, &tr.layers, None)?);
        }
        let editor = Editor::init(&tr.layers, d_in, d_out, tr.shape, normalisation(&samples)?, tr.seed, model.device())?;
        let adam = editor.params.iter().map(|(n, v)| Ok((n.clone(), Adam::from_values(factors::host(v.as_tensor())?, 0.0)))).collect::<Result<_>>()?;
        (editor, adam, Vec::new(), 0)
    };
    for (name, a) in adam.iter_mut() {
        a.lr = if name == "step" { tr.step_lr } else { tr.lr };
    }
    let meta = |steps: usize| Meta {
        model: identity.clone(),
        family: config.family.name.to_string(),
        layers: tr.layers.clone(),
        d_in,
        d_out,
        shape: tr.shape,
        training: tr.request_json(),
        request: request_id.clone(),
        steps,
        tool: crate::tool_version(),
    };

    let bar = eval::progress(spec.progress, "mend train", tr.steps);
    bar.set_position(start.min(tr.steps) as u64);
    let mut sums = [0.0; 3];
    for step in start..tr.steps {
        let batch: Vec<&Request> = (0..tr.batch).map(|j| &train_set[draw(step * tr.batch + j, train_set.len(), tr.seed)]).collect();
        let windows = text.as_ref().map_or(Vec::new(), |(ids, t)| windows(ids, *t, tr.seed, step));
        let (loss, edit_loss, locality_loss) = training_loss(&model, &tok, &editor, &batch, &windows, tr)?;
        for (s, v) in sums.iter_mut().zip([scalar(&loss)?, edit_loss, locality_loss]) {
            *s += v;
        }
        descend(&mut editor, &mut adam, &loss, tr.grad_clip)?;
        bar.inc(1);
        let done = step + 1;
        if done % tr.validate_every == 0 || done == tr.steps {
            let n = (done - rows.last().map_or(start.min(done), |r: &Row| r.step)).max(1) as f64;
            let [efficacy, paraphrase, neighborhood] = validate(&model, &tok, &editor, &validation_set, &spec.requests)?;
            rows.push(Row { step: done, loss: sums[0] / n, edit_loss: sums[1] / n, locality_loss: sums[2] / n, efficacy, paraphrase, neighborhood });
            sums = [0.0; 3];
            bar.set_message(format!("ES {efficacy:.2} PS {paraphrase:.2} NS {neighborhood:.2}"));
            file::write(&checkpoint_path, &meta(done), &editor, Some(&adam), &policy)?;
            write_rows(&csv_path, &rows, &policy)?;
            draw_curves(&spec.out, &rows, &policy)?;
        }
    }
    bar.finish_and_clear();
    let steps = start.max(tr.steps);
    let id = file::write(&editor_path, &meta(steps), &editor, None, &policy)?;
    let validation = rows.last().map(|r| [r.efficacy, r.paraphrase, r.neighborhood]);
    Ok(TrainSummary {
        editor: editor_path,
        records: [train_set.len(), validation_set.len()],
        id,
        steps,
        resumed_from: start,
        seconds: started.elapsed().as_secs_f64(),
        validation,
    })
}

/// Step `step`'s generic-text windows: `t.windows` runs of `t.tokens` tokens at seeded offsets.
fn windows(ids: &[u32], t: TextLocality, seed: u64, step: usize) -> Vec<Vec<u32>> {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..t.windows).map(|_| ids[rng.random_range(0..ids.len() - t.tokens)..][..t.tokens].to_vec()).collect()
}

/// The training record used for the `i`-th edit: epoch by epoch, each a seeded permutation.
fn draw(i: usize, n: usize, seed: u64) -> usize {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add((i / n) as u64)));
    order[i % n]
}

/// The rewrite prompt with its new target, teacher-forced.
fn rewrite(tok: &Tokenizer, r: &Request) -> Result<Sequence> {
    teacher_forced(tok, &r.filled(), r)
}

fn teacher_forced(tok: &Tokenizer, prompt: &str, r: &Request) -> Result<Sequence> {
    let target = tok.ids(&r.target_text())?;
    if target.is_empty() {
        return Err(Error::Settings(format!("{}: the target tokenizes to nothing", r.origin)));
    }
    Ok(Sequence::teacher_forced(tok.prompt_ids(prompt)?, &target))
}

/// One step's loss `edit_weight·edit + locality_weight·KL` (differentiable in the editor), with
/// its two parts' values; `text` (token windows of generic text) joins the locality loss.
pub fn training_loss(model: &Model, tok: &Tokenizer, editor: &Editor, batch: &[&Request], text: &[Vec<u32>], tr: &Training) -> Result<(Tensor, f64, f64)> {
    let mut rewrites = Vec::new();
    let mut paraphrases = Vec::new();
    let mut locality = Vec::new();
    for r in batch {
        rewrites.push(rewrite(tok, r)?);
        for p in r.paraphrases.iter().take(tr.paraphrases) {
            paraphrases.push(teacher_forced(tok, p, r)?);
        }
        for n in r.neighbors.iter().take(tr.locality_prompts) {
            locality.push(Sequence { ids: tok.prompt_ids(&n.prompt)?, targets: Vec::new() });
        }
    }
    locality.extend(text.iter().map(|ids| Sequence { ids: [tok.prefix(), ids].concat(), targets: Vec::new() }));
    let nr = rewrites.len();
    let seqs: Vec<Sequence> = rewrites.iter().chain(&paraphrases).chain(&locality).cloned().collect();
    let batch = Batch::right_padded(&seqs.iter().map(|s| s.ids.clone()).collect::<Vec<_>>());
    let first = *tr.layers.iter().min().expect("checked");
    let resume = residual_before(model, &batch, first)?;
    // The factors come from the rewrite prompts alone.
    let only_rewrites: Vec<Sequence> =
        seqs.iter().enumerate().map(|(i, s)| if i < nr { s.clone() } else { Sequence { ids: s.ids.clone(), targets: Vec::new() } }).collect();
    let fs = gradient_factors(model, &only_rewrites, &tr.layers, resume.as_ref())?;
    let updates = fs.iter().map(|f| editor.update(f).map(|(u, v)| WeightUpdate { layer: f.layer, u, v })).collect::<model::Result<Vec<_>>>()?;
    let hidden = factors::forward_with(model, &batch, first, resume.as_ref(), updates)?;
    let edit = target_nll(model, &hidden, &seqs)?;
    let loss = (&edit * tr.edit_weight)?;
    let at: Vec<(usize, usize)> = factors::real_positions(&batch).into_iter().filter(|&(s, _)| s >= seqs.len() - locality.len()).collect();
    if at.is_empty() {
        return Ok((loss, scalar(&edit)?, 0.0));
    }
    let base = factors::forward_with(model, &batch, first, resume.as_ref(), Vec::new())?;
    let logp = |h: &Tensor| -> model::Result<Tensor> { Ok(crate::model::ops::log_softmax(&model.logits(&model::rows(h, &at)?)?)?) };
    let locality_loss = kl(&logp(&base)?.detach(), &logp(&hidden)?)?;
    let loss = (loss + (&locality_loss * tr.locality_weight)?)?;
    Ok((loss, scalar(&edit)?, scalar(&locality_loss)?))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// One Adam step of every trained tensor on `loss`'s gradient, its global norm clipped to `clip`.
fn descend(editor: &mut Editor, adam: &mut BTreeMap<String, Adam>, loss: &Tensor, clip: f64) -> Result<()> {
    let grads = loss.backward()?;
    let mut g: BTreeMap<&String, Vec<f32>> = BTreeMap::new();
    for (name, var) in &editor.params {
        let values = match grads.get(var.as_tensor()) {
            Some(t) => factors::host(t)?,
            None => vec![0.0; var.elem_count()],
        };
        g.insert(name, values);
    }
    let norm = g.values().flatten().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let scale = if norm > clip { (clip / norm) as f32 } else { 1.0 };
    for (name, values) in g {
        let a = adam.get_mut(name).expect("one optimiser per tensor");
        let scaled: Vec<f32> = values.iter().map(|x| x * scale).collect();
        a.tick();
        a.step(0..scaled.len(), &scaled);
        let var = &editor.params[name];
        var.set(&Tensor::from_vec(a.theta.clone(), var.dims(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Efficacy, paraphrase and neighbourhood (CounterFact protocol) of editing each of `records`
/// alone into the unedited model with `editor`, averaged over the records.
fn validate(model: &Model, tok: &Tokenizer, editor: &Editor, records: &[Request], path: &Path) -> Result<[f64; 3]> {
    let mut sums = [0.0; 3];
    let mut counts = [0usize; 3];
    for r in records {
        let mut edited = model.clone();
        for (layer, u, v) in super::updates(model, editor, &rewrite(tok, r)?)? {
            crate::edit::commit(&mut edited, layer, &u, &v, 100.0).map_err(|e| Error::Settings(e.to_string()))?;
        }
        let models = Models { base: model.clone(), patched: Some(edited), patch_ids: Vec::new() };
        let report = eval::edits::report(&models, tok, path, std::slice::from_ref(r), &eval::Options::default())?;
        for (i, name) in ["efficacy", "paraphrase", "neighborhood"].iter().enumerate() {
            if let Some(a) = report.counterfact.iter().find(|a| a.name == *name) {
                sums[i] += a.mean;
                counts[i] += 1;
            }
        }
    }
    Ok([0, 1, 2].map(|i| if counts[i] == 0 { f64::NAN } else { sums[i] / counts[i] as f64 }))
}

fn write_rows(path: &Path, rows: &[Row], policy: &Policy) -> Result<()> {
    let mut text = format!("{CSV_HEADER}\n");
    for r in rows {
        text += &format!("{},{},{},{},{},{},{}\n", r.step, r.loss, r.edit_loss, r.locality_loss, r.efficacy, r.paraphrase, r.neighborhood);
    }
    crate::atomic::write(path, text.as_bytes(), policy).map_err(crate::io_err(path))?;
    Ok(())
}

/// The rows of an earlier run's `training.csv` up to its checkpoint at step `upto`.
fn read_rows(path: &Path, upto: usize) -> Result<Vec<Row>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = crate::read_regular_text(path, 1 << 26)?;
    let bad = |line: usize| Error::File { path: path.to_path_buf(), problem: format!("line {line}: not a training row; delete the folder to start over") };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        let num = |k: usize| v.get(k).and_then(|s| s.parse::<f64>().ok()).ok_or_else(|| bad(i + 1));
        let step = v.first().and_then(|s| s.parse::<usize>().ok()).ok_or_else(|| bad(i + 1))?;
        if step <= upto {
            rows.push(Row { step, loss: num(1)?, edit_loss: num(2)?, locality_loss: num(3)?, efficacy: num(4)?, paraphrase: num(5)?, neighborhood: num(6)? });
        }
    }
    Ok(rows)
}

/// `training-loss.png` (the two losses, log scale) and `training-validation.png` (the validation
/// metrics) against the step.
fn draw_curves(out: &Path, rows: &[Row], policy: &Policy) -> Result<()> {
    let series = |label: &str, colour: usize, f: fn(&Row) -> f64| plot::Series {
        label: label.into(),
        points: rows.iter().map(|r| (r.step as f64, f(r))).filter(|p| p.1.is_finite() && p.1 > 0.0).collect(),
        colour,
        dashed: false,
    };
    let losses = [series("edit loss (NLL of the new target)", 0, |r| r.edit_loss), series("locality loss (KL to the unedited model)", 1, |r| r.locality_loss)];
    let axes = plot::Axes { log_x: false, log_y: true };
    plot::lines(&out.join("training-loss.png"), "MEND training: losses (mean since the previous point)", "training step", "loss", &losses, axes, policy)?;
    let metrics = [series("efficacy", 0, |r| r.efficacy), series("paraphrase", 1, |r| r.paraphrase), series("neighbourhood", 2, |r| r.neighborhood)];
    let title = "MEND training: validation edits (CounterFact protocol, one edit at a time)";
    plot::lines(&out.join("training-validation.png"), title, "training step", "share of prompts", &metrics, plot::Axes::default(), policy)?;
    Ok(())
}
