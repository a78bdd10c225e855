//! Attention for inference on the CPU: `softmax(cap(scale·q·kᵀ) + bias)·v` computed a tile of queries
//! at a time, so the `[batch, heads, queries, keys]` scores never exist as one tensor and keys
//! no query of a tile can see (the causal future, left padding) are skipped. Forward only:
//! callers use it when no gradient can flow, as with candle-nn's fused kernels.

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per tile: the tile's scores (`TILE × keys` f32) stay in cache.
const TILE: usize = 64;

/// Whether [`attend`] can take these inputs (f32 on the CPU).
pub fn supports(q: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32
}

/// `q [b, heads, t, d]`, `k`/`v [b, kv_heads, s, d]` (query head `h` reads kv head
/// `h / (heads / kv_heads)`), `bias [b, 1, t, s]` additive (0 or −∞, at least one 0 per row),
/// the logits `scale·q·kᵀ` soft-capped to `c·tanh(x/c)` where `softcap` is `c`
/// → `[b, t, heads · d]`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f32, softcap: Option<f32>) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, s, _) = k.dims4()?;
    let flat = |x: &Tensor| x.contiguous()?.flatten_all()?.to_vec1::<f32>();
    let (qv, kv, vv, bias) = (flat(q)?, flat(k)?, flat(v)?, flat(bias)?);
    let rep = heads / kv_heads;
    let width = heads * d;
    let mut out = vec![0f32; b * t * width];
    out.par_chunks_mut(t * width)
        .enumerate()
        .flat_map(|(seq, rows)| rows.par_chunks_mut(TILE * width).enumerate().map(move |(j, part)| (seq, j * TILE, part)))
        .for_each(|(seq, i0, part)| {
            let rows = part.len() / width;
            let bias = &bias[(seq * t + i0) * s..(seq * t + i0 + rows) * s];
            // Keys any query of the tile can see.
            let visible = |r: &[f32]| r.iter().position(|x| x.is_finite()).map(|a| (a, s - r.iter().rev().position(|x| x.is_finite()).unwrap_or(0)));
            let (from, to) = bias.chunks(s).filter_map(visible).fold((s, 0), |(a, z), (x, y)| (a.min(x), z.max(y)));
            let n = to.saturating_sub(from);
            if n == 0 {
                return;
            }
            let mut scores = vec![0f32; rows * n];
            for h in 0..heads {
                let q = &qv[((seq * heads + h) * t + i0) * d..((seq * heads + h) * t + i0 + rows) * d];
                let kvh = (seq * kv_heads + h / rep) * s;
                let (k, v) = (&kv[(kvh + from) * d..(kvh + to) * d], &vv[(kvh + from) * d..(kvh + to) * d]);
                // scores = scale · q · kᵀ
                matmul(&mut scores, (n, 1), q, (d, 1), k, (1, d), (rows, n, d), scale);
                if let Some(c) = softcap {
                    scores.iter_mut().for_each(|x| *x = (*x / c).tanh() * c);
                }
                for (sr, br) in scores.chunks_exact_mut(n).zip(bias.chunks_exact(s)) {
                    softmax_row(sr, &br[from..to]);
                }
                // out[:, h·d..] = probs · v
                matmul(&mut part[h * d..], (width, 1), &scores, (n, 1), v, (d, 1), (rows, d, n), 1.0);
            }
        });
    Tensor::from_vec(out, (b, t, width), q.device())
}

/// `x := softmax(x + bias)` over one row.
fn softmax_row(x: &mut [f32], bias: &[f32]) {
    x.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in x.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    x.iter_mut().for_each(|x| *x /= sum);
}

/// `dst[m×n] = alpha · lhs[m×k] · rhs[k×n]`, single-threaded, with (row, column) strides in
/// elements; every element addressed lies inside its slice (checked).
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    dst_s: (usize, usize),
    lhs: &[f32],
    lhs_s: (usize, usize),
    rhs: &[f32],
    rhs_s: (usize, usize),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
) {
    let last = |(rs, cs): (usize, usize), r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0);
    assert!(last(dst_s, m, n) < dst.len() && last(lhs_s, m, k) < lhs.len() && last(rhs_s, k, n) < rhs.len());
    // SAFETY: the asserts keep every element gemm reads or writes inside the three slices,
    // and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.1 as isize,
            dst_s.0 as isize,
            false,
            lhs.as_ptr(),
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs.as_ptr(),
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention by definition, one query at a time, in f64.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        (b, heads, kv_heads, t, s, d): (usize, usize, usize, usize, usize, usize),
        softcap: Option<f64>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; b * t * heads * d];
        for (seq, h, i) in (0..b).flat_map(|x| (0..heads).flat_map(move |h| (0..t).map(move |i| (x, h, i)))) {
            let kvh = seq * kv_heads + h / (heads / kv_heads);
            let qi = &q[((seq * heads + h) * t + i) * d..][..d];
            let logits: Vec<f64> = (0..s)
                .map(|j| {
                    let kj = &k[(kvh * s + j) * d..][..d];
                    let x = qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>() / (d as f64).sqrt();
                    softcap.map_or(x, |c| (x / c).tanh() * c) + bias[(seq * t + i) * s + j] as f64
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                let o: f64 = (0..s).map(|j| e[j] / z * v[(kvh * s + j) * d + c] as f64).sum();
                out[(seq * t + i) * heads * d + h * d + c] = o as f32;
            }
        }
        out
    }

    #[test]
    fn equals_the_definition_with_gqa_padding_a_cached_prefix_and_softcapping() {
        // Two sequences, 70 new queries after 5 cached keys (tiles of 64 + 6); the second
        // sequence has 3 left pads, which no query may see.
        let (b, heads, kv_heads, t, p, d) = (2, 6, 2, 70, 5, 8);
        let s = p + t;
        let fill = |n: usize, seed: u64| -> Vec<f32> { (0..n as u64).map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0).collect() };
        let (q, k, v) = (fill(b * heads * t * d, 1), fill(b * kv_heads * s * d, 2), fill(b * kv_heads * s * d, 3));
        let mut bias = vec![0f32; b * t * s];
        for (seq, i, j) in (0..b).flat_map(|x| (0..t).flat_map(move |i| (0..s).map(move |j| (x, i, j)))) {
            let padded = seq == 1 && j < 3;
            if j > p + i || padded {
                bias[(seq * t + i) * s + j] = f32::NEG_INFINITY;
            }
        }
        let dev = Device::Cpu;
        // Plain, and with logits soft-capped at 0.7 (they reach ±2.8 here).
        for softcap in [None, Some(0.7)] {
            let got = attend(
                &Tensor::from_vec(q.clone(), (b, heads, t, d), &dev).unwrap(),
                &Tensor::from_vec(k.clone(), (b, kv_heads, s, d), &dev).unwrap(),
                &Tensor::from_vec(v.clone(), (b, kv_heads, s, d), &dev).unwrap(),
                &Tensor::from_vec(bias.clone(), (b, 1, t, s), &dev).unwrap(),
                1.0 / (d as f32).sqrt(),
                softcap.map(|c| c as f32),
            )
            .unwrap();
            assert_eq!(got.dims(), &[b, t, heads * d]);
            let want = naive(&q, &k, &v, &bias, (b, heads, kv_heads, t, s, d), softcap);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "softcap {softcap:?}: max |Δ| = {err}");
        }
    }
}
