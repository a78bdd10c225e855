//! The header of a GGUF file: its metadata and tensor infos, read from the file's bytes. Every
//! count and length is checked against the bytes that remain before anything is read or
//! allocated, so memory follows the file's real size, never what it claims. Arrays the caller
//! does not need (a tokenizer's 100,000 strings, for `apply`) are stepped over and only counted.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use super::Error;

/// The tensor types a GGUF file may hold that candle reads, with their numbers in a tensor
/// info (ggml's `ggml_type`).
pub(super) const TYPES: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// Arrays nest at most this deep (as in llama.cpp and candle).
const MAX_DEPTH: usize = 64;
/// Tensors have at most this many dimensions (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// A GGUF file's header.
pub(super) struct Header {
    /// The metadata (arrays not asked for left out), the tensor infos and where tensor data starts.
    pub(super) content: Content,
    /// The element counts of the metadata arrays that were stepped over, by key.
    pub(super) skipped: BTreeMap<String, u64>,
    /// Where the metadata key/value section ends and the tensor infos start.
    pub(super) metadata_end: usize,
    /// The tensor data alignment (`general.alignment`, else 32).
    pub(super) alignment: u64,
}

/// Reads the header of the GGUF file `path`, whose bytes are `bytes`. A metadata array is
/// decoded only if `decode_array` says so of its key; other values always are.
pub(super) fn read(path: &Path, bytes: &[u8], decode_array: impl Fn(&str) -> bool) -> Result<Header, Error> {
    let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
    let mut r = Reader { bytes, at: 0, wide: true };
    if bytes.get(..4) != Some(b"GGUF") {
        return Err(corrupt("no GGUF magic".into()));
    }
    r.at = 4;
    let version = r.u32().map_err(corrupt)?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        _ => return Err(Error::UnsupportedVersion { path: path.to_path_buf(), version }),
    };
    r.wide = version > 1;
    let (tensors, keys) = (r.len().map_err(corrupt)?, r.len().map_err(corrupt)?);
    let mut metadata = HashMap::new();
    let mut skipped = BTreeMap::new();
    for _ in 0..keys {
        let key = r.string().map_err(corrupt)?;
        let kind = r.u32().map_err(corrupt)?;
        if metadata.contains_key(&key) || skipped.contains_key(&key) {
            return Err(corrupt(format!("metadata `{key}` appears twice")));
        }
        let problem = |e: String| corrupt(format!("metadata `{key}`: {e}"));
        if kind == 9 && !decode_array(&key) {
            let n = r.skip_array(0).map_err(problem)?;
            skipped.insert(key, n);
        } else {
            let value = r.value(kind, 0).map_err(problem)?;
            metadata.insert(key, value);
        }
    }
    let metadata_end = r.at;
    let alignment = alignment(&metadata);
    if alignment == 0 {
        return Err(Error::Metadata { path: path.to_path_buf(), key: "general.alignment".into(), problem: "is 0".into() });
    }
    r.fits(tensors, r.prefix() + 4 + 4 + 8).map_err(|e| corrupt(format!("{tensors} tensor infos: {e}")))?;
    let mut tensor_infos = HashMap::new();
    for _ in 0..tensors {
        let name = r.string().map_err(corrupt)?;
        let info = r.tensor_info().map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(corrupt(format!("tensor `{name}` is listed twice")));
        }
    }
    let tensor_data_offset = (r.at as u64).div_ceil(alignment) * alignment;
    Ok(Header { content: Content { magic, metadata, tensor_infos, tensor_data_offset }, skipped, metadata_end, alignment })
}

/// The tensor data alignment `general.alignment` sets, read as llama.cpp and candle read it: an
/// integer type of at most 32 bits, else (or when negative) the default 32.
fn alignment(metadata: &HashMap<String, Value>) -> u64 {
    match metadata.get("general.alignment") {
        Some(Value::U8(v)) => u64::from(*v),
        Some(Value::U16(v)) => u64::from(*v),
        Some(Value::U32(v)) => u64::from(*v),
        Some(Value::I8(v)) if *v >= 0 => *v as u64,
        Some(Value::I16(v)) if *v >= 0 => *v as u64,
        Some(Value::I32(v)) if *v >= 0 => *v as u64,
        _ => 32,
    }
}

/// A read position in a GGUF file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Lengths and counts are 64-bit (versions 2 and 3), not 32-bit (version 1).
    wide: bool,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n).ok().and_then(|n| self.at.checked_add(n)).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("the header ends past the end of the file (needs {n} bytes at offset {})", self.at))?;
        let b = &self.bytes[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Bytes in a length or count.
    fn prefix(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    /// A length or count.
    fn len(&mut self) -> Result<u64, String> {
        if self.wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    /// Fails unless `n` items of at least `size` bytes each fit in what remains.
    fn fits(&self, n: u64, size: u64) -> Result<(), String> {
        let remaining = (self.bytes.len() - self.at) as u64;
        match n.checked_mul(size) {
            Some(needed) if needed <= remaining => Ok(()),
            _ => Err(format!("{n} items of at least {size} bytes do not fit in the {remaining} bytes left at offset {}", self.at)),
        }
    }

    /// A length-prefixed string; bytes that are not UTF-8 become U+FFFD.
    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// The size of a value of type `kind` if fixed, else `None`.
    fn fixed_size(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    /// The fewest bytes a value of type `kind` takes.
    fn min_size(&self, kind: u32) -> u64 {
        Self::fixed_size(kind).unwrap_or(match kind {
            9 => 4 + self.prefix(),
            _ => self.prefix(),
        })
    }

    /// One metadata value of type `kind`, at array depth `depth`.
    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("boolean byte {b} is neither 0 nor 1")),
            },
            8 => Value::String(self.string()?),
            9 if depth < MAX_DEPTH => {
                let (item, n) = self.array_head()?;
                // Grows with the items read, each at least a byte of the file.
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            9 => return Err(format!("arrays nested more than {MAX_DEPTH} deep")),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            k => return Err(format!("unknown value type {k}")),
        })
    }

    /// An array's item type and length, checked to fit in what remains.
    fn array_head(&mut self) -> Result<(u32, u64), String> {
        let item = self.u32()?;
        if item > 12 {
            return Err(format!("unknown array item type {item}"));
        }
        let n = self.len()?;
        self.fits(n, self.min_size(item))?;
        Ok((item, n))
    }

    /// Steps over an array value at depth `depth`, checking its structure: its length.
    fn skip_array(&mut self, depth: usize) -> Result<u64, String> {
        if depth >= MAX_DEPTH {
            return Err(format!("arrays nested more than {MAX_DEPTH} deep"));
        }
        let (item, n) = self.array_head()?;
        match (Self::fixed_size(item), item) {
            (Some(size), 7) => {
                if let Some(b) = self.take(n * size)?.iter().find(|&&b| b > 1) {
                    return Err(format!("boolean byte {b} is neither 0 nor 1"));
                }
            }
            (Some(size), _) => {
                self.take(n * size)?;
            }
            (None, 8) => {
                for _ in 0..n {
                    let len = self.len()?;
                    self.take(len)?;
                }
            }
            (None, _) => {
                for _ in 0..n {
                    self.skip_array(depth + 1)?;
                }
            }
        }
        Ok(n)
    }

    /// A tensor info after its name: dimensions (fastest first in the file, reversed here to
    /// PyTorch's order), type and data offset.
    fn tensor_info(&mut self) -> Result<TensorInfo, String> {
        let n_dims = self.u32()?;
        if n_dims > MAX_DIMS {
            return Err(format!("{n_dims} dimensions, at most {MAX_DIMS} allowed"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.len()?;
            dims.push(usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?);
        }
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
            return Err(format!("dimensions {dims:?} overflow"));
        }
        dims.reverse();
        let id = self.u32()?;
        let ggml_dtype = TYPES.iter().find(|(n, _)| *n == id).map(|&(_, t)| t).ok_or_else(|| format!("tensor type {id} is not one factpatch reads"))?;
        let offset = self.u64()?;
        Ok(TensorInfo { ggml_dtype, shape: dims.into(), offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use std::io::Cursor;

    /// A GGUF file with these metadata, as candle writes it.
    fn file(metadata: &[(&str, Value)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut Cursor::new(&mut bytes), &refs, &[]).unwrap();
        bytes
    }

    #[test]
    fn reads_as_candle_reads_and_counts_what_it_skips() {
        let tokens = Value::Array((0..5).map(|i| Value::String(format!("t{i}"))).collect());
        let bytes = file(&[("a.n", Value::U32(7)), ("tokenizer.tokens", tokens), ("a.list", Value::Array(vec![Value::F32(1.5), Value::F32(2.0)]))]);
        let theirs = Content::read(&mut Cursor::new(&bytes)).unwrap();
        let all = read(Path::new("x.gguf"), &bytes, |_| true).unwrap();
        assert_eq!(format!("{:?}", sorted(&all.content.metadata)), format!("{:?}", sorted(&theirs.metadata)));
        assert_eq!(all.content.tensor_data_offset, theirs.tensor_data_offset);
        let some = read(Path::new("x.gguf"), &bytes, |k| !k.starts_with("tokenizer.")).unwrap();
        assert_eq!(some.skipped, BTreeMap::from([("tokenizer.tokens".to_string(), 5)]));
        assert!(!some.content.metadata.contains_key("tokenizer.tokens") && some.content.metadata.contains_key("a.list"));
        assert_eq!(some.metadata_end, all.metadata_end);
    }

    fn sorted(m: &HashMap<String, Value>) -> BTreeMap<&String, String> {
        m.iter().map(|(k, v)| (k, format!("{v:?}"))).collect()
    }

    #[test]
    fn claimed_lengths_beyond_the_file_are_refused_before_reading() {
        let mut bytes = file(&[("big", Value::Array(vec![Value::U8(1)]))]);
        // The array's length (after magic, version, counts, key and types) claims 2^60 items.
        let at = 4 + 4 + 8 + 8 + 8 + 3 + 4 + 4;
        bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        for decode in [true, false] {
            let err = read(Path::new("x.gguf"), &bytes, |_| decode).err().unwrap().to_string();
            assert!(err.contains("x.gguf") && err.contains("metadata `big`") && err.contains("do not fit"), "{err}");
        }
    }
}
