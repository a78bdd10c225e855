//! Knowledge neurons: integrated-gradient attributions equal the formula computed by central
//! finite differences on full sequences (no cache, no resume), on both tiny families; neuron
//! selection by hand.

use candle_core::{DType, Tensor};
use factpatch::edit::kn;
use factpatch::model::{ops, Addition, Batch, Hooks, Model, Site};
use std::path::Path;

/// p(answer) after `prompt` with layer `layer`'s key at the last position replaced by `x`.
fn prob(model: &Model, prompt: &[u32], answer: u32, layer: usize, x: &[f64], a: &[f64]) -> f64 {
    let shift: Vec<f64> = x.iter().zip(a).map(|(x, a)| x - a).collect();
    let delta = Tensor::from_vec(shift, x.len(), model.device()).unwrap();
    let last = prompt.len() - 1;
    let hooks = Hooks { additions: vec![Addition { layer, site: Site::Key, at: vec![(0, last)], delta }], ..Hooks::default() };
    let hidden = model.forward(&Batch::right_padded(&[prompt.to_vec()]), &hooks, None).unwrap().hidden;
    let lp = ops::log_softmax(&model.logits(&hidden.squeeze(0).unwrap().get(last).unwrap().unsqueeze(0).unwrap()).unwrap()).unwrap();
    lp.squeeze(0).unwrap().get(answer as usize).unwrap().to_scalar::<f64>().unwrap().exp()
}

/// The key at the last position of `prompt` at `layer`.
fn key(model: &Model, prompt: &[u32], layer: usize) -> Vec<f64> {
    let hooks = Hooks { keys: vec![layer], ..Hooks::default() };
    let trace = model.forward(&Batch::right_padded(&[prompt.to_vec()]), &hooks, None).unwrap();
    trace.keys[&layer].squeeze(0).unwrap().get(prompt.len() - 1).unwrap().to_vec1().unwrap()
}

fn check(dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let model = Model::load(&dir).unwrap().to_dtype(DType::F64).unwrap();
    let prompts = vec![vec![5, 17, 42, 99, 7], vec![11, 12], vec![300, 4, 8]];
    let (answer, steps) = (77, 3);
    let layers: Vec<usize> = (0..model.config.num_layers).collect();
    let ig = kn::attributions(&model, &prompts, answer, &layers, steps).unwrap();
    assert_eq!((ig.len(), ig[0].len()), (layers.len(), prompts.len()));
    let mut worst: f64 = 0.0;
    for &l in &layers {
        for (p, prompt) in prompts.iter().enumerate() {
            let a = key(&model, prompt, l);
            assert_eq!(ig[l][p].len(), a.len());
            for i in (0..a.len()).step_by(a.len() / 8) {
                let h = 1e-5;
                let mut mean = 0.0;
                for j in 0..steps {
                    let alpha = (j as f64 + 0.5) / steps as f64;
                    let x: Vec<f64> = a.iter().map(|v| v * alpha).collect();
                    let (mut plus, mut minus) = (x.clone(), x.clone());
                    plus[i] += h;
                    minus[i] -= h;
                    mean += (prob(&model, prompt, answer, l, &plus, &a) - prob(&model, prompt, answer, l, &minus, &a)) / (2.0 * h) / steps as f64;
                }
                let reference = a[i] * mean;
                let scale = ig[l][p].iter().fold(0.0f64, |m, x| m.max(x.abs()));
                assert!(scale > 0.0, "{dir:?} layer {l} prompt {p}: all attributions are zero");
                worst = worst.max((ig[l][p][i] - reference).abs() / scale);
            }
        }
    }
    assert!(worst < 1e-6, "{dir:?}: attribution differs from finite differences by {worst:e} (relative to the largest)");
}

#[test]
fn llama_attributions_match_finite_differences() {
    check("fixtures/tiny-llama");
}

#[test]
fn gpt2_attributions_match_finite_differences() {
    check("fixtures/tiny-gpt2");
}

#[test]
fn neurons_are_picked_by_threshold_and_shared_by_enough_prompts() {
    // [layer][prompt][neuron]; prompt maxima 10, 4, -1 (the last picks nothing).
    let scores =
        vec![vec![vec![10.0, 1.0, 2.5], vec![4.0, 0.9, 0.0], vec![-1.0, -2.0, -3.0]], vec![vec![0.0, 3.0, 2.0], vec![0.5, 1.0, 0.7], vec![-1.0, -1.0, -1.0]]];
    // Threshold 0.2: prompt 0 picks (0,0), (0,2), (1,1); prompt 1 picks (0,0), (0,1), (1,1).
    assert_eq!(kn::select(&scores, 0.2, 0.5), vec![(0, 0), (1, 1)]);
    assert_eq!(kn::select(&scores, 0.2, 0.3), vec![(0, 0), (0, 1), (0, 2), (1, 1)]);
    assert_eq!(kn::select(&scores, 0.2, 1.0), Vec::<(usize, usize)>::new());
}
