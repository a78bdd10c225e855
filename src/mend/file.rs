//! The editor file (`formats/mend.md`): safetensors holding the trained tensors and the
//! normalisation in f32, with metadata naming the model, the layers, the network's shape and the
//! training that produced it. Its id is the blake3 of its bytes. A training checkpoint is the same
//! file plus the optimiser's state (`adam.m.NAME`, `adam.v.NAME`, and the step count). The
//! metadata's `content` hash covers every tensor, so a damaged file is refused, not used.

use super::editor::{norm_shapes, param_shapes, Editor, Shape};
use super::{Error, Result};
use crate::adam::Adam;
use crate::atomic::Policy;
use crate::io_err;
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The `format` metadata value of an editor file.
pub const FORMAT: &str = "factpatch-mend";
/// The version of `formats/mend.md` this module reads and writes.
pub const FORMAT_VERSION: &str = "1";
/// The safetensors metadata key whose value holds the metadata, as a JSON object of strings.
const METADATA_KEY: &str = "factpatch";

/// What an editor is for and how it was made (the file's metadata).
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// [`Checkpoint::identity`](crate::checkpoint::Checkpoint::identity) of the model, hex.
    pub model: String,
    pub family: String,
    pub layers: Vec<usize>,
    pub d_in: usize,
    pub d_out: usize,
    pub shape: Shape,
    /// The training settings, JSON (`mend::Training`).
    pub training: String,
    /// The id of the training request (model, requests file, settings): a run resumes only its own.
    pub request: String,
    /// Optimisation steps taken.
    pub steps: usize,
    pub tool: String,
}

impl Meta {
    fn to_map(&self) -> BTreeMap<String, String> {
        let shape = serde_json::to_string(&self.shape).expect("plain struct");
        [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("model", self.model.clone()),
            ("family", self.family.clone()),
            ("layers", self.layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
            ("d_in", self.d_in.to_string()),
            ("d_out", self.d_out.to_string()),
            ("shape", shape),
            ("training", self.training.clone()),
            ("request", self.request.clone()),
            ("steps", self.steps.to_string()),
            ("tool", self.tool.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_map(m: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let bad = |problem: String| Error::File { path: path.to_path_buf(), problem };
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| bad(format!("metadata lacks `{k}`")));
        let num = |k: &str| get(k)?.parse::<usize>().map_err(|_| bad(format!("metadata `{k}` is not a number")));
        if m.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a MEND editor: metadata `format` is not `{FORMAT}`")));
        }
        if get("format_version")? != FORMAT_VERSION {
            return Err(bad(format!("format version {} (this factpatch reads {FORMAT_VERSION})", get("format_version")?)));
        }
        let layers = get("layers")?;
        let layers: Vec<usize> =
            layers.split(',').map(|x| x.parse().map_err(|_| bad(format!("metadata `layers` `{layers}` is not a list of numbers")))).collect::<Result<_>>()?;
        let shape: Shape = serde_json::from_str(&get("shape")?).map_err(|e| bad(format!("metadata `shape`: {e}")))?;
        let (d_in, d_out) = (num("d_in")?, num("d_out")?);
        // Bounds before any tensor is allocated for what the metadata claims.
        if layers.is_empty()
            || d_in == 0
            || d_out == 0
            || shape.rank == 0
            || d_in.max(d_out).max(shape.rank) > crate::model::MAX_DIMENSION
            || shape.hidden_layers > 8
        {
            return Err(bad(format!("implausible sizes: layers {layers:?}, d_in {d_in}, d_out {d_out}, {shape:?}")));
        }
        Ok(Meta {
            model: get("model")?,
            family: get("family")?,
            layers,
            d_in,
            d_out,
            shape,
            training: get("training")?,
            request: get("request")?,
            steps: num("steps")?,
            tool: get("tool")?,
        })
    }
}

/// An editor file as read: what it says, the editor, its id and, in a checkpoint, the optimisers.
pub struct EditorFile {
    pub meta: Meta,
    pub editor: Editor,
    /// blake3 of the file's bytes, hex.
    pub id: String,
    /// A checkpoint's optimiser state per trained tensor.
    pub adam: Option<BTreeMap<String, Adam>>,
}

/// Writes `editor` (and, for a checkpoint, the optimisers, whose `theta` are the parameters)
/// to `path` as `policy` allows; returns the file's id.
pub fn write(path: &Path, meta: &Meta, editor: &Editor, adam: Option<&BTreeMap<String, Adam>>, policy: &Policy) -> Result<String> {
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    for (name, var) in &editor.params {
        tensors.push((name.clone(), super::factors::host(var.as_tensor())?, var.dims().to_vec()));
    }
    for (name, t) in &editor.norm {
        tensors.push((name.clone(), super::factors::host(t)?, t.dims().to_vec()));
    }
    let mut map = meta.to_map();
    if let Some(adam) = adam {
        for (name, a) in adam {
            let dims = editor.params[name].dims().to_vec();
            tensors.push((format!("adam.m.{name}"), a.m.clone(), dims.clone()));
            tensors.push((format!("adam.v.{name}"), a.v.clone(), dims));
        }
        let t = adam.values().next().map_or(0, |a| a.t);
        map.insert("adam_t".into(), t.to_string());
    }
    map.insert("content".into(), content_hash(tensors.iter().map(|(n, v, _)| (n.as_str(), bytemuck::cast_slice::<f32, u8>(v)))));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, values, dims)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.clone(), bytemuck::cast_slice(values)).expect("sizes agree");
            (name.clone(), view)
        })
        .collect();
    // One metadata key holding sorted JSON: safetensors writes its metadata map in hash order.
    let header = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&map).expect("strings"))]);
    let bytes = safetensors::serialize(views, Some(header)).map_err(|e| Error::File { path: path.to_path_buf(), problem: e.to_string() })?;
    crate::atomic::write(path, &bytes, policy).map_err(io_err(path))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// blake3 over every tensor's name and bytes, in name order.
fn content_hash<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut sorted: Vec<(&str, &[u8])> = tensors.collect();
    sorted.sort_by_key(|(n, _)| *n);
    let mut h = blake3::Hasher::new();
    for (name, bytes) in sorted {
        h.update(&(name.len() as u64).to_le_bytes()).update(name.as_bytes()).update(&(bytes.len() as u64).to_le_bytes()).update(bytes);
    }
    h.finalize().to_hex().to_string()
}

/// Reads and checks an editor file (or checkpoint) onto `device`: every tensor the metadata's
/// sizes call for, f32, of exactly that shape and finite, and nothing else.
pub fn read(path: &Path, device: &Device) -> Result<EditorFile> {
    let bytes = crate::read_regular(path, crate::MAX_DATA_BYTES)?;
    let bad = |problem: String| Error::File { path: path.to_path_buf(), problem };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let map = header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).ok_or_else(|| bad(format!("no `{METADATA_KEY}` metadata: not a MEND editor")))?;
    let map: BTreeMap<String, String> = serde_json::from_str(map).map_err(|e| bad(format!("metadata `{METADATA_KEY}`: {e}")))?;
    let map = &map;
    let meta = Meta::from_map(map, path)?;
    let checkpoint = map.contains_key("adam_t");
    let params = param_shapes(meta.layers.len(), meta.d_in, meta.d_out, &meta.shape);
    let norms = norm_shapes(meta.d_in, meta.d_out);
    let mut expected: Vec<(String, Vec<usize>)> = params.iter().chain(&norms).cloned().collect();
    if checkpoint {
        for (name, dims) in &params {
            expected.push((format!("adam.m.{name}"), dims.clone()));
            expected.push((format!("adam.v.{name}"), dims.clone()));
        }
    }
    if let Some(extra) = st.names().into_iter().find(|n| !expected.iter().any(|(e, _)| e == *n)) {
        return Err(bad(format!("unexpected tensor `{extra}`")));
    }
    let mut values = BTreeMap::new();
    for (name, dims) in &expected {
        let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` missing")))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != dims.as_slice() {
            return Err(bad(format!("tensor `{name}` is {:?} {:?}, expected F32 {dims:?}", t.dtype(), t.shape())));
        }
        let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("tensor `{name}` holds a non-finite value")));
        }
        values.insert(name.clone(), (v, dims.clone()));
    }
    let content = content_hash(expected.iter().map(|(n, _)| (n.as_str(), st.tensor(n).expect("checked").data())));
    if map.get("content") != Some(&content) {
        return Err(bad("the tensors do not match the metadata's `content` hash: the file is damaged".into()));
    }
    let tensor = |name: &str| -> Result<Tensor> {
        let (v, dims) = &values[name];
        Ok(Tensor::from_vec(v.clone(), dims.as_slice(), device)?)
    };
    let editor = Editor {
        layers: meta.layers.clone(),
        d_in: meta.d_in,
        d_out: meta.d_out,
        shape: meta.shape,
        params: params.iter().map(|(n, _)| Ok((n.clone(), Var::from_tensor(&tensor(n)?)?))).collect::<Result<_>>()?,
        norm: norms.iter().map(|(n, _)| Ok((n.clone(), tensor(n)?))).collect::<Result<_>>()?,
    };
    let adam = match checkpoint {
        false => None,
        true => {
            let t: i32 = map["adam_t"].parse().map_err(|_| bad("metadata `adam_t` is not a number".into()))?;
            Some(
                params
                    .iter()
                    .map(|(n, _)| {
                        let a = Adam {
                            theta: values[n].0.clone(),
                            m: values[&format!("adam.m.{n}")].0.clone(),
                            v: values[&format!("adam.v.{n}")].0.clone(),
                            lr: 0.0,
                            t,
                        };
                        (n.clone(), a)
                    })
                    .collect(),
            )
        }
    };
    Ok(EditorFile { meta, editor, id: blake3::hash(&bytes).to_hex().to_string(), adam })
}
