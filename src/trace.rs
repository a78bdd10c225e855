//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1):
//! which hidden states carry a fact. Noise on the subject's token embeddings makes the model lose
//! the answer; restoring one clean state, at one layer and one token, shows how much of the
//! answer's probability that state alone brings back. Done for the block output (the hidden
//! state), and separately for the MLP output and the attention output (of a window of layers
//! around each layer, as the paper does), of every layer at every token. Traces of many facts
//! average by token class ([`average`]), which is how a family's edit layers are chosen.

use crate::model::{self, Addition, Batch, Hooks, Model, Restore, Sampling, Site};
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
/// of the token embeddings, from `seed`; and how many layers' MLP or attention outputs one
/// restoration sets (`window`, centred on the layer; the hidden state is restored one layer at a
/// time).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub samples: usize,
    pub noise_scale: f64,
    pub seed: u64,
    pub window: usize,
}

impl Default for Options {
    /// ROME's: 10 draws of 3σ, windows of 10 layers.
    fn default() -> Self {
        Options { samples: 10, noise_scale: 3.0, seed: 0, window: 10 }
    }
}

impl Kind {
    /// What a restoration of this kind sets, as tables and heatmaps title it.
    pub fn title(self, window: usize) -> String {
        match self {
            Kind::Hidden => format!("restoring the {}", self.name()),
            _ => format!("restoring the {} of the {window} layers around each", self.name()),
        }
    }

    /// The layers one restoration "at layer `l`" sets, of `layers`: `l` alone for the hidden
    /// state, `l − ⌊w/2⌋ .. l + ⌈w/2⌉` (clipped) for the MLP and attention outputs, as in ROME.
    pub fn window(self, l: usize, window: usize, layers: usize) -> std::ops::Range<usize> {
        match self {
            Kind::Hidden => l..l + 1,
            _ => l.saturating_sub(window / 2)..(l + window - window / 2).min(layers),
        }
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
    /// Layers restored together for the MLP and attention outputs.
    pub window: usize,
}

/// Traces `prompt` (the subject at its `{}`) towards the first token of `target`.
pub fn trace(model: &Model, tok: &Tokenizer, template: &str, subject: &str, target: &str, opts: Options) -> Result<CausalTrace> {
    if opts.samples == 0 || opts.window == 0 || opts.noise_scale.is_nan() || opts.noise_scale <= 0.0 {
        return Err(Error::Fact(format!(
            "tracing needs at least one noise draw, a window of at least one layer and a positive noise scale (got {}, {} and {})",
            opts.samples, opts.window, opts.noise_scale
        )));
    }
    let start = template.find("{}").ok_or_else(|| Error::Fact(format!("the prompt `{template}` has no {{}} for the subject")))?;
    let text = template.replacen("{}", subject, 1);
    let enc = tok.encode_prompt(&text)?;
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
    // Restorations resume from the corrupted residual stream; its other states are not read.
    let corrupt = model.forward(&batch, &Hooks { residuals: all.clone(), additions: vec![corrupt_noise], ..Hooks::default() }, None)?;
    let p_clean = prob(&clean.hidden)?[0];
    let p_corrupt = prob(&corrupt.hidden)?.iter().sum::<f64>() / s as f64;

    // Restoring state (l, p) in draw i: rows `i·t + p` of one batch per layer and kind, which
    // resumes from the corrupted stream entering the window's first layer (draw i's noise
    // already in it) and sets the window's states at p to their clean values.
    let rows = Batch::right_padded(&vec![ids.clone(); s * t]);
    let repeat = Tensor::from_vec((0..s * t).map(|r| (r / t) as u32).collect::<Vec<_>>(), s * t, dev)?;
    let position = Tensor::from_vec((0..s * t).map(|r| (r % t) as u32).collect::<Vec<_>>(), s * t, dev)?;
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
            let window = kind.window(l, opts.window, layers);
            let mut restores = Vec::new();
            for j in window.clone() {
                let (site, captured) = match kind {
                    Kind::Hidden => (Site::Residual, &clean.residuals[&j]),
                    Kind::Mlp => (Site::MlpOut, &clean.mlp_outputs[&j]),
                    Kind::Attention => (Site::AttnOut, &clean.attn_outputs[&j]),
                };
                // Row (i, p) takes the clean state at position p.
                restores.push(Restore { layer: j, site, at: at.clone(), values: captured.i(0)?.index_select(&position, 0)? });
            }
            let hooks = match window.start {
                0 => Hooks { additions: vec![row_noise.clone()], restores, ..Hooks::default() },
                first => Hooks { resume: Some((first, corrupt.residuals[&(first - 1)].index_select(&repeat, 0)?)), restores, ..Hooks::default() },
            };
            let p = prob(&model.forward(&rows, &hooks, None)?.hidden)?;
            per_layer.push((0..t).map(|pos| (0..s).map(|i| p[i * t + pos]).sum::<f64>() / s as f64).collect());
        }
        restored.push(per_layer);
    }
    let tokens = ids.iter().map(|&id| tok.decode(&[id])).collect::<std::result::Result<_, _>>()?;
    Ok(CausalTrace {
        tokens,
        subject: first..last + 1,
        answer: tok.decode(&[answer])?,
        clean: p_clean,
        corrupted: p_corrupt,
        noise,
        restored,
        window: opts.window,
    })
}

impl CausalTrace {
    /// Each token's label: its text, the subject's marked with `*`.
    pub fn labels(&self) -> Vec<String> {
        self.tokens.iter().enumerate().map(|(i, t)| format!("{}{:?}", if self.subject.contains(&i) { "*" } else { " " }, t)).collect()
    }

    /// The heatmaps (tokens × layers, one panel per kind), titled with `what`, into `png`.
    pub fn draw(&self, what: &str, png: &std::path::Path, policy: &crate::atomic::Policy) -> std::result::Result<(), crate::plot::Error> {
        let rows: Vec<Vec<Vec<f64>>> =
            self.restored.iter().map(|layers| (0..self.tokens.len()).map(|p| layers.iter().map(|row| row[p]).collect()).collect()).collect();
        let panels = panels(self.window, &self.labels(), &rows);
        let notes = vec![
            format!(
                "P({:?}) clean {:.3}, with the subject's embeddings (* tokens) corrupted {:.3} (noise σ = {:.4})",
                self.answer, self.clean, self.corrupted, self.noise
            ),
            "cell: P(answer) with that layer's state (MLP, attention: the window's)".into(),
            "at that one token restored to its clean value".into(),
        ];
        crate::plot::grid(png, &format!("Causal trace: {what}"), &notes, "P(answer)", &panels, policy)
    }
}

/// One heatmap panel per kind (in [`Kind::ALL`] order): `rows[kind][row][layer]`, labelled.
fn panels(window: usize, labels: &[String], rows: &[Vec<Vec<f64>>]) -> Vec<crate::plot::Grid> {
    Kind::ALL
        .iter()
        .zip(rows)
        .map(|(k, values)| crate::plot::Grid { title: k.title(window), row_labels: labels.to_vec(), x_label: "layer".into(), values: values.clone() })
        .collect()
}

/// ROME's token classes (Meng et al. 2022, Figure 2), by which traces of different prompts are
/// averaged. Tokens before the subject belong to none.
pub const CLASSES: [&str; 6] = ["first subject token", "middle subject tokens", "last subject token", "first subsequent token", "further tokens", "last token"];
/// The index of "last subject token" in [`CLASSES`]: where ROME and MEMIT read their keys.
pub const LAST_SUBJECT: usize = 2;

impl CausalTrace {
    /// Each token's class in [`CLASSES`]. A one-token subject is its last token; the prompt's last
    /// token is "last token" unless it is the subject's.
    pub fn classes(&self) -> Vec<Option<usize>> {
        let (first, last, end) = (self.subject.start, self.subject.end - 1, self.tokens.len() - 1);
        (0..self.tokens.len())
            .map(|i| match i {
                _ if i < first => None,
                _ if i == last => Some(2),
                _ if i == first => Some(0),
                _ if i < last => Some(1),
                _ if i == end => Some(5),
                _ if i == last + 1 => Some(3),
                _ => Some(4),
            })
            .collect()
    }
}

/// Traces of many facts averaged by token class.
#[derive(Clone, Debug)]
pub struct Average {
    pub facts: usize,
    /// Mean P(answer), clean and corrupted.
    pub clean: f64,
    pub corrupted: f64,
    /// Per kind, class and layer: the average indirect effect, the mean over the facts that
    /// have the class of (P restored − P corrupted), each fact's tokens of the class averaged
    /// first.
    pub effect: Vec<Vec<Vec<f64>>>,
    /// How many facts have each class.
    pub counts: [usize; 6],
    /// Layers restored together for the MLP and attention outputs.
    pub window: usize,
}

/// Averages `traces` (all of one model) by token class.
pub fn average(traces: &[CausalTrace]) -> Average {
    let layers = traces.first().map_or(0, |t| t.restored[0].len());
    let mut effect = vec![vec![vec![0.0; layers]; CLASSES.len()]; Kind::ALL.len()];
    let mut counts = [0usize; 6];
    for t in traces {
        let classes = t.classes();
        for (c, count) in counts.iter_mut().enumerate() {
            let members: Vec<usize> = (0..classes.len()).filter(|&i| classes[i] == Some(c)).collect();
            if members.is_empty() {
                continue;
            }
            *count += 1;
            for (k, per_layer) in t.restored.iter().enumerate() {
                for (l, row) in per_layer.iter().enumerate() {
                    effect[k][c][l] += members.iter().map(|&i| row[i] - t.corrupted).sum::<f64>() / members.len() as f64;
                }
            }
        }
    }
    for k in &mut effect {
        for (c, row) in k.iter_mut().enumerate() {
            row.iter_mut().for_each(|v| *v /= counts[c].max(1) as f64);
        }
    }
    let n = traces.len().max(1) as f64;
    Average {
        facts: traces.len(),
        clean: traces.iter().map(|t| t.clean).sum::<f64>() / n,
        corrupted: traces.iter().map(|t| t.corrupted).sum::<f64>() / n,
        effect,
        counts,
        window: traces.first().map_or(0, |t| t.window),
    }
}

impl Average {
    /// The `n` consecutive layers whose MLP outputs, restored at the subject's last token, bring
    /// back the most of the answer (the largest summed effect; the earliest of equals).
    pub fn edit_layers(&self, n: usize) -> std::ops::Range<usize> {
        let mlp = &self.effect[Kind::ALL.iter().position(|&k| k == Kind::Mlp).expect("MLP")][LAST_SUBJECT];
        let n = n.clamp(1, mlp.len().max(1));
        let sums: Vec<f64> = mlp.windows(n).map(|w| w.iter().sum()).collect();
        let start = crate::eval::general::best(&sums);
        start..start + n
    }

    /// The heatmaps (classes × layers, one panel per kind), titled with `what`, into `png`.
    pub fn draw(&self, what: &str, png: &std::path::Path, policy: &crate::atomic::Policy) -> std::result::Result<(), crate::plot::Error> {
        let labels: Vec<String> = CLASSES.iter().zip(&self.counts).map(|(c, n)| format!("{c} ({n})")).collect();
        let panels = panels(self.window, &labels, &self.effect);
        let notes = vec![
            format!("{} facts the model knows; mean P(answer) clean {:.3}, subject corrupted {:.3}", self.facts, self.clean, self.corrupted),
            "cell: average indirect effect, P(answer) restored − P(answer) corrupted,".into(),
            "over the facts with tokens of that class (how many in brackets)".into(),
        ];
        crate::plot::grid(png, &format!("Average causal trace: {what}"), &notes, "indirect effect", &panels, policy)
    }
}

/// A fact to trace: the prompt (the subject at its `{}`), the subject and the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub template: String,
    pub subject: String,
    pub answer: String,
}

/// The facts of a file in the format of ROME's `known_1000.json`: a JSON array of objects with
/// `prompt` (containing `subject`), `subject` and `attribute` (the answer).
pub fn read_facts(path: &std::path::Path) -> Result<Vec<Fact>> {
    #[derive(serde::Deserialize)]
    struct Known {
        prompt: String,
        subject: String,
        attribute: String,
    }
    let bad = |problem: String| Error::Fact(format!("{}: {problem}", path.display()));
    let text = crate::read_regular_text(path, crate::MAX_DATA_BYTES).map_err(|e| bad(e.source.to_string()))?;
    let known: Vec<Known> = serde_json::from_str(&text).map_err(|e| bad(format!("not an array of {{prompt, subject, attribute}} records: {e}")))?;
    known
        .into_iter()
        .enumerate()
        .map(|(i, k)| {
            let template = crate::edit::request::template(&k.prompt, &k.subject, &format!("record {}", i + 1)).map_err(|e| bad(e.to_string()))?;
            match k.attribute.trim().is_empty() {
                true => Err(bad(format!("record {}: the attribute is empty", i + 1))),
                false => Ok(Fact { template, subject: k.subject.trim().to_string(), answer: k.attribute }),
            }
        })
        .collect()
}

/// The first `n` of `facts` the model knows: its greedy next token after the prompt is the
/// answer's first token. Also how many were read to find them.
pub fn known<'a>(model: &Model, tok: &Tokenizer, facts: &'a [Fact], n: usize) -> Result<(Vec<&'a Fact>, usize)> {
    const BATCH: usize = 16;
    let mut found = Vec::new();
    let mut read = 0;
    for group in facts.chunks(BATCH) {
        let mut prompts = Vec::new();
        let mut answers = Vec::new();
        for f in group {
            answers.push(tok.ids(&crate::edit::request::continuation(&f.answer))?.first().copied());
            prompts.push(tok.prompt_ids(&f.template.replacen("{}", &f.subject, 1))?);
        }
        for ((r, answer), out) in group.iter().zip(answers).zip(model::generate(model, &prompts, 1, Sampling::Greedy, &[])?) {
            read += 1;
            if answer.is_some() && out.first().copied() == answer {
                found.push(r);
                if found.len() == n {
                    return Ok((found, read));
                }
            }
        }
    }
    Ok((found, read))
}
