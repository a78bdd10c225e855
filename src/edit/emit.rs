//! Patch emission: compiled updates → a patch against the tensors they apply to, with the
//! requests, hyperparameters and provenance in its manifest.

use super::{request::Request, FactReport, Hparams, LayerUpdate};
use crate::checkpoint::Tensors;
use crate::model::{Family, Orientation};
use crate::patch::{BaseTensor, Delta, Edit as PatchEdit, Encoded, Factors, Manifest, Method as PatchMethod, ModelInfo};
use std::collections::BTreeMap;

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
    /// The identity of the model compiled against, before any parent patch.
    pub base_model: Option<String>,
    pub stats_id: Option<String>,
    /// MEND's editor file id.
    pub editor_id: Option<String>,
    pub parent: Option<String>,
    pub reports: &'a [FactReport],
}

/// The patch for `updates` compiled from `requests` against `base` (the tensors they apply to:
/// a checkpoint, or one with the parent patches overlaid). One entry per touched tensor: a single
/// update keeps its factors (with RECT's k when it masks); several updates of one tensor are
/// stored as their exact explicit sum.
pub fn encode_patch(
    base: &dyn Tensors,
    family: &Family,
    requests: &[Request],
    updates: &[LayerUpdate],
    hp: &Hparams,
    prov: &Provenance,
) -> Result<Encoded, crate::patch::Error> {
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
            ([_], true) => Delta::LowRankRect { factors: factors[0].clone(), k: hp.rect_k, eps: crate::rect::EPS },
            (_, false) => Delta::LowRank(factors),
            (_, true) => {
                // Each mask was computed against the weight as the earlier updates left it.
                let mut w = t.to_f32().into_owned();
                let mut sum = vec![0f32; w.len()];
                for f in &factors {
                    let mut d = crate::apply::product(f, t.shape);
                    crate::rect::mask(&mut d, &w, hp.rect_k, crate::rect::EPS);
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
            hyperparameters: serde_json::to_value(hp).ok().and_then(|v| v.as_object().cloned()).map(|m| m.into_iter().collect()).unwrap_or_default(),
        },
    );
    manifest.base_model = prov.base_model.clone();
    manifest.parent = prov.parent.clone();
    manifest.stats_id = prov.stats_id.clone();
    manifest.editor_id = prov.editor_id.clone();
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
