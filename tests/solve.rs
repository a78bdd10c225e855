//! The closed forms equal plain dense references on small random matrices (f64, 1e-9).

use factpatch::edit::solve;
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};

fn random(rng: &mut impl Rng, r: usize, c: usize) -> Array2<f64> {
    Array2::from_shape_fn((r, c), |_| rng.random::<f64>() * 2.0 - 1.0)
}

/// Gauss–Jordan inverse with partial pivoting: the naive reference.
fn inverse(a: &Array2<f64>) -> Array2<f64> {
    let n = a.nrows();
    let mut m = ndarray::concatenate![ndarray::Axis(1), a.clone(), Array2::eye(n)];
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| m[[i, col]].abs().total_cmp(&m[[j, col]].abs())).unwrap();
        for j in 0..2 * n {
            m.swap([col, j], [p, j]);
        }
        let d = m[[col, col]];
        for j in 0..2 * n {
            m[[col, j]] /= d;
        }
        for i in 0..n {
            if i != col {
                let f = m[[i, col]];
                for j in 0..2 * n {
                    m[[i, j]] -= f * m[[col, j]];
                }
            }
        }
    }
    m.slice(ndarray::s![.., n..]).to_owned()
}

/// A random symmetric positive definite second moment of `n` random keys.
fn second_moment(rng: &mut impl Rng, d: usize) -> Array2<f64> {
    let keys = random(rng, d, 4 * d);
    keys.dot(&keys.t()) / (4 * d) as f64
}

fn max_abs(a: &Array2<f64>) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn memit_matches_dense_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (d_out, d_in, n, lambda) in [(6, 9, 1, 10.0), (5, 12, 4, 1.5), (8, 16, 7, 15000.0)] {
        let r = random(&mut rng, d_out, n);
        let k = random(&mut rng, d_in, n);
        let c = second_moment(&mut rng, d_in);
        let (u, v) = solve::memit(&r, &k, &c, lambda).unwrap();
        let dense = r.dot(&k.t()).dot(&inverse(&(&c * lambda + k.dot(&k.t()))));
        let err = max_abs(&(u.dot(&v.t()) - &dense)) / max_abs(&dense);
        assert!(err < 1e-9, "memit ({d_out}x{d_in}, n={n}, λ={lambda}): relative error {err:e}");
    }
}

#[test]
fn rome_matches_dense_reference_and_writes_the_value() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (d_out, d_in) = (7, 10);
    let w = random(&mut rng, d_out, d_in);
    let c = second_moment(&mut rng, d_in);
    let k_mean = Array1::from_iter((0..d_in).map(|_| rng.random::<f64>()));
    let k_prompt = &k_mean + &Array1::from_iter((0..d_in).map(|_| 0.1 * rng.random::<f64>()));
    let v_star = Array1::from_iter((0..d_out).map(|_| rng.random::<f64>()));
    let delta = &v_star - &w.dot(&k_prompt);
    for c in [Some(&c), None] {
        let (u, v) = solve::rome(&delta, &k_mean, &k_prompt, c).unwrap();
        // Paper form: ΔW = Λ (C⁻¹k̄)ᵀ with Λ = (v* − W k_p) / ((C⁻¹k̄)ᵀ k_p).
        let cinv_k = match c {
            Some(c) => inverse(c).dot(&k_mean),
            None => k_mean.clone(),
        };
        let lambda = &delta / cinv_k.dot(&k_prompt);
        let dense = lambda.insert_axis(ndarray::Axis(1)).dot(&cinv_k.insert_axis(ndarray::Axis(0)));
        let update = u.dot(&v.t());
        let err = max_abs(&(&update - &dense)) / max_abs(&dense);
        assert!(err < 1e-9, "rome (mom2 {}): relative error {err:e}", c.is_some());
        let written = (&w + &update).dot(&k_prompt);
        let miss = (&written - &v_star).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(miss < 1e-9, "rome: (W + ΔW) k_p misses v* by {miss:e}");
    }
}

#[test]
fn memit_refuses_a_degenerate_system() {
    let k = Array2::zeros((4, 2));
    let err = solve::memit(&Array2::zeros((3, 2)), &k, &Array2::zeros((4, 4)), 1.0).unwrap_err();
    assert!(err.to_string().contains("not positive definite"), "{err}");
}
