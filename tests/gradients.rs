//! Gradients with respect to an added vector match central finite differences, through every
//! op the forward pass uses (RMSNorm/RoPE/GQA/SwiGLU, LayerNorm/GELU/learned positions, and
//! Gemma's post-norms, soft-capping, per-layer windows and rotary bases, GPT-NeoX's and GPT-J's parallel
//! blocks, partial and interleaved rotary, erf GELU), with padding; and no
//! gradient is computed for frozen weights.

use candle_core::{DType, IndexOp, Tensor, Var};
use factpatch::model::{ops, Addition, Batch, Hooks, Model, Site};
use std::path::Path;

/// Mean target NLL over two padded sequences plus a KL-like term, as the target-vector
/// optimisation uses, as a function of `delta`.
fn loss(model: &Model, delta: &Tensor, site: Site, layer: usize) -> candle_core::Result<Tensor> {
    let batch = Batch::right_padded(&[vec![5, 17, 42, 99, 7, 3], vec![11, 12, 13, 200]]);
    let hooks = Hooks { additions: vec![Addition { layer, site, at: vec![(0, 3), (1, 3)], delta: delta.clone() }], ..Hooks::default() };
    let trace = model.forward(&batch, &hooks, None).map_err(candle_core::Error::wrap)?;
    let logits = model.logits(&trace.hidden).map_err(candle_core::Error::wrap)?;
    let lp = ops::log_softmax(&logits)?;
    let nll = (lp.i((0, 4, 7))? + lp.i((1, 3, 1))?)?.neg()?;
    let probs = ops::softmax(&logits.i((0, 5))?)?;
    let kl = (probs.clone() * (probs.log()? - lp.i((1, 0))?)?)?.sum_all()?;
    nll + (kl * 0.25)?
}

fn check(dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let model = Model::load(&dir).unwrap().to_dtype(DType::F64).unwrap();
    let d = model.config.hidden_size;
    let last = model.config.num_layers - 1;
    // MlpOut at the last layer: MEMIT's edit point where a norm follows the MLP (Gemma).
    for (site, layer) in [(Site::Residual, 0), (Site::MlpOut, 0), (Site::Residual, last), (Site::MlpOut, last)] {
        let init: Vec<f64> = (0..d).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.02).collect();
        let var = Var::from_vec(init.clone(), d, model.device()).unwrap();
        let l = loss(&model, var.as_tensor(), site, layer).unwrap();
        let grads = l.backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("gradient for delta").to_vec1::<f64>().unwrap();
        assert!(grads.get(model.mlp_out_weight(0)).is_none(), "a frozen weight received a gradient");
        let at = |v: Vec<f64>| loss(&model, &Tensor::from_vec(v, d, model.device()).unwrap(), site, layer).unwrap().to_scalar::<f64>().unwrap();
        let mut worst: f64 = 0.0;
        for i in (0..d).step_by(d / 8) {
            let h = 1e-5;
            let (mut plus, mut minus) = (init.clone(), init.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd = (at(plus) - at(minus)) / (2.0 * h);
            let rel = (g[i] - fd).abs() / fd.abs().max(1e-3);
            worst = worst.max(rel);
        }
        let norm: f64 = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 1e-6, "{dir:?} {site:?}@{layer}: gradient vanished (‖g‖ = {norm})");
        assert!(worst <= 1e-3, "{dir:?} {site:?}@{layer}: relative error {worst:e} against finite differences");
    }
}

#[test]
fn llama_gradients_match_finite_differences() {
    check("fixtures/tiny-llama");
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    check("fixtures/tiny-gpt2");
}

#[test]
fn gemma2_gradients_match_finite_differences() {
    check("fixtures/families/tiny-gemma2");
}

#[test]
fn gemma3_gradients_match_finite_differences() {
    check("fixtures/families/tiny-gemma3");
}

#[test]
fn gpt_neox_gradients_match_finite_differences() {
    check("fixtures/families/tiny-gpt-neox");
    check("fixtures/families/tiny-gpt-neox-sequential");
}

#[test]
fn gptj_gradients_match_finite_differences() {
    check("fixtures/families/tiny-gptj");
}
