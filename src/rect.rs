//! RECT: keep only the top-k% of a delta by relative change |ΔW|/max(|W|, ε).
//! Deterministic: f32 scores, ties broken by the lower flat index.

/// How many of `n` elements the top-`k`% keeps: `ceil(k·n/100)` in f64, clamped to [0, n].
pub fn keep_count(k: f64, n: usize) -> usize {
    let c = (k * n as f64 / 100.0).ceil();
    if c.is_nan() || c <= 0.0 {
        0
    } else {
        (c as usize).min(n)
    }
}

/// The relative-change score of one element.
pub fn score(delta: f32, w: f32, eps: f32) -> f32 {
    delta.abs() / w.abs().max(eps)
}

/// Zeroes every element of `delta` outside the top-`k`% by [`score`] against `w`.
/// `delta` and `w` have the same length; `k` is a percentage.
pub fn mask(delta: &mut [f32], w: &[f32], k: f64, eps: f32) {
    debug_assert_eq!(delta.len(), w.len());
    let n = delta.len();
    let keep = keep_count(k, n);
    if keep == n {
        return;
    }
    if keep == 0 {
        delta.fill(0.0);
        return;
    }
    let mut order: Vec<(f32, u32)> = (0..n).map(|i| (score(delta[i], w[i], eps), i as u32)).collect();
    // Higher score first; equal scores: lower index first. A total order, so the split is unique.
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    order.select_nth_unstable_by(keep - 1, cmp);
    let mut kept = vec![false; n];
    for &(_, i) in &order[..keep] {
        kept[i as usize] = true;
    }
    for (d, k) in delta.iter_mut().zip(kept) {
        if !k {
            *d = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_top_by_relative_change_with_index_ties() {
        let w = [1.0, 10.0, 1.0, 0.0, 1.0];
        let mut d = [0.5, 1.0, 0.5, 1e-9, 0.1];
        // scores: 0.5, 0.1, 0.5, 1e-9/eps(1e-8)=0.1, 0.1 → keep 2: indices 0 and 2.
        mask(&mut d, &w, 40.0, 1e-8);
        assert_eq!(d, [0.5, 0.0, 0.5, 0.0, 0.0]);
        let mut d = [1.0, 1.0, 1.0];
        mask(&mut d, &[1.0; 3], 34.0, 1e-8); // ceil(1.02) = 2, ties → lowest indices
        assert_eq!(d, [1.0, 1.0, 0.0]);
        assert_eq!(keep_count(100.0, 7), 7);
        assert_eq!(keep_count(0.0, 7), 0);
    }
}
