//! The closed-form updates, in f64 with LAPACK. Every update is returned as low-rank factors
//! `ΔW = U·Vᵀ` (`U [d_out, r]`, `V [d_in, r]`) in the edit view `out = W·k`.

use ndarray::{Array1, Array2, Axis};
use ndarray_linalg::{Eigh, FactorizeCInto, SolveC, UPLO};

/// A linear solve failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system matrix is not positive definite (statistics too few or degenerate).
    #[error("{0}: the matrix is not positive definite; collect statistics over more tokens or raise the regularisation")]
    NotPositiveDefinite(&'static str),
    /// An eigendecomposition did not converge.
    #[error("{0}: the LAPACK routine did not converge")]
    Failed(&'static str),
    /// Inputs have inconsistent shapes.
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Solves `A X = B` for symmetric positive definite `A`, column by column on one Cholesky factor.
/// LAPACK gets `Aᵀ` in column order: the same matrix, without the two transposes a row-major
/// matrix costs.
fn solve_spd(a: Array2<f64>, b: &Array2<f64>, what: &'static str) -> Result<Array2<f64>> {
    let factor = a.reversed_axes().factorizec_into(UPLO::Lower).map_err(|_| Error::NotPositiveDefinite(what))?;
    let mut x = Array2::zeros(b.raw_dim());
    for (j, col) in b.axis_iter(Axis(1)).enumerate() {
        let sol = factor.solvec(&col.to_owned()).map_err(|_| Error::NotPositiveDefinite(what))?;
        x.column_mut(j).assign(&sol);
    }
    Ok(x)
}

/// MEMIT: `ΔW = R Kᵀ (λC + K Kᵀ)⁻¹` for residuals `R [d_out, n]`, keys `K [d_in, n]` and the
/// key second moment `C [d_in, d_in]`. Factors: `U = R`, `V = (λC + KKᵀ)⁻¹ K` (symmetric system).
pub fn memit(r: &Array2<f64>, k: &Array2<f64>, c: &Array2<f64>, lambda: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    if r.ncols() != k.ncols() || c.nrows() != k.nrows() || c.ncols() != k.nrows() {
        return Err(Error::Shape(format!("memit: R {:?}, K {:?}, C {:?} do not fit", r.dim(), k.dim(), c.dim())));
    }
    let a = c * lambda + k.dot(&k.t());
    Ok((r.clone(), solve_spd(a, k, "λC + KKᵀ")?))
}

/// ENCORE's norm-constrained MEMIT (Gupta et al. 2025, arXiv:2502.01636), as the authors' code
/// solves it: the update minimising `‖ΔW K − R‖² + λ_p·tr(ΔW C ΔWᵀ) + ‖ΔW K_p‖² + λₙ‖ΔW‖²_F`,
/// `ΔW = R Kᵀ (λ_p C + S_p + λₙI + K Kᵀ)⁻¹`, with `S_p = K_p K_pᵀ` the summed `k kᵀ` of facts
/// edited earlier. The penalty is on this edit's update, relative to the weights it is applied
/// to (after earlier edits). Factors: `U = R`, `V = (λ_p C + S_p + λₙI + KKᵀ)⁻¹ K`.
pub fn encore(r: &Array2<f64>, k: &Array2<f64>, c: &Array2<f64>, lambda_p: f64, s_p: &Array2<f64>, lambda_n: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    let d = k.nrows();
    if r.ncols() != k.ncols() || c.dim() != (d, d) || s_p.dim() != (d, d) {
        return Err(Error::Shape(format!("encore: R {:?}, K {:?}, C {:?}, S_p {:?} do not fit", r.dim(), k.dim(), c.dim(), s_p.dim())));
    }
    let a = c * lambda_p + s_p + Array2::<f64>::eye(d) * lambda_n + k.dot(&k.t());
    Ok((r.clone(), solve_spd(a, k, "λ_p C + S_p + λₙI + KKᵀ")?))
}

/// Norm anchoring of a value vector (after NAS, Liu et al. 2026, arXiv:2602.02543): with
/// `value = W k` the MLP output at a fact's key now and `delta` its optimised change, the change
/// `δ'` that makes the new value `value + δ'` point along `value + delta` with the norm
/// `‖W₀ k‖` of the original model's value at that key. (NAS anchors to a mean norm of values
/// solved on the original model over a sample of CounterFact requests; this anchors each fact
/// to its own key, which needs no reference data.) A zero `value + delta` has no direction and
/// is kept.
pub fn anchored_delta(w0: &Array2<f64>, key: &Array1<f64>, value: &Array1<f64>, delta: &Array1<f64>) -> Result<Array1<f64>> {
    if w0.dim() != (value.len(), key.len()) || delta.len() != value.len() {
        return Err(Error::Shape(format!("anchored value: W₀ {:?}, key {}, value {}, delta {} do not fit", w0.dim(), key.len(), value.len(), delta.len())));
    }
    let anchor = w0.dot(key);
    let target = value + delta;
    let norm = target.dot(&target).sqrt();
    if norm == 0.0 {
        return Ok(delta.clone());
    }
    Ok(target * (anchor.dot(&anchor).sqrt() / norm) - value)
}

/// EMMET: the batch update that maps every key exactly to its target (as `μ → 0`):
/// `ΔW = R D⁻¹ Kᵀ (λC)⁻¹` with `D = Kᵀ (λC)⁻¹ K + μI`. Factors: `U = R D⁻¹`, `V = (λC)⁻¹ K`.
pub fn emmet(r: &Array2<f64>, k: &Array2<f64>, c: &Array2<f64>, lambda: f64, mu: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    if r.ncols() != k.ncols() || c.nrows() != k.nrows() || c.ncols() != k.nrows() {
        return Err(Error::Shape(format!("emmet: R {:?}, K {:?}, C {:?} do not fit", r.dim(), k.dim(), c.dim())));
    }
    let v = solve_spd(c * lambda, k, "λC")?;
    let d = k.t().dot(&v) + Array2::<f64>::eye(k.ncols()) * mu;
    let ut = solve_spd(d, &r.t().to_owned(), "Kᵀ(λC)⁻¹K + μI")?;
    Ok((ut.t().to_owned(), v))
}

/// `ΔW = U Vᵀ` with the columns of `U` that are equal merged into one (their `V` columns summed):
/// the same update at a lower stored rank.
pub fn merge_equal_columns(u: Array2<f64>, v: Array2<f64>) -> (Array2<f64>, Array2<f64>) {
    let mut kept: Vec<usize> = Vec::new();
    let mut sums: Vec<Array1<f64>> = Vec::new();
    for j in 0..u.ncols() {
        match kept.iter().position(|&i| u.column(i) == u.column(j)) {
            Some(at) => sums[at] += &v.column(j),
            None => {
                kept.push(j);
                sums.push(v.column(j).to_owned());
            }
        }
    }
    let v = Array2::from_shape_fn((v.nrows(), kept.len()), |(i, j)| sums[j][i]);
    (u.select(Axis(1), &kept), v)
}

/// AlphaEdit's projector onto the null space of the key second moment: `P = Û Ûᵀ` over the
/// eigenvectors of `C` whose eigenvalues are below `tau`.
pub fn nullspace(c: &Array2<f64>, tau: f64) -> Result<Array2<f64>> {
    if c.nrows() != c.ncols() {
        return Err(Error::Shape(format!("nullspace: C {:?} is not square", c.dim())));
    }
    let (values, vectors) = c.eigh(UPLO::Lower).map_err(|_| Error::Failed("eigendecomposition of C"))?;
    let kept: Vec<usize> = (0..values.len()).filter(|&i| values[i] < tau).collect();
    let u = vectors.select(Axis(1), &kept);
    Ok(u.dot(&u.t()))
}

/// AlphaEdit: `ΔW = R Kᵀ P (S P + αI)⁻¹` with `S = K Kᵀ + S_p` (`S_p`: the summed `k kᵀ` of
/// facts edited earlier) and `P` from [`nullspace`]; `ΔW` lies in `P`'s range, so keys the
/// corpus spans are left (nearly) alone. Factors: `U = R`, `V = (P S + αI)⁻¹ P K`, computed as
/// `P (P S P + αI)⁻¹ P K` (equal since `P² = P`): a symmetric positive definite system for
/// Cholesky, where LU (OpenBLAS's `dgetrf`) needs more stack than a 2 MiB thread has.
pub fn alphaedit(r: &Array2<f64>, k: &Array2<f64>, s_p: &Array2<f64>, p: &Array2<f64>, alpha: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    let d = k.nrows();
    if r.ncols() != k.ncols() || s_p.dim() != (d, d) || p.dim() != (d, d) {
        return Err(Error::Shape(format!("alphaedit: R {:?}, K {:?}, S_p {:?}, P {:?} do not fit", r.dim(), k.dim(), s_p.dim(), p.dim())));
    }
    let psp = p.dot(&(k.dot(&k.t()) + s_p)).dot(p);
    let z = solve_spd(psp + Array2::<f64>::eye(d) * alpha, &p.dot(k), "P S P + αI")?;
    Ok((r.clone(), p.dot(&z)))
}

/// ROME: the rank-one update that maps the prompt's key `k_p` to `W k_p + delta` exactly,
/// along `u = C⁻¹ k̄ / ‖C⁻¹ k̄‖` (`k̄` the template-averaged key; `C = I` without mom2
/// adjustment). Factors: `U = delta / (k_p · u)`, `V = u`.
pub fn rome(delta: &Array1<f64>, k_mean: &Array1<f64>, k_prompt: &Array1<f64>, c: Option<&Array2<f64>>) -> Result<(Array2<f64>, Array2<f64>)> {
    if k_mean.len() != k_prompt.len() || c.is_some_and(|c| c.dim() != (k_mean.len(), k_mean.len())) {
        return Err(Error::Shape(format!("rome: keys {} and {} and C do not fit", k_mean.len(), k_prompt.len())));
    }
    let mut u = match c {
        Some(c) => solve_spd(c.clone(), &k_mean.clone().insert_axis(Axis(1)), "C")?.column(0).to_owned(),
        None => k_mean.clone(),
    };
    let norm = u.dot(&u).sqrt();
    let denom = k_prompt.dot(&u) / norm;
    if norm == 0.0 || !denom.is_finite() || denom.abs() < 1e-12 {
        return Err(Error::Shape("rome: the key is orthogonal to its update direction".into()));
    }
    u /= norm;
    let right = delta / denom;
    Ok((right.insert_axis(Axis(1)), u.insert_axis(Axis(1))))
}
