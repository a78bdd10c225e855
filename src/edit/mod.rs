//! The edit compiler: requests → keys and target vectors on the model → a closed form (ROME,
//! MEMIT, EMMET, AlphaEdit, ENCORE), knowledge-neuron attribution (KN) or a trained editor
//! network (MEND) → RECT. Updates are applied to
//! the in-memory model as they are made (MEMIT reads each layer's keys after the layers before
//! it changed), and returned as low-rank factors.

mod emit;
mod hparams;
pub mod kn;
mod preserved;
pub mod request;
pub mod solve;
pub mod target;

pub use emit::{encode_patch, Provenance};
pub use hparams::{EarlyStop, Hparams, KnParams, Method, ValueNorm};
pub use preserved::Preserved;

use crate::model::{self, Hooks, Model, Orientation, Sampling};
use crate::tokenize::Tokenizer;
use candle_core::{DType, Tensor};
use ndarray::{Array1, Array2};
use request::Request;
use target::{Edit, FactPrompts, Prompt, Stop};

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
    /// MEND was asked for without an editor.
    #[error("MEND needs a trained editor: pass --editor FILE (made by `factpatch mend train`)")]
    NoEditor,
    /// Value anchoring has no original weights for the layer it reads.
    #[error("value_norm = anchored needs the original weights of layer {0}, which the compiler keeps when it opens the model")]
    MissingOriginal(usize),
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
    /// Why the target optimisation stopped (KN has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// KN: the neurons edited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<usize>,
}

/// Samples the context templates: `{}` alone, then for each group `(n, len)`, `n` seeded top-5
/// continuations of short openers, each turned into `"<text>. {}"`.
pub fn context_templates(model: &Model, tok: &Tokenizer, groups: &[(usize, usize)], seed: u64) -> Result<Vec<Vec<String>>> {
    const OPENERS: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];
    let mut out = vec![vec!["{}".to_string()]];
    for (g, &(n, len)) in groups.iter().enumerate() {
        let prompts: Vec<Vec<u32>> = (0..n).map(|i| tok.prompt_ids(OPENERS[i % OPENERS.len()])).collect::<std::result::Result<_, _>>()?;
        let sampling = Sampling::TopK { k: 5, temperature: 1.0, seed: seed.wrapping_add(g as u64) };
        let gens = model::generate(model, &prompts, len, sampling, &[])?;
        let mut group = Vec::new();
        for (p, g) in prompts.iter().zip(gens) {
            let text = tok.decode(&p[tok.prefix().len()..].iter().chain(&g).copied().collect::<Vec<_>>())?;
            group.push(format!("{}. {{}}", text.replace(['{', '}'], " ")));
        }
        out.push(group);
    }
    Ok(out)
}

/// Compiles `requests` into updates and applies them to `model` (which ends up edited).
/// `templates` come from [`context_templates`] with `hp.templates` and `hp.seed`; like the
/// peers, a run samples them once and reuses them for every later edit.
/// AlphaEdit adds the keys of the facts it edits to `preserved`. MEND uses `editor`.
pub fn compile(
    model: &mut Model,
    tok: &Tokenizer,
    requests: &[Request],
    hp: &Hparams,
    preserved: &mut Preserved,
    templates: &[Vec<String>],
    editor: Option<&crate::mend::Editor>,
) -> Result<(Vec<LayerUpdate>, Vec<FactReport>)> {
    hp.check(&model.config)?;
    check_lengths(model, tok, requests, templates)?;
    preserved.prepare(hp)?;
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
        Method::Mend => {
            let editor = editor.ok_or(Error::NoEditor)?;
            for req in requests {
                let (mut u, report) = mend(model, tok, req, hp, editor)?;
                updates.append(&mut u);
                reports.push(report);
            }
        }
        Method::Memit | Method::Emmet | Method::AlphaEdit | Method::Encore => {
            let (mut u, r) = memit(model, tok, requests, hp, templates, preserved)?;
            updates.append(&mut u);
            reports.extend(r);
        }
    }
    Ok((updates, reports))
}

/// Refuses a request whose prompts cannot fit the model's context, before any pass allocates for
/// them: its filled prompt in the longest context template, followed by its target.
fn check_lengths(model: &Model, tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>]) -> Result<()> {
    let max = model.config.max_positions;
    let mut context = 0;
    for t in templates.iter().flatten() {
        context = context.max(tok.ids(&t.replacen("{}", "", 1))?.len());
    }
    for r in requests {
        let (prompt, target) = (tok.prompt_ids(&r.filled())?.len(), tok.ids(&r.target_text())?.len());
        if prompt + target + context > max {
            let problem = format!(
                "the prompt ({prompt} tokens) and target ({target} tokens) in the longest context template ({context} tokens) do not fit the model's context of {max} tokens"
            );
            return Err(Error::Request { origin: r.origin.clone(), problem });
        }
    }
    Ok(())
}

/// Tokenized target ids (with the leading space), refusing empty ones.
pub(crate) fn target_ids(tok: &Tokenizer, req: &Request) -> Result<Vec<u32>> {
    let ids = tok.ids(&req.target_text())?;
    if ids.is_empty() {
        return Err(Error::Request { origin: req.origin.clone(), problem: "target tokenizes to nothing".into() });
    }
    Ok(ids)
}

/// The rewriting prompts (every template, with the target), the essence prompt and, when `hp`
/// weighs it (`answer_kl`), the bare rewriting prompt followed by the whole target.
pub fn optimisation_prompts(tok: &Tokenizer, req: &Request, templates: &[Vec<String>], hp: &Hparams) -> Result<FactPrompts> {
    let target = target_ids(tok, req)?;
    let rewriting = templates
        .iter()
        .flatten()
        .map(|ctx| target::prompt(tok, &ctx.replacen("{}", &req.prompt, 1), &req.subject, Some(&target), req))
        .collect::<Result<Vec<_>>>()?;
    let essence = target::prompt(tok, "{} is a", &req.subject, None, req)?;
    let answer = match hp.answer_kl > 0.0 {
        true => Some(target::prompt(tok, &req.prompt, &req.subject, None, req).map(|mut p| {
            p.ids.extend_from_slice(&target);
            p
        })?),
        false => None,
    };
    Ok(FactPrompts { rewriting, essence, answer })
}

/// Keys of each request at `layer`, in one forward pass over every request × template: the
/// average within each template group and then across groups, and the key of the raw prompt
/// (`templates[0][0]` is always `{}`).
fn request_keys(model: &Model, tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>], layer: usize) -> Result<Vec<(Array1<f64>, Array1<f64>)>> {
    let prompts = key_prompts(tok, requests, templates)?;
    average_keys(&target::keys(model, &prompts, &[layer])?.remove(0), templates)
}

/// Every request in every template, without targets: the prompts keys are read at.
fn key_prompts(tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>]) -> Result<Vec<Prompt>> {
    requests
        .iter()
        .flat_map(|r| templates.iter().flatten().map(move |ctx| target::prompt(tok, &ctx.replacen("{}", &r.prompt, 1), &r.subject, None, r)))
        .collect()
}

/// The keys MEMIT's schedule solves with, two a fact: the template averages (columns `0..n`),
/// then the raw prompts' own keys (columns `n..2n`), both mapped to the fact's residual. A
/// subject that is its prompt's first token has a raw key that sees no context, far from the
/// template average; fitting both makes the edit reach it.
pub(crate) fn key_columns(keys: Vec<(Array1<f64>, Array1<f64>)>) -> Array2<f64> {
    let (means, raws): (Vec<_>, Vec<_>) = keys.into_iter().unzip();
    stack(&means.into_iter().chain(raws).collect::<Vec<_>>())
}

/// Keys `[requests × templates, d]` of [`key_prompts`] → per request, the template average of
/// [`request_keys`] and the raw prompt's key.
fn average_keys(keys: &Tensor, templates: &[Vec<String>]) -> Result<Vec<(Array1<f64>, Array1<f64>)>> {
    let keys: Vec<Vec<f64>> = keys.to_dtype(DType::F64)?.to_vec2()?;
    let per_request = templates.iter().map(Vec::len).sum::<usize>();
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
    preserved: &mut Preserved,
) -> Result<(Vec<LayerUpdate>, FactReport)> {
    let layer = hp.layers[0];
    // ROME weighs every template equally.
    let flat = vec![templates.iter().flatten().cloned().collect::<Vec<_>>()];
    let (k_mean, k_prompt) = request_keys(model, tok, std::slice::from_ref(req), &flat, layer)?.remove(0);
    let prompts = optimisation_prompts(tok, req, templates, hp)?;
    let t = target::optimize(model, &[prompts], Edit::MlpOut(layer), hp)?.remove(0);
    let c = preserved.regulariser(layer, hp)?;
    let (u, v) = solve::rome(&Array1::from(t.delta.clone()), &k_mean, &k_prompt, c.as_deref())?;
    let update = commit(model, layer, &u, &v, hp.rect_k)?;
    Ok((vec![update], report(req, &t)))
}

/// MEND: the editor's update from the gradient of the new target's NLL after the raw prompt,
/// applied to every layer it edits (one rank per token of prompt and target). The report's loss
/// is that NLL after the edit.
fn mend(model: &mut Model, tok: &Tokenizer, req: &Request, hp: &Hparams, editor: &crate::mend::Editor) -> Result<(Vec<LayerUpdate>, FactReport)> {
    let (prompt, target) = (tok.prompt_ids(&req.filled())?, target_ids(tok, req)?);
    let seq = crate::mend::factors::Sequence::teacher_forced(prompt.clone(), &target);
    let mut updates = Vec::new();
    for (layer, u, v) in crate::mend::updates(model, editor, &seq)? {
        updates.push(commit(model, layer, &u, &v, hp.rect_k)?);
    }
    let loss = -target::target_logprob(model, &[prompt], &target)?[0];
    let report = FactReport { subject: req.subject.clone(), target_new: req.target_new.clone(), steps: 0, loss, stop: None, neurons: None };
    Ok((updates, report))
}

fn report(req: &Request, t: &target::Target) -> FactReport {
    FactReport { subject: req.subject.clone(), target_new: req.target_new.clone(), steps: t.steps, loss: t.loss, stop: Some(t.stop), neurons: None }
}

/// MEMIT's schedule (targets at the last edited layer, the residual spread over the layers in
/// order), solved by MEMIT's, EMMET's, AlphaEdit's or ENCORE's closed form. Where a norm stands
/// between the MLP and the residual stream (Gemma's `post_feedforward_layernorm`), a residual
/// change does not split linearly into MLP output changes: the target is then the last edited
/// layer's down-projection output, and each layer in order takes its share of what that output
/// still lacks, re-measured after the layers before it changed (docs/families.md).
fn memit(
    model: &mut Model,
    tok: &Tokenizer,
    requests: &[Request],
    hp: &Hparams,
    templates: &[Vec<String>],
    preserved: &mut Preserved,
) -> Result<(Vec<LayerUpdate>, Vec<FactReport>)> {
    let last = *hp.layers.iter().max().expect("checked non-empty");
    let (edit, hooks_at_last) = if model.config.family.mlp_joins_residual() {
        (Edit::Residual(last), Hooks { residuals: vec![last], stop_after: Some(last), ..Hooks::default() })
    } else {
        (Edit::MlpOut(last), Hooks { mlp_outputs: vec![last], stop_after: Some(last), ..Hooks::default() })
    };
    let mut targets = Vec::new();
    let mut reports = Vec::new();
    // Facts are optimised together, a bounded number at a time.
    for chunk in requests.chunks(TARGET_BATCH) {
        let prompts = chunk.iter().map(|r| optimisation_prompts(tok, r, templates, hp)).collect::<Result<Vec<_>>>()?;
        for (req, t) in chunk.iter().zip(target::optimize(model, &prompts, edit, hp)?) {
            reports.push(report(req, &t));
            let delta = Array1::from(t.delta);
            let delta = match hp.value_norm {
                ValueNorm::Anchored => solve::anchored_delta(preserved.original(last)?, &Array1::from(t.key), &Array1::from(t.value), &delta)?,
                ValueNorm::None => delta,
            };
            // z = h + δ at the last edited layer (h its residual or MLP output).
            targets.push(Array1::from(t.init) + delta);
        }
    }
    let mut layers = hp.layers.clone();
    layers.sort_unstable();
    // The keys and residuals of each layer, read after the layers before it were updated; the
    // passes start at the earliest layer updated since the pass before.
    let raw: Vec<Prompt> = requests.iter().map(|r| target::prompt(tok, &r.prompt, &r.subject, None, r)).collect::<Result<_>>()?;
    let mut raw = Resumable::new(model, &raw, layers[0])?;
    let mut keyed = Resumable::new(model, &key_prompts(tok, requests, templates)?, layers[0])?;
    let mut updates = Vec::new();
    for (i, &layer) in layers.iter().enumerate() {
        let hooks = Hooks { keys: vec![layer], stop_after: Some(layer), ..Hooks::default() };
        let keys = average_keys(&model::rows(&keyed.forward(model, hooks, layer)?.keys[&layer], &keyed.at)?, templates)?;
        let k = key_columns(keys);
        // What the last edited layer holds now, for each raw prompt.
        let trace = raw.forward(model, hooks_at_last.clone(), layer)?;
        let now = match edit {
            Edit::Residual(_) => &trace.residuals[&last],
            Edit::MlpOut(_) => &trace.mlp_outputs[&last],
        };
        let now: Vec<Vec<f64>> = model::rows(now, &raw.at)?.to_dtype(DType::F64)?.to_vec2()?;
        let now: Vec<Array1<f64>> = now.into_iter().map(Array1::from).collect();
        let r = (stack(&targets) - stack(&now)) / (layers.len() - i) as f64;
        let r = ndarray::concatenate![ndarray::Axis(1), r, r];
        let base = preserved.regulariser(layer, hp)?;
        let base = || base.as_deref().ok_or(Error::MissingStats(layer));
        let (u, v) = match hp.method {
            Method::Emmet => solve::emmet(&r, &k, base()?, hp.required(hp.emmet_lambda, "emmet_lambda")?)?,
            Method::AlphaEdit => {
                let p = preserved.nullspace(layer, hp.required(hp.nullspace_threshold, "nullspace_threshold")?)?;
                let uv = solve::alphaedit(&r, &k, preserved.earlier_keys(layer, k.nrows()), &p, hp.required(hp.alpha, "alpha")?)?;
                preserved.remember(layer, &k);
                uv
            }
            Method::Encore => {
                let uv = solve::encore(&r, &k, base()?, preserved.earlier_keys(layer, k.nrows()))?;
                preserved.remember(layer, &k);
                uv
            }
            _ => solve::memit(&r, &k, base()?)?,
        };
        let (u, v) = solve::merge_equal_columns(u, v);
        updates.push(commit(model, layer, &u, &v, hp.rect_k)?);
    }
    Ok((updates, reports))
}

/// A batch of prompts whose passes resume from the residual stream entering the earliest layer
/// that changed since the last pass: the layers before it are as they were, so the result is
/// the same as a pass from the embeddings.
struct Resumable {
    batch: model::Batch,
    /// `(sequence, subject's last token)` of each prompt.
    at: Vec<(usize, usize)>,
    /// The layer passes start at and the stream entering it (none: the embeddings).
    start: Option<(usize, Tensor)>,
}

impl Resumable {
    /// The batch of `prompts`, its passes starting at layer `from`, the first to be updated.
    fn new(model: &Model, prompts: &[Prompt], from: usize) -> Result<Self> {
        let batch = model::Batch::right_padded(&prompts.iter().map(|p| p.ids.clone()).collect::<Vec<_>>());
        let at = prompts.iter().enumerate().map(|(i, p)| (i, p.lookup)).collect();
        let mut r = Resumable { batch, at, start: None };
        if let Some(before) = from.checked_sub(1) {
            r.forward(model, Hooks { stop_after: Some(before), ..Hooks::default() }, from)?;
        }
        Ok(r)
    }

    /// A pass of the current `model` with `hooks`, keeping the stream entering layer `next`, the
    /// next to be updated, for the passes after it.
    fn forward(&mut self, model: &Model, mut hooks: Hooks, next: usize) -> Result<model::Trace> {
        let from = self.start.as_ref().map_or(0, |(l, _)| *l);
        let keep = next.checked_sub(1).filter(|&before| before >= from);
        hooks.residuals.extend(keep);
        hooks.resume = self.start.clone();
        let trace = model.forward(&self.batch, &hooks, None)?;
        if let Some(before) = keep {
            self.start = Some((next, trace.residuals[&before].clone()));
        }
        Ok(trace)
    }
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
    crate::rect::mask(&mut delta, &w_stored, rect_k, crate::rect::EPS);
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
