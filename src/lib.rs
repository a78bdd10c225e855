//! factpatch: compile fact edits (ROME, MEMIT, RECT) into small verifiable weight patches.

pub mod apply;
pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod edit;
pub mod eval;
pub mod experiment;
pub mod gguf;
pub mod model;
pub mod patch;
pub mod plot;
pub mod rect;
pub mod stats;
pub mod tokenize;

/// factpatch's cache folder (statistics, tensor hashes, downloaded fixtures):
/// `$FACTPATCH_CACHE`, else `~/.cache/factpatch`.
pub fn cache_root() -> std::path::PathBuf {
    match std::env::var_os("FACTPATCH_CACHE") {
        Some(root) => root.into(),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/factpatch"),
    }
}
