//! factpatch: compile fact edits (ROME, MEMIT, EMMET, AlphaEdit, KN; then RECT) into small
//! verifiable weight patches ([`compile`]), and apply, merge, diff, audit and evaluate them.

pub mod apply;
pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod compile;
pub mod edit;
pub mod eval;
pub mod experiment;
pub mod gguf;
pub mod model;
pub mod patch;
pub mod plot;
pub mod rect;
pub mod sign;
pub mod stats;
pub mod tokenize;

use std::path::{Path, PathBuf};

/// A file-system operation on `path` failed; every module's `Error` carries it as `Io`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `map_err(io_err(path))`: names `path` in an I/O error.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError { path: path.to_path_buf(), source }
}

/// `factpatch <version>`, as written into patches and statistics files.
pub fn tool_version() -> String {
    format!("factpatch {}", env!("CARGO_PKG_VERSION"))
}

/// Process-wide settings for tensor work. Call it first thing in `main`, before other threads
/// exist.
/// - candle's CPU pool gets one thread unless `CANDLE_NUM_THREADS` says otherwise. The matmuls
///   run on the system BLAS's threads, and candle's pool spins while it waits, taking cores from
///   them. A MEMIT compile on 2 cores took 4.9 s with one pool thread, 6.6 s with two.
/// - glibc keeps freed tensor buffers for reuse rather than handing them back to the kernel at
///   every free. Its defaults unmapped and re-faulted megabytes per op in the optimisation loop:
///   one CounterFact MEMIT fact took 7.2-8.0 s, and 5.9-6.2 s with the buffers kept.
pub fn init_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // SAFETY: mallopt only sets allocator parameters; both values are within glibc's limits.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// factpatch's cache folder (statistics, tensor hashes, downloaded fixtures):
/// `$FACTPATCH_CACHE`, else `~/.cache/factpatch`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("FACTPATCH_CACHE") {
        Some(root) => root.into(),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/factpatch"),
    }
}
