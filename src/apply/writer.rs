//! The streaming writer: a patch stack applied onto a checkpoint folder, written as a new
//! folder with patched tensors streamed in chunks and everything else copied by the kernel.

use super::stack::{add_chunk, materialize, materialize_chunk, Stack, CHUNK};
use super::{Error, Result};
use crate::atomic::{AtomicDir, Policy};
use crate::checkpoint::{self, Checkpoint, TensorRef};
use crate::io_err;
use crate::patch::{Delta, Patch};
use crate::rect;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

impl Stack {
    /// Streams the bytes of touched tensor `base` with the whole stack applied to `sink`, in
    /// chunks, once [`Stack::verify`] has passed. A tensor one patch touches is computed chunk
    /// by chunk and never held whole; `done` hears which byte ranges of `base` have been read
    /// for the last time in a pass. A tensor several patches touch is accumulated in memory.
    pub(crate) fn stream_verified(&self, base: &TensorRef, done: &dyn Fn(Range<usize>), sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        match self.touched[base.name][..] {
            [(p, e)] => stream_one(base, &self.patches[p].delta(e)?, &self.patches[p], done, sink),
            ref list => {
                let last = &self.patches[list.last().expect("non-empty").0];
                let (w0, d) = self.accumulate(base)?;
                materialize(base, &w0, &d, last, sink)
            }
        }
    }

    /// Everything [`apply_with`] checks before it writes anything: the signatures (with
    /// `options.trusted`), the base model and the first patch's parent when a patch records them
    /// ([`Stack::check_model`]), then every touched tensor ([`Stack::verify`]). Returns every
    /// tensor's hash of `ckpt` when the base model check computed them.
    pub fn check(&self, ckpt: &Checkpoint, options: &ApplyOptions) -> Result<Option<BTreeMap<String, blake3::Hash>>> {
        if let Some(trusted) = &options.trusted {
            for p in self.patches() {
                trusted.verify(p)?;
            }
        }
        let hashes = match self.needs_identity(options.allow_other_base) {
            true => self.check_model(ckpt, options.hash_cache.as_deref(), options.allow_other_base)?.hashes,
            false => None,
        };
        self.verify(ckpt)?;
        Ok(hashes)
    }
}

/// Streams `base` with one patch's `delta` added to `sink`, chunk by chunk, with the same
/// arithmetic per element as [`Stack::patched`]. The delta is never held whole: a RECT entry's
/// product is recomputed for each of the cut's two passes and for the write. `done` hears each
/// byte range of `base` as a pass finishes with it.
fn stream_one(base: &TensorRef, delta: &Delta, patch: &Patch, done: &dyn Fn(Range<usize>), sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let s = base.dtype.size();
    let n = base.bytes.len() / s;
    let chunks = || (0..n).step_by(CHUNK).map(move |a| a..(a + CHUNK).min(n));
    // The delta's unmasked chunk into `d`.
    let fill = |r: &Range<usize>, d: &mut Vec<f32>| {
        d.clear();
        d.resize(r.len(), 0.0);
        add_chunk(d, delta, base.shape, r.start);
    };
    let (mut d, mut buf, mut keys) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    let mut cut = match delta {
        Delta::LowRankRect { k, eps, .. } => rect::Cut::find(n, *k, |visit| {
            for r in chunks() {
                fill(&r, &mut d);
                let w = base.dtype.as_f32(&base.bytes[r.start * s..r.end * s], &mut buf);
                rect::keys(&d, w, *eps, &mut keys);
                visit(&keys);
                done(r.start * s..r.end * s);
            }
        }),
        _ => None,
    };
    for r in chunks() {
        fill(&r, &mut d);
        let w = base.dtype.as_f32(&base.bytes[r.start * s..r.end * s], &mut buf);
        if let (Some(cut), Delta::LowRankRect { eps, .. }) = (&mut cut, delta) {
            rect::keys(&d, w, *eps, &mut keys);
            cut.zero(&mut d, &keys);
        }
        sink(&materialize_chunk(base, r.start, w, &d, patch)?)?;
        done(r.start * s..r.end * s);
    }
    Ok(())
}

/// What [`apply`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplySummary {
    pub output: PathBuf,
    /// The output's model identity, blake3 hex (see `Checkpoint::identity`).
    pub identity: String,
    pub patches: Vec<String>,
    pub tensors_patched: usize,
    pub bytes_written: u64,
}

/// How [`apply_with`] writes its output.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// fsync every output file before the rename, so that not even a power loss leaves a
    /// partly written model under the final name (`cp` does not). On by default.
    pub sync: bool,
    /// Where the base's tensor hashes are remembered (`Checkpoint::tensor_hashes_cached`): for
    /// the base model check, and for the untouched tensors' part of the output's identity
    /// unless `verify_output` is set (then computed from the bytes).
    pub hash_cache: Option<PathBuf>,
    /// When given, every patch must carry a signature by one of these keys (`PATCH.minisig`),
    /// checked over the bytes that are applied.
    pub trusted: Option<crate::sign::Trusted>,
    /// Accept a model other than the patches' recorded base (or one that already has the first
    /// patch's parent applied); every touched tensor's hash is still checked.
    pub allow_other_base: bool,
    /// Compute the output's identity from the base's bytes (never the cache), then, once written,
    /// read the output's weights back and check that their identity is the one reported.
    pub verify_output: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { sync: true, hash_cache: None, trusted: None, allow_other_base: false, verify_output: false }
    }
}

/// [`apply_with`] with the default options.
pub fn apply(model: &Path, patches: &[PathBuf], out: &Path) -> Result<ApplySummary> {
    apply_with(model, patches, out, &ApplyOptions::default())
}

/// Applies `patches` in order to the model at `model`, writing a new model folder at `out`.
/// Everything is verified before anything is written (the base model, the parent chain, every
/// touched tensor); the output appears only when complete. The untouched tensors are copied by
/// the kernel while another thread hashes them from the base's bytes (or finds their hashes in
/// the cache), so the output's identity costs no second pass.
pub fn apply_with(model: &Path, patches: &[PathBuf], out: &Path, options: &ApplyOptions) -> Result<ApplySummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    apply_to(&Checkpoint::open(model)?, patches, out, options)
}

/// [`apply_with`] onto an opened checkpoint (the folder it was opened from). Its weight files
/// are checked to be unchanged around every tensor read and before the output is committed
/// (`Checkpoint::check_unchanged`): a base modified during the run is an error, not a crash
/// or a silently mixed output, and leaves nothing behind.
pub fn apply_to(ckpt: &Checkpoint, patches: &[PathBuf], out: &Path, options: &ApplyOptions) -> Result<ApplySummary> {
    if out.exists() {
        return Err(Error::OutputExists(out.to_path_buf()));
    }
    let model = ckpt.dir();
    let stack = Stack::load(patches)?;
    let base = stack.check(ckpt, options)?;
    // Never inside the model folder (it would copy itself), nor around it or a patch.
    let inputs = std::iter::once(model).chain(patches.iter().map(PathBuf::as_path));
    let dir = AtomicDir::create(out, &Policy::new().reading(inputs)).map_err(io_err(out))?;
    let untouched: Vec<&str> = ckpt.names().filter(|n| !stack.touched.contains_key(*n)).collect();
    let (copied, written) = std::thread::scope(|s| {
        let hashing = s.spawn(|| match (&base, &options.hash_cache) {
            (Some(all), _) => Ok(untouched.iter().map(|n| (n.to_string(), all[*n])).collect()),
            (None, Some(cache)) if !options.verify_output => ckpt.tensor_hashes_cached(&untouched, cache),
            (None, _) => ckpt.tensor_hashes(&untouched),
        });
        let written = (|| {
            let (mut bytes, mut hashes) = (0, BTreeMap::new());
            for file in ckpt.files() {
                let name = file.file_name().expect("weight files have names");
                bytes += write_weights(ckpt, &stack, file, &dir.path().join(name), &mut hashes)?;
            }
            let weights: BTreeSet<_> = ckpt.files().filter_map(Path::file_name).collect();
            copy_others(model, dir.path(), &weights)?;
            Ok::<_, Error>((bytes, hashes))
        })();
        (hashing.join().expect("hashing thread does not panic"), written)
    });
    let (bytes_written, mut hashes) = written?;
    hashes.extend(copied?);
    let identity = ckpt.identity_of(&hashes).to_hex().to_string();
    if options.verify_output {
        let found = Checkpoint::open(dir.path())?.identity()?.to_hex().to_string();
        if found != identity {
            return Err(Error::OutputMismatch { output: out.to_path_buf(), printed: identity, found });
        }
    }
    ckpt.check_files_unchanged()?;
    dir.commit(options.sync).map_err(io_err(out))?;
    Ok(ApplySummary {
        output: out.to_path_buf(),
        identity,
        patches: stack.patches.iter().map(|p| p.id().to_string()).collect(),
        tensors_patched: stack.touched.len(),
        bytes_written,
    })
}

/// Rewrites one weight file inside the output's temporary folder: the header and untouched
/// ranges copied by the kernel on one thread while this one streams the patched tensors into
/// their places, recording their byte hashes in `hashes`. Returns the file's length.
fn write_weights(ckpt: &Checkpoint, stack: &Stack, src: &Path, dest: &Path, hashes: &mut BTreeMap<String, blake3::Hash>) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let input = File::open(src).map_err(io_err(src))?;
    let len = input.metadata().map_err(io_err(src))?.len();
    let out = File::create_new(dest).map_err(io_err(dest))?;
    let touched = ckpt.names_in(src).into_iter().filter(|n| stack.touched.contains_key(*n)).map(|n| ckpt.tensor(n)).collect::<checkpoint::Result<Vec<_>>>()?;
    let mut gaps = Vec::new();
    let mut pos = 0u64;
    for t in &touched {
        gaps.push((pos, t.offset as u64));
        pos = (t.offset + t.bytes.len()) as u64;
    }
    gaps.push((pos, len));
    std::thread::scope(|s| {
        let copier = s.spawn(|| gaps.iter().try_for_each(|&(from, to)| copy_range(&input, src, &out, dest, from..to, from)));
        let streamed = touched.iter().try_for_each(|t| {
            let (mut h, mut at) = (blake3::Hasher::new(), t.offset as u64);
            ckpt.check_unchanged(t)?;
            stack.stream_verified(t, &|r| ckpt.evict_range(t, r), &mut |chunk| {
                h.update(chunk);
                out.write_all_at(chunk, at).map_err(io_err(dest))?;
                at += chunk.len() as u64;
                Ok(())
            })?;
            ckpt.check_unchanged(t)?;
            hashes.insert(t.name.to_string(), h.finalize());
            ckpt.evict(t);
            Ok::<_, Error>(())
        });
        copier.join().expect("the copying thread does not panic")?;
        streamed
    })?;
    Ok(len)
}

/// Copies the bytes `range` of `input` (at `src`) into `out` (at `dest`) from offset `at`, by the
/// kernel (`copy_file_range` where the filesystem has it). Moves both files' positions.
pub(crate) fn copy_range(input: &File, src: &Path, out: &File, dest: &Path, range: Range<u64>, at: u64) -> std::result::Result<(), crate::IoError> {
    let (mut input, mut out) = (input, out);
    out.seek(SeekFrom::Start(at)).map_err(io_err(dest))?;
    input.seek(SeekFrom::Start(range.start)).map_err(io_err(src))?;
    let copied = std::io::copy(&mut std::io::Read::take(input, range.end - range.start), &mut out).map_err(io_err(dest))?;
    if copied != range.end - range.start {
        return Err(io_err(src)(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Copies every file of the model folder `root` into `to`, except the top-level weight files
/// in `skip`: folders recursively, regular files by the kernel, and symbolic links as links,
/// never followed. A link is reproduced only when it is relative and leads, one step at a time,
/// to something inside the folder (so the copy leads to the same place inside the output);
/// any other link, and anything else (a FIFO, a device), is an error.
fn copy_others(root: &Path, to: &Path, skip: &BTreeSet<&std::ffi::OsStr>) -> Result<()> {
    copy_tree(root, Path::new(""), to, skip)
}

fn copy_tree(root: &Path, rel: &Path, to: &Path, skip: &BTreeSet<&std::ffi::OsStr>) -> Result<()> {
    let from = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&from).map_err(io_err(&from))?.collect::<std::io::Result<_>>().map_err(io_err(&from))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dest) = (e.path(), to.join(e.file_name()));
        if skip.contains(e.file_name().as_os_str()) {
            continue;
        }
        let refuse = |why: String| Error::from(io_err(&src)(std::io::Error::new(std::io::ErrorKind::InvalidInput, why)));
        let kind = e.file_type().map_err(io_err(&src))?;
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io_err(&src))?;
            if !leads_inside(root, &rel.join(e.file_name())) {
                return Err(refuse(format!(
                    "symbolic link to {} does not lead to a file or folder inside the model folder: apply never follows a link out of it; replace the link by what it points to, or remove it",
                    target.display()
                )));
            }
            std::os::unix::fs::symlink(&target, &dest).map_err(io_err(&dest))?;
        } else if kind.is_dir() {
            std::fs::create_dir(&dest).map_err(io_err(&dest))?;
            copy_tree(root, &rel.join(e.file_name()), &dest, &BTreeSet::new())?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dest).map_err(io_err(&dest))?;
        } else {
            return Err(refuse("is not a regular file, folder or symbolic link: apply copies nothing else".into()));
        }
    }
    Ok(())
}

/// Whether the symbolic link `link` (relative to `root`) resolves, following every link on the
/// way, to something that exists inside `root` without ever stepping out of it.
fn leads_inside(root: &Path, link: &Path) -> bool {
    use std::path::Component;
    let mut at: Vec<std::ffi::OsString> = link.components().map(|c| c.as_os_str().to_owned()).collect();
    let mut todo: Vec<std::ffi::OsString> = Vec::new(); // components still to walk, last first
    let mut hops = 0;
    loop {
        // `at` ends with a link: replace it by the link's target.
        let here = root.join(at.iter().collect::<PathBuf>());
        let Ok(target) = std::fs::read_link(&here) else { return false };
        hops += 1;
        if hops > 40 {
            return false;
        }
        at.pop();
        for c in target.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_owned()),
                Component::CurDir => {}
                Component::ParentDir => todo.push("..".into()),
                Component::RootDir | Component::Prefix(_) => return false,
            }
        }
        loop {
            let Some(c) = todo.pop() else { return true };
            if c == ".." {
                if at.pop().is_none() {
                    return false;
                }
                continue;
            }
            at.push(c);
            match std::fs::symlink_metadata(root.join(at.iter().collect::<PathBuf>())) {
                Ok(m) if m.file_type().is_symlink() => break,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
}
