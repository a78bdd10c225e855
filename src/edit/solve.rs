//! The closed-form updates, in f64 with LAPACK. Every update is returned as low-rank factors
//! `ΔW = U·Vᵀ` (`U [d_out, r]`, `V [d_in, r]`) in the edit view `out = W·k`.

use ndarray::{Array1, Array2, Axis};
use ndarray_linalg::{FactorizeC, SolveC, UPLO};

/// A linear solve failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system matrix is not positive definite (statistics too few or degenerate).
    #[error("{0}: the matrix is not positive definite; collect statistics over more tokens or raise the regularisation")]
    NotPositiveDefinite(&'static str),
    /// Inputs have inconsistent shapes.
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Solves `A X = B` for symmetric positive definite `A`, column by column on one Cholesky factor.
fn solve_spd(a: &Array2<f64>, b: &Array2<f64>, what: &'static str) -> Result<Array2<f64>> {
    let factor = a.factorizec(UPLO::Lower).map_err(|_| Error::NotPositiveDefinite(what))?;
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
    Ok((r.clone(), solve_spd(&a, k, "λC + KKᵀ")?))
}

/// ROME: the rank-one update that maps the prompt's key `k_p` to `W k_p + delta` exactly,
/// along `u = C⁻¹ k̄ / ‖C⁻¹ k̄‖` (`k̄` the template-averaged key; `C = I` without mom2
/// adjustment). Factors: `U = delta / (k_p · u)`, `V = u`.
pub fn rome(delta: &Array1<f64>, k_mean: &Array1<f64>, k_prompt: &Array1<f64>, c: Option<&Array2<f64>>) -> Result<(Array2<f64>, Array2<f64>)> {
    if k_mean.len() != k_prompt.len() || c.is_some_and(|c| c.dim() != (k_mean.len(), k_mean.len())) {
        return Err(Error::Shape(format!("rome: keys {} and {} and C do not fit", k_mean.len(), k_prompt.len())));
    }
    let mut u = match c {
        Some(c) => solve_spd(c, &k_mean.clone().insert_axis(Axis(1)), "C")?.column(0).to_owned(),
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
