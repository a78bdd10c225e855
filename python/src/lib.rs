//! `factpatch._native`, the Python module: thin wrappers over the library functions the CLI
//! calls (reading, verifying and applying patches, compiling edits). `factpatch/__init__.py`
//! re-exports it and adds `apply_to_model`, which edits a live PyTorch model.

use factpatch::apply::{self, ApplyOptions, Stack};
use factpatch::checkpoint::{self, Checkpoint, Dtype, TensorRef};
use factpatch::compile::{self, Compiler, Spec, StatsSource};
use factpatch::edit::{request, Method};
use factpatch::{atomic, patch, rect};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyException, PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::path::{Path, PathBuf};

pyo3::create_exception!(factpatch, Error, PyException, "A factpatch error; its message is the CLI's one line, naming the file and the problem.");

/// A library error as [`Error`], with the message the CLI prints after `error: `.
fn error(e: impl std::error::Error + 'static) -> PyErr {
    Error::new_err(factpatch::error_line(&e))
}

/// `value` (anything serde serialises) as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let json = serde_json::to_string(value).map_err(error)?;
    py.import("json")?.call_method1("loads", (json,))
}

/// What `factpatch apply` checks and uses: the tensor-hash cache under `$FACTPATCH_CACHE`.
fn apply_options() -> ApplyOptions {
    ApplyOptions { hash_cache: Some(checkpoint::default_hash_cache()), ..Default::default() }
}

/// A touched tensor as `Patch.tensors` lists it: name, dtype, shape, encoding kind.
type TensorRow<'py> = (String, String, Bound<'py, PyTuple>, &'static str);

/// A patch file, read and verified (its hash, then its manifest); payloads are decoded on demand.
#[pyclass(frozen, module = "factpatch")]
struct Patch {
    /// The patch alone, as a stack: what verifying and materialising work on.
    stack: Stack,
}

impl Patch {
    fn patch(&self) -> &patch::Patch {
        &self.stack.patches()[0]
    }

    /// `deltas` as a dict of f32 arrays shaped like their tensors.
    fn arrays<'py>(&self, py: Python<'py>, deltas: Vec<(String, Vec<f32>)>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for ((name, d), e) in deltas.into_iter().zip(&self.patch().manifest().entries) {
            debug_assert_eq!(name, e.tensor);
            out.set_item(name, PyArray1::from_vec(py, d).reshape(e.shape.clone())?)?;
        }
        Ok(out)
    }
}

#[pymethods]
impl Patch {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let stack = py.detach(|| Stack::load(&[path])).map_err(error)?;
        Ok(Patch { stack })
    }

    /// `fp1-…`: the blake3 of the file's canonical bytes.
    #[getter]
    fn id(&self) -> &str {
        self.patch().id()
    }

    /// Where the patch was read from.
    #[getter]
    fn path(&self) -> &Path {
        self.patch().path()
    }

    /// The manifest (`formats/patch.md`) as a dict.
    #[getter]
    fn manifest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, self.patch().manifest())
    }

    /// The fact edits, a dict each: subject, relation, prompt, target_old, target_new.
    #[getter]
    fn edits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.patch().manifest().edits)
    }

    /// The touched tensors: (name, dtype, shape, encoding kind) each, by name.
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<TensorRow<'py>>> {
        let entries = &self.patch().manifest().entries;
        entries.iter().map(|e| Ok((e.tensor.clone(), format!("{:?}", e.dtype), PyTuple::new(py, &e.shape)?, e.encoding.kind()))).collect()
    }

    /// Checks the patch against the model folder `model_dir` as `factpatch apply` does before
    /// writing: its recorded base model and parent, every touched tensor's dtype, shape and
    /// blake3, and its payloads. Raises `factpatch.Error` on the first mismatch.
    fn verify(&self, py: Python<'_>, model_dir: PathBuf) -> PyResult<()> {
        py.detach(|| self.stack.check(&Checkpoint::open(&model_dir)?, &apply_options()).map(drop)).map_err(error)
    }

    /// Tensor name → the f32 delta in the stored layout (GPT-2's Conv1D weights stay
    /// transposed). `base` is the model folder the patch applies to: each tensor's blake3 is
    /// checked against it, and RECT entries are masked against its weights. Without it, a patch
    /// with RECT entries is an error.
    #[pyo3(signature = (base = None))]
    fn deltas<'py>(&self, py: Python<'py>, base: Option<PathBuf>) -> PyResult<Bound<'py, PyDict>> {
        let deltas = py
            .detach(|| match &base {
                Some(dir) => self.stack.deltas(&Checkpoint::open(dir)?),
                None => apply::standalone_deltas(self.patch()),
            })
            .map_err(error)?;
        self.arrays(py, deltas)
    }

    /// The delta of tensor `name` for the live tensor whose raw little-endian bytes are `data`
    /// (a uint8 array) with `dtype` ("F32", "F16" or "BF16") and `shape`: the dtype, shape and
    /// blake3 must be the patch's base (else `factpatch.Error`), and a RECT mask is computed
    /// against these weights. An f32 array shaped `shape`.
    fn delta_for<'py>(&self, py: Python<'py>, name: &str, dtype: &str, shape: Vec<usize>, data: PyReadonlyArray1<'py, u8>) -> PyResult<Bound<'py, PyAny>> {
        if !self.stack.touched().any(|t| t == name) {
            return Err(PyKeyError::new_err(format!("{}: the patch does not touch tensor `{name}`", self.patch().path().display())));
        }
        let dtype: Dtype = serde_json::from_value(dtype.into()).map_err(|_| PyValueError::new_err(format!("dtype `{dtype}` is not F32, F16 or BF16")))?;
        let bytes = data.as_slice()?;
        let expected = shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        if expected != Some(bytes.len()) {
            return Err(PyValueError::new_err(format!("tensor `{name}`: {} bytes, but {dtype:?}{shape:?} takes {expected:?}", bytes.len())));
        }
        let live = TensorRef { name, dtype, shape: &shape, bytes, path: Path::new(""), offset: 0 };
        let delta = self.stack.delta_for(&live).map_err(error)?;
        Ok(PyArray1::from_vec(py, delta).reshape(shape)?.into_any())
    }

    fn __repr__(&self) -> String {
        format!("Patch({:?}, {})", self.patch().path(), self.patch().id())
    }
}

/// Applies `patches` in order to the model folder `model_dir`, writing a new folder `out_dir`,
/// as `factpatch apply` does: everything verified first, the output renamed into place once
/// complete and synced, never replacing anything. Returns the summary (output, identity,
/// patches, tensors_patched, bytes_written).
#[pyfunction(name = "apply")]
fn apply_patches<'py>(py: Python<'py>, model_dir: PathBuf, patches: Vec<PathBuf>, out_dir: PathBuf) -> PyResult<Bound<'py, PyAny>> {
    let summary = py.detach(|| apply::apply_with(&model_dir, &patches, &out_dir, &apply_options())).map_err(error)?;
    to_python(py, &summary)
}

/// `factpatch compile`: the requests of the `requests` files and `facts`
/// (`PROMPT|SUBJECT|TARGET`), compiled with the same spec as the CLI's flags give, the patch
/// written to `out` (never replacing a file). Returns the patch id.
#[pyfunction(name = "compile")]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (model, out, facts, requests, method, rect, layers, seed, stats, corpus, stats_tokens, cache, sets, on, editor))]
fn compile_patch(
    py: Python<'_>,
    model: PathBuf,
    out: PathBuf,
    facts: Vec<String>,
    requests: Vec<PathBuf>,
    method: &str,
    rect: Option<f64>,
    layers: Option<Vec<usize>>,
    seed: u64,
    stats: Option<PathBuf>,
    corpus: Vec<PathBuf>,
    stats_tokens: u64,
    cache: Option<PathBuf>,
    sets: Vec<String>,
    on: Vec<PathBuf>,
    editor: Option<PathBuf>,
) -> PyResult<String> {
    let method: Method = serde_json::from_value(method.into())
        .map_err(|_| PyValueError::new_err(format!("method `{method}` is not one of rome, memit, emmet, alphaedit, encore, kn, mend")))?;
    let rect_k = rect::parse_k(&rect.map_or("none".into(), |k| k.to_string())).map_err(PyValueError::new_err)?;
    let stats = match (stats, corpus.is_empty()) {
        (Some(path), _) => StatsSource::File(path),
        (None, false) => StatsSource::Corpus { files: corpus, tokens: stats_tokens },
        (None, true) => StatsSource::Cached,
    };
    let spec = Spec {
        model,
        on,
        method,
        overrides: compile::overrides(rect_k, seed, None, layers.as_deref(), &sets),
        stats,
        cache: cache.unwrap_or_else(factpatch::stats::default_cache_dir),
        editor,
        progress: false,
    };
    py.detach(|| -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        atomic::Policy::new().check(&out).map_err(factpatch::io_err(&out))?;
        let requests = request::gather(&requests, &facts)?;
        let compiled = Compiler::open(&spec)?.patch(&requests)?;
        atomic::write(&out, &compiled.patch.bytes, &atomic::Policy::new()).map_err(factpatch::io_err(&out))?;
        Ok(compiled.patch.id)
    })
    .map_err(|e| Error::new_err(factpatch::error_line(e.as_ref())))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the CLI's `main` does: one candle pool thread (compile speed and the same bytes), and
    // glibc's allocator keeping freed tensor buffers.
    factpatch::init_process();
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<Patch>()?;
    m.add_function(wrap_pyfunction!(apply_patches, m)?)?;
    m.add_function(wrap_pyfunction!(compile_patch, m)?)?;
    Ok(())
}
