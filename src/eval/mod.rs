//! Evaluation: how well edits took and what they cost. Edit metrics on request files
//! ([`edits`], in two protocols that do not compare) and general abilities on task files
//! ([`general`]), all read from teacher-forced log-likelihoods ([`score`]) and generations of a
//! model with patches overlaid in memory ([`Models`]). [`run`] does a whole evaluation.

pub mod answer;
pub mod edits;
pub mod fluency;
pub mod general;
pub mod report;
pub mod score;
pub mod tasks;

use crate::apply::{self, Overlay, Stack};
use crate::checkpoint::{self, Checkpoint};
use crate::edit::request;
use crate::model::{self, Config, Model};
use crate::tokenize::{self, Tokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// Everything that can go wrong evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task or text file could not be read.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// A line of a task file does not fit the task's format.
    #[error("{path}:{line}: {problem}")]
    Malformed { path: PathBuf, line: usize, problem: String },
    /// An item (or a window) does not fit the model's context.
    #[error("{path}: {what}")]
    TooLong { path: PathBuf, what: String },
    /// A file holds nothing to evaluate.
    #[error("{path}: {what}")]
    Empty { path: PathBuf, what: String },
    /// `--general` names a task that does not exist.
    #[error("unknown task `{name}` (known: {known})")]
    UnknownTask { name: String, known: String },
    /// `--general` is not `TASK=FILE` or `TASK:N=FILE`.
    #[error("`{0}`: expected TASK=FILE or TASK:N=FILE (N items, N > 0)")]
    TaskSpec(String),
    /// The request file is unusable.
    #[error(transparent)]
    Requests(#[from] request::Error),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] tokenize::Error),
    /// The model folder is unreadable.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The patches do not apply to the model.
    #[error(transparent)]
    Patch(#[from] apply::Error),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The model under evaluation and, when patches are overlaid, the unedited base it is compared
/// with (locality reads both).
pub struct Models {
    pub base: Model,
    /// The base with the patches overlaid; `None` without patches.
    pub patched: Option<Model>,
    /// The ids of the overlaid patches, in order.
    pub patch_ids: Vec<String>,
}

impl Models {
    /// Loads the model at `dir` and, with `patches`, a second copy with the patches overlaid in
    /// memory (verified as `apply` does: the stack's base model and parents, then every touched
    /// tensor's hash; nothing is written).
    pub fn load(dir: &Path, patches: &[PathBuf]) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let device = model::default_device()?;
        let base = Model::from_checkpoint(Config::read(dir)?, &ckpt, &device)?;
        if patches.is_empty() {
            return Ok(Models { base, patched: None, patch_ids: Vec::new() });
        }
        let stack = Stack::load(patches)?;
        stack.check_model(&ckpt, Some(&crate::checkpoint::default_hash_cache()), false)?;
        let patched = Model::from_checkpoint(Config::read(dir)?, &Overlay::new(&ckpt, &stack)?, &device)?;
        let patch_ids = stack.patches().iter().map(|p| p.id().to_string()).collect();
        Ok(Models { base, patched: Some(patched), patch_ids })
    }

    /// The model whose abilities are measured: the patched one, else the base.
    pub fn evaluated(&self) -> &Model {
        self.patched.as_ref().unwrap_or(&self.base)
    }
}

/// Choices shared by every evaluation.
#[derive(Clone, Debug)]
pub struct Options {
    /// Evaluate a random subset of this many items (records, task items, text windows) per
    /// file; at least 1.
    pub limit: Option<usize>,
    /// Seeds the subset and every sampler.
    pub seed: u64,
    /// Perplexity window in tokens (default: the model's context).
    pub seq_len: Option<usize>,
    /// Length of fluency generations in tokens, prompt included (ROME: 100).
    pub fluency_length: usize,
    /// Draw progress bars on the terminal.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { limit: None, seed: 0, seq_len: None, fluency_length: 100, progress: false }
    }
}

/// The indices, in increasing order, of the items evaluated out of `len`: all of them, or
/// `limit` drawn without replacement by a generator seeded with `seed`.
pub fn subset(len: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    match limit {
        Some(n) if n < len => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut picked = rand::seq::index::sample(&mut rng, len, n).into_vec();
            picked.sort_unstable();
            picked
        }
        _ => (0..len).collect(),
    }
}

/// A progress bar over `len` items labelled `label` (hidden unless `show`).
pub(crate) fn progress(show: bool, label: &str, len: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template("{msg:12} {bar:30} {pos}/{len}  {per_sec}  ETA {eta}").expect("valid template");
    bar.set_style(style);
    bar.set_message(label.to_string());
    bar
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct Plan {
    pub model: PathBuf,
    pub patches: Vec<PathBuf>,
    /// An edit request file (any format `request::read` accepts).
    pub requests: Option<PathBuf>,
    /// General-ability tasks and their files.
    pub tasks: Vec<tasks::Spec>,
    pub options: Options,
}

/// Reads every input (failing on the first bad one before any model work), loads the model and
/// patches, and evaluates.
pub fn run(plan: &Plan) -> Result<report::Report> {
    let requests = plan.requests.as_deref().map(request::read).transpose()?;
    let data = plan.tasks.iter().map(tasks::Spec::read).collect::<Result<Vec<_>>>()?;
    let tok = Tokenizer::open(&plan.model)?;
    let models = Models::load(&plan.model, &plan.patches)?;
    let edits = match (&plan.requests, requests) {
        (Some(path), Some(requests)) => Some(edits::report(&models, &tok, path, &requests, &plan.options)?),
        _ => None,
    };
    let general = data.iter().map(|d| general::run(models.evaluated(), &tok, d, &plan.options)).collect::<Result<_>>()?;
    Ok(report::Report {
        schema: report::SCHEMA,
        model: plan.model.clone(),
        patches: models.patch_ids,
        seed: plan.options.seed,
        limit: plan.options.limit,
        edits,
        general,
    })
}
