//! Prompts, keys and target vectors: where the subject sits in each prompt, what the MLP key is
//! there, and which residual change makes the model say the new target.

use super::{EarlyStop, Error, Hparams, Result};
use crate::adam::Adam;
use crate::edit::request::Request;
use crate::model::{self, ops, rows, Batch, Hooks, KvCache, Model};
use crate::tokenize::{self, Tokenizer};
use candle_core::{DType, IndexOp, Tensor, Var};

/// A tokenized prompt with the position of the subject's last token and, for rewriting
/// prompts, the teacher-forced target tokens `(position, id)`.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub lookup: usize,
    pub targets: Vec<(usize, u32)>,
}

impl Prompt {
    /// Where its last token is in its suffix, the tokens from the subject's last one on.
    fn last_in_suffix(&self) -> usize {
        self.ids.len() - 1 - self.lookup
    }
}

/// `template` (one `{}`: the subject's place) filled with `subject`, optionally followed by the
/// target tokens but the last (their predictions are what the loss reads).
pub fn prompt(tok: &Tokenizer, template: &str, subject: &str, target: Option<&[u32]>, req: &Request) -> Result<Prompt> {
    let start = template.find("{}").expect("validated: one {}");
    let text = template.replacen("{}", subject, 1);
    let enc = tok.encode_prompt(&text)?;
    let lookup = tokenize::last_token_in(&enc.offsets, (start, start + subject.len()))
        .ok_or_else(|| Error::Request { origin: req.origin.clone(), problem: format!("subject `{subject}` cannot be located among the tokens of `{text}`") })?;
    let mut ids = enc.ids;
    let mut targets = Vec::new();
    if let Some(t) = target {
        for (i, &id) in t.iter().enumerate() {
            targets.push((ids.len() - 1 + i, id));
        }
        ids.extend_from_slice(&t[..t.len() - 1]);
    }
    Ok(Prompt { ids, lookup, targets })
}

/// Keys at the subject's last token of each prompt, at each of `layers`, on the current model:
/// layer → `[prompts, intermediate]` (f32).
pub fn keys(model: &Model, prompts: &[Prompt], layers: &[usize]) -> Result<Vec<Tensor>> {
    let batch = Batch::right_padded(&prompts.iter().map(|p| p.ids.clone()).collect::<Vec<_>>());
    let at: Vec<_> = prompts.iter().enumerate().map(|(i, p)| (i, p.lookup)).collect();
    let hooks = Hooks { keys: layers.to_vec(), stop_after: layers.iter().max().copied(), ..Hooks::default() };
    let trace = model.forward(&batch, &hooks, None)?;
    Ok(layers.iter().map(|l| rows(&trace.keys[l], &at)).collect::<model::Result<_>>()?)
}

/// Where a target vector is added, and what it is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// ROME, and MEMIT where a norm follows the MLP: added to layer `l`'s MLP output (the down
    /// projection's, before any post-MLP norm); the target is that output.
    MlpOut(usize),
    /// MEMIT: added to layer `l`'s residual output; the target is the residual stream.
    Residual(usize),
}

/// The loss, and each target token's NLL, a fact converges below.
const GOAL: f64 = 5e-2;

/// Why a fact's target optimisation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    /// Every target token's NLL fell below 0.05 on every rewriting prompt, or the loss did with
    /// every target token the most probable one.
    Converged,
    /// Most-probable early stopping: the new target became the most probable continuation on
    /// every rewriting prompt.
    MostProbable,
    /// The adaptive step cap (`v_extend`·`v_steps`) was reached without converging.
    StepCap,
}

/// The result of a target-vector optimisation.
#[derive(Clone, Debug)]
pub struct Target {
    /// The vector to add at the edit point `[hidden]` (f64).
    pub delta: Vec<f64>,
    /// The value at the edit point before the edit, for the raw prompt `[hidden]`.
    pub init: Vec<f64>,
    /// The raw prompt's MLP key `[intermediate]` and MLP output `[hidden]` at the edited layer
    /// before the edit (f64).
    pub key: Vec<f64>,
    pub value: Vec<f64>,
    /// Adam steps taken: `delta` is the vector after this many updates, the one the loss and the
    /// stopping rule were last evaluated at (at the step cap, the update after the last
    /// evaluation is kept too).
    pub steps: usize,
    pub loss: f64,
    pub stop: Stop,
}

/// One fact's prompts for [`optimize`]: the rewriting prompts (with targets), the essence prompt
/// and, with `answer_kl`, the bare rewriting prompt followed by the whole target.
pub struct FactPrompts {
    pub rewriting: Vec<Prompt>,
    pub essence: Prompt,
    pub answer: Option<Prompt>,
}

/// Optimises, for each fact, a vector δ added at the subject's last token (at `edit`) of every
/// one of its prompts so that the rewriting prompts predict their targets: mean target NLL +
/// `kl_factor`·KL(now ‖ before) on the essence prompt + `weight_decay`·‖δ‖/‖init‖², Adam, ‖δ‖
/// clamped to `clamp_norm`·‖init‖. The stop rule looks at every target token of every rewriting
/// prompt, given the prompt and the target tokens before it. A fact has converged once every one
/// has an NLL below 0.05, or once its loss is below 0.05 (the peers' rule, which averages over
/// the tokens) and every one is the most probable token (ties included): the mean can hide a
/// token that still loses, typically after the bare prompt, and the KL and norm terms can hold
/// the loss above 0.05 when every token is reached. With `early_stop = mpes` it also stops at the
/// first step where every target token is the most probable one (MPES, Gupta et al. 2025,
/// arXiv:2502.01636: the paper checks the single next token; a multi-token target must win at
/// each of its positions). The criteria are checked on the same pass as the loss, before the
/// step's update, so a fact already most probable keeps δ = 0. A fact not stopped after
/// `v_steps` steps keeps going, up to `v_extend`·`v_steps` steps in all (the adaptive cap: more
/// steps only for the facts that need them), and those steps follow a loss whose NLL term weighs
/// each target token by its share of the fact's NLL, so they go to the tokens still far from the
/// goal (typically the first token after the bare prompt, one rewriting prompt among many in the
/// mean).
///
/// Facts are independent (separate sequences, separate rows of δ, element-wise Adam), so they
/// run together in one batch; a finished fact's row is frozen. Nothing before the subject's last
/// token depends on δ: each prompt's prefix runs once into a KV cache, and each step runs only
/// the suffixes through the layers after the edit point.
pub fn optimize(model: &Model, facts: &[FactPrompts], edit: Edit, hp: &Hparams) -> Result<Vec<Target>> {
    let layer = match edit {
        Edit::MlpOut(l) | Edit::Residual(l) => l,
    };
    let nf = facts.len();
    // Rows: each fact's rewriting prompts, then its essence prompt, then its answer prompt.
    let mut all: Vec<&Prompt> = Vec::new();
    let (mut fact_rows, mut essence, mut answer) = (Vec::new(), Vec::new(), Vec::new());
    for fp in facts {
        let first = all.len();
        all.extend(fp.rewriting.iter());
        essence.push((all.len(), 0));
        all.push(&fp.essence);
        if let Some(a) = &fp.answer {
            answer.push((all.len(), a.last_in_suffix()));
            all.push(a);
        }
        fact_rows.push(first..all.len());
    }
    let prefixes: Vec<Vec<u32>> = all.iter().map(|p| p.ids[..p.lookup].to_vec()).collect();
    let suffixes: Vec<Vec<u32>> = all.iter().map(|p| p.ids[p.lookup..].to_vec()).collect();
    let mut prefix_cache = KvCache::default();
    if prefixes.iter().any(|p| !p.is_empty()) {
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut prefix_cache))?;
    }

    // The unedited pass: the resume state after `layer`, the values at the edit point, the KL anchors.
    let hooks = Hooks { keys: vec![layer], residuals: vec![layer], mlp_outputs: vec![layer], ..Hooks::default() };
    let base = model.forward(&Batch::right_padded(&suffixes), &hooks, Some(&mut prefix_cache.clone()))?;
    let resume = base.residuals[&layer].detach();
    let source = match edit {
        Edit::MlpOut(_) => &base.mlp_outputs[&layer],
        Edit::Residual(_) => &resume,
    };
    let raw_rows = |x: &Tensor| -> Result<Vec<Vec<f64>>> { fact_rows.iter().map(|r| Ok(x.i((r.start, 0))?.to_dtype(DType::F64)?.to_vec1()?)).collect() };
    let inits = raw_rows(source)?;
    let (keys, outputs) = (raw_rows(&base.keys[&layer])?, raw_rows(&base.mlp_outputs[&layer])?);
    let init_norms: Vec<f64> = inits.iter().map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let anchor = ops::log_softmax(&model.logits(&rows(&base.hidden, &essence)?)?)?.detach();
    let answer_anchor = if answer.is_empty() { None } else { Some(ops::log_softmax(&model.logits(&rows(&base.hidden, &answer)?)?)?.detach()) };
    let all = Rows {
        facts,
        fact_rows: &fact_rows,
        suffixes: &suffixes,
        cache: &prefix_cache,
        resume: &resume,
        mlp_out: &base.mlp_outputs[&layer],
        anchor: &anchor,
        answer_anchor: answer_anchor.as_ref(),
        init_norms: &init_norms,
        hp,
    };

    let d = model.config.hidden_size;
    let mut adam = Adam::new(nf * d, hp.v_lr);
    let mut done: Vec<Option<Stopped>> = vec![None; nf];
    let mut last_loss = vec![f64::NAN; nf];
    let mpes = hp.early_stop == EarlyStop::Mpes;
    let cap = hp.v_steps * hp.v_extend;
    let mut work: Option<Working> = None;
    for step in 0..cap {
        // Only the facts still optimised run: a fact that stopped leaves the batch.
        let active: Vec<usize> = (0..nf).filter(|&f| done[f].is_none()).collect();
        if work.as_ref().is_none_or(|w| w.facts != active) {
            work = Some(all.working(model, active)?);
        }
        let w = work.as_ref().expect("just set");
        let delta = Var::from_tensor(&Tensor::from_vec(
            w.facts.iter().flat_map(|&f| adam.theta[f * d..(f + 1) * d].iter().copied()).collect(),
            (w.facts.len(), d),
            model.device(),
        )?)?;
        let rows_delta = delta.as_tensor().index_select(&w.row_fact, 0)?;
        let x = match edit {
            Edit::MlpOut(_) => model.add_to_mlp_output(layer, &w.resume, &w.mlp_out, &w.at, &rows_delta)?,
            Edit::Residual(_) => model::add_at(&w.resume, &w.at, &rows_delta)?,
        };
        let hidden = if layer + 1 < model.config.num_layers {
            let hooks = Hooks { resume: Some((layer + 1, x)), ..Hooks::default() };
            model.forward(&w.suffix, &hooks, Some(&mut w.cache.clone()))?.hidden
        } else {
            x
        };
        let n = w.ids.dims()[0];
        let lp = ops::log_softmax(&model.logits(&rows(&hidden, &w.wanted)?)?)?;
        let target_lp = lp.narrow(0, 0, n)?.gather(&w.ids, 1)?;
        // Facts all of whose target tokens are likely (NLL below the goal), and all of whose
        // target tokens are the most probable ones.
        let own: Vec<f32> = target_lp.squeeze(1)?.to_vec1()?;
        let best: Vec<f32> = lp.narrow(0, 0, n)?.max_keepdim(1)?.squeeze(1)?.to_vec1()?;
        let (mut likely, mut most_probable) = (vec![true; w.facts.len()], vec![true; w.facts.len()]);
        for ((b, o), &f) in best.iter().zip(&own).zip(&w.owner) {
            likely[f] &= -(*o as f64) < GOAL;
            most_probable[f] &= o >= b;
        }
        let picked = (target_lp.squeeze(1)? * &w.weight)?;
        let nll = w.by_fact.matmul(&picked.unsqueeze(1)?)?.squeeze(1)?.neg()?;
        let kl_at = |from: usize, anchor: &Tensor| -> Result<Tensor> {
            let now = lp.narrow(0, from, w.facts.len())?;
            Ok((now.exp()? * (&now - anchor)?)?.sum(1)?)
        };
        let mut kl = (kl_at(n, &w.anchor)? * hp.kl_factor)?;
        if let Some(anchor) = &w.answer_anchor {
            kl = (kl + (kl_at(n + w.facts.len(), anchor)? * hp.answer_kl)?)?;
        }
        // ‖δ‖ with a zero-safe gradient (δ starts at 0, where √ has none).
        let norm = (delta.as_tensor().sqr()?.sum(1)? + 1e-24)?.sqrt()?;
        let penalties = (kl + (norm * &w.decay)?)?;
        let losses = (nll + &penalties)?;
        let values: Vec<f32> = losses.to_vec1()?;
        let mut still = vec![0f32; w.facts.len()];
        for (j, &f) in w.facts.iter().enumerate() {
            last_loss[f] = values[j] as f64;
            let stop = match ((values[j] as f64) < GOAL && most_probable[j] || likely[j], mpes && most_probable[j]) {
                (true, _) => Some(Stop::Converged),
                (false, true) => Some(Stop::MostProbable),
                (false, false) => None,
            };
            match stop {
                Some(stop) => done[f] = Some(Stopped { step, loss: values[j] as f64, delta: adam.theta[f * d..(f + 1) * d].to_vec(), stop }),
                None => still[j] = 1.0,
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        // Past `v_steps`, the steps go to the target tokens still far from the goal: each fact's
        // NLL term weighs its tokens by their share of the fact's NLL.
        let losses = if step < hp.v_steps {
            losses
        } else {
            let mut total = vec![0f64; w.facts.len()];
            own.iter().zip(&w.owner).for_each(|(o, &f)| total[f] -= *o as f64);
            let focus: Vec<f32> = own.iter().zip(&w.owner).map(|(o, &f)| (-(*o as f64) / total[f].max(f64::MIN_POSITIVE)) as f32).collect();
            let picked = (target_lp.squeeze(1)? * Tensor::from_vec(focus, n, model.device())?)?;
            (w.by_fact.matmul(&picked.unsqueeze(1)?)?.squeeze(1)?.neg()? + &penalties)?
        };
        let loss = (losses * Tensor::from_vec(still, w.facts.len(), model.device())?)?.sum_all()?;
        let grads = loss.backward()?;
        let grad: Vec<f32> = grads.get(delta.as_tensor()).expect("δ is in the graph").flatten_all()?.to_vec1()?;
        // Facts stopped at this step keep their δ; the rest take the step and are clamped.
        adam.tick();
        for (j, &f) in w.facts.iter().enumerate().filter(|&(_, &f)| done[f].is_none()) {
            adam.step(f * d..(f + 1) * d, &grad[j * d..(j + 1) * d]);
            let row = &mut adam.theta[f * d..(f + 1) * d];
            let norm = row.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
            let max = hp.clamp_norm * init_norms[f];
            if norm > max {
                row.iter_mut().for_each(|x| *x = (*x as f64 * max / norm) as f32);
            }
        }
    }
    let normed = matches!(edit, Edit::MlpOut(_)) && !model.config.family.mlp_joins_residual();
    Ok((0..nf)
        .map(|f| {
            let (steps, loss, row, stop) = match &done[f] {
                Some(s) => (s.step, s.loss, s.delta.clone(), s.stop),
                None => (cap, last_loss[f], adam.theta[f * d..(f + 1) * d].to_vec(), Stop::StepCap),
            };
            let delta: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            let delta = if normed { at_init_norm(&inits[f], init_norms[f], &delta) } else { delta };
            Target { delta, init: inits[f].clone(), key: keys[f].clone(), value: outputs[f].clone(), steps, loss, stop }
        })
        .collect())
}

/// Where a norm follows the MLP, only the direction of its output `m + δ` reaches the residual
/// stream, yet neighbours' leak grows with ‖δ‖. Rescaled to `‖m‖` (`m_norm`), the target points
/// the same way (the raw prompt's residual is unchanged, up to the norm's ε) with ‖δ‖ ≤ 2‖m‖.
fn at_init_norm(m: &[f64], m_norm: f64, delta: &[f64]) -> Vec<f64> {
    let z: Vec<f64> = m.iter().zip(delta).map(|(m, d)| m + d).collect();
    let z_norm = z.iter().map(|x| x * x).sum::<f64>().sqrt();
    if z_norm == 0.0 {
        return delta.to_vec();
    }
    z.iter().zip(m).map(|(z, m)| z * m_norm / z_norm - m).collect()
}

/// Everything [`optimize`] knows of every fact, from which the batch of the facts still being
/// optimised is cut.
struct Rows<'a> {
    facts: &'a [FactPrompts],
    /// Each fact's rows (its rewriting prompts, then its essence prompt).
    fact_rows: &'a [std::ops::Range<usize>],
    /// Each row from the subject's last token on.
    suffixes: &'a [Vec<u32>],
    /// The rows' prefixes, cached (empty when no row has one).
    cache: &'a KvCache,
    /// The unedited residual stream and MLP output of the edited layer `[rows, suffix, hidden]`.
    resume: &'a Tensor,
    mlp_out: &'a Tensor,
    /// Each fact's unedited next-token log-probabilities after its essence prompt, and after its
    /// answer prompt.
    anchor: &'a Tensor,
    answer_anchor: Option<&'a Tensor>,
    init_norms: &'a [f64],
    hp: &'a Hparams,
}

/// The batch of the facts still being optimised (`facts`, ascending), in its own row numbers.
struct Working {
    facts: Vec<usize>,
    suffix: Batch,
    cache: KvCache,
    resume: Tensor,
    mlp_out: Tensor,
    /// Every row's subject's last token (position 0 of its suffix), and each row's fact.
    at: Vec<(usize, usize)>,
    row_fact: Tensor,
    /// The target-token rows, then each fact's essence row, then each fact's answer row.
    wanted: Vec<(usize, usize)>,
    /// Each target token's id `[n, 1]`, weight in its fact's mean `[n]`, fact (local) and the
    /// `[facts, n]` indicator that sums each fact's tokens.
    ids: Tensor,
    weight: Tensor,
    owner: Vec<usize>,
    by_fact: Tensor,
    anchor: Tensor,
    answer_anchor: Option<Tensor>,
    decay: Tensor,
}

impl Rows<'_> {
    fn working(&self, model: &Model, facts: Vec<usize>) -> Result<Working> {
        let dev = model.device();
        let rows: Vec<usize> = facts.iter().flat_map(|&f| self.fact_rows[f].clone()).collect();
        let suffix = Batch::right_padded(&rows.iter().map(|&r| self.suffixes[r].clone()).collect::<Vec<_>>());
        let cache = if self.cache.is_empty() { KvCache::default() } else { self.cache.select(&rows)? };
        let picked = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), dev)?;
        let cut = |x: &Tensor| x.index_select(&picked, 0)?.narrow(1, 0, suffix.seq_len());
        let (resume, mlp_out) = (cut(self.resume)?, cut(self.mlp_out)?);
        let (mut wanted, mut ids, mut weight, mut owner) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut row_fact, mut essence, mut answer) = (Vec::new(), Vec::new(), Vec::new());
        let mut first = 0;
        for (j, &f) in facts.iter().enumerate() {
            let fp = &self.facts[f];
            for (i, p) in fp.rewriting.iter().enumerate() {
                for &(pos, id) in &p.targets {
                    wanted.push((first + i, pos - p.lookup));
                    ids.push(id);
                    weight.push((1.0 / (p.targets.len() * fp.rewriting.len()) as f64) as f32);
                    owner.push(j);
                }
            }
            let extra = 1 + usize::from(fp.answer.is_some());
            row_fact.extend(std::iter::repeat_n(j as u32, fp.rewriting.len() + extra));
            essence.push((first + fp.rewriting.len(), 0));
            if let Some(a) = &fp.answer {
                answer.push((first + fp.rewriting.len() + 1, a.last_in_suffix()));
            }
            first += fp.rewriting.len() + extra;
        }
        let n = ids.len();
        let indicator: Vec<f32> = (0..facts.len()).flat_map(|j| owner.iter().map(move |&o| (o == j) as u8 as f32)).collect();
        wanted.extend(essence);
        wanted.extend(answer);
        let chosen = Tensor::from_vec(facts.iter().map(|&f| f as u32).collect::<Vec<_>>(), facts.len(), dev)?;
        let decay: Vec<f32> = facts.iter().map(|&f| (self.hp.v_weight_decay / (self.init_norms[f] * self.init_norms[f])) as f32).collect();
        Ok(Working {
            suffix,
            cache,
            resume,
            mlp_out,
            at: (0..rows.len()).map(|i| (i, 0)).collect(),
            row_fact: Tensor::from_vec(row_fact, rows.len(), dev)?,
            wanted,
            ids: Tensor::from_vec(ids, (n, 1), dev)?,
            weight: Tensor::from_vec(weight, n, dev)?,
            owner,
            by_fact: Tensor::from_vec(indicator, (facts.len(), n), dev)?,
            anchor: self.anchor.index_select(&chosen, 0)?,
            answer_anchor: self.answer_anchor.map(|a| a.index_select(&chosen, 0)).transpose()?,
            decay: Tensor::from_vec(decay, facts.len(), dev)?,
            facts,
        })
    }
}

/// A fact whose optimisation stopped: at which step, its loss there, δ then, and why.
#[derive(Clone)]
struct Stopped {
    step: usize,
    loss: f64,
    delta: Vec<f32>,
    stop: Stop,
}

/// Mean per-token log-probability of `target` after each prompt, on the current model:
/// the score evaluations compare.
pub fn target_logprob(model: &Model, prompts: &[Vec<u32>], target: &[u32]) -> Result<Vec<f64>> {
    let seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.iter().chain(&target[..target.len() - 1]).copied().collect()).collect();
    let batch = Batch::right_padded(&seqs);
    let hidden = model.forward(&batch, &Hooks::default(), None)?.hidden;
    let rows_at: Vec<(usize, usize)> = prompts.iter().enumerate().flat_map(|(i, p)| (0..target.len()).map(move |j| (i, p.len() - 1 + j))).collect();
    let lp = ops::log_softmax(&model.logits(&rows(&hidden, &rows_at)?)?)?;
    let ids = Tensor::from_vec(target.iter().cycle().take(rows_at.len()).copied().collect::<Vec<_>>(), (rows_at.len(), 1), model.device())?;
    let picked: Vec<f32> = lp.gather(&ids, 1)?.squeeze(1)?.to_vec1()?;
    Ok(picked.chunks(target.len()).map(|c| c.iter().map(|&x| x as f64).sum::<f64>() / target.len() as f64).collect())
}
