//! Hyperparameters: the editing method and its settings, with each method's defaults and
//! `KEY=JSON` overrides. They are recorded in every patch's manifest.

use super::{Error, Result};
use crate::model;

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
    /// MEMIT with early stopping and a norm penalty on each update (ENCORE, Gupta et al. 2025).
    ///
    /// Most-probable early stopping, the Frobenius-norm-constrained closed form and the keys of
    /// earlier edits preserved: "Lifelong Sequential Knowledge Editing without Model
    /// Degradation", arXiv:2502.01636.
    Encore,
    /// Knowledge neurons: attribution by integrated gradients, then embedding swaps (Dai et al. 2022).
    Kn,
    /// A trained editor network maps the edit's fine-tuning gradient to a low-rank update
    /// (MEND, Mitchell et al. 2022); needs an editor from `factpatch mend train`.
    Mend,
}

impl Method {
    /// Whether the method optimises target vectors (all but KN and MEND).
    pub fn optimises_targets(self) -> bool {
        !matches!(self, Method::Kn | Method::Mend)
    }

    /// Whether the method follows MEMIT's schedule (targets at the last edited layer, then a
    /// closed form per layer): MEMIT, EMMET, AlphaEdit, ENCORE.
    pub fn memit_schedule(self) -> bool {
        matches!(self, Method::Memit | Method::Emmet | Method::AlphaEdit | Method::Encore)
    }

    /// Whether the method preserves the keys of the facts edited before it (AlphaEdit, ENCORE).
    pub fn keeps_earlier_keys(self) -> bool {
        matches!(self, Method::AlphaEdit | Method::Encore)
    }
}

/// When a fact's target optimisation stops before its step cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EarlyStop {
    /// Once the loss is below 0.05 (the peers' rule).
    #[default]
    None,
    /// Also at the first step where the new target is the most probable continuation on every
    /// rewriting prompt, every target token given the ones before it (MPES: most-probable early
    /// stopping, Gupta et al. 2025, arXiv:2502.01636).
    Mpes,
}

/// How the optimised value vectors are scaled before the closed form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueNorm {
    /// As optimised.
    #[default]
    None,
    /// Rescaled to the norm of the original model's value at the fact's key (norm anchoring, after
    /// NAS: Liu et al. 2026, "Norm Anchors Make Model Edits Last", arXiv:2602.02543).
    Anchored,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl EarlyStop {
    fn is_none(&self) -> bool {
        *self == EarlyStop::None
    }

    /// The target optimisation's default Adam learning rate under this rule: the peers' 0.5, and
    /// 1.0 with MPES, which stops at the first step where the new target wins, so a larger step
    /// overshoots by at most that step (on SmolLM2 it reaches the stop in 0.6× the steps with the
    /// same scores, docs/methods-on-smollm2.md).
    pub fn default_lr(self) -> f64 {
        match self {
            EarlyStop::None => 0.5,
            EarlyStop::Mpes => 1.0,
        }
    }
}

impl ValueNorm {
    fn is_none(&self) -> bool {
        *self == ValueNorm::None
    }
}

/// Hyperparameters. Defaults follow the peers' published Llama settings (ROME, MEMIT, EMMET,
/// AlphaEdit, ENCORE, EasyEdit's KN), with the changes measured on SmolLM2 noted per field.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Hparams {
    pub method: Method,
    /// Edited layers (ROME: one).
    pub layers: Vec<usize>,
    /// Target-vector optimisation: Adam steps, learning rate, weight decay, norm clamp, KL factor.
    pub v_steps: usize,
    /// The adaptive step cap: a fact that has not converged after `v_steps` steps keeps going, up
    /// to `v_extend`·`v_steps` steps in all (1: no extension, as before the option existed; 4 at
    /// the defaults, 100 steps). Facts that converge within `v_steps` are unaffected. Recorded
    /// only when not 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub v_extend: usize,
    pub v_lr: f64,
    pub v_weight_decay: f64,
    pub clamp_norm: f64,
    pub kl_factor: f64,
    /// The weight of KL(now ‖ before) on the next token after the bare rewriting prompt and the
    /// whole target: what the model says after the new answer (0: not measured).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answer_kl: f64,
    /// MEMIT's λ on the key second moment (ENCORE's λ_p). The peers' Llama-7B value is 15,000; on
    /// SmolLM2-135M (10 CounterFact facts, batch) 15,000 gave efficacy 0.70, 5,000 gave 0.90 and
    /// 1,500 gave 1.00 with neighbourhood 0.94× its pre-edit value, so 1,500 is the default. For
    /// ENCORE too: 15,000 gave efficacy 0.50 against 0.90 (10 facts, one at a time).
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
    /// ENCORE: λₙ, the weight of the Frobenius-norm penalty ‖ΔW‖² on each update (the authors'
    /// 10; 100 gave efficacy 0.50 against 0.90 on SmolLM2, 10 facts one at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_lambda: Option<f64>,
    /// Every method but KN: when a fact's target optimisation stops (`none`, `mpes`). Recorded
    /// only when not `none`, so patches compiled before it existed keep their ids.
    #[serde(default, skip_serializing_if = "EarlyStop::is_none")]
    pub early_stop: EarlyStop,
    /// MEMIT, EMMET, AlphaEdit, ENCORE: the value vectors' norm (`none`, `anchored`). Recorded
    /// only when not `none`.
    #[serde(default, skip_serializing_if = "ValueNorm::is_none")]
    pub value_norm: ValueNorm,
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
    /// The defaults of `method` for a model of this configuration.
    pub fn defaults(method: Method, config: &model::Config) -> Self {
        let layers = config.family.edit_layers(config.num_layers);
        let encore = method == Method::Encore;
        let early_stop = if encore { EarlyStop::Mpes } else { EarlyStop::None };
        Hparams {
            method,
            layers: match method {
                Method::Rome | Method::Emmet => vec![layers[config.family.rome_layer_index.min(layers.len() - 1)]],
                Method::Memit | Method::AlphaEdit | Method::Encore => layers,
                Method::Kn => (0..config.num_layers).collect(),
                Method::Mend => (config.num_layers.saturating_sub(3)..config.num_layers).collect(),
            },
            v_steps: 25,
            v_extend: if method.optimises_targets() { 4 } else { 1 },
            v_lr: early_stop.default_lr(),
            // ENCORE's published settings hold the target vectors closer to where they start.
            v_weight_decay: if encore { 0.5 } else { 1e-3 },
            clamp_norm: if encore { 0.75 } else { 4.0 },
            kl_factor: 0.0625,
            answer_kl: if method.optimises_targets() { config.family.answer_kl } else { 0.0 },
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
            norm_lambda: encore.then_some(10.0),
            early_stop,
            value_norm: ValueNorm::None,
            kn: (method == Method::Kn).then_some(KnParams { steps: config.family.kn_steps, threshold: 0.2, share: 0.4 }),
        }
    }

    /// Overrides one hyperparameter: `KEY=VALUE` with a JSON value or a bare word (a string), a
    /// dot for nested keys (`alpha=1`, `layers=[3,4]`, `kn.steps=5`, `early_stop=mpes`). Only the
    /// method's own keys exist. A new `early_stop` brings its default `v_lr` unless `v_lr` was
    /// changed before it.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let bad = |why: String| Error::Hparams(format!("--set {assignment}: {why}"));
        let (key, value) = assignment.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
        let value: serde_json::Value = match serde_json::from_str(value) {
            Ok(v) => v,
            Err(_) if !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => serde_json::Value::String(value.into()),
            Err(e) => return Err(bad(format!("the value is not JSON ({e})"))),
        };
        let mut json = serde_json::to_value(&*self).map_err(|e| bad(e.to_string()))?;
        // Keys left out of the record at their defaults still exist for the methods they apply to.
        if let Some(map) = json.as_object_mut() {
            if self.method.optimises_targets() {
                map.entry("early_stop").or_insert("none".into());
                map.entry("v_extend").or_insert(1.into());
                map.entry("answer_kl").or_insert(0.0.into());
            }
            if self.method.memit_schedule() {
                map.entry("value_norm").or_insert("none".into());
            }
        }
        let mut slot = &mut json;
        for part in key.split('.') {
            slot = slot.as_object_mut().and_then(|m| m.get_mut(part)).ok_or_else(|| bad(format!("{:?} has no hyperparameter `{key}`", self.method)))?;
        }
        *slot = value;
        let before = (self.early_stop, self.v_lr);
        *self = serde_json::from_value(json).map_err(|e| bad(e.to_string()))?;
        if key == "early_stop" && before.1 == before.0.default_lr() {
            self.v_lr = self.early_stop.default_lr();
        }
        Ok(())
    }

    /// Whether the method reads key statistics.
    pub fn needs_stats(&self) -> bool {
        match self.method {
            Method::Rome => self.mom2_adjustment,
            Method::Memit | Method::Emmet | Method::AlphaEdit | Method::Encore => true,
            Method::Kn | Method::Mend => false,
        }
    }

    /// The fixed part `scale·C + ridge·I` of the closed form's system matrix, as
    /// `(scale, ridge)`; none for methods without one.
    pub fn regulariser(&self) -> Result<Option<(f64, f64)>> {
        Ok(match self.method {
            Method::Rome if self.mom2_adjustment => Some((1.0, 0.0)),
            Method::Memit | Method::Emmet => Some((self.mom2_weight, 0.0)),
            Method::Encore => Some((self.mom2_weight, self.required(self.norm_lambda, "norm_lambda")?)),
            _ => None,
        })
    }

    /// A method-specific value, which `defaults` sets for that method.
    pub(crate) fn required<T: Copy>(&self, value: Option<T>, name: &str) -> Result<T> {
        value.ok_or_else(|| Error::Hparams(format!("{:?} needs `{name}` in its hyperparameters", self.method)))
    }

    /// Whether the values fit a model of this configuration.
    pub fn check(&self, config: &model::Config) -> Result<()> {
        let n = config.num_layers;
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
        if self.v_extend == 0 {
            return Err(Error::Hparams("v_extend must be at least 1 (1: no steps past v_steps)".into()));
        }
        if self.early_stop != EarlyStop::None && !self.method.optimises_targets() {
            return Err(Error::Hparams(format!("early_stop applies to methods that optimise target vectors, not {:?}", self.method)));
        }
        if self.value_norm != ValueNorm::None && !self.method.memit_schedule() {
            return Err(Error::Hparams(format!("value_norm applies to MEMIT, EMMET, AlphaEdit and ENCORE, not {:?}", self.method)));
        }
        if let Some(l) = self.norm_lambda.filter(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(Error::Hparams(format!("norm_lambda {l} must be finite and ≥ 0")));
        }
        if !(self.rect_k > 0.0 && self.rect_k <= 100.0) {
            return Err(Error::Hparams(format!("RECT k = {} must be in (0, 100]", self.rect_k)));
        }
        Ok(())
    }
}
