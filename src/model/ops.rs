//! Differentiable building blocks. candle-nn's fused kernels (softmax, norms, rope, sdpa)
//! have no backward pass, so everything gradients must flow through is composed here from
//! primitive ops that do. Weight matmuls go through [`Linear`], whose backward pass computes
//! the input gradient only: weights are frozen, and candle's own matmul would also compute theirs.

use super::config::{RopeConfig, RopeScaling};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D};

/// A frozen affine map `y = x·Wᵀ + b`, with `W` stored `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Linear { weight: self.weight.to_dtype(dtype)?, bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()? })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let lead = &x.dims()[..x.rank() - 1];
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?.contiguous()?;
        let y = x2.apply_op2(&self.weight, FrozenMatmul { transposed: true })?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = lead.to_vec();
        shape.push(out_dim);
        y.reshape(shape)
    }
}

/// `x [m, k] · wᵀ` for `w [n, k]` (`transposed`), or `x [m, k] · w` for `w [k, n]`,
/// differentiable in `x` only. Each is the other's backward pass. On the CPU, f32 goes to the
/// system BLAS, whose kernels outrun candle's on these skinny products.
struct FrozenMatmul {
    transposed: bool,
}

impl FrozenMatmul {
    /// `(m, n, k)` from the layouts, checking the inner dimensions agree.
    fn dims(&self, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (r, c) = l2.shape().dims2()?;
        let (n, k2) = if self.transposed { (r, c) } else { (c, r) };
        if k != k2 {
            candle_core::bail!("frozen matmul: inner dimensions differ ({k} vs {k2})");
        }
        Ok((m, n, k))
    }

    /// `w`'s layout as the right operand `[k, n]` of a plain matmul.
    fn rhs(&self, l2: &Layout) -> Result<Layout> {
        if self.transposed {
            l2.transpose(0, 1)
        } else {
            Ok(l2.clone())
        }
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(l1, l2)?;
        if let (CpuStorage::F32(x), CpuStorage::F32(w), Some((x0, x1)), Some((w0, w1)), true) =
            (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets(), k > 0)
        {
            let (x, w) = (&x[x0..x1], &w[w0..w1]);
            // Not zeroed: with beta = 0, sgemm writes every element of y without reading it.
            let mut y = Vec::<f32>::with_capacity(m * n);
            let (trans, ldw) = if self.transposed { (cblas_sys::CblasTrans, k) } else { (cblas_sys::CblasNoTrans, n) };
            // SAFETY: row-major x [m, k], w [n, k] or [k, n] (checked above), y [m, n] allocated
            // and fully written by sgemm (beta = 0) before its length is set.
            unsafe {
                cblas_sys::cblas_sgemm(
                    cblas_sys::CblasRowMajor,
                    cblas_sys::CblasNoTrans,
                    trans,
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    x.as_ptr(),
                    k as i32,
                    w.as_ptr(),
                    ldw as i32,
                    0.0,
                    y.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
                    n as i32,
                );
                y.set_len(m * n);
            }
            return Ok((CpuStorage::F32(y), Shape::from((m, n))));
        }
        let out = s1.matmul(s2, (1, m, n, k), l1, &self.rhs(l2)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &self.rhs(l2)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = FrozenMatmul { transposed: !self.transposed };
        Ok((Some(grad.contiguous()?.apply_op2(w, back)?), None))
    }
}

/// Softmax over the last dimension, stable, with a backward pass. When no gradient can flow
/// through `x`, candle-nn's fused kernel (which has no backward) computes the same values faster.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, stable, with a backward pass.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `c·tanh(x/c)`: values squashed smoothly into `(−c, c)` (Gemma's soft-capping), differentiable.
pub fn softcap(x: &Tensor, c: f64) -> Result<Tensor> {
    (x / c)?.tanh()? * c
}

/// Normalisation layers, as their families define them.
#[derive(Clone, Debug)]
pub enum Norm {
    /// `x / sqrt(mean(x²) + eps) · w` (Llama).
    Rms { weight: Tensor, eps: f64 },
    /// `(x − mean) / sqrt(var + eps) · w + b` (GPT-2).
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

impl Norm {
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            Norm::Rms { weight, eps } => Norm::Rms { weight: weight.to_dtype(dtype)?, eps: *eps },
            Norm::Layer { weight, bias, eps } => Norm::Layer { weight: weight.to_dtype(dtype)?, bias: bias.to_dtype(dtype)?, eps: *eps },
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // The fused kernel has no backward: only where no gradient can flow.
            Norm::Rms { weight, eps } if !x.track_op() && x.dtype() == DType::F32 => candle_nn::ops::rms_norm(&x.contiguous()?, weight, *eps as f32),
            Norm::Rms { weight, eps } => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + *eps)?.sqrt()?)?.broadcast_mul(weight)
            }
            Norm::Layer { weight, bias, eps } => {
                let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred.broadcast_div(&(var + *eps)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)
            }
        }
    }
}

/// Which of a head's rotated dimensions turn together as a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RotaryLayout {
    /// Dimension `i` with `i + rotary_dim/2` (`rotate_half`: Llama, GPT-NeoX).
    HalfSplit,
    /// Dimension `2i` with `2i + 1` (`rotate_every_two`: GPT-J).
    Interleaved,
}

/// Rotary position embedding. The angles are computed for the positions a pass uses, so nothing
/// is allocated per position of the model's context.
#[derive(Clone, Debug)]
pub struct Rope {
    /// The inverse frequencies, `rotary_dim / 2` of them.
    inv: Vec<f32>,
    layout: RotaryLayout,
}

/// The cosines and sines of one pass's positions, `[b, 1, t, rotary_dim]` each, in the layout's
/// order of dimensions.
pub struct RopeAngles {
    cos: Tensor,
    sin: Tensor,
    layout: RotaryLayout,
}

impl Rope {
    /// The inverse frequencies of the rotated dimensions under `rope`, computed in f32 as
    /// transformers does, paired as `layout` says.
    pub fn new(rope: &RopeConfig, layout: RotaryLayout) -> Self {
        let dim = rope.rotary_dim;
        let base = (0..dim / 2).map(|i| (1.0 / rope.theta.powf(2.0 * i as f64 / dim as f64)) as f32);
        let inv = match rope.scaling {
            None => base.collect(),
            Some(RopeScaling::Linear { factor }) => base.map(|f| f / factor as f32).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions }) => {
                let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_positions as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        };
        Rope { inv, layout }
    }

    /// The angles of `positions` (`b × t`, row-major) in `dtype` on `device`.
    pub fn angles(&self, positions: &[u32], (b, t): (usize, usize), dtype: DType, device: &candle_core::Device) -> Result<RopeAngles> {
        let hd = 2 * self.inv.len();
        let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * hd), Vec::with_capacity(positions.len() * hd));
        // Each frequency twice: the halves repeated (half-split), or each one repeated (interleaved).
        let order: Vec<f32> = match self.layout {
            RotaryLayout::HalfSplit => self.inv.iter().chain(&self.inv).copied().collect(),
            RotaryLayout::Interleaved => self.inv.iter().flat_map(|&f| [f, f]).collect(),
        };
        for &p in positions {
            for f in &order {
                // HF computes the angle in f32: match it so logits agree to the last bits.
                let angle = (p as f32) * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (b, 1, t, hd), device)?.to_dtype(dtype);
        Ok(RopeAngles { cos: table(cos)?, sin: table(sin)?, layout: self.layout })
    }

    /// Rotates `x [b, heads, t, head_dim]` by the angles of its positions: all of each head,
    /// or its first rotated dimensions (the rest pass through).
    pub fn apply(x: &Tensor, angles: &RopeAngles) -> Result<Tensor> {
        let (_, _, _, hd) = x.dims4()?;
        let (cos, sin) = (&angles.cos, &angles.sin);
        let rd = cos.dim(D::Minus1)?;
        let rot = if rd < hd { x.narrow(D::Minus1, 0, rd)? } else { x.clone() };
        // Each pair (x1, x2) becomes (−x2, x1).
        let rotated = match angles.layout {
            RotaryLayout::HalfSplit => {
                let x1 = rot.narrow(D::Minus1, 0, rd / 2)?;
                let x2 = rot.narrow(D::Minus1, rd / 2, rd / 2)?;
                Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?
            }
            RotaryLayout::Interleaved => {
                let (b, h, t, _) = rot.dims4()?;
                let pairs = rot.reshape((b, h, t, rd / 2, 2))?;
                let (x1, x2) = (pairs.narrow(D::Minus1, 0, 1)?, pairs.narrow(D::Minus1, 1, 1)?);
                Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?.reshape((b, h, t, rd))?
            }
        };
        let out = (rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        if rd < hd {
            Tensor::cat(&[&out, &x.narrow(D::Minus1, rd, hd - rd)?], D::Minus1)
        } else {
            Ok(out)
        }
    }
}

/// Activation functions of MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// `x·σ(x)` (Llama's SwiGLU gate).
    Silu,
    /// GPT-2's tanh approximation of GELU ("gelu_new").
    GeluTanh,
    /// GELU by the error function ("gelu": GPT-NeoX).
    Gelu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
            Activation::Gelu => x.gelu_erf(),
        }
    }

    /// `act(gate) · up`: one fused, parallel pass when no gradient can flow (f32 on the CPU),
    /// composed from differentiable ops otherwise.
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let fused = !gate.track_op() && !up.track_op() && gate.dtype() == DType::F32 && gate.device().is_cpu() && gate.dims() == up.dims();
        if !fused {
            return self.apply(gate)? * up;
        }
        gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &Gated(self))
    }

    /// The activation of one f32 value, as candle computes it.
    fn scalar(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::GeluTanh => {
                0.5 * x * (1.0 + (std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2 * x * (1.0 + 0.044715 * x * x)).tanh())
            }
            Activation::Gelu => {
                let x = x as f64;
                (0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
            }
        }
    }
}

/// `act(gate) · up` elementwise, forward only (see [`Activation::gated`]).
struct Gated(Activation);

impl candle_core::CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(g), CpuStorage::F32(u), Some((g0, g1)), Some((u0, u1))) = (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("gated activation: contiguous f32 inputs only")
        };
        const CHUNK: usize = 1 << 14;
        let (g, u) = (&g[g0..g1], &u[u0..u1]);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
            o.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (&g, &u))| *o = self.0.scalar(g) * u);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
