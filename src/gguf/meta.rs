//! Typed access to GGUF metadata, with errors naming the file and the key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::header::Header;
use super::Error;

/// The metadata of one GGUF file.
pub(super) struct Meta<'a> {
    /// The GGUF file, for error messages.
    path: &'a Path,
    /// Its key/value pairs.
    map: &'a HashMap<String, Value>,
    /// The element counts of the arrays that were not read, by key.
    skipped: &'a BTreeMap<String, u64>,
}

/// No arrays left unread.
#[cfg(test)]
static NONE_SKIPPED: BTreeMap<String, u64> = BTreeMap::new();

impl<'a> Meta<'a> {
    /// Wrap the metadata read from `path`, every array read.
    #[cfg(test)]
    pub(super) fn new(path: &'a Path, map: &'a HashMap<String, Value>) -> Self {
        Meta { path, map, skipped: &NONE_SKIPPED }
    }

    /// Wrap the metadata of `header`, read from `path`.
    pub(super) fn of(path: &'a Path, header: &'a Header) -> Self {
        Meta { path, map: &header.content.metadata, skipped: &header.skipped }
    }

    /// The GGUF file this metadata came from.
    pub(super) fn path(&self) -> &'a Path {
        self.path
    }

    /// A metadata error about `key`.
    pub(super) fn error(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Metadata { path: self.path.to_path_buf(), key: key.to_string(), problem: problem.into() }
    }

    /// The value of `key`, which must be present.
    fn get(&self, key: &str) -> Result<&'a Value, Error> {
        self.map.get(key).ok_or_else(|| self.error(key, "missing"))
    }

    /// A non-negative integer of any width.
    fn to_usize(&self, key: &str, value: &Value) -> Result<usize, Error> {
        let n: Option<u64> = match *value {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| self.error(key, format!("expected a non-negative integer, found {value:?}")))
    }

    /// A required non-negative integer.
    pub(super) fn usize(&self, key: &str) -> Result<usize, Error> {
        self.to_usize(key, self.get(key)?)
    }

    /// An optional non-negative integer.
    pub(super) fn opt_usize(&self, key: &str) -> Result<Option<usize>, Error> {
        self.map.get(key).map(|v| self.to_usize(key, v)).transpose()
    }

    /// A float. An `f32` is widened through its shortest decimal form, so
    /// `1e-5` stored as `f32` becomes `1e-5` rather than `9.999999747378752e-6`.
    fn to_f64(&self, key: &str, value: &Value) -> Result<f64, Error> {
        match *value {
            Value::F32(v) => format!("{v}").parse().map_err(|_| self.error(key, format!("unreadable float {v}"))),
            Value::F64(v) => Ok(v),
            _ => Err(self.error(key, format!("expected a float, found {value:?}"))),
        }
    }

    /// A required float.
    pub(super) fn f64(&self, key: &str) -> Result<f64, Error> {
        self.to_f64(key, self.get(key)?)
    }

    /// An optional float.
    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>, Error> {
        self.map.get(key).map(|v| self.to_f64(key, v)).transpose()
    }

    /// A required string.
    pub(super) fn string(&self, key: &str) -> Result<&'a str, Error> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.error(key, format!("expected a string, found {}", kind(other)))),
        }
    }

    /// An optional string.
    pub(super) fn opt_string(&self, key: &str) -> Result<Option<&'a str>, Error> {
        if self.map.contains_key(key) {
            self.string(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An optional boolean.
    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>, Error> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(key, format!("expected a boolean, found {}", kind(other)))),
        }
    }

    /// The number of elements of a required array, read or not.
    pub(super) fn array_len(&self, key: &str) -> Result<usize, Error> {
        match self.skipped.get(key) {
            Some(&n) => usize::try_from(n).map_err(|_| self.error(key, format!("{n} elements are too many"))),
            None => self.array(key).map(<[Value]>::len),
        }
    }

    /// The elements of a required array (one that was read).
    fn array(&self, key: &str) -> Result<&'a [Value], Error> {
        if self.skipped.contains_key(key) {
            return Err(self.error(key, "was not read"));
        }
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            other => Err(self.error(key, format!("expected an array, found {}", kind(other)))),
        }
    }

    /// A required array of strings.
    pub(super) fn string_array(&self, key: &str) -> Result<Vec<&'a str>, Error> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.error(key, format!("element {i} is {}, not a string", kind(other)))),
            })
            .collect()
    }

    /// A required array of integers.
    pub(super) fn int_array(&self, key: &str) -> Result<Vec<usize>, Error> {
        self.array(key)?.iter().map(|v| self.to_usize(key, v)).collect()
    }
}

/// A short description of a value's type, without dumping large arrays.
fn kind(value: &Value) -> String {
    match value {
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::String(_) => "a string".to_string(),
        other => format!("{other:?}"),
    }
}
