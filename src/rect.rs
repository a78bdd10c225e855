//! RECT: keep only the top-k% of a delta by relative change |ΔW|/max(|W|, ε).
//! Deterministic: f32 scores, ties broken by the lower flat index.

/// ε in |ΔW|/max(|W|, ε): keeps the score finite where a weight is zero.
pub const EPS: f32 = 1e-8;

/// A RECT setting as written on the command line: `none` (keep the whole update, k = 100) or
/// k, the percentage kept, in (0, 100].
pub fn parse_k(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s == "none" {
        return Ok(100.0);
    }
    match s.parse::<f64>() {
        Ok(k) if k > 0.0 && k <= 100.0 => Ok(k),
        _ => Err(format!("`{s}` is neither `none` nor a percentage in (0, 100]")),
    }
}

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
#[inline]
pub fn score(delta: f32, w: f32, eps: f32) -> f32 {
    delta.abs() / w.abs().max(eps)
}

/// The order key of an element: its score's bits (for non-negative floats, bit order is value order).
#[inline]
pub fn key(delta: f32, w: f32, eps: f32) -> u32 {
    score(delta, w, eps).to_bits()
}

/// Where the top-`k`% of a sequence of keys begins: every key above `threshold` is kept and,
/// of the keys equal to it, the first `ties` in flat order. Found by two histogram passes, so
/// the extra memory is one fixed 64K-bin histogram, not a copy of the scores, whether the keys
/// sit in memory or are recomputed chunk by chunk.
#[derive(Clone, Copy, Debug)]
pub struct Cut {
    threshold: u32,
    ties: usize,
}

impl Cut {
    /// The cut that keeps [`keep_count`]`(k, n)` of the `n` keys `keys` visits in flat order, a
    /// slice at a time (it is called twice, and must visit the same keys each time); `None`
    /// when all stay.
    pub fn find(n: usize, k: f64, mut keys: impl FnMut(&mut dyn FnMut(&[u32]))) -> Option<Cut> {
        let keep = keep_count(k, n);
        if keep == n {
            return None;
        }
        if keep == 0 {
            return Some(Cut { threshold: u32::MAX, ties: 0 });
        }
        let mut hist = vec![0usize; 1 << 16];
        keys(&mut |ks| ks.iter().for_each(|&b| hist[(b >> 16) as usize] += 1));
        let (high, rank) = descend(&hist, keep);
        hist.fill(0);
        keys(&mut |ks| ks.iter().filter(|&&b| b >> 16 == high).for_each(|&b| hist[(b & 0xffff) as usize] += 1));
        let (low, ties) = descend(&hist, rank);
        Some(Cut { threshold: high << 16 | low, ties })
    }

    /// Zeroes the elements of `delta` that are not kept, `keys` theirs: the next ones in flat
    /// order. The ties still kept are found first; then each element is kept or zeroed by one
    /// comparison and a bit mask, with no branch on the (unpredictable) outcome, so it vectorizes.
    pub fn zero(&mut self, delta: &mut [f32], keys: &[u32]) {
        let t = self.threshold;
        // Up to `split`, a key equal to the threshold is a tie still kept; from there on, not.
        let mut split = 0;
        if self.ties > 0 {
            split = keys.len();
            for (i, _) in keys.iter().enumerate().filter(|&(_, &k)| k == t) {
                if self.ties == 0 {
                    split = i;
                    break;
                }
                self.ties -= 1;
            }
        }
        let (d_ties, d_rest) = delta.split_at_mut(split);
        let (k_ties, k_rest) = keys.split_at(split);
        keep_where(d_ties, k_ties, |k| k >= t);
        keep_where(d_rest, k_rest, |k| k > t);
    }
}

/// Sets the elements of `delta` whose keys fail `kept` to +0, by a bit mask.
#[inline]
fn keep_where(delta: &mut [f32], keys: &[u32], kept: impl Fn(u32) -> bool) {
    for (d, &key) in delta.iter_mut().zip(keys) {
        *d = f32::from_bits(d.to_bits() & u32::from(kept(key)).wrapping_neg());
    }
}

/// The keys of `delta` against `w` (same lengths), into `out` (cleared first).
pub fn keys(delta: &[f32], w: &[f32], eps: f32, out: &mut Vec<u32>) {
    out.clear();
    out.extend(delta.iter().zip(w).map(|(&d, &w)| key(d, w, eps)));
}

/// Elements whose keys [`mask`] holds at a time.
const STEP: usize = 1 << 14;

/// Zeroes every element of `delta` outside the top-`k`% by [`score`] against `w`
/// (same lengths; `k` a percentage), ties going to the lower flat index.
pub fn mask(delta: &mut [f32], w: &[f32], k: f64, eps: f32) {
    debug_assert_eq!(delta.len(), w.len());
    let mut ks = Vec::with_capacity(STEP);
    let Some(mut cut) = Cut::find(delta.len(), k, |visit| {
        for (d, w) in delta.chunks(STEP).zip(w.chunks(STEP)) {
            keys(d, w, eps, &mut ks);
            visit(&ks);
        }
    }) else {
        return;
    };
    for (d, w) in delta.chunks_mut(STEP).zip(w.chunks(STEP)) {
        keys(d, w, eps, &mut ks);
        cut.zero(d, &ks);
    }
}

/// The bin holding the `rank`-th largest element (1-based) of a histogram, and that element's
/// rank within the bin.
fn descend(hist: &[usize], mut rank: usize) -> (u32, usize) {
    for (bin, &count) in hist.iter().enumerate().rev() {
        if rank <= count {
            return (bin as u32, rank);
        }
        rank -= count;
    }
    unreachable!("rank is at most the histogram's total")
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

    /// The mask by definition: a full sort by score, ties by index.
    fn by_sorting(delta: &[f32], w: &[f32], k: f64, eps: f32) -> Vec<f32> {
        let n = delta.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| score(delta[b], w[b], eps).total_cmp(&score(delta[a], w[a], eps)).then(a.cmp(&b)));
        let mut want = vec![0.0; n];
        for &i in &order[..keep_count(k, n)] {
            want[i] = delta[i];
        }
        want
    }

    #[test]
    fn matches_a_full_sort_with_many_ties() {
        let n = 1000;
        let w: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let delta: Vec<f32> = (0..n).map(|i| ((i * 104729) % 5) as f32 * 0.5 - 1.0).collect();
        for k in [0.1, 3.0, 33.3, 50.0, 99.9] {
            let mut got = delta.clone();
            mask(&mut got, &w, k, 1e-3);
            assert_eq!(got, by_sorting(&delta, &w, k, 1e-3), "k = {k}");
        }
    }

    #[test]
    fn matches_a_full_sort_on_continuous_values() {
        // Scores spread over many high-bit bins and sharing some, with exact zeros (eps ties).
        let n = 50_000;
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..n).map(|i| if i % 97 == 0 { 0.0 } else { next() }).collect();
        let delta: Vec<f32> = (0..n).map(|i| if i % 89 == 0 { 0.0 } else { next() * 1e-3 }).collect();
        for k in [0.01, 1.0, 40.0, 99.0] {
            let mut got = delta.clone();
            mask(&mut got, &w, k, 1e-6);
            assert_eq!(got, by_sorting(&delta, &w, k, 1e-6), "k = {k}");
        }
    }
}
