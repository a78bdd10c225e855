//! factpatch: compile fact edits (ROME, MEMIT, EMMET, AlphaEdit, ENCORE, KN; then RECT) into small
//! verifiable weight patches ([`compile`]), and apply, merge, diff, audit and evaluate them.

mod adam;
pub mod apply;
pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod compile;
pub mod edit;
pub mod eval;
pub mod experiment;
pub mod export;
pub mod gguf;
pub mod mend;
pub mod model;
pub mod patch;
pub mod plot;
pub mod rect;
pub mod sigbus;
pub mod sign;
pub mod stats;
pub mod tokenize;
pub mod trace;

use std::path::{Path, PathBuf};

/// A file-system operation on `path` failed; every module's `Error` carries it as `Io`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", path.display(), describe(source))]
pub struct IoError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// An I/O error in words; a read cut short says the file is shorter than it should be.
fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the file ended early (truncated, or truncated while it was read)".into(),
        _ => e.to_string(),
    }
}

/// `map_err(io_err(path))`: names `path` in an I/O error.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError { path: path.to_path_buf(), source }
}

/// Largest metadata file read whole: `config.json`, shard indexes, `tokenizer.json`, caches.
pub const MAX_METADATA_BYTES: u64 = 256 << 20;
/// Largest data file read whole: patches, requests, corpora, task files, statistics.
pub const MAX_DATA_BYTES: u64 = 1 << 40;

/// Opens `path` for reading if it is a regular file of at most `max_bytes` bytes; returns it
/// with its length. Devices, FIFOs, sockets and folders are refused before anything blocks on
/// them or reads them to exhaustion: the file is opened non-blocking and checked again once
/// open, so a FIFO swapped in between cannot hang the open either.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<(std::fs::File, u64), IoError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let check = |m: std::fs::Metadata| -> std::io::Result<u64> {
        let t = m.file_type();
        let kind = if t.is_file() {
            None
        } else if t.is_dir() {
            Some("a folder")
        } else if t.is_fifo() {
            Some("a FIFO")
        } else if t.is_char_device() {
            Some("a character device")
        } else if t.is_block_device() {
            Some("a block device")
        } else if t.is_socket() {
            Some("a socket")
        } else {
            Some("of an unknown type")
        };
        if let Some(kind) = kind {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("not a regular file ({kind})")));
        }
        if m.len() > max_bytes {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} bytes, more than the {max_bytes} allowed", m.len())));
        }
        Ok(m.len())
    };
    let opened = || {
        check(std::fs::metadata(path)?)?;
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        let len = check(file.metadata()?)?;
        Ok((file, len))
    };
    opened().map_err(io_err(path))
}

/// Copies `path`, a regular file of at most `max_bytes` bytes (see [`open_regular`]), into the
/// sink `make` builds from its length; a file that grows past the limit while read is an error.
fn copy_regular<W: std::io::Write>(path: &Path, max_bytes: u64, make: impl FnOnce(u64) -> W) -> Result<W, IoError> {
    use std::io::Read;
    let (file, len) = open_regular(path, max_bytes)?;
    let mut sink = make(len);
    let copied = std::io::copy(&mut file.take(max_bytes.saturating_add(1)), &mut sink).map_err(io_err(path))?;
    if copied > max_bytes {
        let grew = std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("grew past the {max_bytes} bytes allowed while being read"));
        return Err(io_err(path)(grew));
    }
    Ok(sink)
}

/// The bytes of `path`, a regular file of at most `max_bytes` bytes (see [`open_regular`]).
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>, IoError> {
    copy_regular(path, max_bytes, |len| Vec::with_capacity(len as usize))
}

/// blake3 of the bytes of `path`, a regular file of at most `max_bytes` bytes, as hex. The file
/// is streamed, not held in memory.
pub fn hash_file(path: &Path, max_bytes: u64) -> Result<String, IoError> {
    Ok(copy_regular(path, max_bytes, |_| blake3::Hasher::new())?.finalize().to_hex().to_string())
}

/// The text of `path` (see [`read_regular`]); invalid UTF-8 is an error naming the line.
pub fn read_regular_text(path: &Path, max_bytes: u64) -> Result<String, IoError> {
    String::from_utf8(read_regular(path, max_bytes)?).map_err(|e| io_err(path)(not_utf8(e.as_bytes(), e.utf8_error().valid_up_to())))
}

/// The error for `bytes` that are valid UTF-8 only up to `valid`: names the line and byte.
pub fn not_utf8(bytes: &[u8], valid: usize) -> std::io::Error {
    let line = 1 + bytes[..valid].iter().filter(|&&b| b == b'\n').count();
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {line}: not valid UTF-8 (byte {valid})"))
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
/// - a weight file truncated under its memory map gives one error line naming it, not a bus
///   error ([`sigbus`]).
/// - glibc keeps freed tensor buffers for reuse rather than handing them back to the kernel at
///   every free. Its defaults unmapped and re-faulted megabytes per op in the optimisation loop:
///   one CounterFact MEMIT fact took 7.2-8.0 s, and 5.9-6.2 s with the buffers kept.
/// - OpenBLAS starts its threads when it is loaded, and an idle one spins (`sched_yield`) for
///   about 2^28 cycles before it sleeps. On 2 cores that took one from `apply`, which does no
///   BLAS, for its whole run (0.06-0.12 s). They are stopped here; OpenBLAS starts them again
///   at its first threaded call.
pub fn init_process() {
    sigbus::install();
    extern "C" {
        fn blas_thread_shutdown_() -> std::os::raw::c_int;
    }
    // SAFETY: no BLAS call is in flight (no other thread exists yet); OpenBLAS restarts its
    // threads when it next needs them, as it does after a fork.
    unsafe { blas_thread_shutdown_() };
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

/// The one-line message for an error and its causes, as the CLI prints it after `error: `:
/// typed errors already quote their cause, so each cause is added only when it says something
/// new, and every message is put on one line ([`one_line`]).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()).map(|c| one_line(&c.to_string())) {
        if !message.contains(&cause) {
            message += if message.is_empty() { "" } else { ": " };
            message += &cause;
        }
    }
    message
}

/// `message` on one line: a captured backtrace (candle appends one to its errors when
/// `RUST_BACKTRACE` is set) is dropped, other line breaks become spaces.
pub fn one_line(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines().map(str::trim) {
        let frame = line.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if frame || line.eq_ignore_ascii_case("stack backtrace:") {
            break;
        }
        if !line.is_empty() {
            kept.push(line);
        }
    }
    kept.join(" ")
}
