//! Patches applied onto a llama or gemma3 GGUF file (`apply --model FILE.gguf`): a new GGUF file whose
//! metadata and untouched tensors are the input's bytes, and whose touched tensors are
//! dequantized, patched and stored again (see `formats/patch.md`, "GGUF models").
//!
//! Patches are compiled against the Hugging Face folder `import-gguf` makes of the file, so the
//! file is checked against them as that folder: its identity and every touched tensor's hash
//! are those of the tensors as `import-gguf` writes them (dequantized to f32, Llama's
//! `q_proj`/`k_proj` un-permuted, Gemma's norms less 1), computed by the same code. Every patch
//! is verified before the output is created: against the tensor hashes the identity was checked
//! with (from the hash cache, or the bytes), and a tensor several patches touch from its bytes.
//! Then the kernel copies the rest of the file while this thread computes the touched tensors,
//! one at a time, each checked against its patch again as it is read; the copying thread joins
//! in once done. Nothing is committed unless every check passed.

use super::header;
use super::tensors::{self, Mapped};
use super::{Error, Hparams};
use crate::apply::{self, ApplyOptions, ApplySummary, ModelIdentity, Stack};
use crate::atomic::{AtomicFile, Policy};
use crate::checkpoint::{self, Dtype, Stamp, TensorRef};
use crate::io_err;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// How the output stores the tensors the patches change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TouchedAs {
    /// Quantized again to the tensor's own type: the file keeps its size and layout.
    Own,
    /// 16-bit floats.
    F16,
    /// 32-bit floats: exactly the values `apply` writes into the imported folder.
    F32,
}

/// What touched tensors are stored as unless `--touched-as` says otherwise. f16: quantized
/// again to Q4_1, single MEMIT edits of SmolLM2 are mostly lost (the demo's model still answers
/// Paris; over 50 CounterFact edits the mean margin P(new) − P(true) falls from +0.97 to +0.08,
/// `cargo bench --bench gguf_quant`); in f16 they score as on the f32 folder, for 6% more bytes
/// (`docs/runtimes.md`, "GGUF apply"). Gemma 3 270M's Q4_K keeps its edits when quantized
/// again, but rounds part of each away (paraphrase 0.96 → 0.88 over the same 50 records).
pub const DEFAULT_TOUCHED_AS: TouchedAs = TouchedAs::F16;

/// What the cache of tensor hashes calls the hashes of a GGUF file's dequantized tensors.
const HASH_KIND: &str = "gguf-dequantized-f32|";

/// Whether `path` is a regular file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    crate::open_regular(path, u64::MAX).is_ok_and(|(mut f, _)| f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// Applies `patches` in order to the GGUF file `model`, writing a new GGUF file at `out` (never
/// replacing anything). The patches are checked as [`apply::apply_with`] checks them against
/// the folder `import-gguf` makes of `model`; touched tensors are stored as `touched_as` says.
/// The reported identity is that of the output's import: untouched tensors' hashes come from
/// the base (the hash cache, when `options.hash_cache` is given), touched ones from the written
/// bytes; `options.verify_output` recomputes it from the written file.
pub fn apply(model: &Path, patches: &[PathBuf], out: &Path, options: &ApplyOptions, touched_as: TouchedAs) -> Result<ApplySummary, Error> {
    let stack = Stack::load(patches)?;
    if let Some(trusted) = &options.trusted {
        for p in stack.patches() {
            trusted.verify(p).map_err(apply::Error::from)?;
        }
    }
    let gguf = Gguf::open(model)?;
    let policy = Policy::new().reading(std::iter::once(model).chain(patches.iter().map(PathBuf::as_path)));
    policy.check(out).map_err(io_err(out))?;
    let tensors = gguf.tensors()?;
    let by_hf: BTreeMap<&str, &Mapped> = tensors.iter().map(|m| (m.hf.as_str(), m)).collect();
    let touched = stack
        .touched()
        .map(|name| {
            by_hf.get(name).copied().ok_or_else(|| {
                let patch = stack.patches().iter().find(|p| p.manifest().entries.iter().any(|e| e.tensor == name)).expect("a patch touches it");
                apply::Error::MissingTensor { patch: patch.path().to_path_buf(), name: name.to_string(), model: model.to_path_buf() }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The base: its identity, then every touched tensor, before anything is written.
    let mut cached = None;
    let remembered = options.hash_cache.as_deref().map(|cache| {
        let (cached, gguf, tensors) = (&mut cached, &gguf, &tensors);
        move || -> Result<String, Error> {
            let hashes = gguf.hashes_cached(tensors, cache)?;
            let identity = identity(tensors, &hashes).to_hex().to_string();
            *cached = Some(hashes);
            Ok(identity)
        }
    });
    let from_bytes = || -> Result<ModelIdentity, Error> {
        let hashes = gguf.hashes(&tensors)?;
        Ok(ModelIdentity { identity: identity(&tensors, &hashes).to_hex().to_string(), hashes: Some(hashes) })
    };
    let base = stack.check_identity(model, remembered, from_bytes, options.allow_other_base)?;
    let mut hashes = base.hashes.or(cached).expect("hashed from the cache or the bytes");
    // Every touched tensor against the hashes the identity was checked with, and one that
    // several patches touch from its bytes (in parallel: it is accumulated). The others' bytes
    // are checked again as they are read for writing, below.
    let mut from_record = BTreeSet::new();
    let mut accumulated = Vec::new();
    for m in &touched {
        if stack.verify_recorded(&m.hf, Dtype::F32, &m.shape, &hashes[&m.hf])? {
            from_record.insert(m.hf.as_str());
        } else {
            accumulated.push(*m);
        }
    }
    // Not even an empty parallel iterator otherwise: it starts rayon's threads, whose idle
    // spinning takes CPU time from the copy and the touched tensors.
    if !accumulated.is_empty() {
        accumulated.par_iter().try_for_each(|m| gguf.verify(&stack, m))?;
    }

    let mut file = AtomicFile::create(out, &policy).map_err(io_err(out))?;
    let types: BTreeMap<&str, GgmlDType> = touched.iter().map(|m| (m.gguf, stored_type(m.info.ggml_dtype, touched_as))).collect();
    let (bytes_written, written) = gguf.write(&tensors, &types, file.file().map_err(io_err(out))?, out, |m, sink| {
        let values = gguf.patched(&stack, m, from_record.contains(m.hf.as_str()))?;
        let q = quantize(m, values, types[m.gguf]).map_err(|e| gguf.corrupt(m, e))?;
        sink(&q.data().map_err(|e| gguf.corrupt(m, e))?)?;
        Ok((m.hf.clone(), hash_f32(&m.hf_values_of(&gguf.path, &q)?)))
    })?;
    hashes.extend(written);
    let identity = identity(&tensors, &hashes).to_hex().to_string();
    if options.verify_output {
        let written = Gguf::open(file.path())?;
        let found = identity_of_file(&written)?;
        if found != identity {
            return Err(apply::Error::OutputMismatch { output: out.to_path_buf(), printed: identity, found }.into());
        }
    }
    gguf.check_unchanged()?;
    file.commit_synced(options.sync).map_err(io_err(out))?;
    Ok(ApplySummary {
        output: out.to_path_buf(),
        identity,
        patches: stack.patches().iter().map(|p| p.id().to_string()).collect(),
        tensors_patched: touched.len(),
        bytes_written,
    })
}

/// The identity of the model `import-gguf` makes of `gguf`, computed from its bytes.
fn identity_of_file(gguf: &Gguf) -> Result<String, Error> {
    let tensors = gguf.tensors()?;
    Ok(identity(&tensors, &gguf.hashes(&tensors)?).to_hex().to_string())
}

/// The model identity (`Checkpoint::identity`) of the imported folder: every tensor as F32
/// under its Hugging Face name and shape, with these hashes of its f32 bytes.
fn identity(tensors: &[Mapped], hashes: &BTreeMap<String, blake3::Hash>) -> blake3::Hash {
    let mut sorted: Vec<&Mapped> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.hf.cmp(&b.hf));
    checkpoint::identity_from(sorted.into_iter().map(|m| (m.hf.as_str(), Dtype::F32, m.shape.as_slice(), &hashes[&m.hf])))
}

/// blake3 of `values` as little-endian f32 bytes, as `import-gguf` writes them.
fn hash_f32(values: &[f32]) -> blake3::Hash {
    blake3::hash(&checkpoint::f32_bytes(values))
}

/// The type a touched tensor of type `own` is stored as.
fn stored_type(own: GgmlDType, touched_as: TouchedAs) -> GgmlDType {
    match touched_as {
        TouchedAs::Own => own,
        TouchedAs::F16 => GgmlDType::F16,
        TouchedAs::F32 => GgmlDType::F32,
    }
}

/// Hugging Face-ordered `values` of `m` in the GGUF's row order, stored as `dtype`.
fn quantize(m: &Mapped, values: Vec<f32>, dtype: GgmlDType) -> candle_core::Result<QTensor> {
    let t = Tensor::from_vec(m.gguf_order(values), m.shape.as_slice(), &Device::Cpu)?;
    QTensor::quantize(&t, dtype)
}

/// Bytes a tensor of `elems` elements takes as `dtype`, if whole blocks.
fn stored_len(dtype: GgmlDType, elems: usize) -> Option<usize> {
    elems.is_multiple_of(dtype.block_size()).then(|| elems / dtype.block_size() * dtype.type_size())
}

/// The type's number in a GGUF tensor info (ggml's `ggml_type`).
fn type_id(dtype: GgmlDType) -> u32 {
    header::TYPES.iter().find(|(_, t)| *t == dtype).expect("every candle type is in the table").0
}

/// An opened llama or gemma3 GGUF file (version 2 or 3), memory-mapped, its header parsed and checked.
struct Gguf {
    path: PathBuf,
    /// Kept open so that changes to the file can be detected.
    file: File,
    mmap: Mmap,
    /// Size and modification time when opened: reads through the map are valid while they hold.
    stamp: Stamp,
    content: Content,
    hp: Hparams,
    /// Where the metadata section ends and the tensor infos start.
    metadata_end: usize,
    /// The alignment of tensor data (`general.alignment`, else 32).
    alignment: u64,
}

impl Gguf {
    /// Opens and checks `path`: a llama model whose every tensor lies inside the file.
    fn open(path: &Path) -> Result<Self, Error> {
        let (file, _) = crate::open_regular(path, u64::MAX).map_err(|e| Error::Open { path: path.to_path_buf(), source: e.source })?;
        let stamp = Stamp::of(&file, path).map_err(apply::Error::from)?;
        // SAFETY: the file is treated as immutable while open; factpatch never writes into an
        // input, and `check_unchanged` is called around reads to catch others who do.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        // Version 1 lays the header out otherwise (32-bit lengths); `write` writes 2 and 3.
        let version = mmap.get(4..8).filter(|_| mmap.starts_with(b"GGUF")).map(|v| u32::from_le_bytes(v.try_into().expect("4 bytes")));
        if let Some(version) = version.filter(|v| !matches!(v, 2 | 3)) {
            return Err(Error::UnsupportedVersion { path: path.to_path_buf(), version });
        }
        // The tokenizer's arrays (most of the header) are stepped over: apply needs only the shapes.
        let header = header::read(path, &mmap, |key| !key.starts_with("tokenizer."))?;
        let hp = Hparams::read(&super::meta::Meta::of(path, &header))?;
        let (content, metadata_end, alignment) = (header.content, header.metadata_end, header.alignment);
        let gguf = Gguf { path: path.to_path_buf(), file, mmap, stamp, content, hp, metadata_end, alignment };
        gguf.check_layout()?;
        Ok(gguf)
    }

    /// Every tensor lies inside the file, and they follow each other in data order, each at the
    /// aligned end of the one before, as llama.cpp requires (so the output is never larger than
    /// the input but for the touched tensors' new types).
    fn check_layout(&self) -> Result<(), Error> {
        let tensors = self.tensors()?;
        let mut order: Vec<&Mapped> = tensors.iter().collect();
        order.sort_by_key(|m| (m.info.offset, m.gguf));
        let mut expected = 0;
        for m in order {
            let range = self.range(m)?;
            if m.info.offset != expected {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("tensor `{}` starts at data offset {}, expected {expected}: tensors are not packed in order", m.gguf, m.info.offset),
                });
            }
            expected = self.align(m.info.offset + range.len() as u64);
        }
        Ok(())
    }

    /// `n` rounded up to the tensor data alignment.
    fn align(&self, n: u64) -> u64 {
        n.div_ceil(self.alignment) * self.alignment
    }

    /// The tensors, in GGUF name order, with their Hugging Face names and shapes.
    fn tensors(&self) -> Result<Vec<Mapped<'_>>, Error> {
        tensors::map(&self.path, &self.content, &self.hp)
    }

    /// Where `m`'s data lies in the file; an error if not inside it.
    fn range(&self, m: &Mapped) -> Result<std::ops::Range<usize>, Error> {
        let elems = m.shape.iter().product();
        let len = stored_len(m.info.ggml_dtype, elems);
        let start = self.content.tensor_data_offset.checked_add(m.info.offset).and_then(|s| usize::try_from(s).ok());
        match (start, len) {
            (Some(start), Some(len)) if start.checked_add(len).is_some_and(|end| end <= self.mmap.len()) => Ok(start..start + len),
            _ => Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{}` ({:?}, {elems} elements at offset {}) does not lie inside the file", m.gguf, m.info.ggml_dtype, m.info.offset),
            }),
        }
    }

    /// An error about tensor `m` of this file.
    fn corrupt(&self, m: &Mapped, e: candle_core::Error) -> Error {
        Error::Corrupt { path: self.path.clone(), reason: format!("tensor `{}`: {e}", m.gguf) }
    }

    /// Fails when the file no longer has the size and modification time it had when opened.
    fn check_unchanged(&self) -> Result<(), Error> {
        Ok(self.stamp.check(&self.file, &self.path).map_err(apply::Error::from)?)
    }

    /// `m`'s values as `import-gguf` writes them.
    fn hf_values(&self, m: &Mapped) -> Result<Vec<f32>, Error> {
        self.check_unchanged()?;
        let values = m.hf_values(&self.path, &mut Cursor::new(&self.mmap[..]), self.content.tensor_data_offset)?;
        self.check_unchanged()?;
        Ok(values)
    }

    /// blake3 of every tensor's f32 bytes as `import-gguf` writes them, by Hugging Face name.
    fn hashes(&self, tensors: &[Mapped]) -> Result<BTreeMap<String, blake3::Hash>, Error> {
        tensors.par_iter().map(|m| Ok((m.hf.clone(), hash_f32(&self.hf_values(m)?)))).collect()
    }

    /// [`Gguf::hashes`], remembered in `cache` (see `Checkpoint::tensor_hashes_cached`).
    fn hashes_cached(&self, tensors: &[Mapped], cache: &Path) -> Result<BTreeMap<String, blake3::Hash>, Error> {
        let every: Vec<&str> = tensors.iter().map(|m| m.hf.as_str()).collect();
        checkpoint::remembered_hashes(cache, &self.path, &self.file, HASH_KIND, &every, || self.hashes(tensors))
    }

    /// Checks the patches touching `m` against it (`Stack::verify_tensor`).
    fn verify(&self, stack: &Stack, m: &Mapped) -> Result<(), Error> {
        let values = self.hf_values(m)?;
        Ok(stack.verify_tensor(&self.base(m, &checkpoint::f32_bytes(&values))?, &|_| {})?)
    }

    /// `m`'s values with the whole stack applied, as f32 in Hugging Face order, once verified
    /// (`Stack::stream_verified`). With `check`, its bytes are first checked against the patch
    /// (`Stack::verify_tensor`): it was verified by its recorded hash only.
    fn patched(&self, stack: &Stack, m: &Mapped, check: bool) -> Result<Vec<f32>, Error> {
        let values = self.hf_values(m)?;
        let bytes = checkpoint::f32_bytes(&values);
        let base = self.base(m, &bytes)?;
        if check {
            stack.verify_tensor(&base, &|_| {})?;
        }
        let mut out = Vec::with_capacity(values.len());
        stack.stream_verified(&base, &|_| {}, &mut |chunk| {
            Dtype::F32.decode_into(chunk, &mut out);
            Ok(())
        })?;
        Ok(out)
    }

    /// Tensor `m` as the imported folder has it, its f32 bytes `bytes`.
    fn base<'a>(&'a self, m: &'a Mapped, bytes: &'a [u8]) -> Result<TensorRef<'a>, Error> {
        Ok(TensorRef { name: &m.hf, dtype: Dtype::F32, shape: &m.shape, bytes, path: &self.path, offset: self.range(m)?.start })
    }

    /// Writes the output GGUF into `out` (at `path`): the header and metadata as read, tensor
    /// infos in data order with `types` for the touched tensors and offsets recomputed, the
    /// untouched tensors' bytes copied by the kernel on one thread while the others compute the
    /// touched ones (one thread per core in all: more would take CPU time from the copy), each written
    /// where it goes as `touched` hands its bytes to its sink. Returns the file's length and
    /// what `touched` returned for each, in data order.
    fn write<T: Send>(
        &self,
        tensors: &[Mapped],
        types: &BTreeMap<&str, GgmlDType>,
        out: &File,
        path: &Path,
        touched: impl Fn(&Mapped, &mut dyn FnMut(&[u8]) -> Result<(), Error>) -> Result<T, Error> + Sync,
    ) -> Result<(u64, Vec<T>), Error> {
        use std::os::unix::fs::FileExt;
        let mut order: Vec<&Mapped> = tensors.iter().collect();
        order.sort_by_key(|m| (m.info.offset, m.gguf));
        let mut head = self.mmap[..self.metadata_end].to_vec();
        let (mut places, mut offset) = (Vec::with_capacity(order.len()), 0u64);
        for m in order {
            let dtype = types.get(m.gguf).copied().unwrap_or(m.info.ggml_dtype);
            let len = stored_len(dtype, m.shape.iter().product()).expect("checked on open, or a quantized tensor") as u64;
            head.extend_from_slice(&(m.gguf.len() as u64).to_le_bytes());
            head.extend_from_slice(m.gguf.as_bytes());
            head.extend_from_slice(&(m.shape.len() as u32).to_le_bytes());
            for &d in m.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&type_id(dtype).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            places.push((m, offset, len));
            offset = self.align(offset + len);
        }
        head.resize(self.align(head.len() as u64) as usize, 0);
        let data = head.len() as u64;
        // Sized first: the padding after each tensor is never written, and reads as zeros.
        out.set_len(data + offset).map_err(io_err(path))?;
        let (streamed, copied): (Vec<_>, Vec<_>) = places.into_iter().partition(|(m, ..)| types.contains_key(m.gguf));
        // The untouched tensors as spans of the input and where they go, each run of tensors
        // that follow each other without padding in both files copied as one span.
        let mut spans: Vec<(std::ops::Range<u64>, u64)> = Vec::new();
        for &(m, at, _) in &copied {
            let range = self.range(m)?;
            let (from, to) = (range.start as u64..range.end as u64, data + at);
            match spans.last_mut() {
                Some((last, last_to)) if last.end == from.start && *last_to + (last.end - last.start) == to => last.end = from.end,
                _ => spans.push((from, to)),
            }
        }
        // A span that starts the tensor data in both files is copied from offset 0, the input's
        // header with it, and the new header written over that: the kernel copies page-aligned
        // ranges a quarter faster. Otherwise the header is written first.
        let head_in_span = spans.first().is_some_and(|(from, to)| from.start == self.content.tensor_data_offset && *to == data);
        if head_in_span {
            spans[0] = (0..spans[0].0.end, 0);
        } else {
            out.write_all_at(&head, 0).map_err(io_err(path))?;
        }
        let copy = || {
            for (i, (range, at)) in spans.iter().enumerate() {
                crate::apply::copy_range(&self.file, &self.path, out, path, range.clone(), *at)?;
                if i == 0 && head_in_span {
                    out.write_all_at(&head, 0).map_err(io_err(path))?;
                }
            }
            Ok::<_, crate::IoError>(())
        };
        // The touched tensors, taken in turn by this thread, one more per further core, and the
        // copier once it has copied. After an error, none is taken.
        let next = AtomicUsize::new(0);
        let work = || -> Result<Vec<(usize, T)>, Error> {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(m, at, len)) = streamed.get(i) else { return Ok(done) };
                let mut pos = data + at;
                let written = touched(m, &mut |bytes| {
                    out.write_all_at(bytes, pos).map_err(io_err(path))?;
                    pos += bytes.len() as u64;
                    Ok(())
                });
                match written {
                    Ok(t) => done.push((i, t)),
                    Err(e) => {
                        next.store(streamed.len(), Ordering::Relaxed);
                        return Err(e);
                    }
                }
                assert_eq!(pos - data - at, len, "tensor `{}`: written length differs from its tensor info", m.gguf);
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let helpers = cores.saturating_sub(2).min(streamed.len());
        let results = std::thread::scope(|s| {
            let copier = s.spawn(|| {
                copy()?;
                work()
            });
            let helpers: Vec<_> = (0..helpers).map(|_| s.spawn(work)).collect();
            let mut results = vec![work()];
            results.extend(std::iter::once(copier).chain(helpers).map(|t| t.join().expect("a writing thread does not panic")));
            results
        });
        let mut written = Vec::new();
        for r in results {
            written.extend(r?);
        }
        written.sort_by_key(|&(i, _)| i);
        let written = written.into_iter().map(|(_, t)| t).collect();
        Ok((data + offset, written))
    }
}
