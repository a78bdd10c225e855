//! A statistics run: a request checked and identified, computed or found in the cache, and
//! written out; shard files merged.

use super::accumulate::accumulate;
use super::cache::{cache_path, store};
use super::corpus::{plan, sample, Corpus, Shard};
use super::file::{file_id, Meta, Stats};
use super::{Error, Result};
use crate::atomic::Policy;
use crate::checkpoint::Checkpoint;
use crate::model::{self, Model};
use crate::tokenize::{self, Tokenizer};
use crate::{io_err, tool_version};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Parses a layer list: `4-8`, `5`, `3,5,7` or a mix (`2,4-6`). Sorted, without repeats.
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = || Error::Invalid(format!("layers `{s}`: expected e.g. 4-8 or 3,5,7"));
    let mut layers = Vec::new();
    for part in s.split(',') {
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        match part.split_once('-') {
            Some((a, b)) if num(a)? <= num(b)? => layers.extend(num(a)?..=num(b)?),
            Some(_) => return Err(bad()),
            None => layers.push(num(part)?),
        }
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

/// What to compute statistics of.
#[derive(Clone, Debug)]
pub struct Request {
    /// A Hugging Face model folder (with `tokenizer.json`).
    pub model: PathBuf,
    /// Plain-text or `.jsonl` files.
    pub corpus: Vec<PathBuf>,
    /// Layers to capture (`None`: the family's MEMIT defaults).
    pub layers: Option<Vec<usize>>,
    /// Cap on the tokens of the whole run, all shards together (`None`: the whole corpus).
    pub max_tokens: Option<u64>,
    pub seq_len: usize,
    pub seed: u64,
    pub shard: Shard,
}

impl Request {
    /// A request with the defaults: family layers, whole corpus, seq-len 512, seed 0, unsharded.
    pub fn new(model: &Path, corpus: &[PathBuf]) -> Self {
        Request { model: model.into(), corpus: corpus.to_vec(), layers: None, max_tokens: None, seq_len: 512, seed: 0, shard: Shard::ALL }
    }
}

/// A request with its inputs read and identified, ready to compute. The weights are loaded
/// only by [`compute`]: a cache hit never reads them.
pub struct Prepared {
    /// The model folder.
    pub model: PathBuf,
    pub tokenizer: Tokenizer,
    pub corpus: Corpus,
    /// The result's metadata, but for `tokens`.
    pub meta: Meta,
    pub shard: Shard,
}

/// Checks the request and identifies its model (by tensor hashes, cached), tokenizer and corpus.
pub fn prepare(req: &Request) -> Result<Prepared> {
    // Cheap checks first: the configuration and the options; then the corpus.
    let cfg = &model::Config::read(&req.model)?;
    let layers = req.layers.clone().unwrap_or_else(|| cfg.family.edit_layers(cfg.num_layers));
    if layers.is_empty() {
        return Err(Error::Invalid("no layers requested".into()));
    }
    if let Some(&layer) = layers.iter().find(|&&l| l >= cfg.num_layers) {
        return Err(Error::LayerOutOfRange { layer, model: req.model.clone(), last: cfg.num_layers - 1 });
    }
    let tokenizer = Tokenizer::open(&req.model)?;
    let start = tokenizer.prefix().len();
    if req.seq_len <= start || req.seq_len > cfg.max_positions {
        return Err(Error::Invalid(format!(
            "seq-len {} must be between {} (the tokenizer's {start} sequence-start token(s), and one more) and the model's {} positions",
            req.seq_len,
            start + 1,
            cfg.max_positions
        )));
    }
    if req.max_tokens == Some(0) {
        return Err(Error::Invalid("--tokens must be positive".into()));
    }
    let tok_path = req.model.join(tokenize::FILE);
    let tokenizer_hash = blake3::hash(&crate::read_regular(&tok_path, crate::MAX_METADATA_BYTES)?);
    let corpus = Corpus::read(&req.corpus)?;
    let meta = Meta {
        model: Checkpoint::open(&req.model)?.identity_cached(&crate::checkpoint::default_hash_cache())?.to_hex().to_string(),
        tokenizer: tokenizer_hash.to_hex().to_string(),
        corpus: corpus.hash.to_hex().to_string(),
        layers,
        max_tokens: req.max_tokens,
        seq_len: req.seq_len,
        seed: req.seed,
        prefix: tokenizer.prefix().iter().map(|&t| t as usize).collect(),
        shards: vec![req.shard.index],
        shard_count: req.shard.count,
        tokens: 0,
        tool: tool_version(),
    };
    Ok(Prepared { model: req.model.clone(), tokenizer, corpus, meta, shard: req.shard })
}

/// Tokenizes, plans and accumulates; with `progress`, shows a bar with tokens/s and ETA.
pub fn compute(p: &Prepared, progress: bool) -> Result<Stats> {
    let spinner = if progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    spinner.set_message(format!("stats: sampling {} documents", p.corpus.documents.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let ids = |d: &str| Ok(p.tokenizer.ids(d)?);
    let prefix = p.tokenizer.prefix();
    let chunks = sample(&p.corpus.documents, ids, p.meta.seq_len - prefix.len(), p.meta.seed, p.meta.max_tokens)?;
    spinner.finish_and_clear();
    if chunks.is_empty() {
        return Err(Error::EmptyCorpus(format!("{} document(s) but no tokens", p.corpus.documents.len())));
    }
    let plan = plan(chunks, p.shard);
    let bar = if progress { ProgressBar::new(plan.tokens) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("stats {bar:30} {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}").expect("valid template"));
    let model = Model::load(&p.model)?;
    let layers = accumulate(&model, &p.meta.layers, prefix, &plan.batches, &bar)?;
    bar.finish_and_clear();
    Ok(Stats { meta: Meta { tokens: plan.tokens, ..p.meta.clone() }, layers })
}

/// The outcome of [`run`] or [`merge_files`].
#[derive(Debug)]
pub struct Outcome {
    pub stats: Stats,
    /// Every file written or reused (all hold the same bytes).
    pub paths: Vec<PathBuf>,
    /// The file id: blake3 of the file's bytes.
    pub id: String,
    /// Whether the statistics came from the cache.
    pub cached: bool,
}

/// Complete statistics for `req` from the cache, computing and storing them only when absent.
/// The compiler calls it for [`StatsSource::Corpus`](crate::compile::StatsSource::Corpus).
pub fn find_or_compute(req: &Request, cache: &Path, progress: bool) -> Result<Outcome> {
    if req.shard != Shard::ALL {
        return Err(Error::Invalid("the cache holds complete runs only: use shard 0/1".into()));
    }
    let p = prepare(req)?;
    let path = cache_path(cache, &p.meta.request_id());
    if path.is_file() {
        if let Ok(stats) = Stats::read(&path) {
            if stats.meta.request_id() == p.meta.request_id() && stats.meta.is_complete() {
                let id = file_id(&path)?;
                return Ok(Outcome { stats, paths: vec![path], id, cached: true });
            }
        }
    }
    let stats = compute(&p, progress)?;
    let (path, id) = store(cache, &stats)?;
    Ok(Outcome { stats, paths: vec![path], id, cached: false })
}

/// `factpatch stats`: an unsharded run goes through the cache (and is copied to `out` if
/// given); a shard needs `out` and bypasses the cache. An existing `out` is replaced only when
/// `force`, and never when it is one of the run's inputs (checked before any work).
pub fn run(req: &Request, out: Option<&Path>, force: bool, cache: &Path, progress: bool) -> Result<Outcome> {
    let policy = Policy::force(force).reading(std::iter::once(&req.model).chain(&req.corpus));
    if let Some(out) = out {
        policy.check(out).map_err(io_err(out))?;
    }
    if req.shard != Shard::ALL {
        let out = out.ok_or_else(|| Error::Invalid(format!("shard {} needs --out (shards are not cached)", req.shard)))?;
        return write_out(compute(&prepare(req)?, progress)?, out, &policy, None);
    }
    let mut outcome = find_or_compute(req, cache, progress)?;
    if let Some(out) = out {
        outcome.stats.write(out, &policy)?;
        outcome.paths.push(out.to_path_buf());
    }
    Ok(outcome)
}

fn write_out(stats: Stats, out: &Path, policy: &Policy, cache: Option<&Path>) -> Result<Outcome> {
    let id = stats.write(out, policy)?;
    let mut paths = vec![out.to_path_buf()];
    if let Some(cache) = cache.filter(|_| stats.meta.is_complete()) {
        paths.push(store(cache, &stats)?.0);
    }
    Ok(Outcome { stats, paths, id, cached: false })
}

/// `factpatch stats merge`: sums shard files into `out` (replaced only when `force`, never
/// when it is one of the shards); a completed run also goes to `cache`.
pub fn merge_files(inputs: &[PathBuf], out: &Path, force: bool, cache: Option<&Path>) -> Result<Outcome> {
    let policy = Policy::force(force).reading(inputs);
    policy.check(out).map_err(io_err(out))?;
    let parts = inputs.iter().map(|p| Ok((p.clone(), Stats::read(p)?))).collect::<Result<Vec<_>>>()?;
    write_out(Stats::merge(&parts)?, out, &policy, cache)
}
