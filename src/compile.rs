//! The compile pipeline, in one place: a model folder (with parent patches overlaid), a method
//! with its hyperparameters (defaults, then overrides in order), the key statistics it needs and
//! the context templates → a [`Compiler`] that edits facts in memory and emits patches.
//! `factpatch compile`/`edit`, experiments, tests and benches all go through it.

use crate::apply::{self, Overlay, Stack};
use crate::checkpoint::{Checkpoint, Tensors};
use crate::edit::{self, request::Request, FactReport, Hparams, LayerUpdate, Method, Preserved, Provenance};
use crate::model::{self, Model};
use crate::patch::Encoded;
use crate::stats;
use crate::tokenize::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything that can go wrong setting up or running a compile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or running the model, or the edit itself.
    #[error(transparent)]
    Edit(#[from] edit::Error),
    /// The parent patches do not fit the model.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// Computing, finding or reading key statistics.
    #[error(transparent)]
    Stats(#[from] stats::Error),
    /// Encoding the patch.
    #[error(transparent)]
    Patch(#[from] crate::patch::Error),
    /// Reading MEND's editor, or an editor that does not fit (boxed: its errors are large).
    #[error(transparent)]
    Mend(Box<crate::mend::Error>),
    /// The method needs key statistics and none were given or cached.
    #[error("{method:?} needs key statistics of layers {layers:?} and the cache {cache} has none for this model: add --corpus FILE (plain text or JSONL, e.g. fixtures/corpus/sotu.txt) to compute them once, or --stats FILE")]
    NoStats { method: Method, layers: Vec<usize>, cache: PathBuf },
}

impl From<model::Error> for Error {
    fn from(e: model::Error) -> Self {
        Error::Edit(e.into())
    }
}

impl From<crate::mend::Error> for Error {
    fn from(e: crate::mend::Error) -> Self {
        Error::Mend(Box::new(e))
    }
}

impl From<crate::checkpoint::Error> for Error {
    fn from(e: crate::checkpoint::Error) -> Self {
        Error::Edit(model::Error::from(e).into())
    }
}

impl From<crate::tokenize::Error> for Error {
    fn from(e: crate::tokenize::Error) -> Self {
        Error::Edit(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where the key statistics come from.
#[derive(Clone, Debug)]
pub enum StatsSource {
    /// A statistics file (`formats/stats.md`).
    File(PathBuf),
    /// Computed from a corpus (or found in the cache for exactly that request), `tokens` at most.
    Corpus { files: Vec<PathBuf>, tokens: u64 },
    /// The cache's best statistics for this model covering the edited layers, whatever corpus
    /// they came from.
    Cached,
}

/// What to compile with.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The model folder.
    pub model: PathBuf,
    /// Patches already applied to the model, in order: edits are made on top of them and the
    /// patch records the last as its parent.
    pub on: Vec<PathBuf>,
    pub method: Method,
    /// Hyperparameter overrides after the method's defaults, in order: `KEY=JSON` (see
    /// [`Hparams::set`]).
    pub overrides: Vec<String>,
    pub stats: StatsSource,
    /// The statistics cache (AlphaEdit's projectors are kept there too).
    pub cache: PathBuf,
    /// MEND's trained editor file (`formats/mend.md`).
    pub editor: Option<PathBuf>,
    /// Show progress bars (statistics).
    pub progress: bool,
}

impl Spec {
    /// A spec with the method's defaults, no parent patches, statistics from the default cache.
    pub fn new(model: &Path, method: Method) -> Self {
        Spec {
            model: model.into(),
            on: Vec::new(),
            method,
            overrides: Vec::new(),
            stats: StatsSource::Cached,
            cache: stats::default_cache_dir(),
            editor: None,
            progress: false,
        }
    }
}

/// The compile options every front end has (the CLI's flags, the Python `compile`) as
/// hyperparameter overrides, in this order: RECT's k, the template seed, MEMIT's λ and the
/// layers when given, then the `KEY=JSON` assignments of `sets`.
pub fn overrides(rect_k: f64, seed: u64, mom2_weight: Option<f64>, layers: Option<&[usize]>, sets: &[String]) -> Vec<String> {
    let mut overrides = vec![format!("rect_k={rect_k}"), format!("seed={seed}")];
    if let Some(w) = mom2_weight {
        overrides.push(format!("mom2_weight={w}"));
    }
    if let Some(layers) = layers {
        overrides.push(format!("layers={layers:?}"));
    }
    overrides.extend(sets.iter().cloned());
    overrides
}

/// The statistics a compile used.
#[derive(Clone, Debug)]
pub struct StatsUsed {
    /// The file id (blake3 of its bytes), recorded in every patch.
    pub id: String,
    pub path: PathBuf,
    pub tokens: u64,
    /// Whether they were found rather than computed now.
    pub cached: bool,
}

/// A compiled patch.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub patch: Encoded,
    pub reports: Vec<FactReport>,
    /// Wall time of the edit itself (the model is already loaded).
    pub seconds: f64,
}

/// A model ready to edit: the weights (parents overlaid) loaded once, the hyperparameters
/// resolved, the statistics and templates in hand. Cloning it is cheap (tensors are shared
/// until an edit replaces them), so one compiler can start several independent runs.
#[derive(Clone)]
pub struct Compiler {
    /// The model as edited so far (its parent patches included).
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub hp: Hparams,
    /// The key statistics and, for AlphaEdit, the keys of facts edited earlier.
    pub preserved: Preserved,
    /// Context templates, sampled once (as the peers do) and reused for every edit.
    pub templates: Vec<Vec<String>>,
    pub stats: Option<StatsUsed>,
    /// MEND's editor and its file's id and path.
    editor: Option<(Arc<crate::mend::Editor>, String, PathBuf)>,
    base: Arc<Checkpoint>,
    /// The base's identity, recorded in every patch.
    base_identity: String,
    parents: Arc<Stack>,
    model_name: String,
}

impl Compiler {
    /// Opens `spec.model`, overlays the parent patches, resolves the hyperparameters, finds (or
    /// computes) the statistics and samples the templates. The weights are read once.
    pub fn open(spec: &Spec) -> Result<Self> {
        let config = model::Config::read(&spec.model)?;
        let mut hp = Hparams::defaults(spec.method, &config);
        for assignment in &spec.overrides {
            hp.set(assignment)?;
        }
        hp.check(&config)?;
        let tokenizer = Tokenizer::open(&spec.model)?;
        let base = Arc::new(Checkpoint::open(&spec.model)?);
        let parents = Arc::new(Stack::load(&spec.on)?);
        // The parents must be for this model and start their chain (`formats/patch.md`, "Base model").
        let base_identity = parents.check_model(&base, Some(&crate::checkpoint::default_hash_cache()), false)?.identity;
        let device = model::default_device()?;
        let editor = editor(spec, &hp, &config, &device, &base_identity)?;
        let (preserved, stats) = statistics(spec, &hp, &base_identity, config.max_positions)?;
        let model = Model::from_checkpoint(config, &Overlay::new(&base, &parents)?, &device)?;
        let templates = edit::context_templates(&model, &tokenizer, &hp.templates, hp.seed)?;
        let mut compiler = Compiler {
            model,
            tokenizer,
            hp,
            preserved,
            templates,
            stats,
            editor,
            base,
            base_identity,
            parents,
            model_name: spec.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if compiler.hp.value_norm == edit::ValueNorm::Anchored {
            // Values are anchored to the model as it was before any edit, parents included.
            let last = *compiler.hp.layers.iter().max().expect("checked");
            let w = original_mlp_out(&compiler.base, &compiler.model.config, last)?;
            compiler.preserved.keep_original(last, w);
        }
        if compiler.hp.method.keeps_earlier_keys() {
            // AlphaEdit and ENCORE protect the facts the parent patches edited too.
            let earlier: Vec<Request> = compiler.parents.patches().iter().flat_map(edit::request::recorded).collect();
            let c = &mut compiler;
            c.preserved.remember_requests(&c.model, &c.tokenizer, &earlier, &c.templates, &c.hp.layers)?;
        }
        Ok(compiler)
    }

    /// Edits `requests` into the in-memory model; returns the updates and per-fact reports.
    pub fn edit(&mut self, requests: &[Request]) -> Result<(Vec<LayerUpdate>, Vec<FactReport>)> {
        let editor = self.editor.as_ref().map(|(e, _, _)| e.as_ref());
        Ok(edit::compile(&mut self.model, &self.tokenizer, requests, &self.hp, &mut self.preserved, &self.templates, editor)?)
    }

    /// Edits `requests` and encodes the updates as a patch against the model as it was opened
    /// (parents overlaid), recording the last parent. Same inputs, same bytes.
    pub fn patch(&mut self, requests: &[Request]) -> Result<Compiled> {
        let started = Instant::now();
        let (updates, reports) = self.edit(requests)?;
        let seconds = started.elapsed().as_secs_f64();
        let prov = Provenance {
            model_name: self.model_name.clone(),
            base_model: Some(self.base_identity.clone()),
            stats_id: self.stats.as_ref().map(|s| s.id.clone()),
            editor_id: self.editor.as_ref().map(|(_, id, _)| id.clone()),
            parent: self.parents.patches().last().map(|p| p.id().to_string()),
            reports: &reports,
        };
        let base = Overlay::new(&self.base, &self.parents)?;
        let patch = edit::encode_patch(&base, self.model.config.family, requests, &updates, &self.hp, &prov)?;
        Ok(Compiled { patch, reports, seconds })
    }

    /// What decides the edits it makes, as JSON: the base model's identity, the parent patches,
    /// the statistics, the editor and the hyperparameters.
    pub fn recipe(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.base_identity,
            "parents": self.parents.patches().iter().map(|p| p.id()).collect::<Vec<_>>(),
            "stats": self.stats.as_ref().map(|s| &s.id),
            "editor": self.editor.as_ref().map(|(_, id, _)| id),
            "hparams": self.hp,
        })
    }

    /// What it read: the model folder, the parent patches, the statistics file and the editor.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let parents = self.parents.patches().iter().map(|p| p.path().to_path_buf());
        let editor = self.editor.iter().map(|(_, _, path)| path.clone());
        std::iter::once(self.base.dir().to_path_buf()).chain(parents).chain(self.stats.iter().map(|s| s.path.clone())).chain(editor).collect()
    }
}

/// MEND's editor, read and checked against the model (its identity `base_identity`, hex) and
/// the hyperparameters' layers; none for the other methods, which refuse one.
fn editor(
    spec: &Spec,
    hp: &Hparams,
    cfg: &model::Config,
    device: &candle_core::Device,
    base_identity: &str,
) -> Result<Option<(Arc<crate::mend::Editor>, String, PathBuf)>> {
    let path = match (&spec.editor, spec.method) {
        (None, Method::Mend) => return Err(edit::Error::NoEditor.into()),
        (None, _) => return Ok(None),
        (Some(path), Method::Mend) => path,
        (Some(_), m) => return Err(edit::Error::Hparams(format!("--editor is MEND's; {m:?} takes none")).into()),
    };
    let f = crate::mend::read(path, device)?;
    let problem = if f.meta.model != base_identity {
        Some(format!("trained for the model {}, not {} ({base_identity})", f.meta.model, spec.model.display()))
    } else if f.meta.layers != hp.layers {
        Some(format!("edits layers {:?}, the hyperparameters ask for {:?}: pass --layers to match", f.meta.layers, hp.layers))
    } else if (f.meta.d_in, f.meta.d_out) != (cfg.intermediate_size, cfg.hidden_size) {
        Some(format!("edits [{}, {}] projections, the model's are [{}, {}]", f.meta.d_out, f.meta.d_in, cfg.hidden_size, cfg.intermediate_size))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(crate::mend::Error::Mismatch { path: path.clone(), problem }.into());
    }
    Ok(Some((Arc::new(f.editor), f.id, path.clone())))
}

/// Layer `layer`'s MLP output projection as `base` stores it, in the edit view `[out, in]`.
fn original_mlp_out(base: &Checkpoint, config: &model::Config, layer: usize) -> Result<ndarray::Array2<f64>> {
    let proj = &config.family.mlp_out;
    let (out, inp) = (config.hidden_size, config.intermediate_size);
    let stored = match proj.orientation {
        model::Orientation::OutIn => [out, inp],
        model::Orientation::InOut => [inp, out],
    };
    let t = base.tensor_with_shape(&proj.at(layer), &stored)?;
    let w = ndarray::Array2::from_shape_vec((stored[0], stored[1]), t.to_f32().iter().map(|&x| x as f64).collect()).expect("shape checked");
    Ok(match proj.orientation {
        model::Orientation::OutIn => w,
        model::Orientation::InOut => w.reversed_axes().as_standard_layout().into_owned(),
    })
}

/// The key statistics `hp` needs (none for KN, or ROME without the C⁻¹ direction), for the model
/// of identity `base_identity` (hex) and `max_positions` positions: corpus windows are the
/// statistics' default length, or the model's context where that is shorter.
fn statistics(spec: &Spec, hp: &Hparams, base_identity: &str, max_positions: usize) -> Result<(Preserved, Option<StatsUsed>)> {
    if !hp.needs_stats() {
        return Ok((Preserved::default(), None));
    }
    let (stats, used) = match &spec.stats {
        StatsSource::File(path) => {
            let s = stats::Stats::read(path)?;
            let tokens = s.meta.tokens;
            (s, StatsUsed { id: stats::file_id(path)?, path: path.clone(), tokens, cached: false })
        }
        StatsSource::Corpus { files, tokens } => {
            let mut req = stats::Request::new(&spec.model, files);
            req.layers = Some(hp.layers.clone());
            req.max_tokens = Some(*tokens);
            req.seq_len = req.seq_len.min(max_positions);
            let o = stats::find_or_compute(&req, &spec.cache, spec.progress)?;
            let used = StatsUsed { id: o.id, path: o.paths[0].clone(), tokens: o.stats.meta.tokens, cached: o.cached };
            (o.stats, used)
        }
        StatsSource::Cached => {
            let found = stats::find_in_cache(&spec.cache, base_identity, &hp.layers)?;
            let (path, _) = found.ok_or_else(|| Error::NoStats { method: hp.method, layers: hp.layers.clone(), cache: spec.cache.clone() })?;
            let s = stats::Stats::read(&path)?;
            let tokens = s.meta.tokens;
            (s, StatsUsed { id: stats::file_id(&path)?, path, tokens, cached: true })
        }
    };
    let preserved: Preserved = stats.layers.iter().map(|(l, s)| (*l, s.second_moment())).collect();
    // Projectors and factors are kept beside the statistics they come from.
    Ok((preserved.keep_derived(&spec.cache, &used.id), Some(used)))
}
