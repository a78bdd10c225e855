//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1):
//! which hidden states carry a fact. Noise on the subject's token embeddings makes the model lose
//! the answer; restoring one clean state, at one layer and one token, shows how much of the
//! answer's probability that state alone brings back. Done for the block output (the hidden
//! state), and separately for the MLP output and the attention output, of every layer at every
//! token.

use crate::model::{self, Addition, Batch, Hooks, Model, Site};
use crate::tokenize::{self, Tokenizer};
use candle_core::{DType, IndexOp, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Everything that can go wrong tracing a fact.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The prompt, subject or target do not fit together.
    #[error("{0}")]
    Fact(String),
    /// The model failed to run.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The tokenizer failed to encode or decode.
    #[error(transparent)]
    Tokenizer(#[from] tokenize::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The block's output, the residual stream.
    Hidden,
    Mlp,
    Attention,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Hidden, Kind::Mlp, Kind::Attention];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hidden => "hidden state",
            Kind::Mlp => "MLP output",
            Kind::Attention => "attention output",
        }
    }
}

/// How to corrupt the subject: `samples` noise draws of `noise_scale` times the standard deviation
/// of the token embeddings, from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub samples: usize,
    pub noise_scale: f64,
    pub seed: u64,
}

impl Default for Options {
    /// ROME's: 10 draws of 3σ.
    fn default() -> Self {
        Options { samples: 10, noise_scale: 3.0, seed: 0 }
    }
}

/// A fact's causal trace.
#[derive(Clone, Debug)]
pub struct CausalTrace {
    /// The prompt's tokens, as text.
    pub tokens: Vec<String>,
    /// The subject's tokens `first..end`.
    pub subject: std::ops::Range<usize>,
    /// The target's first token, as text.
    pub answer: String,
    /// P(answer) on the clean prompt, and with the subject corrupted (mean over the draws).
    pub clean: f64,
    pub corrupted: f64,
    /// The noise's standard deviation.
    pub noise: f64,
    /// Per kind (in [`Kind::ALL`] order): P(answer) with that state restored, `[layer][token]`,
    /// the mean over the draws.
    pub restored: Vec<Vec<Vec<f64>>>,
}

/// Traces `prompt` (the subject at its `{}`) towards the first token of `target`.
pub fn trace(model: &Model, tok: &Tokenizer, template: &str, subject: &str, target: &str, opts: Options) -> Result<CausalTrace> {
    if opts.samples == 0 || opts.noise_scale.is_nan() || opts.noise_scale <= 0.0 {
        return Err(Error::Fact(format!("tracing needs at least one noise draw and a positive noise scale (got {} and {})", opts.samples, opts.noise_scale)));
    }
    let start = template.find("{}").ok_or_else(|| Error::Fact(format!("the prompt `{template}` has no {{}} for the subject")))?;
    let text = template.replacen("{}", subject, 1);
    let enc = tok.encode(&text)?;
    let span = (start, start + subject.len());
    let first = enc.offsets.iter().position(|&(a, b)| a < span.1 && b > span.0);
    let last = tokenize::last_token_in(&enc.offsets, span);
    let (Some(first), Some(last)) = (first, last) else {
        return Err(Error::Fact(format!("the subject `{subject}` cannot be located among the tokens of `{text}`")));
    };
    let answer = *tok.ids(&crate::edit::request::continuation(target))?.first().ok_or_else(|| Error::Fact(format!("the target `{target}` has no tokens")))?;
    let t = enc.ids.len();
    let (ids, layers, d) = (enc.ids, model.config.num_layers, model.config.hidden_size);
    let (s, dev) = (opts.samples, model.device());
    let all: Vec<usize> = (0..layers).collect();
    let hooks = Hooks { residuals: all.clone(), mlp_outputs: all.clone(), attn_outputs: all.clone(), ..Hooks::default() };
    let prob = |hidden: &Tensor| -> Result<Vec<f64>> {
        let b = hidden.dims()[0];
        let last_rows = hidden.narrow(1, t - 1, 1)?.reshape((b, d))?;
        let p = candle_nn::ops::softmax_last_dim(&model.logits(&last_rows)?)?.i((.., answer as usize))?;
        Ok(p.to_dtype(DType::F64)?.to_vec1()?)
    };

    let clean = model.forward(&Batch::right_padded(std::slice::from_ref(&ids)), &hooks, None)?;
    // The corrupted runs: `s` copies of the prompt, each with its own noise on the subject.
    let noise = opts.noise_scale * model.embedding_std()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let normal = Normal::new(0.0, noise).map_err(|e| Error::Fact(format!("noise of {noise}: {e}")))?;
    let n_noisy = s * (last + 1 - first);
    let draws = Tensor::from_vec((0..n_noisy * d).map(|_| normal.sample(&mut rng) as f32).collect::<Vec<_>>(), (n_noisy, d), dev)?;
    let at_subject: Vec<(usize, usize)> = (0..s).flat_map(|i| (first..=last).map(move |p| (i, p))).collect();
    let corrupt_noise = Addition { layer: 0, site: Site::Embedding, at: at_subject, delta: draws.clone() };
    let batch = Batch::right_padded(&vec![ids.clone(); s]);
    let corrupt = model.forward(&batch, &Hooks { additions: vec![corrupt_noise], ..hooks.clone() }, None)?;
    let p_clean = prob(&clean.hidden)?[0];
    let p_corrupt = prob(&corrupt.hidden)?.iter().sum::<f64>() / s as f64;

    // Restoring state (l, p) in draw i: rows `i·t + p` of one batch per layer and kind, which
    // resumes from the corrupted stream entering layer l (draw i's noise already in it).
    let rows = Batch::right_padded(&vec![ids.clone(); s * t]);
    let repeat = Tensor::from_vec((0..s * t).map(|r| (r / t) as u32).collect::<Vec<_>>(), s * t, dev)?;
    let at: Vec<(usize, usize)> = (0..s * t).map(|r| (r, r % t)).collect();
    // Passes restoring a state of layer 0 start from the embeddings: each row takes its draw's noise.
    let nsub = last + 1 - first;
    let row_noise = Addition {
        layer: 0,
        site: Site::Embedding,
        at: (0..s * t).flat_map(|r| (first..=last).map(move |p| (r, p))).collect(),
        delta: draws.reshape((s, nsub * d))?.index_select(&repeat, 0)?.reshape((s * t * nsub, d))?,
    };
    let mut restored = Vec::new();
    for kind in Kind::ALL {
        let mut per_layer = Vec::new();
        for l in 0..layers {
            let (site, captured_clean, captured_corrupt) = match kind {
                Kind::Hidden => (Site::Residual, &clean.residuals[&l], &corrupt.residuals[&l]),
                Kind::Mlp => (Site::MlpOut, &clean.mlp_outputs[&l], &corrupt.mlp_outputs[&l]),
                Kind::Attention => (Site::AttnOut, &clean.attn_outputs[&l], &corrupt.attn_outputs[&l]),
            };
            // Row (i, p) adds clean − corrupted at position p: the state becomes the clean one.
            let gap = captured_clean.broadcast_sub(captured_corrupt)?; // [s, t, d]
            let delta = gap.reshape((s * t, d))?;
            let restore = Addition { layer: l, site, at: at.clone(), delta };
            let hooks = match l {
                0 => Hooks { additions: vec![row_noise.clone(), restore], ..Hooks::default() },
                _ => Hooks { resume: Some((l, corrupt.residuals[&(l - 1)].index_select(&repeat, 0)?)), additions: vec![restore], ..Hooks::default() },
            };
            let p = prob(&model.forward(&rows, &hooks, None)?.hidden)?;
            per_layer.push((0..t).map(|pos| (0..s).map(|i| p[i * t + pos]).sum::<f64>() / s as f64).collect());
        }
        restored.push(per_layer);
    }
    let tokens = ids.iter().map(|&id| tok.decode(&[id])).collect::<std::result::Result<_, _>>()?;
    Ok(CausalTrace { tokens, subject: first..last + 1, answer: tok.decode(&[answer])?, clean: p_clean, corrupted: p_corrupt, noise, restored })
}

impl CausalTrace {
    /// Each token's label: its text, the subject's marked with `*`.
    pub fn labels(&self) -> Vec<String> {
        self.tokens.iter().enumerate().map(|(i, t)| format!("{}{:?}", if self.subject.contains(&i) { "*" } else { " " }, t)).collect()
    }

    /// The heatmaps (tokens × layers, one panel per kind), titled with `what`, into `png`.
    pub fn draw(&self, what: &str, png: &std::path::Path, policy: &crate::atomic::Policy) -> std::result::Result<(), crate::plot::Error> {
        let panels: Vec<crate::plot::Grid> = Kind::ALL
            .iter()
            .zip(&self.restored)
            .map(|(k, layers)| crate::plot::Grid {
                title: format!("restoring the {}", k.name()),
                row_labels: self.labels(),
                x_label: "layer".into(),
                values: (0..self.tokens.len()).map(|p| layers.iter().map(|row| row[p]).collect()).collect(),
            })
            .collect();
        let notes = vec![
            format!(
                "P({:?}) clean {:.3}, with the subject's embeddings (* tokens) corrupted {:.3} (noise σ = {:.4})",
                self.answer, self.clean, self.corrupted, self.noise
            ),
            "each cell: P(answer) with that one layer's state at that one token restored to its clean value".into(),
        ];
        crate::plot::grid(png, &format!("Causal trace: {what}"), &notes, "P(answer)", &panels, policy)
    }
}
