//! The closed forms, in f64 with LAPACK. Every update is returned as low-rank factors
//! `ΔW = U·Vᵀ` (`U [d_out, r]`, `V [d_in, r]`) in the edit view `out = W·k`.
//!
//! Each system matrix is a fixed part `A` (a scaled key second moment plus a ridge) plus the
//! outer products `U Uᵀ` of a few keys. `A`'s Cholesky factor is computed once ([`Factor`], kept
//! by `Preserved`), and each edit's keys enter by the Woodbury identity: a solve of `O(d² r)`
//! instead of a new `O(d³)` factorisation.

use ndarray::{s, Array1, Array2, ArrayView2, Axis};
use ndarray_linalg::{CholeskyInto, Eigh, FactorizeCInto, SolveC, UPLO};

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

/// A symmetric positive definite matrix `A`, held as its Cholesky factor `A = L Lᵀ` (or, for
/// a multiple of the identity, as that multiple).
#[derive(Clone, Debug, PartialEq)]
pub struct Factor(Kind);

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    /// `L`, lower triangular with a positive diagonal, row-major.
    Lower(Array2<f64>),
    /// `A = a·I` of this size.
    Identity(f64, usize),
}

impl Factor {
    /// The Cholesky factor of `a`. LAPACK reads `a` in column order, where it is `Aᵀ = A`
    /// without a transpose; the upper factor `U` it writes there is `L = Uᵀ`.
    pub fn cholesky(a: Array2<f64>, what: &'static str) -> Result<Self> {
        if !a.is_square() {
            return Err(Error::Shape(format!("{what}: {:?} is not square", a.dim())));
        }
        let upper = a.reversed_axes().cholesky_into(UPLO::Upper).map_err(|_| Error::NotPositiveDefinite(what))?;
        Ok(Factor(Kind::Lower(upper.reversed_axes().as_standard_layout().into_owned())))
    }

    /// `a·I` of size `d`, for `a > 0`.
    pub fn identity(a: f64, d: usize, what: &'static str) -> Result<Self> {
        if !(a > 0.0 && a.is_finite()) {
            return Err(Error::NotPositiveDefinite(what));
        }
        Ok(Factor(Kind::Identity(a, d)))
    }

    /// A factor read back from storage: `l` if it is square, lower triangular, with a positive
    /// finite diagonal and finite entries.
    pub fn from_lower(l: Array2<f64>) -> Option<Self> {
        let valid = l.is_square() && l.indexed_iter().all(|((i, j), &x)| x.is_finite() && if i == j { x > 0.0 } else { j < i || x == 0.0 });
        valid.then(|| Factor(Kind::Lower(if l.is_standard_layout() { l } else { l.as_standard_layout().into_owned() })))
    }

    /// `L` (row-major, zeros above the diagonal), for storage; none for a multiple of the identity.
    pub fn lower(&self) -> Option<&Array2<f64>> {
        match &self.0 {
            Kind::Lower(l) => Some(l),
            Kind::Identity(..) => None,
        }
    }

    /// The size `d` of `A`.
    pub fn dim(&self) -> usize {
        match &self.0 {
            Kind::Lower(l) => l.nrows(),
            Kind::Identity(_, d) => *d,
        }
    }

    /// `A⁻¹ B`: two triangular solves (`L Z = B`, `Lᵀ X = Z`).
    pub fn solve(&self, b: &Array2<f64>) -> Result<Array2<f64>> {
        let d = self.dim();
        if b.nrows() != d {
            return Err(Error::Shape(format!("solve: A is {d}x{d}, B has {} rows", b.nrows())));
        }
        let l = match &self.0 {
            Kind::Identity(a, _) => return Ok(b / *a),
            Kind::Lower(l) => l.as_slice().expect("kept in row order"),
        };
        let mut x = b.as_standard_layout().into_owned();
        let n = x.ncols();
        if n == 0 || d == 0 {
            return Ok(x);
        }
        assert!(d <= i32::MAX as usize && n <= i32::MAX as usize);
        for trans in [cblas_sys::CblasNoTrans, cblas_sys::CblasTrans] {
            // SAFETY: `l` is a row-major [d, d] matrix and `x` a row-major [d, n] one, as the
            // call reads and writes them.
            unsafe {
                cblas_sys::cblas_dtrsm(
                    cblas_sys::CblasRowMajor,
                    cblas_sys::CblasLeft,
                    cblas_sys::CblasLower,
                    trans,
                    cblas_sys::CblasNonUnit,
                    d as i32,
                    n as i32,
                    1.0,
                    l.as_ptr(),
                    d as i32,
                    x.as_mut_ptr(),
                    n as i32,
                );
            }
        }
        Ok(x)
    }

    /// `A` itself.
    fn matrix(&self) -> Array2<f64> {
        match &self.0 {
            Kind::Lower(l) => l.dot(&l.t()),
            Kind::Identity(a, d) => Array2::eye(*d) * *a,
        }
    }

    /// `(A + U Uᵀ)⁻¹ U E`, `E` the last `n` columns of the identity: the system solved for the
    /// last `n` columns of `U`, the earlier ones only part of its matrix. While `U` has at most
    /// `d/2` columns, by the Woodbury identity on `A`'s factor: with `Y = A⁻¹U` and
    /// `S = I + UᵀY`, `(A + UUᵀ) Y S⁻¹ E = U S S⁻¹ E = U E`, so the solution is `Y (S⁻¹E)`
    /// (no subtraction, so no cancellation). With more, `A + UUᵀ` is factorised afresh, which
    /// is then the cheaper.
    pub fn solve_with(&self, u: &Array2<f64>, n: usize, what: &'static str) -> Result<Array2<f64>> {
        let (d, r) = u.dim();
        if d != self.dim() || n > r {
            return Err(Error::Shape(format!("{what}: A is {0}x{0}, U is {d}x{r}, solving for {n} columns", self.dim())));
        }
        let last = u.slice(s![.., r - n..]).to_owned();
        if 2 * r > d {
            return solve_spd(self.matrix() + u.dot(&u.t()), &last, what);
        }
        let y = self.solve(u)?;
        let s = Array2::<f64>::eye(r) + u.t().dot(&y);
        let e = Array2::from_shape_fn((r, n), |(i, j)| f64::from(i == r - n + j));
        Ok(y.dot(&solve_spd(s, &e, what)?))
    }
}

/// MEMIT: `ΔW = R Kᵀ (λC + K Kᵀ)⁻¹` for residuals `R [d_out, n]`, keys `K [d_in, n]` and the
/// factor of `λC` (`C [d_in, d_in]` the key second moment). Factors: `U = R`,
/// `V = (λC + KKᵀ)⁻¹ K`.
pub fn memit(r: &Array2<f64>, k: &Array2<f64>, lambda_c: &Factor) -> Result<(Array2<f64>, Array2<f64>)> {
    if r.ncols() != k.ncols() || lambda_c.dim() != k.nrows() {
        return Err(Error::Shape(format!("memit: R {:?}, K {:?}, λC {2}x{2} do not fit", r.dim(), k.dim(), lambda_c.dim())));
    }
    Ok((r.clone(), lambda_c.solve_with(k, k.ncols(), "λC + KKᵀ")?))
}

/// ENCORE's norm-constrained MEMIT (Gupta et al. 2025, arXiv:2502.01636), as the authors' code
/// solves it: the update minimising `‖ΔW K − R‖² + λ_p·tr(ΔW C ΔWᵀ) + ‖ΔW K_p‖² + λₙ‖ΔW‖²_F`,
/// `ΔW = R Kᵀ (λ_p C + λₙI + K_p K_pᵀ + K Kᵀ)⁻¹`, with `K_p` the keys of facts edited earlier
/// (columns) and `base` the factor of `λ_p C + λₙI`. The penalty is on this edit's update,
/// relative to the weights it is applied to (after earlier edits). Factors: `U = R`,
/// `V = (λ_p C + λₙI + K_pK_pᵀ + KKᵀ)⁻¹ K`.
pub fn encore(r: &Array2<f64>, k: &Array2<f64>, base: &Factor, k_p: ArrayView2<f64>) -> Result<(Array2<f64>, Array2<f64>)> {
    let d = k.nrows();
    if r.ncols() != k.ncols() || base.dim() != d || k_p.nrows() != d {
        return Err(Error::Shape(format!("encore: R {:?}, K {:?}, λ_pC + λₙI {2}x{2}, K_p {3:?} do not fit", r.dim(), k.dim(), base.dim(), k_p.dim())));
    }
    let u = ndarray::concatenate![Axis(1), k_p, k.view()];
    Ok((r.clone(), base.solve_with(&u, k.ncols(), "λ_p C + λₙI + K_pK_pᵀ + KKᵀ")?))
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
/// `ΔW = R D⁻¹ Kᵀ (λC)⁻¹` with `D = Kᵀ (λC)⁻¹ K + μI`, given the factor of `λC`. Factors:
/// `U = R D⁻¹`, `V = (λC)⁻¹ K`.
pub fn emmet(r: &Array2<f64>, k: &Array2<f64>, lambda_c: &Factor, mu: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    if r.ncols() != k.ncols() || lambda_c.dim() != k.nrows() {
        return Err(Error::Shape(format!("emmet: R {:?}, K {:?}, λC {2}x{2} do not fit", r.dim(), k.dim(), lambda_c.dim())));
    }
    let v = lambda_c.solve(k)?;
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

/// AlphaEdit: `ΔW = R Kᵀ P (S P + αI)⁻¹` with `S = K Kᵀ + K_p K_pᵀ` (`K_p`: the keys of facts
/// edited earlier, columns) and `P` from [`nullspace`]; `ΔW` lies in `P`'s range, so keys the
/// corpus spans are left (nearly) alone. Factors: `U = R`, `V = (P S + αI)⁻¹ P K`, computed as
/// `P (αI + P S P)⁻¹ P K` (equal since `P² = P`), where `P S P = (P[K_p K])(P[K_p K])ᵀ`: a
/// symmetric positive definite system of a few outer products, for Cholesky (LU, OpenBLAS's
/// `dgetrf`, needs more stack than a 2 MiB thread has) or the Woodbury identity.
pub fn alphaedit(r: &Array2<f64>, k: &Array2<f64>, k_p: ArrayView2<f64>, p: &Array2<f64>, alpha: f64) -> Result<(Array2<f64>, Array2<f64>)> {
    let d = k.nrows();
    if r.ncols() != k.ncols() || k_p.nrows() != d || p.dim() != (d, d) {
        return Err(Error::Shape(format!("alphaedit: R {:?}, K {:?}, K_p {:?}, P {:?} do not fit", r.dim(), k.dim(), k_p.dim(), p.dim())));
    }
    let u = p.dot(&ndarray::concatenate![Axis(1), k_p, k.view()]);
    let z = Factor::identity(alpha, d, "αI")?.solve_with(&u, k.ncols(), "P S P + αI")?;
    Ok((r.clone(), p.dot(&z)))
}

/// ROME: the rank-one update that maps the prompt's key `k_p` to `W k_p + delta` exactly,
/// along `u = C⁻¹ k̄ / ‖C⁻¹ k̄‖` (`k̄` the template-averaged key; `C = I` without mom2
/// adjustment; `c` its factor). Factors: `U = delta / (k_p · u)`, `V = u`.
pub fn rome(delta: &Array1<f64>, k_mean: &Array1<f64>, k_prompt: &Array1<f64>, c: Option<&Factor>) -> Result<(Array2<f64>, Array2<f64>)> {
    if k_mean.len() != k_prompt.len() || c.is_some_and(|c| c.dim() != k_mean.len()) {
        return Err(Error::Shape(format!("rome: keys {} and {} and C do not fit", k_mean.len(), k_prompt.len())));
    }
    let mut u = match c {
        Some(c) => c.solve(&k_mean.clone().insert_axis(Axis(1)))?.column(0).to_owned(),
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
