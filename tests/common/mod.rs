//! Shared test helpers: fixture paths, the real model, and reading reference tensors.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The imported SmolLM2 folder; tells how to get it when missing.
pub fn smollm2() -> PathBuf {
    let dir = root().join("fixtures/models/SmolLM2-135M-Instruct");
    assert!(dir.join("model.safetensors").is_file(), "{} is missing: run `bash fixtures/setup.sh` first", dir.display());
    dir
}

/// A reference tensor: shape and values as f64 (floats) or i64 (ids).
pub struct Ref {
    pub shape: Vec<usize>,
    pub f: Vec<f64>,
    pub i: Vec<i64>,
}

/// Every tensor of a reference safetensors file.
pub fn read_ref(path: &Path) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = v.data();
            let (f, i) = match v.dtype() {
                Dtype::F32 => (data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(), vec![]),
                Dtype::I64 => (vec![], data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, Ref { shape: v.shape().to_vec(), f, i })
        })
        .collect()
}

pub fn ids(r: &Ref) -> Vec<u32> {
    r.i.iter().map(|&x| x as u32).collect()
}
