//! The closed forms (and value anchoring) equal plain dense references on small random matrices (f64, 1e-9).

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

/// The Cholesky factor of `a`.
fn factor(a: Array2<f64>) -> solve::Factor {
    solve::Factor::cholesky(a, "test").unwrap()
}

fn max_abs(a: &Array2<f64>) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn memit_matches_dense_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Up to d/2 keys go through the Woodbury identity, more through a fresh factorisation.
    for (d_out, d_in, n, lambda) in [(6, 9, 1, 10.0), (5, 12, 4, 1.5), (8, 16, 7, 15000.0), (4, 10, 5, 2.0), (4, 10, 6, 2.0), (3, 6, 14, 0.5)] {
        let r = random(&mut rng, d_out, n);
        let k = random(&mut rng, d_in, n);
        let c = second_moment(&mut rng, d_in);
        let (u, v) = solve::memit(&r, &k, &factor(&c * lambda)).unwrap();
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
        let (u, v) = solve::rome(&delta, &k_mean, &k_prompt, c.map(|c| factor(c.clone())).as_ref()).unwrap();
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
fn a_degenerate_system_is_refused() {
    let err = solve::Factor::cholesky(Array2::zeros((4, 4)), "λC").unwrap_err();
    assert!(err.to_string().contains("λC: the matrix is not positive definite"), "{err}");
    // A factor read back from storage is checked: lower triangular, positive diagonal.
    let l = Array2::from_shape_vec((2, 2), vec![1.0, 0.0, 0.5, 2.0]).unwrap();
    assert!(solve::Factor::from_lower(l.clone()).is_some());
    assert!(solve::Factor::from_lower(l.t().to_owned()).is_none(), "upper triangular taken");
    assert!(solve::Factor::from_lower(-l.clone()).is_none(), "negative diagonal taken");
    assert!(solve::Factor::from_lower(Array2::zeros((2, 3))).is_none(), "not square taken");
    let nan = Array2::from_shape_vec((2, 2), vec![1.0, 0.0, f64::NAN, 2.0]).unwrap();
    assert!(solve::Factor::from_lower(nan).is_none(), "NaN taken");
}

#[test]
fn a_factor_solves_like_the_inverse() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (d, n) in [(1, 1), (7, 3), (20, 1), (20, 30)] {
        let a = second_moment(&mut rng, d) * 3.0 + Array2::<f64>::eye(d) * 0.25;
        let b = random(&mut rng, d, n);
        let dense = inverse(&a).dot(&b);
        for f in [factor(a.clone()), solve::Factor::from_lower(factor(a.clone()).lower().unwrap().clone()).unwrap()] {
            let err = max_abs(&(f.solve(&b).unwrap() - &dense)) / max_abs(&dense);
            assert!(err < 1e-9, "A⁻¹B ({d}x{d}, {n} columns): relative error {err:e}");
        }
        let l = factor(a.clone()).lower().unwrap().clone();
        assert!(max_abs(&(l.dot(&l.t()) - &a)) < 1e-12 * max_abs(&a), "L Lᵀ is not A");
        let scaled = solve::Factor::identity(2.5, d, "αI").unwrap();
        assert!(max_abs(&(scaled.solve(&b).unwrap() - &b / 2.5)) < 1e-15);
    }
    assert!(solve::Factor::identity(0.0, 3, "αI").is_err());
}

#[test]
fn emmet_matches_dense_reference_and_is_exact_without_ridge() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for (d_out, d_in, n, lambda, mu) in [(6, 9, 1, 10.0, 0.1), (5, 12, 4, 1.5, 0.0), (8, 16, 7, 100.0, 0.5)] {
        let r = random(&mut rng, d_out, n);
        let k = random(&mut rng, d_in, n);
        let c = second_moment(&mut rng, d_in);
        let (u, v) = solve::emmet(&r, &k, &factor(&c * lambda), mu).unwrap();
        let cinv = inverse(&(&c * lambda));
        let d = k.t().dot(&cinv).dot(&k) + Array2::<f64>::eye(n) * mu;
        let dense = r.dot(&inverse(&d)).dot(&k.t()).dot(&cinv);
        let update = u.dot(&v.t());
        let err = max_abs(&(&update - &dense)) / max_abs(&dense);
        assert!(err < 1e-9, "emmet ({d_out}x{d_in}, n={n}): relative error {err:e}");
        if mu == 0.0 {
            // Equality constraints: every key lands exactly on its residual.
            let miss = max_abs(&(update.dot(&k) - &r));
            assert!(miss < 1e-9, "emmet: ΔW K misses R by {miss:e}");
        }
    }
}

/// A symmetric matrix with the given eigenvalues along random orthonormal directions, and
/// those directions (columns).
fn with_spectrum(rng: &mut impl Rng, values: &[f64]) -> (Array2<f64>, Array2<f64>) {
    let n = values.len();
    // Gram–Schmidt on random columns.
    let mut q = random(rng, n, n);
    for j in 0..n {
        for i in 0..j {
            let proj = q.column(i).dot(&q.column(j));
            let qi = q.column(i).to_owned();
            q.column_mut(j).scaled_add(-proj, &qi);
        }
        let norm = q.column(j).dot(&q.column(j)).sqrt();
        q.column_mut(j).mapv_inplace(|x| x / norm);
    }
    let c = q.dot(&Array2::from_diag(&Array1::from(values.to_vec()))).dot(&q.t());
    (c, q)
}

#[test]
fn nullspace_projects_onto_the_small_eigendirections() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let values = [3.0, 1e-3, 0.5, 2e-2 * 0.99, 7.0, 1e-6, 0.03, 2.0];
    let (c, q) = with_spectrum(&mut rng, &values);
    let p = solve::nullspace(&c, 2e-2).unwrap();
    let small: Vec<usize> = (0..values.len()).filter(|&i| values[i] < 2e-2).collect();
    let u = q.select(ndarray::Axis(1), &small);
    let dense = u.dot(&u.t());
    assert!(max_abs(&(&p - &dense)) < 1e-9, "projector differs from Û Ûᵀ");
    assert!(max_abs(&(p.dot(&p) - &p)) < 1e-9, "not idempotent");
    assert_eq!(small.len(), 3);
    assert!((p.diag().sum() - 3.0).abs() < 1e-9, "rank {}", p.diag().sum());
}

#[test]
fn alphaedit_matches_dense_reference_and_spares_the_preserved_keys() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let d_in = 10;
    // Keys the corpus uses span 6 directions; 4 are free.
    let values = [4.0, 2.0, 1.0, 0.5, 0.3, 0.1, 1e-4, 1e-5, 1e-6, 1e-7];
    let (c, q) = with_spectrum(&mut rng, &values);
    let p = solve::nullspace(&c, 1e-2).unwrap();
    // Up to d/2 keys in all go through the Woodbury identity, more through a factorisation.
    for (d_out, n, n_p, alpha) in [(6, 1, 2, 10.0), (5, 3, 2, 1.0), (7, 2, 2, 0.1), (4, 2, 0, 1.0), (4, 3, 9, 0.5)] {
        let r = random(&mut rng, d_out, n);
        let k = random(&mut rng, d_in, n);
        let kp = random(&mut rng, d_in, n_p);
        let s_p = kp.dot(&kp.t());
        let (u, v) = solve::alphaedit(&r, &k, kp.view(), &p, alpha).unwrap();
        let s = k.dot(&k.t()) + &s_p;
        let dense = r.dot(&k.t()).dot(&p).dot(&inverse(&(s.dot(&p) + Array2::<f64>::eye(d_in) * alpha)));
        let update = u.dot(&v.t());
        let err = max_abs(&(&update - &dense)) / max_abs(&dense);
        assert!(err < 1e-9, "alphaedit (n={n}, α={alpha}): relative error {err:e}");
        // A key along the corpus's directions passes through unchanged.
        let used = q.column(0).to_owned() + q.column(3).to_owned() * 2.0;
        let leak = update.dot(&used).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(leak < 1e-9 * max_abs(&update).max(1.0), "ΔW moves a preserved key by {leak:e}");
    }
}

#[test]
fn projectors_are_kept_beside_their_statistics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let (c, _) = with_spectrum(&mut rng, &[3.0, 1e-3, 0.5, 1e-6, 7.0, 0.03]);
    let dir = tempfile::tempdir().unwrap();
    let fresh = || [(4, c.clone())].into_iter().collect::<factpatch::edit::Preserved>().keep_derived(dir.path(), "stats-id");
    let computed = fresh().nullspace(4, 2e-2).unwrap();
    assert_eq!(*computed, solve::nullspace(&c, 2e-2).unwrap());
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("stats-id.nullspace-4-"));
    // Read back bit for bit by a later run, not recomputed: a planted projector is what it gets.
    let planted = ndarray::Array2::<f64>::eye(6) * 0.5;
    let bytes: Vec<u8> = planted.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![6, 6], &bytes).unwrap();
    std::fs::write(&files[0], safetensors::serialize([("projector", view)], None).unwrap()).unwrap();
    assert_eq!(*fresh().nullspace(4, 2e-2).unwrap(), planted);
    // Another τ is another file; an unreadable one is computed again.
    assert_eq!(*fresh().nullspace(4, 1e-2).unwrap(), solve::nullspace(&c, 1e-2).unwrap());
    std::fs::write(&files[0], b"not safetensors").unwrap();
    assert_eq!(*fresh().nullspace(4, 2e-2).unwrap(), *computed);
}

#[test]
fn factors_are_kept_beside_their_statistics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let c = second_moment(&mut rng, 6);
    let dir = tempfile::tempdir().unwrap();
    let fresh = || [(4, c.clone())].into_iter().collect::<factpatch::edit::Preserved>().keep_derived(dir.path(), "stats-id");
    let computed = fresh().factor(4, 3.0, 0.5).unwrap();
    assert_eq!(*computed, factor(&c * 3.0 + Array2::<f64>::eye(6) * 0.5));
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("stats-id.cholesky-4-"));
    let plant = |m: &Array2<f64>| {
        let bytes: Vec<u8> = m.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![6, 6], &bytes).unwrap();
        std::fs::write(&files[0], safetensors::serialize([("factor", view)], None).unwrap()).unwrap();
    };
    // Read back by a later run, not recomputed: a planted factor is what it gets.
    let planted = Array2::<f64>::eye(6) * 0.5;
    plant(&planted);
    assert_eq!(fresh().factor(4, 3.0, 0.5).unwrap().lower(), Some(&planted));
    // One that is not a Cholesky factor (upper triangular) is computed again, as is another scale.
    plant(&(Array2::<f64>::eye(6) + Array2::from_shape_fn((6, 6), |(i, j)| f64::from(j > i))));
    assert_eq!(*fresh().factor(4, 3.0, 0.5).unwrap(), *computed);
    assert_eq!(*fresh().factor(4, 2.0, 0.5).unwrap(), factor(&c * 2.0 + Array2::<f64>::eye(6) * 0.5));
    // Missing statistics are named.
    assert!(fresh().factor(5, 3.0, 0.5).unwrap_err().to_string().contains("no key statistics for layer 5"));
}

#[test]
fn encore_matches_dense_reference_and_zeroes_its_objective_gradient() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for (d_out, d_in, n, n_p, lambda_p, lambda_n) in [(6, 9, 1, 0, 10.0, 10.0), (5, 12, 4, 2, 1.5, 0.5), (8, 16, 7, 5, 15000.0, 20.0), (3, 8, 2, 12, 2.0, 0.0)]
    {
        let r = random(&mut rng, d_out, n);
        let k = random(&mut rng, d_in, n);
        let c = second_moment(&mut rng, d_in);
        let kp = random(&mut rng, d_in, n_p);
        let s_p = kp.dot(&kp.t());
        let base = factor(&c * lambda_p + Array2::<f64>::eye(d_in) * lambda_n);
        let (u, v) = solve::encore(&r, &k, &base, kp.view()).unwrap();
        let a = &c * lambda_p + &s_p + Array2::<f64>::eye(d_in) * lambda_n + k.dot(&k.t());
        let dense = r.dot(&k.t()).dot(&inverse(&a));
        let update = u.dot(&v.t());
        let err = max_abs(&(&update - &dense)) / max_abs(&dense);
        assert!(err < 1e-9, "encore (n={n}, n_p={n_p}, λ_p={lambda_p}, λₙ={lambda_n}): relative error {err:e}");
        // ½∇ of ‖ΔK − R‖² + λ_p tr(ΔCΔᵀ) + ‖ΔK_p‖² + λₙ‖Δ‖²: (ΔK − R)Kᵀ + Δ(λ_p C + K_pK_pᵀ + λₙI).
        let grad = (update.dot(&k) - &r).dot(&k.t()) + update.dot(&(&c * lambda_p + kp.dot(&kp.t()) + Array2::<f64>::eye(d_in) * lambda_n));
        let scale = max_abs(&r.dot(&k.t()));
        assert!(max_abs(&grad) < 1e-9 * scale, "encore: the objective's gradient is {:e} at the solution", max_abs(&grad));
    }
    // Without the norm penalty and earlier keys, ENCORE is MEMIT.
    let (r, k, c) = (random(&mut rng, 4, 2), random(&mut rng, 7, 2), second_moment(&mut rng, 7));
    let (u, v) = solve::encore(&r, &k, &factor(&c * 3.0), Array2::zeros((7, 0)).view()).unwrap();
    let (mu, mv) = solve::memit(&r, &k, &factor(&c * 3.0)).unwrap();
    assert!(max_abs(&(u.dot(&v.t()) - mu.dot(&mv.t()))) < 1e-12);
}

#[test]
fn anchored_value_matches_dense_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    for (d_out, d_in) in [(5, 8), (12, 30), (1, 3)] {
        let w0 = random(&mut rng, d_out, d_in);
        let key = Array1::from_iter((0..d_in).map(|_| rng.random::<f64>() * 2.0 - 1.0));
        let value = Array1::from_iter((0..d_out).map(|_| rng.random::<f64>() * 2.0 - 1.0));
        let delta = Array1::from_iter((0..d_out).map(|_| rng.random::<f64>() * 6.0 - 3.0));
        let got = solve::anchored_delta(&w0, &key, &value, &delta).unwrap();
        // Naive: the original value W₀k, its norm, and v + δ scaled to it.
        let anchor: Vec<f64> = (0..d_out).map(|i| (0..d_in).map(|j| w0[[i, j]] * key[j]).sum()).collect();
        let anchor_norm = anchor.iter().map(|x| x * x).sum::<f64>().sqrt();
        let target: Vec<f64> = (0..d_out).map(|i| value[i] + delta[i]).collect();
        let target_norm = target.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..d_out {
            let want = target[i] * anchor_norm / target_norm - value[i];
            assert!((got[i] - want).abs() < 1e-9 * want.abs().max(1.0), "({d_out}x{d_in}) element {i}: {} vs {want}", got[i]);
        }
        // The new value has the original value's norm and keeps the optimised direction.
        let new = &value + &got;
        assert!((new.dot(&new).sqrt() - anchor_norm).abs() < 1e-9 * anchor_norm);
        let cosine = new.dot(&Array1::from(target)) / (new.dot(&new).sqrt() * target_norm);
        assert!((cosine - 1.0).abs() < 1e-12, "direction changed: cosine {cosine}");
    }
    let err = solve::anchored_delta(&Array2::zeros((3, 4)), &Array1::zeros(5), &Array1::zeros(3), &Array1::zeros(3)).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn merging_equal_columns_keeps_the_update_at_a_lower_rank() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let r = random(&mut rng, 6, 3);
    // MEMIT with two keys a fact (the template average and the raw prompt's key) mapped to the same residual.
    let r2 = ndarray::concatenate![ndarray::Axis(1), r, r];
    let k = random(&mut rng, 9, 6);
    let c = second_moment(&mut rng, 9);
    let (u, v) = solve::memit(&r2, &k, &factor(&c * 2.0)).unwrap();
    let dense = u.dot(&v.t());
    let (u, v) = solve::merge_equal_columns(u, v);
    assert_eq!((u.ncols(), v.ncols()), (3, 3), "six columns of three distinct residuals merge into three");
    let err = max_abs(&(u.dot(&v.t()) - &dense)) / max_abs(&dense);
    assert!(err < 1e-12, "merged update differs: relative error {err:e}");
    // Distinct columns are left alone.
    let (u1, v1) = (random(&mut rng, 6, 4), random(&mut rng, 9, 4));
    let (u2, v2) = solve::merge_equal_columns(u1.clone(), v1.clone());
    assert_eq!((u2, v2), (u1, v1));
}
