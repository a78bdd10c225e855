//! RECT: keep only the top-k% of a delta by relative change |ΔW|/max(|W|, ε).
//! Deterministic: f32 scores, ties broken by the lower flat index.

use std::cmp::Ordering;

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
/// `delta` and `w` have the same length; `k` is a percentage. Extra memory: one f32 per element.
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
    let mut scores: Vec<f32> = delta.iter().zip(w).map(|(&d, &w)| score(d, w, eps)).collect();
    let threshold = *scores.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a)).1;
    let above = scores.iter().filter(|s| s.total_cmp(&threshold) == Ordering::Greater).count();
    drop(scores);
    // Everything above the threshold stays; of the ties at it, the lowest indices fill the quota.
    let mut ties = keep - above;
    for (d, &w) in delta.iter_mut().zip(w) {
        match score(*d, w, eps).total_cmp(&threshold) {
            Ordering::Greater => {}
            Ordering::Equal if ties > 0 => ties -= 1,
            _ => *d = 0.0,
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

    #[test]
    fn matches_a_full_sort_with_many_ties() {
        let n = 1000;
        let w: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let delta: Vec<f32> = (0..n).map(|i| ((i * 104729) % 5) as f32 * 0.5 - 1.0).collect();
        for k in [0.1, 3.0, 33.3, 50.0, 99.9] {
            let mut got = delta.clone();
            mask(&mut got, &w, k, 1e-3);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| score(delta[b], w[b], 1e-3).total_cmp(&score(delta[a], w[a], 1e-3)).then(a.cmp(&b)));
            let mut want = vec![0.0; n];
            for &i in &order[..keep_count(k, n)] {
                want[i] = delta[i];
            }
            assert_eq!(got, want, "k = {k}");
        }
        assert_eq!(keep_count(0.0, 7), 0);
    }
}
