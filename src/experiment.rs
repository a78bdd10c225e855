//! Experiments: what an editing method costs as edits pile up, with and without RECT.
//! `sequential` edits one fact after another on one model and evaluates after chosen numbers
//! of edits (the facts edited so far, and the general abilities); `batch` edits the first N facts in one
//! solve, for several N. Each RECT setting runs on its own copy of the model.
//!
//! Results are rows (setting, x, metric, value) in `results.csv`, rewritten atomically after
//! every evaluation. The edited weights are saved beside them (`state/`) at every evaluation and
//! at least every [`SAVE_EVERY`] edits, so an interrupted run resumes close to where it stopped.
//! The plots are redrawn from the rows each time.

use crate::atomic::Policy;
use crate::compile::{self, Compiler};
use crate::edit::{request::Request, Hparams, Preserved};
use crate::eval::{self, edits, general, tasks::TaskData, Models};
use crate::model::{self, Model};
use crate::plot::{self, Series};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything that can go wrong running an experiment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Compiling an edit failed.
    #[error(transparent)]
    Compile(#[from] compile::Error),
    /// Evaluating failed.
    #[error(transparent)]
    Eval(Box<eval::Error>),
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// Drawing a plot failed.
    #[error(transparent)]
    Plot(#[from] plot::Error),
    /// A results or state file is unreadable or does not belong to this experiment.
    #[error("{path}: {problem}")]
    State { path: PathBuf, problem: String },
    /// The experiment asks for more facts than the requests hold, or for nothing.
    #[error("{0}")]
    Plan(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<eval::Error> for Error {
    fn from(e: eval::Error) -> Self {
        Error::Eval(Box::new(e))
    }
}

/// How edits are made between evaluations.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Facts `batch` at a time (one solve per batch), evaluated after each count of edits in
    /// `at` (ascending, multiples of `batch`; the last is the total).
    Sequential { at: Vec<usize>, batch: usize },
    /// For each size N, the first N facts in one batch, on a fresh model.
    Batch { sizes: Vec<usize> },
}

/// What to run.
pub struct Setup {
    /// The unedited model, method, hyperparameters (`rect_k` is set per setting), statistics
    /// and templates: each setting starts from a clone of it.
    pub compiler: Compiler,
    /// The requests in file order ([`crate::edit::request::records`]); those the run edits are
    /// checked together.
    pub requests: Vec<Request>,
    pub requests_path: PathBuf,
    /// RECT settings as k (100 = none).
    pub rects: Vec<f64>,
    pub general: Vec<TaskData>,
    pub options: eval::Options,
    pub out: PathBuf,
}

/// One measured value: `metric` of `setting` after `x` edits (sequential) or at batch size `x`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub setting: String,
    pub x: usize,
    pub metric: String,
    pub value: f64,
}

/// The label of a RECT setting: `none` for k = 100, else `k=40`.
pub fn setting_name(k: f64) -> String {
    if k >= 100.0 {
        "none".into()
    } else {
        format!("k={k}")
    }
}

/// The x axes' labels.
const X_EDITS: &str = "edits";
const X_BATCH: &str = "batch size";

fn x_label(schedule: &Schedule) -> &'static str {
    match schedule {
        Schedule::Sequential { .. } => X_EDITS,
        Schedule::Batch { .. } => X_BATCH,
    }
}

/// A sequential run saves its state at least this often (in edits), besides every evaluation.
pub const SAVE_EVERY: usize = 10;

impl Schedule {
    /// Sequential, one fact at a time, `edits` in all, evaluated after every `every` (and after
    /// the last).
    pub fn every(edits: usize, every: usize) -> Self {
        let mut at: Vec<usize> = (1..=edits).filter(|i| every > 0 && i % every == 0).collect();
        if edits > 0 && at.last() != Some(&edits) {
            at.push(edits);
        }
        Schedule::Sequential { at, batch: 1 }
    }

    /// The same schedule with `batch` facts edited in each solve (sequential only).
    pub fn in_batches(self, batch: usize) -> Self {
        match self {
            Schedule::Sequential { at, .. } => Schedule::Sequential { at, batch },
            batch_schedule => batch_schedule,
        }
    }
}

/// Runs (or resumes) the experiment; returns every row.
pub fn run(setup: &Setup, schedule: &Schedule) -> Result<Vec<Row>> {
    let needed = match schedule {
        Schedule::Sequential { at, .. } if !at.is_empty() && at[0] > 0 && at.windows(2).all(|w| w[0] < w[1]) => at[at.len() - 1],
        Schedule::Batch { sizes } if !sizes.is_empty() && !sizes.contains(&0) => *sizes.iter().max().expect("non-empty"),
        _ => return Err(Error::Plan("nothing to run: give positive numbers of edits (ascending) and batch sizes".into())),
    };
    if needed > setup.requests.len() {
        return Err(Error::Plan(format!("{}: {needed} facts asked for, {} there", setup.requests_path.display(), setup.requests.len())));
    }
    let edited = crate::edit::request::check(setup.requests[..needed].to_vec()).map_err(eval::Error::from)?;
    if edited.len() < needed {
        return Err(Error::Plan(format!("{}: the first {needed} records repeat a fact; {} are distinct", setup.requests_path.display(), edited.len())));
    }
    if let Schedule::Sequential { at, batch } = schedule {
        if *batch == 0 || at.iter().any(|a| a % batch != 0) {
            return Err(Error::Plan(format!("edits are made {batch} at a time: evaluate after positive multiples of {batch} (--at, --every, --edits)")));
        }
    }
    // The results, state and plots in `out` are rewritten at every evaluation; no input ever is.
    let inputs = setup.compiler.inputs().into_iter().chain([setup.requests_path.clone()]).chain(setup.general.iter().map(|t| t.path.clone()));
    let policy = Policy::rewrite().reading(inputs);
    std::fs::create_dir_all(setup.out.join("state")).map_err(|e| state_err(&setup.out, e))?;
    check_recipe(setup, schedule, &policy)?;
    let mut rows = read_rows(&setup.out.join("results.csv"))?;
    // Fluency needs long generations at every evaluation; experiments leave it out.
    let requests: Vec<Request> = edited.into_iter().map(|r| Request { generation_prompts: Vec::new(), ..r }).collect();
    let ctx = Context { setup, requests: &requests, policy };
    for &k in &setup.rects {
        let mut compiler = setup.compiler.clone();
        compiler.hp.rect_k = k;
        let setting = setting_name(k);
        match schedule {
            Schedule::Sequential { at, batch } => ctx.sequential(compiler, &setting, at, *batch, &mut rows)?,
            Schedule::Batch { sizes } => ctx.batch(&compiler, &setting, sizes, &mut rows)?,
        }
    }
    // Plots as this version draws them, even when a finished run is only resumed.
    if !rows.is_empty() {
        draw(&setup.out, &rows, x_label(schedule), &ctx.policy)?;
    }
    Ok(rows)
}

/// The file in an experiment's folder that records what decides its results.
pub const RECIPE: &str = "experiment.json";

/// What decides an experiment's results, as JSON: the compiler's recipe (without RECT's k, which
/// each setting sets), how facts are batched, and the files and options edits and abilities are
/// measured with. Evaluation points, batch sizes and settings may be added to a run; nothing
/// here may change.
fn recipe(setup: &Setup, schedule: &Schedule) -> Result<serde_json::Value> {
    let mut compiler = setup.compiler.recipe();
    if let Some(hp) = compiler["hparams"].as_object_mut() {
        hp.remove("rect_k");
    }
    let schedule = match schedule {
        Schedule::Sequential { batch, .. } => serde_json::json!({ "sequential": { "batch": batch } }),
        Schedule::Batch { .. } => serde_json::json!("batch"),
    };
    let hash = |path: &Path| crate::hash_file(path, crate::MAX_DATA_BYTES).map_err(|e| state_err(&e.path, e.source));
    let general =
        setup.general.iter().map(|t| Ok(serde_json::json!({ "task": t.task.name(), "file": hash(&t.path)?, "limit": t.limit }))).collect::<Result<Vec<_>>>()?;
    let o = &setup.options;
    Ok(serde_json::json!({
        "compiler": compiler,
        "schedule": schedule,
        "requests": hash(&setup.requests_path)?,
        "general": general,
        "options": { "limit": o.limit, "seed": o.seed, "seq_len": o.seq_len },
    }))
}

/// Records the experiment's recipe in a new folder, or checks it against the one recorded, so
/// that a run never resumes another experiment's results or state.
fn check_recipe(setup: &Setup, schedule: &Schedule, policy: &Policy) -> Result<()> {
    let path = setup.out.join(RECIPE);
    let bad = |problem: String| Error::State { path: path.clone(), problem };
    let start_over = "give another --out, or delete the folder to start over";
    let now = recipe(setup, schedule)?;
    let text = match crate::read_regular_text(&path, crate::MAX_METADATA_BYTES) {
        Ok(text) => text,
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
            let results = setup.out.join("results.csv");
            let state = std::fs::read_dir(setup.out.join("state")).map_err(|e| state_err(&setup.out, e))?.next().is_some();
            if results.exists() || state {
                return Err(Error::State { path: setup.out.clone(), problem: format!("holds results but no {RECIPE} saying what made them; {start_over}") });
            }
            let json = serde_json::to_string_pretty(&now).expect("JSON values serialize") + "\n";
            return crate::atomic::write(&path, json.as_bytes(), policy).map_err(|e| state_err(&path, e));
        }
        Err(e) => return Err(state_err(&path, e.source)),
    };
    let then: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e}); {start_over}")))?;
    let mut changed = Vec::new();
    differences(&then, &now, "", &mut changed);
    if changed.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = changed.iter().take(3).map(|(key, was, is)| format!("`{key}` is {was} there, {is} here")).collect();
    let more = if changed.len() > 3 { format!(" (and {} more)", changed.len() - 3) } else { String::new() };
    Err(bad(format!("holds another experiment: {}{more}; {start_over}", shown.join(", "))))
}

/// Every place where `a` and `b` differ, as dotted keys in order, with the two values there.
fn differences(a: &serde_json::Value, b: &serde_json::Value, at: &str, out: &mut Vec<(String, serde_json::Value, serde_json::Value)>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
                differences(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), &key, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{at}[{i}]"), out);
            }
        }
        _ if a != b => out.push((at.to_string(), a.clone(), b.clone())),
        _ => {}
    }
}

struct Context<'a> {
    setup: &'a Setup,
    requests: &'a [Request],
    /// How every output is written.
    policy: Policy,
}

impl Context<'_> {
    /// The unedited model.
    fn base(&self) -> &Model {
        &self.setup.compiler.model
    }

    fn sequential(&self, mut compiler: Compiler, setting: &str, at: &[usize], batch: usize, rows: &mut Vec<Row>) -> Result<()> {
        let edits = at[at.len() - 1];
        let measured = |rows: &[Row], x: usize| rows.iter().any(|r| r.setting == setting && r.x == x);
        if !rows.iter().any(|r| r.setting == setting) {
            // Every setting starts from the same unedited model: measure it once.
            let unedited: Vec<(String, f64)> =
                rows.iter().filter(|r| r.x == 0).take_while(|r| r.setting == rows[0].setting).map(|r| (r.metric.clone(), r.value)).collect();
            let m = if unedited.is_empty() { self.measure(None, 0)? } else { unedited };
            self.record(rows, setting, 0, m, X_EDITS)?;
        }
        let c = &mut compiler;
        let mut done = self.restore(&mut c.model, &mut c.preserved, setting, &c.hp)?;
        // Every evaluation before the saved state is in the results (the one at the state itself
        // may not be: the run can stop between saving and measuring).
        let last = rows.iter().filter(|r| r.setting == setting).map(|r| r.x).max().unwrap_or(0);
        if last > done || at.iter().any(|&a| a < done && !measured(rows, a)) {
            let path = self.state_path(setting);
            let problem =
                format!("holds the state after {done} edits, which does not match the results (evaluated up to {last} edits); delete the folder to start over");
            return Err(Error::State { path, problem });
        }
        if at.contains(&done) && !measured(rows, done) {
            let m = self.measure(Some(&compiler.model), done)?;
            self.record(rows, setting, done, m, X_EDITS)?;
        }
        if done >= edits {
            return Ok(());
        }
        let bar = progress(setting, edits as u64, done as u64);
        let mut saved = done;
        while done < edits {
            let n = batch.min(edits - done);
            compiler.edit(&self.requests[done..done + n])?;
            done += n;
            bar.inc(n as u64);
            let evaluate = at.contains(&done);
            if evaluate || done - saved >= SAVE_EVERY {
                self.save(&compiler.model, &compiler.preserved, setting, done, &compiler.hp)?;
                saved = done;
            }
            if evaluate {
                bar.suspend(|| -> Result<()> {
                    let m = self.measure(Some(&compiler.model), done)?;
                    self.record(rows, setting, done, m, X_EDITS)
                })?;
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    fn batch(&self, compiler: &Compiler, setting: &str, sizes: &[usize], rows: &mut Vec<Row>) -> Result<()> {
        for &n in sizes {
            if rows.iter().any(|r| r.setting == setting && r.x == n) {
                continue;
            }
            let mut fresh = compiler.clone();
            fresh.edit(&self.requests[..n])?;
            let m = self.measure(Some(&fresh.model), n)?;
            self.record(rows, setting, n, m, X_BATCH)?;
        }
        Ok(())
    }

    /// Edit metrics of the first `n` facts on `edited` (EasyEdit and CounterFact protocols),
    /// and the general abilities of `edited` (or of the base model when `None`).
    fn measure(&self, edited: Option<&Model>, n: usize) -> Result<Vec<(String, f64)>> {
        let models = Models { base: self.base().clone(), patched: edited.cloned(), patch_ids: Vec::new() };
        let tok = &self.setup.compiler.tokenizer;
        let mut out = Vec::new();
        if n > 0 {
            let opts = eval::Options { limit: None, progress: false, ..self.setup.options.clone() };
            let report = edits::report(&models, tok, &self.setup.requests_path, &self.requests[..n], &opts)?;
            out.extend(report.easyedit.iter().chain(&report.counterfact).map(|a| (a.name.to_string(), a.mean)));
        }
        for data in &self.setup.general {
            let r = general::run(models.evaluated(), tok, data, &self.setup.options)?;
            out.extend(r.metrics.iter().map(|m| (format!("{}/{}", data.task.name(), m.name), m.value)));
        }
        Ok(out)
    }

    /// Adds `measured` as rows, rewrites the CSV and redraws the plots.
    fn record(&self, rows: &mut Vec<Row>, setting: &str, x: usize, measured: Vec<(String, f64)>, x_label: &str) -> Result<()> {
        rows.extend(measured.into_iter().map(|(metric, value)| Row { setting: setting.to_string(), x, metric, value }));
        // One order however the run was interrupted: settings as given, then x (stable).
        let rank = |s: &str| self.setup.rects.iter().position(|&k| setting_name(k) == s).unwrap_or(usize::MAX);
        rows.sort_by_key(|r| (rank(&r.setting), r.x));
        let path = self.setup.out.join("results.csv");
        crate::atomic::write(&path, csv(rows).as_bytes(), &self.policy).map_err(|e| state_err(&path, e))?;
        draw(&self.setup.out, rows, x_label, &self.policy)
    }

    fn state_path(&self, setting: &str) -> PathBuf {
        self.setup.out.join("state").join(format!("{setting}.safetensors"))
    }

    /// Saves the edited layers' weights after `edits` edits, and the earlier edits' keys.
    fn save(&self, model: &Model, preserved: &Preserved, setting: &str, edits: usize, hp: &Hparams) -> Result<()> {
        let path = self.state_path(setting);
        let tensors: Vec<(String, Vec<f32>, Vec<usize>)> = hp
            .layers
            .iter()
            .map(|&l| {
                let w = model.mlp_out_weight(l);
                Ok((format!("layer.{l}"), w.flatten_all()?.to_vec1::<f32>()?, w.dims().to_vec()))
            })
            .collect::<std::result::Result<_, candle_core::Error>>()
            .map_err(|e| Error::Model(e.into()))?;
        let keys: Vec<(String, Vec<f64>, Vec<usize>)> =
            preserved.earlier().iter().map(|(l, k)| (format!("earlier_keys.{l}"), k.iter().copied().collect(), k.shape().to_vec())).collect();
        let view = |dtype, s: &[usize], bytes| safetensors::tensor::TensorView::new(dtype, s.to_vec(), bytes).expect("sizes match");
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, v, s)| (n.clone(), view(safetensors::Dtype::F32, s, bytemuck::cast_slice(v))))
            .chain(keys.iter().map(|(n, v, s)| (n.clone(), view(safetensors::Dtype::F64, s, bytemuck::cast_slice(v)))))
            .collect();
        // One metadata key: safetensors writes its metadata map in no fixed order.
        let state = serde_json::json!({ "edits": edits, "setting": setting }).to_string();
        let meta = BTreeMap::from([("state".to_string(), state)]);
        let bytes =
            safetensors::tensor::serialize(views, Some(meta.into_iter().collect())).map_err(|e| Error::State { path: path.clone(), problem: e.to_string() })?;
        crate::atomic::write(&path, &bytes, &self.policy).map_err(|e| state_err(&path, e))
    }

    /// Loads the saved weights into `model` and the earlier keys into `preserved`; returns the
    /// number of edits they hold (0 when nothing was saved).
    fn restore(&self, model: &mut Model, preserved: &mut Preserved, setting: &str, hp: &Hparams) -> Result<usize> {
        let path = self.state_path(setting);
        if !path.exists() {
            return Ok(0);
        }
        let bad = |problem: String| Error::State { path: path.clone(), problem };
        let bytes = crate::read_regular(&path, crate::MAX_DATA_BYTES).map_err(|e| bad(format!("cannot resume: {}", e.source)))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let state: serde_json::Value = meta.metadata().as_ref().and_then(|m| m.get("state")).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default();
        let saved = state["setting"].as_str().unwrap_or_default();
        if saved != setting {
            return Err(bad(format!("holds the state of setting `{saved}`, not `{setting}`; delete the folder to start over")));
        }
        let edits = state["edits"].as_u64().ok_or_else(|| bad("no count of edits in its metadata; delete the folder to start over".into()))? as usize;
        let records = self.setup.requests.len();
        if edits > records {
            return Err(bad(format!("holds the state after {edits} edits, more than the {records} records in {}", self.setup.requests_path.display())));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        // Tensors are checked against the model before any is used: the file is only data.
        let expect = |name: &str, t: &safetensors::tensor::TensorView, dtype: safetensors::Dtype, shape_ok: bool, shape: &str| {
            if t.dtype() != dtype || !shape_ok {
                return Err(bad(format!("tensor `{name}` is {:?} {:?}, not the {dtype:?} {shape} this model needs", t.dtype(), t.shape())));
            }
            Ok(())
        };
        for &l in &hp.layers {
            let name = format!("layer.{l}");
            let t = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
            let dims = model.mlp_out_weight(l).dims();
            expect(&name, &t, safetensors::Dtype::F32, t.shape() == dims, &format!("{dims:?}"))?;
            let w = Tensor::from_vec(crate::checkpoint::Dtype::F32.decode(t.data()), t.shape(), model.device()).map_err(|e| Error::Model(e.into()))?;
            model.set_mlp_out_weight(l, w)?;
        }
        for (name, t) in st.tensors() {
            let Some(layer) = name.strip_prefix("earlier_keys.") else { continue };
            let l = layer.parse().ok().filter(|l| hp.layers.contains(l)).ok_or_else(|| bad(format!("tensor `{name}`: no edited layer {layer}")))?;
            let d = model.mlp_out_weight(l).dims()[1];
            expect(&name, &t, safetensors::Dtype::F64, matches!(t.shape(), [rows, _] if *rows == d), &format!("[{d}, edits]"))?;
            let k = ndarray::Array2::from_shape_vec(
                (d, t.shape()[1]),
                t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            )
            .map_err(|e| bad(e.to_string()))?;
            preserved.remember(l, &k);
        }
        Ok(edits)
    }
}

fn state_err(path: &Path, e: std::io::Error) -> Error {
    Error::State { path: path.to_path_buf(), problem: e.to_string() }
}

fn progress(setting: &str, len: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::new(len).with_position(pos);
    bar.set_style(ProgressStyle::with_template("{msg:8} {bar:30} {pos}/{len} edits  ETA {eta}").expect("valid template"));
    bar.set_message(setting.to_string());
    bar
}

/// The rows as CSV with a header.
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from("setting,x,metric,value\n");
    for r in rows {
        s.push_str(&format!("{},{},{},{}\n", r.setting, r.x, r.metric, r.value));
    }
    s
}

/// Rows from a results file written by [`csv`]; none if it does not exist.
fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = match crate::read_regular_text(path, crate::MAX_DATA_BYTES) {
        Ok(t) => t,
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_err(path, e.source)),
    };
    text.lines()
        .enumerate()
        .skip(1)
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || Error::State { path: path.to_path_buf(), problem: format!("line {}: not `setting,x,metric,value`", i + 1) };
            match f[..] {
                [setting, x, metric, value] => {
                    Ok(Row { setting: setting.into(), x: x.parse().map_err(|_| bad())?, metric: metric.into(), value: value.parse().map_err(|_| bad())? })
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

/// One run for [`compare`]: the output folder of an `experiment` and the name it is drawn under.
/// Folders given one name are one run: one colour, a line per setting of every folder.
#[derive(Clone, Debug, PartialEq)]
pub struct RunFolder {
    pub name: String,
    pub folder: PathBuf,
}

impl std::str::FromStr for RunFolder {
    type Err = String;

    /// `NAME=FOLDER`, or a bare `FOLDER` named after its last component. The text before the
    /// first `=` is a name only if it is letters, digits, `-`, `_`, `.` and `+`: `runs/k=40`
    /// is a folder (write `./k=40` for a folder of that name in the current one).
    fn from_str(arg: &str) -> std::result::Result<Self, String> {
        let is_name = |n: &str| !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || "-_.+".contains(c));
        let (name, folder) = match arg.split_once('=') {
            Some((name, folder)) if is_name(name) && !folder.is_empty() => (name.to_string(), PathBuf::from(folder)),
            _ => {
                let folder = PathBuf::from(arg);
                let name = folder.file_name().map_or_else(|| arg.to_string(), |n| n.to_string_lossy().into_owned());
                (name, folder)
            }
        };
        if name.contains([',', '\n', '\r']) {
            return Err(format!("run name `{name}` would break the CSV; name it with NAME=FOLDER"));
        }
        Ok(RunFolder { name, folder })
    }
}

/// Draws runs side by side into `out`: per metric one chart, a line per run and setting
/// (colour by run, solid for the first setting and dashed for the others), the number of edits
/// on a log axis, the metric on a log axis where it spans over a decade, and the unedited
/// value as a black dashed line. `out/results.csv` holds every row with its run's name. The
/// CSV and charts in `out` are rewritten, but never a run's results. Two folders of one run
/// may not hold the same setting.
pub fn compare(runs: &[RunFolder], out: &Path) -> Result<()> {
    let policy = Policy::rewrite().reading(runs.iter().map(|r| r.folder.join("results.csv")));
    let mut all: Vec<(String, Row)> = Vec::new();
    let mut owner: BTreeMap<(&str, String), &Path> = BTreeMap::new();
    for run in runs {
        let path = run.folder.join("results.csv");
        let rows = read_rows(&path)?;
        if rows.is_empty() {
            return Err(Error::State { path, problem: "no results (is this an experiment's output folder?)".into() });
        }
        let settings: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.setting.as_str()).collect();
        for setting in settings {
            if let Some(other) = owner.insert((&run.name, setting.to_string()), &run.folder) {
                let problem = format!("setting `{setting}` of run `{}` is also in {}; give the two folders different names", run.name, other.display());
                return Err(Error::State { path, problem });
            }
        }
        all.extend(rows.into_iter().map(|r| (run.name.clone(), r)));
    }
    std::fs::create_dir_all(out).map_err(|e| state_err(out, e))?;
    let mut text = String::from("run,setting,x,metric,value\n");
    all.iter().for_each(|(run, r)| text.push_str(&format!("{run},{},{},{},{}\n", r.setting, r.x, r.metric, r.value)));
    let path = out.join("results.csv");
    crate::atomic::write(&path, text.as_bytes(), &policy).map_err(|e| state_err(&path, e))?;
    let mut lines: Vec<(&str, &str)> = Vec::new();
    for (run, r) in &all {
        if r.x > 0 && !lines.contains(&(run.as_str(), r.setting.as_str())) {
            lines.push((run, &r.setting));
        }
    }
    let metrics: std::collections::BTreeSet<&str> = all.iter().map(|(_, r)| r.metric.as_str()).collect();
    let x_max = all.iter().map(|(_, r)| r.x).max().unwrap_or(1).max(1) as f64;
    for metric in metrics {
        let mut order: Vec<&str> = Vec::new();
        let mut series: Vec<Series> = Vec::new();
        for &(run, setting) in &lines {
            if !order.contains(&run) {
                order.push(run);
            }
            let first = lines.iter().find(|l| l.0 == run).map(|l| l.1) == Some(setting);
            let points: Vec<(f64, f64)> =
                all.iter().filter(|(n, r)| n == run && r.setting == setting && r.metric == metric && r.x > 0).map(|(_, r)| (r.x as f64, r.value)).collect();
            if !points.is_empty() {
                series.push(Series { label: format!("{run} {setting}"), points, colour: order.len() - 1, dashed: !first });
            }
        }
        if let Some((_, r)) = all.iter().find(|(_, r)| r.x == 0 && r.metric == metric) {
            series.push(Series { label: "unedited".into(), points: vec![(1.0, r.value), (x_max, r.value)], colour: 6, dashed: true });
        }
        let values = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (lo, hi) = values().fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let axes = plot::Axes { log_x: true, log_y: lo > 0.0 && hi / lo > 10.0 };
        plot::lines(&out.join(format!("{}.png", metric.replace('/', "-"))), metric, "edits", metric, &series, axes, &policy)?;
    }
    Ok(())
}

/// One line plot per metric (a line per setting), and bars of the edit metrics per setting at
/// the largest x every setting has reached.
fn draw(out: &Path, rows: &[Row], x_label: &str, policy: &Policy) -> Result<()> {
    let metrics: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
    let mut settings: Vec<&str> = Vec::new();
    for r in rows {
        if !settings.contains(&r.setting.as_str()) {
            settings.push(&r.setting);
        }
    }
    for metric in &metrics {
        let series: Vec<Series> = settings
            .iter()
            .enumerate()
            .map(|(i, s)| Series {
                label: s.to_string(),
                points: rows.iter().filter(|r| r.setting == *s && r.metric == *metric).map(|r| (r.x as f64, r.value)).collect(),
                colour: i,
                dashed: false,
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        plot::lines(&out.join(format!("{}.png", metric.replace('/', "-"))), metric, x_label, metric, &series, plot::Axes::default(), policy)?;
    }
    // Bars compare settings at the largest x all of them reached; one that has only just
    // started (its x = 0 row alone) is left out rather than holding every bar at 0.
    settings.retain(|s| rows.iter().any(|r| r.setting == *s && r.x > 0));
    let last = settings.iter().map(|s| rows.iter().filter(|r| r.setting == *s).map(|r| r.x).max().unwrap_or(0)).min().unwrap_or(0);
    let bars: Vec<Series> = ["reliability", "generalization", "locality"]
        .iter()
        .enumerate()
        .map(|(i, m)| Series {
            label: m.to_string(),
            colour: i,
            dashed: false,
            points: settings
                .iter()
                .map(|s| rows.iter().find(|r| r.setting == *s && r.x == last && r.metric == *m).map_or((0.0, 0.0), |r| (0.0, r.value)))
                .collect(),
        })
        .collect();
    if last > 0 {
        let groups: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        plot::bars(&out.join("rel-gen-loc.png"), &format!("after {last} ({x_label})"), "score", &groups, &bars, policy)?;
    }
    Ok(())
}
