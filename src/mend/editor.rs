//! The MEND editor network (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale", §3.1).
//! Per edited matrix, each token's gradient factors — the layer input `u_t` and the gradient
//! `δ_t` at its output — are normalised to zero mean and unit variance per element and
//! concatenated into `z_t`, then passed through low-rank residual layers (eq. 3–4):
//! `h = z + σ(s_ℓ ⊙ (U₁V₁z + b₁) + o_ℓ)`, `g(z) = h + s'_ℓ ⊙ (U₂V₂h + b₂) + o'_ℓ`, with `σ` the
//! ReLU, `U` initialised to zero (the network starts as the identity) and the per-layer scale
//! `s_ℓ` and shift `o_ℓ` letting one network serve every edited matrix of one shape. The output
//! splits into `ũ_t`, `δ̃_t`, and the edit is `ΔW_ℓ = −α_ℓ Σ_t δ̃_t ũ_tᵀ` (eq. 5) with a learned
//! step size `α_ℓ` per layer.

use super::factors::LayerFactors;
use crate::model::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

/// Added to the standard deviation in the normalisation (the authors' value).
const NORM_EPS: f64 = 1e-7;

/// The network's size and the step size it starts from; the defaults are the paper's.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Rank of each layer's `U·V` (capped at the input width).
    pub rank: usize,
    /// Layers with a ReLU before the last, linear, one.
    pub hidden_layers: usize,
    /// `α_ℓ` before training.
    pub step_init: f64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape { rank: 1920, hidden_layers: 1, step_init: 1e-4 }
    }
}

/// An editor for the MLP output projections `[d_out, d_in]` of `layers`.
#[derive(Clone, Debug)]
pub struct Editor {
    pub layers: Vec<usize>,
    pub d_in: usize,
    pub d_out: usize,
    pub shape: Shape,
    /// The trained tensors by name (`formats/mend.md`): `net.{j}.{down,up,bias,scale,shift}`
    /// and `step`.
    pub params: BTreeMap<String, Var>,
    /// The normalisation: `norm.{input,grad}.{mean,std}`.
    pub norm: BTreeMap<String, Tensor>,
}

/// The normalisation tensors' names and lengths for inputs `d_in` and gradients `d_out`.
pub fn norm_shapes(d_in: usize, d_out: usize) -> Vec<(String, Vec<usize>)> {
    ["input", "grad"].iter().zip([d_in, d_out]).flat_map(|(part, d)| ["mean", "std"].map(|stat| (format!("norm.{part}.{stat}"), vec![d]))).collect()
}

/// The trained tensors' names and shapes.
pub fn param_shapes(layers: usize, d_in: usize, d_out: usize, shape: &Shape) -> Vec<(String, Vec<usize>)> {
    let dim = d_in + d_out;
    let rank = shape.rank.min(dim);
    let mut out = Vec::new();
    for j in 0..=shape.hidden_layers {
        out.push((format!("net.{j}.down"), vec![rank, dim]));
        out.push((format!("net.{j}.up"), vec![dim, rank]));
        out.push((format!("net.{j}.bias"), vec![dim]));
        out.push((format!("net.{j}.scale"), vec![layers, dim]));
        out.push((format!("net.{j}.shift"), vec![layers, dim]));
    }
    out.push(("step".into(), vec![layers]));
    out
}

/// The per-element mean and standard deviation of the factors of every layer (one network, one
/// normalisation, serves them all), as `norm` tensors in f32.
pub fn normalisation(samples: &[Vec<LayerFactors>]) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (part, pick) in [("input", 0), ("grad", 1)] {
        let parts: Vec<Tensor> = samples
            .iter()
            .flatten()
            .map(|f| if pick == 0 { f.inputs.to_dtype(DType::F64) } else { f.grads.to_dtype(DType::F64) })
            .collect::<candle_core::Result<_>>()?;
        let all = Tensor::cat(&parts, 0).map_err(|e| Error::Input(format!("no factors to normalise with: {e}")))?;
        let mean = all.mean(0)?;
        let std = all.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
        out.insert(format!("norm.{part}.mean"), mean.to_dtype(DType::F32)?);
        out.insert(format!("norm.{part}.std"), std.to_dtype(DType::F32)?);
    }
    Ok(out)
}

impl Editor {
    /// A new editor: `V` Xavier-uniform from `seed`, `U`, biases and shifts zero, scales one,
    /// steps at `shape.step_init` (so it starts as the identity on the normalised factors).
    pub fn init(layers: &[usize], d_in: usize, d_out: usize, shape: Shape, norm: BTreeMap<String, Tensor>, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = BTreeMap::new();
        for (name, dims) in param_shapes(layers.len(), d_in, d_out, &shape) {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = match name.rsplit('.').next().expect("named") {
                "down" => {
                    let bound = (6.0 / (dims[0] + dims[1]) as f64).sqrt() as f32;
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
                "scale" => vec![1.0; n],
                "step" => vec![shape.step_init as f32; n],
                _ => vec![0.0; n],
            };
            params.insert(name, Var::from_tensor(&Tensor::from_vec(values, dims, device)?)?);
        }
        Ok(Editor {
            layers: layers.to_vec(),
            d_in,
            d_out,
            shape,
            params,
            norm: norm.into_iter().map(|(k, t)| Ok((k, t.to_device(device)?))).collect::<Result<_>>()?,
        })
    }

    /// The same editor computing in `dtype` (its tensors converted, still trainable).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self.params.iter().map(|(k, v)| Ok((k.clone(), Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?))).collect::<Result<_>>()?;
        let norm = self.norm.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?))).collect::<Result<_>>()?;
        Ok(Editor { params, norm, ..self.clone() })
    }

    fn param(&self, name: &str) -> &Tensor {
        self.params[name].as_tensor()
    }

    /// The index of `layer` among the edited layers.
    pub fn mode(&self, layer: usize) -> Result<usize> {
        self.layers.iter().position(|&l| l == layer).ok_or_else(|| Error::Input(format!("the editor does not edit layer {layer} (it edits {:?})", self.layers)))
    }

    /// `(ũ [n, d_in], δ̃ [n, d_out])` for factors of layer index `mode`.
    pub fn transform(&self, mode: usize, inputs: &Tensor, grads: &Tensor) -> Result<(Tensor, Tensor)> {
        let dtype = self.param("step").dtype();
        let normalise = |x: &Tensor, part: &str| -> candle_core::Result<Tensor> {
            let mean = self.norm[&format!("norm.{part}.mean")].to_dtype(dtype)?;
            let std = (self.norm[&format!("norm.{part}.std")].to_dtype(dtype)? + NORM_EPS)?;
            x.to_dtype(dtype)?.broadcast_sub(&mean)?.broadcast_div(&std)
        };
        let mut z = Tensor::cat(&[normalise(inputs, "input")?, normalise(grads, "grad")?], D::Minus1)?;
        for j in 0..=self.shape.hidden_layers {
            let p = |part: &str| self.param(&format!("net.{j}.{part}"));
            let pre = z.matmul(&p("down").t()?)?.matmul(&p("up").t()?)?.broadcast_add(p("bias"))?;
            let pre = pre.broadcast_mul(&p("scale").get(mode)?)?.broadcast_add(&p("shift").get(mode)?)?;
            let act = if j < self.shape.hidden_layers { pre.relu()? } else { pre };
            z = (act + z)?;
        }
        Ok((z.narrow(D::Minus1, 0, self.d_in)?, z.narrow(D::Minus1, self.d_in, self.d_out)?))
    }

    /// Layer `f.layer`'s edit as factors `ΔW = U·Vᵀ`: `U = −α_ℓ·δ̃ᵀ [d_out, n]`, `V = ũᵀ [d_in, n]`.
    /// Differentiable in the editor's parameters.
    pub fn update(&self, f: &LayerFactors) -> Result<(Tensor, Tensor)> {
        let mode = self.mode(f.layer)?;
        let (u, d) = self.transform(mode, &f.inputs, &f.grads)?;
        let step = self.param("step").get(mode)?;
        Ok((d.t()?.broadcast_mul(&step.neg()?)?, u.t()?))
    }
}
