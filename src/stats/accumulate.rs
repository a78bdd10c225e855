//! Accumulation: Σ k kᵀ of the MLP keys over the sampled batches, in f64 with a BLAS rank-k
//! update per layer.

use super::Result;
use crate::model::{Batch, Hooks, Model};
use indicatif::ProgressBar;
// Links OpenBLAS (through its LAPACK backend), which provides the CBLAS `dsyrk` used here.
use ndarray::Array2;
use ndarray_linalg as _;
use std::collections::BTreeMap;

/// Σ k kᵀ over some tokens of one layer, and how many tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Sums {
    /// `[intermediate, intermediate]`, symmetric.
    pub sum: Array2<f64>,
    pub count: u64,
}

impl Sums {
    /// E[k kᵀ]: the sum divided by the count.
    pub fn second_moment(&self) -> Array2<f64> {
        &self.sum / self.count.max(1) as f64
    }
}

/// Runs the model over `batches` once each, every sequence behind `prefix` (the tokenizer's
/// sequence start), stopping after the highest of `layers`, and sums k kᵀ over every real token
/// but the prefix's, at every layer. `progress` advances by tokens summed.
pub fn accumulate(model: &Model, layers: &[usize], prefix: &[u32], batches: &[Vec<Vec<u32>>], progress: &ProgressBar) -> Result<BTreeMap<usize, Sums>> {
    let d = model.config.intermediate_size;
    let hooks = Hooks { keys: layers.to_vec(), stop_after: layers.iter().max().copied(), ..Hooks::default() };
    // Upper triangles only until the end (dsyrk); mirrored below.
    let mut upper: BTreeMap<usize, Vec<f64>> = layers.iter().map(|&l| (l, vec![0f64; d * d])).collect();
    let mut count = 0u64;
    let mut rows = Vec::new();
    let p = prefix.len();
    for seqs in batches {
        let batch = Batch::right_padded(&seqs.iter().map(|s| [prefix, s].concat()).collect::<Vec<_>>());
        let trace = model.forward(&batch, &hooks, None)?;
        let t = batch.seq_len();
        let real: usize = seqs.iter().map(Vec::len).sum();
        for (layer, keys) in &trace.keys {
            let keys = keys.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            rows.clear();
            for (s, seq) in seqs.iter().enumerate() {
                rows.extend(keys[(s * t + p) * d..(s * t + p + seq.len()) * d].iter().map(|&k| k as f64));
            }
            syrk_upper(&mut upper.get_mut(layer).expect("hooked layer")[..], &rows, d);
        }
        count += real as u64;
        progress.inc(real as u64);
    }
    Ok(upper
        .into_iter()
        .map(|(l, u)| {
            let mut sum = Array2::from_shape_vec((d, d), u).expect("d × d");
            for i in 0..d {
                for j in 0..i {
                    sum[[i, j]] = sum[[j, i]];
                }
            }
            (l, Sums { sum, count })
        })
        .collect())
}

/// `c[i][j] += Σ_r a[r][i]·a[r][j]` for `i <= j`; `a` is row-major `[rows, d]`, `c` row-major `[d, d]`.
pub fn syrk_upper(c: &mut [f64], a: &[f64], d: usize) {
    let k = a.len() / d;
    if k == 0 {
        return;
    }
    assert!(c.len() == d * d && a.len() == k * d && d <= i32::MAX as usize && k <= i32::MAX as usize);
    // SAFETY: the slices hold exactly the [k, d] and [d, d] row-major matrices the call reads/writes.
    unsafe {
        cblas_sys::cblas_dsyrk(
            cblas_sys::CblasRowMajor,
            cblas_sys::CblasUpper,
            cblas_sys::CblasTrans,
            d as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            d as i32,
            1.0,
            c.as_mut_ptr(),
            d as i32,
        );
    }
}
