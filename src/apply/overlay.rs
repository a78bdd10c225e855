//! The load-time overlay: a checkpoint whose patched tensors are served from memory.

use super::{Result, Stack};
use crate::checkpoint::{self, Checkpoint, TensorRef};
use std::collections::BTreeMap;
use std::path::Path;

/// A checkpoint with patches overlaid at load time: patched tensors are computed once, on
/// construction (after full verification), and served from memory; the rest from the memory map.
pub struct Overlay<'a> {
    ckpt: &'a Checkpoint,
    patched: BTreeMap<String, Vec<u8>>,
}

impl<'a> Overlay<'a> {
    /// Verifies `stack` against `ckpt` and computes every patched tensor.
    pub fn new(ckpt: &'a Checkpoint, stack: &Stack) -> Result<Self> {
        let mut patched = BTreeMap::new();
        for name in stack.touched() {
            patched.insert(name.to_string(), stack.patched(&stack.base(ckpt, name)?)?.into_owned());
        }
        Ok(Overlay { ckpt, patched })
    }
}

/// Tensors as the patched model has them.
impl checkpoint::Tensors for Overlay<'_> {
    fn dir(&self) -> &Path {
        self.ckpt.dir()
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    fn tensor(&self, name: &str) -> checkpoint::Result<TensorRef<'_>> {
        let mut t = self.ckpt.tensor(name)?;
        if let Some(bytes) = self.patched.get(name) {
            t.bytes = bytes;
        }
        Ok(t)
    }
}
