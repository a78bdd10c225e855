//! The statistics cache: complete runs stored under their request id, and looked up by
//! request or by model and layers.

use super::file::{read_meta, Meta, Stats};
use super::Result;
use crate::io_err;
use std::io;
use std::path::{Path, PathBuf};

/// The statistics cache: `$FACTPATCH_CACHE/stats`, else `~/.cache/factpatch/stats`.
pub fn default_cache_dir() -> PathBuf {
    crate::cache_root().join("stats")
}

/// Where the cache keeps the complete statistics of a request.
pub fn cache_path(cache: &Path, request_id: &str) -> PathBuf {
    cache.join(format!("{request_id}.safetensors"))
}

/// Stores complete statistics in the cache under their request id; returns the path and file id.
pub fn store(cache: &Path, stats: &Stats) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let path = cache_path(cache, &stats.meta.request_id());
    let id = stats.write(&path, &crate::atomic::Policy::rewrite())?;
    Ok((path, id))
}

/// The best complete statistics in `cache` for `model` (its identity, hex) covering `layers`,
/// whatever corpus they came from: the most tokens, then the smallest file name. Reads headers
/// only. The compiler uses it for [`StatsSource::Cached`](crate::compile::StatsSource::Cached):
/// existing statistics, however they were made.
pub fn find_in_cache(cache: &Path, model: &str, layers: &[usize]) -> Result<Option<(PathBuf, Meta)>> {
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(cache)(e).into()),
    };
    let mut best: Option<(PathBuf, Meta)> = None;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
        let Ok(meta) = read_meta(&path) else { continue };
        let fits = meta.model == model && meta.is_complete() && layers.iter().all(|l| meta.layers.contains(l));
        if fits && best.as_ref().is_none_or(|(_, b)| meta.tokens > b.tokens) {
            best = Some((path, meta));
        }
    }
    Ok(best)
}
