//! The edit compiler: requests → keys and target vectors on the model → a closed form (ROME,
//! MEMIT, EMMET, AlphaEdit) or knowledge-neuron attribution (KN) → RECT. Updates are applied to
//! the in-memory model as they are made (MEMIT reads each layer's keys after the layers before
//! it changed), and returned as low-rank factors.

pub mod kn;
pub mod request;
pub mod solve;
pub mod target;

use crate::checkpoint::Tensors;
use crate::model::{self, Family, Model, Orientation, Sampling};
use crate::patch::{BaseTensor, Delta, Edit as PatchEdit, Factors, Manifest, Method as PatchMethod, ModelInfo};
use crate::tokenize::Tokenizer;
use candle_core::{DType, Tensor};
use ndarray::{Array1, Array2};
use request::Request;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use target::{Edit, FactPrompts, Prompt};

/// How many facts' target vectors are optimised in one batch.
const TARGET_BATCH: usize = 16;

/// Everything that can go wrong compiling an edit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request cannot be compiled against this model.
    #[error("{origin}: {problem}")]
    Request { origin: String, problem: String },
    /// The hyperparameters do not fit the model.
    #[error("{0}")]
    Hparams(String),
    /// Statistics for a layer are missing.
    #[error("no key statistics for layer {0}: compute them with `factpatch stats`")]
    MissingStats(usize),
    #[error(transparent)]
    Model(#[from] model::Error),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenize::Error),
    #[error(transparent)]
    Solve(#[from] solve::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The editing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Rank-one update of one layer per fact (Meng et al. 2022).
    Rome,
    /// Batched update spread over several layers (Meng et al. 2023).
    Memit,
    /// Batched update that maps each key to its target exactly (Gupta et al. 2024).
    Emmet,
    /// MEMIT confined to the null space of the preserved keys (Fang et al. 2025).
    #[value(name = "alphaedit")]
    AlphaEdit,
    /// Knowledge neurons: attribution by integrated gradients, then embedding swaps (Dai et al. 2022).
    Kn,
}

/// Hyperparameters (defaults: `../shared/reference/algorithms.md` §3, Llama column).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Hparams {
    pub method: Method,
    /// Edited layers (ROME: one).
    pub layers: Vec<usize>,
    /// Target-vector optimisation: Adam steps, learning rate, weight decay, norm clamp, KL factor.
    pub v_steps: usize,
    pub v_lr: f64,
    pub v_weight_decay: f64,
    pub clamp_norm: f64,
    pub kl_factor: f64,
    /// MEMIT's λ on the key second moment. The peers' Llama-7B value is 15,000; on SmolLM2-135M
    /// (10 CounterFact facts, batch) 15,000 gave efficacy 0.70, 5,000 gave 0.90 and 1,500 gave
    /// 1.00 with neighbourhood 0.94× its pre-edit value, so 1,500 is the default.
    pub mom2_weight: f64,
    /// ROME: use C⁻¹ for the update direction.
    pub mom2_adjustment: bool,
    /// Context templates: groups of (count, length in tokens), sampled with `seed`.
    pub templates: Vec<(usize, usize)>,
    pub seed: u64,
    /// RECT: keep the top-k% of each update by relative change; 100 keeps everything.
    pub rect_k: f64,
    /// EMMET: μ, the ridge on the equality constraints (0: exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emmet_lambda: Option<f64>,
    /// AlphaEdit: the eigenvalue of C below which a direction counts as unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nullspace_threshold: Option<f64>,
    /// AlphaEdit: α, the ridge on the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// KN: integrated-gradient steps, the share of a prompt's largest attribution a neuron
    /// needs, and the share of prompts that must pick it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kn: Option<KnParams>,
}

/// Knowledge-neuron settings (EasyEdit's: the family's steps — 20 for GPT-2, 1 for Llama —, 0.2, 0.4).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnParams {
    pub steps: usize,
    pub threshold: f64,
    pub share: f64,
}

impl Hparams {
    /// The defaults of `method` for `model`'s family.
    pub fn defaults(method: Method, model: &Model) -> Self {
        let layers = model.config.family.default_edit_layers.to_vec();
        Hparams {
            method,
            layers: match method {
                Method::Rome | Method::Emmet => vec![layers[1]],
                Method::Memit | Method::AlphaEdit => layers,
                Method::Kn => (0..model.config.num_layers).collect(),
            },
            v_steps: 25,
            v_lr: 0.5,
            v_weight_decay: 1e-3,
            clamp_norm: 4.0,
            kl_factor: 0.0625,
            mom2_weight: 1500.0,
            mom2_adjustment: true,
            templates: match method {
                Method::Rome => vec![(10, 5), (10, 10)],
                _ => vec![(5, 10)],
            },
            seed: 0,
            rect_k: 40.0,
            emmet_lambda: (method == Method::Emmet).then_some(0.1),
            nullspace_threshold: (method == Method::AlphaEdit).then_some(2e-2),
            alpha: (method == Method::AlphaEdit).then_some(10.0),
            kn: (method == Method::Kn).then_some(KnParams { steps: model.config.family.kn_steps, threshold: 0.2, share: 0.4 }),
        }
    }

    /// Overrides one hyperparameter: `KEY=VALUE` with a JSON value, a dot for nested keys
    /// (`alpha=1`, `layers=[3,4]`, `kn.steps=5`). Only the method's own keys exist.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let bad = |why: String| Error::Hparams(format!("--set {assignment}: {why}"));
        let (key, value) = assignment.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
        let value: serde_json::Value = serde_json::from_str(value).map_err(|e| bad(format!("the value is not JSON ({e})")))?;
        let mut json = serde_json::to_value(&*self).map_err(|e| bad(e.to_string()))?;
        let mut slot = &mut json;
        for part in key.split('.') {
            slot = slot.as_object_mut().and_then(|m| m.get_mut(part)).ok_or_else(|| bad(format!("{:?} has no hyperparameter `{key}`", self.method)))?;
        }
        *slot = value;
        *self = serde_json::from_value(json).map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    /// Whether the method reads key statistics.
    pub fn needs_stats(&self) -> bool {
        match self.method {
            Method::Rome => self.mom2_adjustment,
            Method::Memit | Method::Emmet | Method::AlphaEdit => true,
            Method::Kn => false,
        }
    }

    /// A method-specific value, which `defaults` sets for that method.
    fn required<T: Copy>(&self, value: Option<T>, name: &str) -> Result<T> {
        value.ok_or_else(|| Error::Hparams(format!("{:?} needs `{name}` in its hyperparameters", self.method)))
    }

    fn check(&self, model: &Model) -> Result<()> {
        let n = model.config.num_layers;
        if self.layers.is_empty() || self.layers.iter().any(|&l| l >= n) {
            return Err(Error::Hparams(format!("layers {:?} must be non-empty and below {n}", self.layers)));
        }
        if self.method == Method::Rome && self.layers.len() != 1 {
            return Err(Error::Hparams("ROME edits exactly one layer".into()));
        }
        if let Some(kn) = self.kn {
            if kn.steps == 0 || !(0.0..=1.0).contains(&kn.threshold) || !(0.0..=1.0).contains(&kn.share) {
                return Err(Error::Hparams(format!("KN: steps {} must be > 0, threshold {} and share {} in [0, 1]", kn.steps, kn.threshold, kn.share)));
            }
        }
        if !(self.rect_k > 0.0 && self.rect_k <= 100.0) {
            return Err(Error::Hparams(format!("RECT k = {} must be in (0, 100]", self.rect_k)));
        }
        Ok(())
    }
}

/// One layer's update in the edit view (`[out, in]`): `ΔW = U·Vᵀ`, masked by RECT at `rect_k`.
#[derive(Clone, Debug)]
pub struct LayerUpdate {
    pub layer: usize,
    /// `[d_out, r]`, row-major f32.
    pub u: Array2<f32>,
    /// `[d_in, r]`, row-major f32.
    pub v: Array2<f32>,
    pub rect_k: f64,
}

/// Per-fact diagnostics of a compile.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FactReport {
    pub subject: String,
    pub target_new: String,
    /// Optimisation steps taken (KN: integrated-gradient steps).
    pub steps: usize,
    /// The target loss reached (KN: the new target's NLL after the edit).
    pub loss: f64,
    /// KN: the neurons edited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<usize>,
}

/// What an update must preserve: the corpus's key second moments `E[k kᵀ]` per layer (with
/// their null-space projectors, computed once on first use, and kept on disk when a store is
/// given) and, for AlphaEdit, the keys of the facts edited earlier.
#[derive(Clone, Debug, Default)]
pub struct Preserved {
    moments: BTreeMap<usize, Arc<Array2<f64>>>,
    /// `(layer, τ bits)` → projector.
    nullspaces: BTreeMap<(usize, u64), Arc<Array2<f64>>>,
    /// Layer → earlier facts' keys as columns `[d_in, n]`.
    earlier: BTreeMap<usize, Array2<f64>>,
    /// Where projectors persist between runs: a folder, and the id of the statistics they derive from.
    store: Option<(PathBuf, String)>,
}

impl FromIterator<(usize, Array2<f64>)> for Preserved {
    fn from_iter<I: IntoIterator<Item = (usize, Array2<f64>)>>(moments: I) -> Self {
        Preserved { moments: moments.into_iter().map(|(l, c)| (l, Arc::new(c))).collect(), ..Preserved::default() }
    }
}

impl Preserved {
    /// Layer `layer`'s key second moment.
    pub fn moment(&self, layer: usize) -> Result<&Array2<f64>> {
        self.moments.get(&layer).map(|c| c.as_ref()).ok_or(Error::MissingStats(layer))
    }

    /// Keeps the null-space projectors in `dir`, named after the statistics' id `stats_id`, so
    /// that each is computed once per statistics set and τ rather than once per run.
    pub fn keep_projectors(mut self, dir: &Path, stats_id: &str) -> Self {
        self.store = Some((dir.to_path_buf(), stats_id.to_string()));
        self
    }

    /// The projector onto the directions of `moment(layer)` with eigenvalues below `tau`: from
    /// memory, else from the store (the exact f64 bytes it was computed as), else computed
    /// (and stored; a store that cannot be written only means computing it again next time).
    pub fn nullspace(&mut self, layer: usize, tau: f64) -> Result<Arc<Array2<f64>>> {
        if let Some(p) = self.nullspaces.get(&(layer, tau.to_bits())) {
            return Ok(p.clone());
        }
        let c = self.moment(layer)?;
        let file = self.store.as_ref().map(|(dir, id)| dir.join(format!("{id}.nullspace-{layer}-{:016x}.safetensors", tau.to_bits())));
        let p = match file.as_deref().and_then(|f| read_projector(f, c.nrows())) {
            Some(p) => p,
            None => {
                let p = solve::nullspace(c, tau)?;
                if let Some(f) = &file {
                    let _ = write_projector(f, &p);
                }
                p
            }
        };
        let p = Arc::new(p);
        self.nullspaces.insert((layer, tau.to_bits()), p.clone());
        Ok(p)
    }

    /// Layer → the keys of earlier edits (columns), as AlphaEdit accumulated them.
    pub fn earlier(&self) -> &BTreeMap<usize, Array2<f64>> {
        &self.earlier
    }

    /// Adds `keys` (columns) to `layer`'s earlier keys.
    pub fn remember(&mut self, layer: usize, keys: &Array2<f64>) {
        let all = match self.earlier.remove(&layer) {
            Some(old) => ndarray::concatenate![ndarray::Axis(1), old, keys.view()],
            None => keys.clone(),
        };
        self.earlier.insert(layer, all);
    }

    /// `Σ k kᵀ` over `layer`'s earlier keys.
    fn earlier_moment(&self, layer: usize, d: usize) -> Array2<f64> {
        self.earlier.get(&layer).map_or_else(|| Array2::zeros((d, d)), |k| k.dot(&k.t()))
    }

    /// Remembers, for AlphaEdit, the keys of facts that earlier patches edited, computed on
    /// `model` (which carries those patches) as the compile computes keys.
    pub fn remember_requests(&mut self, model: &Model, tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>], layers: &[usize]) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        for &layer in layers {
            let keys: Vec<Array1<f64>> = request_keys(model, tok, requests, templates, layer)?.into_iter().map(|(mean, _)| mean).collect();
            self.remember(layer, &stack(&keys));
        }
        Ok(())
    }
}

/// A stored projector, if `path` holds one of shape `[d, d]` in f64.
fn read_projector(path: &Path, d: usize) -> Option<Array2<f64>> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("projector").ok()?;
    if t.dtype() != safetensors::Dtype::F64 || t.shape() != [d, d] {
        return None;
    }
    let values = t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    Array2::from_shape_vec((d, d), values).ok()
}

/// Stores projector `p` at `path` (safetensors, one F64 tensor `projector`), atomically.
fn write_projector(path: &Path, p: &Array2<f64>) -> std::io::Result<()> {
    let bytes: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, p.shape().to_vec(), &bytes).map_err(std::io::Error::other)?;
    let file = safetensors::serialize([("projector", view)], None).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    crate::atomic::write(path, &file, true)
}

/// Samples the context templates: `{}` alone, then for each group `(n, len)`, `n` seeded top-5
/// continuations of short openers, each turned into `"<text>. {}"`.
pub fn context_templates(model: &Model, tok: &Tokenizer, groups: &[(usize, usize)], seed: u64) -> Result<Vec<Vec<String>>> {
    const OPENERS: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];
    let mut out = vec![vec!["{}".to_string()]];
    for (g, &(n, len)) in groups.iter().enumerate() {
        let prompts: Vec<Vec<u32>> =
            (0..n).map(|i| tok.ids(OPENERS[i % OPENERS.len()])).collect::<std::result::Result<_, _>>()?;
        let sampling = Sampling::TopK { k: 5, temperature: 1.0, seed: seed.wrapping_add(g as u64) };
        let gens = model::generate(model, &prompts, len, sampling, &[])?;
        let mut group = Vec::new();
        for (p, g) in prompts.iter().zip(gens) {
            let text = tok.decode(&p.iter().chain(&g).copied().collect::<Vec<_>>())?;
            group.push(format!("{}. {{}}", text.replace(['{', '}'], " ")));
        }
        out.push(group);
    }
    Ok(out)
}

/// Compiles `requests` into updates and applies them to `model` (which ends up edited).
/// `templates` come from [`context_templates`] with `hp.templates` and `hp.seed`; like the
/// peers, a run samples them once and reuses them for every later edit.
/// AlphaEdit adds the keys of the facts it edits to `preserved`.
pub fn compile(
    model: &mut Model,
    tok: &Tokenizer,
    requests: &[Request],
    hp: &Hparams,
    preserved: &mut Preserved,
    templates: &[Vec<String>],
) -> Result<(Vec<LayerUpdate>, Vec<FactReport>)> {
    hp.check(model)?;
    if hp.needs_stats() {
        for &l in &hp.layers {
            preserved.moment(l)?;
        }
    }
    let mut updates = Vec::new();
    let mut reports = Vec::new();
    match hp.method {
        Method::Rome | Method::Kn => {
            for req in requests {
                let (mut u, report) = match hp.method {
                    Method::Rome => rome(model, tok, req, hp, templates, preserved)?,
                    _ => kn::edit(model, tok, req, hp, templates)?,
                };
                updates.append(&mut u);
                reports.push(report);
            }
        }
        Method::Memit | Method::Emmet | Method::AlphaEdit => {
            let (mut u, r) = memit(model, tok, requests, hp, templates, preserved)?;
            updates.append(&mut u);
            reports.extend(r);
        }
    }
    Ok((updates, reports))
}

/// Tokenized target ids (with the leading space), refusing empty ones.
pub(crate) fn target_ids(tok: &Tokenizer, req: &Request) -> Result<Vec<u32>> {
    let ids = tok.ids(&req.target_text())?;
    if ids.is_empty() {
        return Err(Error::Request { origin: req.origin.clone(), problem: "target tokenizes to nothing".into() });
    }
    Ok(ids)
}

/// The rewriting prompts (every template, with the target) and the essence prompt.
fn optimisation_prompts(tok: &Tokenizer, req: &Request, templates: &[Vec<String>]) -> Result<FactPrompts> {
    let target = target_ids(tok, req)?;
    let rewriting = templates
        .iter()
        .flatten()
        .map(|ctx| target::prompt(tok, &ctx.replacen("{}", &req.prompt, 1), &req.subject, Some(&target), req))
        .collect::<Result<Vec<_>>>()?;
    let essence = target::prompt(tok, "{} is a", &req.subject, None, req)?;
    Ok(FactPrompts { rewriting, essence })
}

/// Keys of each request at `layer`, in one forward pass over every request × template: the
/// average within each template group and then across groups, and the key of the raw prompt
/// (`templates[0][0]` is always `{}`).
fn request_keys(model: &Model, tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>], layer: usize) -> Result<Vec<(Array1<f64>, Array1<f64>)>> {
    let prompts: Vec<Prompt> = requests
        .iter()
        .flat_map(|r| templates.iter().flatten().map(move |ctx| target::prompt(tok, &ctx.replacen("{}", &r.prompt, 1), &r.subject, None, r)))
        .collect::<Result<_>>()?;
    let keys: Vec<Vec<f64>> = target::keys(model, &prompts, &[layer])?.remove(0).to_dtype(DType::F64)?.to_vec2()?;
    let per_request = prompts.len() / requests.len();
    Ok(keys
        .chunks(per_request)
        .map(|k| {
            let mut start = 0;
            let mut mean = Array1::<f64>::zeros(k[0].len());
            for group in templates {
                let sum = k[start..start + group.len()].iter().fold(Array1::zeros(mean.len()), |a, r| a + &Array1::from(r.clone()));
                mean += &(sum / (group.len() * templates.len()) as f64);
                start += group.len();
            }
            (mean, Array1::from(k[0].clone()))
        })
        .collect())
}

fn rome(
    model: &mut Model,
    tok: &Tokenizer,
    req: &Request,
    hp: &Hparams,
    templates: &[Vec<String>],
    preserved: &Preserved,
) -> Result<(Vec<LayerUpdate>, FactReport)> {
    let layer = hp.layers[0];
    // ROME weighs every template equally.
    let flat = vec![templates.iter().flatten().cloned().collect::<Vec<_>>()];
    let (k_mean, k_prompt) = request_keys(model, tok, std::slice::from_ref(req), &flat, layer)?.remove(0);
    let prompts = optimisation_prompts(tok, req, templates)?;
    let t = target::optimize(model, &[prompts], Edit::MlpOut(layer), hp)?.remove(0);
    let c = if hp.mom2_adjustment { Some(preserved.moment(layer)?) } else { None };
    let (u, v) = solve::rome(&Array1::from(t.delta.clone()), &k_mean, &k_prompt, c)?;
    let update = commit(model, layer, &u, &v, hp.rect_k)?;
    Ok((vec![update], FactReport { subject: req.subject.clone(), target_new: req.target_new.clone(), steps: t.steps, loss: t.loss, neurons: None }))
}

/// MEMIT's schedule (targets at the last edited layer, the residual spread over the layers in
/// order), solved by MEMIT's, EMMET's or AlphaEdit's closed form.
fn memit(
    model: &mut Model,
    tok: &Tokenizer,
    requests: &[Request],
    hp: &Hparams,
    templates: &[Vec<String>],
    preserved: &mut Preserved,
) -> Result<(Vec<LayerUpdate>, Vec<FactReport>)> {
    let last = *hp.layers.iter().max().expect("checked non-empty");
    let mut targets = Vec::new();
    let mut reports = Vec::new();
    // Facts are optimised together, a bounded number at a time.
    for chunk in requests.chunks(TARGET_BATCH) {
        let prompts = chunk.iter().map(|r| optimisation_prompts(tok, r, templates)).collect::<Result<Vec<_>>>()?;
        for (req, t) in chunk.iter().zip(target::optimize(model, &prompts, Edit::Residual(last), hp)?) {
            reports.push(FactReport { subject: req.subject.clone(), target_new: req.target_new.clone(), steps: t.steps, loss: t.loss, neurons: None });
            // z = h + δ at the last edited layer.
            targets.push(Array1::from(t.init) + Array1::from(t.delta));
        }
    }
    let raw: Vec<Prompt> = requests
        .iter()
        .map(|r| target::prompt(tok, &r.prompt, &r.subject, None, r))
        .collect::<Result<_>>()?;
    let mut layers = hp.layers.clone();
    layers.sort_unstable();
    let mut updates = Vec::new();
    for (i, &layer) in layers.iter().enumerate() {
        let keys: Vec<Array1<f64>> = request_keys(model, tok, requests, templates, layer)?.into_iter().map(|(mean, _)| mean).collect();
        let k = stack(&keys);
        // What the last edited layer holds now, for each raw prompt.
        let now = current_residuals(model, &raw, last)?;
        let r = (stack(&targets) - stack(&now)) / (layers.len() - i) as f64;
        let (u, v) = match hp.method {
            Method::Emmet => solve::emmet(&r, &k, preserved.moment(layer)?, hp.mom2_weight, hp.required(hp.emmet_lambda, "emmet_lambda")?)?,
            Method::AlphaEdit => {
                let p = preserved.nullspace(layer, hp.required(hp.nullspace_threshold, "nullspace_threshold")?)?;
                let s_p = preserved.earlier_moment(layer, k.nrows());
                let uv = solve::alphaedit(&r, &k, &s_p, &p, hp.required(hp.alpha, "alpha")?)?;
                preserved.remember(layer, &k);
                uv
            }
            _ => solve::memit(&r, &k, preserved.moment(layer)?, hp.mom2_weight)?,
        };
        updates.push(commit(model, layer, &u, &v, hp.rect_k)?);
    }
    Ok((updates, reports))
}

fn current_residuals(model: &Model, prompts: &[Prompt], layer: usize) -> Result<Vec<Array1<f64>>> {
    let batch = model::Batch::right_padded(&prompts.iter().map(|p| p.ids.clone()).collect::<Vec<_>>());
    let hooks = model::Hooks { residuals: vec![layer], stop_after: Some(layer), ..Default::default() };
    let trace = model.forward(&batch, &hooks, None)?;
    let at: Vec<_> = prompts.iter().enumerate().map(|(i, p)| (i, p.lookup)).collect();
    let rows: Vec<Vec<f64>> = target::rows(&trace.residuals[&layer], &at)?.to_dtype(DType::F64)?.to_vec2()?;
    Ok(rows.into_iter().map(Array1::from).collect())
}

/// Columns → matrix.
pub(crate) fn stack(cols: &[Array1<f64>]) -> Array2<f64> {
    Array2::from_shape_fn((cols[0].len(), cols.len()), |(i, j)| cols[j][i])
}

/// Rounds the factors to f32 (as a patch stores them), forms ΔW in the stored layout exactly as
/// apply will (same product, same RECT mask and tie order), and writes `W + ΔW` into the model.
pub(crate) fn commit(model: &mut Model, layer: usize, u: &Array2<f64>, v: &Array2<f64>, rect_k: f64) -> Result<LayerUpdate> {
    let update = LayerUpdate { layer, u: u.mapv(|x| x as f32), v: v.mapv(|x| x as f32), rect_k };
    let orientation = model.config.family.mlp_out.orientation;
    let w = model.mlp_out_weight(layer);
    let (rows, cols) = w.dims2()?;
    let stored = match orientation {
        Orientation::OutIn => w.clone(),
        Orientation::InOut => w.t()?.contiguous()?,
    };
    let shape = stored.dims().to_vec();
    let w_stored: Vec<f32> = stored.flatten_all()?.to_vec1()?;
    let mut delta = crate::apply::product(&update.stored_factors(orientation), &shape);
    crate::rect::mask(&mut delta, &w_stored, rect_k, RECT_EPS);
    let updated: Vec<f32> = w_stored.iter().zip(&delta).map(|(a, b)| a + b).collect();
    let updated = Tensor::from_vec(updated, shape.as_slice(), model.device())?;
    let updated = match orientation {
        Orientation::OutIn => updated,
        Orientation::InOut => updated.t()?.contiguous()?,
    };
    debug_assert_eq!(updated.dims(), [rows, cols]);
    model.set_mlp_out_weight(layer, updated)?;
    Ok(update)
}

/// RECT's ε in |ΔW|/max(|W|, ε).
pub const RECT_EPS: f32 = 1e-8;

impl LayerUpdate {
    /// The factors in the stored tensor's layout (`[in, out]` storage swaps them).
    pub fn stored_factors(&self, orientation: Orientation) -> Factors {
        let (u, v) = match orientation {
            Orientation::OutIn => (&self.u, &self.v),
            Orientation::InOut => (&self.v, &self.u),
        };
        Factors { rank: u.ncols(), u: u.iter().copied().collect(), v: v.iter().copied().collect() }
    }
}

/// Provenance recorded in a compiled patch (nothing time-dependent: same inputs, same bytes).
pub struct Provenance<'a> {
    pub model_name: String,
    pub stats_id: Option<String>,
    pub parent: Option<String>,
    pub reports: &'a [FactReport],
}

/// The patch bytes for `updates` compiled from `requests` against `base` (the tensors they apply
/// to: a checkpoint, or one with the parent patches overlaid). One entry per touched tensor: a single update keeps its factors (with RECT's k
/// when it masks); several updates of one tensor are stored as their exact explicit sum.
pub fn patch_bytes(base: &dyn Tensors, family: &Family, requests: &[Request], updates: &[LayerUpdate], hp: &Hparams, prov: &Provenance) -> std::result::Result<Vec<u8>, crate::patch::Error> {
    let mut by_layer: BTreeMap<usize, Vec<&LayerUpdate>> = BTreeMap::new();
    for u in updates {
        by_layer.entry(u.layer).or_default().push(u);
    }
    let mut deltas = Vec::new();
    for (layer, ups) in by_layer {
        let name = family.mlp_out.at(layer);
        let t = base.tensor(&name).map_err(|e| crate::patch::Error::InvalidDelta { name: name.clone(), reason: e.to_string() })?;
        let factors: Vec<Factors> = ups.iter().map(|u| u.stored_factors(family.mlp_out.orientation)).collect();
        let delta = match (&ups[..], hp.rect_k < 100.0) {
            ([_], true) => Delta::LowRankRect { factors: factors[0].clone(), k: hp.rect_k, eps: RECT_EPS },
            (_, false) => Delta::LowRank(factors),
            (_, true) => {
                // Each mask was computed against the weight as the earlier updates left it.
                let mut w = t.to_f32().into_owned();
                let mut sum = vec![0f32; w.len()];
                for f in &factors {
                    let mut d = crate::apply::product(f, t.shape);
                    crate::rect::mask(&mut d, &w, hp.rect_k, RECT_EPS);
                    for ((s, w), d) in sum.iter_mut().zip(w.iter_mut()).zip(&d) {
                        *s += d;
                        *w += d;
                    }
                }
                Delta::explicit(sum)
            }
        };
        deltas.push((BaseTensor::of(&t), delta));
    }
    let mut manifest = Manifest::new(
        ModelInfo { name: prov.model_name.clone(), family: family.name.to_string() },
        PatchMethod {
            name: format!("{:?}", hp.method).to_lowercase(),
            hyperparameters: serde_json::to_value(hp)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        },
    );
    manifest.parent = prov.parent.clone();
    manifest.stats_id = prov.stats_id.clone();
    manifest.rect_k = Some(hp.rect_k);
    manifest.edits = requests
        .iter()
        .map(|r| PatchEdit {
            subject: r.subject.clone(),
            relation: r.relation.clone().unwrap_or_else(|| r.prompt.clone()),
            prompt: r.prompt.clone(),
            target_old: r.target_true.clone().unwrap_or_default(),
            target_new: r.target_new.clone(),
        })
        .collect();
    let n = prov.reports.len().max(1) as f64;
    manifest.metrics.insert("mean_target_loss".into(), prov.reports.iter().map(|r| r.loss).sum::<f64>() / n);
    manifest.metrics.insert("mean_optimisation_steps".into(), prov.reports.iter().map(|r| r.steps as f64).sum::<f64>() / n);
    crate::patch::encode(manifest, deltas)
}
