//! Text generation with a KV cache: greedy, or seeded top-k sampling.

use super::{Batch, Error, Hooks, KvCache, Model, Result};
use candle_core::IndexOp;
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub enum Sampling {
    /// The most probable token.
    Greedy,
    /// One of the `k` most probable tokens, drawn with probabilities ∝ exp(logit / temperature)
    /// from a generator seeded with `seed`, so runs repeat exactly.
    TopK { k: usize, temperature: f64, seed: u64 },
}

/// Continues each prompt by up to `max_new` tokens, stopping a sequence at any `stop` token
/// (included in its output). Prompts are batched, left-padded, and decoded incrementally.
pub fn generate(model: &Model, prompts: &[Vec<u32>], max_new: usize, sampling: Sampling, stop: &[u32]) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Input("cannot generate from an empty prompt".into()));
    }
    let mut rng = match sampling {
        Sampling::TopK { seed, .. } => rand::rngs::StdRng::seed_from_u64(seed),
        Sampling::Greedy => rand::rngs::StdRng::seed_from_u64(0),
    };
    let mut out = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    let mut cache = KvCache::default();
    let mut batch = Batch::left_padded(prompts);
    for _ in 0..max_new {
        let trace = model.forward(&batch, &Hooks::default(), Some(&mut cache))?;
        let last = trace.hidden.i((.., batch.seq_len() - 1, ..))?;
        let logits = model.logits(&last)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (i, row) in logits.iter().enumerate() {
            let tok = choose(row, sampling, &mut rng);
            if !done[i] {
                out[i].push(tok);
                done[i] = stop.contains(&tok);
            }
            next.push(vec![tok]);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        batch = Batch { mask: vec![vec![true]; next.len()], ids: next };
    }
    Ok(out)
}

fn choose(logits: &[f32], sampling: Sampling, rng: &mut impl Rng) -> u32 {
    let greedy = || {
        // First index of the maximum, as torch.argmax does.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    match sampling {
        Sampling::Greedy => greedy(),
        Sampling::TopK { k, temperature, .. } if k <= 1 || temperature <= 0.0 => greedy(),
        Sampling::TopK { k, temperature, .. } => {
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            idx.truncate(k);
            let top = logits[idx[0]] as f64;
            let weights: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - top) / temperature).exp()).collect();
            let mut r = rng.random::<f64>() * weights.iter().sum::<f64>();
            for (&i, w) in idx.iter().zip(&weights) {
                r -= w;
                if r <= 0.0 {
                    return i as u32;
                }
            }
            idx[idx.len() - 1] as u32
        }
    }
}
