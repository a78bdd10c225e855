//! What an update must preserve: the key second moments per layer, what the closed forms derive
//! from them (null-space projectors and Cholesky factors, kept on disk beside the statistics
//! they come from) and the earlier keys of AlphaEdit and ENCORE.

use super::{key_columns, request::Request, request_keys, solve, Error, Hparams, Method, Result};
use crate::model::Model;
use crate::tokenize::Tokenizer;
use ndarray::{Array2, ArrayView2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What an update must preserve: the corpus's key second moments `E[k kᵀ]` per layer (with
/// their null-space projectors and the Cholesky factors of their scaled and ridged forms,
/// computed once on first use, and kept on disk when a store is given), for AlphaEdit and ENCORE
/// the keys of the facts edited earlier, and for norm-anchored values the original model's
/// weights.
#[derive(Clone, Debug, Default)]
pub struct Preserved {
    moments: BTreeMap<usize, Arc<Array2<f64>>>,
    /// `(layer, τ bits)` → projector.
    nullspaces: BTreeMap<(usize, u64), Arc<Array2<f64>>>,
    /// `(layer, scale bits, ridge bits)` → the factor of `scale·C + ridge·I`.
    factors: BTreeMap<(usize, u64, u64), Arc<solve::Factor>>,
    /// Layer → earlier facts' keys as columns `[d_in, n]`.
    earlier: BTreeMap<usize, Array2<f64>>,
    /// Layer → the original model's MLP output projection `[d_out, d_in]` (value anchoring).
    originals: BTreeMap<usize, Arc<Array2<f64>>>,
    /// Where projectors and factors persist between runs: a folder, and the id of the statistics
    /// they derive from.
    store: Option<(PathBuf, String)>,
}

impl FromIterator<(usize, Array2<f64>)> for Preserved {
    fn from_iter<I: IntoIterator<Item = (usize, Array2<f64>)>>(moments: I) -> Self {
        Preserved { moments: moments.into_iter().map(|(l, c)| (l, Arc::new(c))).collect(), ..Preserved::default() }
    }
}

impl Preserved {
    /// Layer `layer`'s key second moment.
    pub fn second_moment(&self, layer: usize) -> Result<&Array2<f64>> {
        self.moments.get(&layer).map(|c| c.as_ref()).ok_or(Error::MissingStats(layer))
    }

    /// Keeps the null-space projectors and Cholesky factors in `dir`, named after the statistics'
    /// id `stats_id`, so that each is computed once per statistics set and parameter rather than
    /// once per run.
    pub fn keep_derived(mut self, dir: &Path, stats_id: &str) -> Self {
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
        let c = self.second_moment(layer)?;
        let file = self.store.as_ref().map(|(dir, id)| dir.join(format!("{id}.nullspace-{layer}-{:016x}.safetensors", tau.to_bits())));
        let p = match file.as_deref().and_then(|f| read_matrix(f, "projector", c.nrows())) {
            Some(p) => p,
            None => {
                let p = solve::nullspace(c, tau)?;
                if let Some(f) = &file {
                    let _ = write_matrix(f, "projector", &p);
                }
                p
            }
        };
        let p = Arc::new(p);
        self.nullspaces.insert((layer, tau.to_bits()), p.clone());
        Ok(p)
    }

    /// The Cholesky factor of `scale·C + ridge·I` (`C = moment(layer)`), the fixed part of a
    /// closed form's system matrix: from memory, else from the store (checked lower triangular
    /// with a positive diagonal), else computed (and stored, as projectors are).
    pub fn factor(&mut self, layer: usize, scale: f64, ridge: f64) -> Result<Arc<solve::Factor>> {
        let key = (layer, scale.to_bits(), ridge.to_bits());
        if let Some(f) = self.factors.get(&key) {
            return Ok(f.clone());
        }
        let c = self.second_moment(layer)?;
        let d = c.nrows();
        let name = format!("cholesky-{layer}-{:016x}-{:016x}", key.1, key.2);
        let file = self.store.as_ref().map(|(dir, id)| dir.join(format!("{id}.{name}.safetensors")));
        let stored = file.as_deref().and_then(|f| read_matrix(f, "factor", d)).and_then(solve::Factor::from_lower);
        let f = match stored {
            Some(f) => f,
            None => {
                let f = solve::Factor::cholesky(c * scale + Array2::<f64>::eye(d) * ridge, "the scaled key second moment")?;
                if let (Some(file), Some(l)) = (&file, f.lower()) {
                    let _ = write_matrix(file, "factor", l);
                }
                f
            }
        };
        let f = Arc::new(f);
        self.factors.insert(key, f.clone());
        Ok(f)
    }

    /// The factor of `hp`'s fixed system matrix at `layer` ([`Hparams::regulariser`]), if its
    /// closed form has one.
    pub fn regulariser(&mut self, layer: usize, hp: &Hparams) -> Result<Option<Arc<solve::Factor>>> {
        hp.regulariser()?.map(|(scale, ridge)| self.factor(layer, scale, ridge)).transpose()
    }

    /// Computes (or finds) everything `hp`'s closed form reads besides the edit's own keys: the
    /// statistics of its layers, their factors and AlphaEdit's projectors. A compile calls it
    /// first; made once before copies of a compiler are taken, it serves them all.
    pub fn prepare(&mut self, hp: &Hparams) -> Result<()> {
        if !hp.needs_stats() {
            return Ok(());
        }
        for &l in &hp.layers {
            self.second_moment(l)?;
            self.regulariser(l, hp)?;
            if hp.method == Method::AlphaEdit {
                self.nullspace(l, hp.required(hp.nullspace_threshold, "nullspace_threshold")?)?;
            }
        }
        Ok(())
    }

    /// Keeps `w` (`[d_out, d_in]`) as layer `layer`'s original MLP output projection, the weights
    /// value anchoring measures against.
    pub fn keep_original(&mut self, layer: usize, w: Array2<f64>) {
        self.originals.insert(layer, Arc::new(w));
    }

    /// Layer `layer`'s original MLP output projection.
    pub fn original(&self, layer: usize) -> Result<&Array2<f64>> {
        self.originals.get(&layer).map(|w| w.as_ref()).ok_or(Error::MissingOriginal(layer))
    }

    /// Layer → the keys of earlier edits (columns), as AlphaEdit and ENCORE accumulated them.
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

    /// `layer`'s earlier keys as columns `[d, n]` (none: `[d, 0]`).
    pub(crate) fn earlier_keys(&self, layer: usize, d: usize) -> ArrayView2<'_, f64> {
        self.earlier.get(&layer).map_or_else(|| ArrayView2::from_shape((d, 0), &[]).expect("an empty matrix"), |k| k.view())
    }

    /// Remembers, for AlphaEdit and ENCORE, the keys of facts that earlier patches edited, computed on
    /// `model` (which carries those patches) as the compile computes keys.
    pub fn remember_requests(&mut self, model: &Model, tok: &Tokenizer, requests: &[Request], templates: &[Vec<String>], layers: &[usize]) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        for &layer in layers {
            // Both keys a fact, as MEMIT's schedule solves with them.
            self.remember(layer, &key_columns(request_keys(model, tok, requests, templates, layer)?));
        }
        Ok(())
    }
}

/// The `[d, d]` f64 matrix `name` stored at `path`, if it holds one.
fn read_matrix(path: &Path, name: &str, d: usize) -> Option<Array2<f64>> {
    let bytes = crate::read_regular(path, crate::MAX_DATA_BYTES).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor(name).ok()?;
    if t.dtype() != safetensors::Dtype::F64 || t.shape() != [d, d] {
        return None;
    }
    let values = t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    Array2::from_shape_vec((d, d), values).ok()
}

/// Stores `m` at `path` (safetensors, one F64 tensor `name`), atomically.
fn write_matrix(path: &Path, name: &str, m: &Array2<f64>) -> std::io::Result<()> {
    let bytes: Vec<u8> = m.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, m.shape().to_vec(), &bytes).map_err(std::io::Error::other)?;
    let file = safetensors::serialize([(name, view)], None).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    crate::atomic::write(path, &file, &crate::atomic::Policy::rewrite())
}
