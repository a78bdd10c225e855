//! A model family as a table: every stored tensor's name (and GGUF name), orientation, shape and
//! bias, and the block's structure as explicit optional parts. The loader (`weights.rs`), the
//! GGUF importer and `inspect-model` all read these tables; each family is one file in
//! `families/` (docs/families.md says how to add one).

use super::config::Config;
use super::ops::{Activation, RotaryLayout};
use super::Result;
use serde::Serialize;
use std::path::Path;

/// How a stored projection matrix maps to the `[out, in]` view edits use (`out = W·k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Orientation {
    /// Stored `[out, in]` (torch `nn.Linear`).
    OutIn,
    /// Stored `[in, out]` (GPT-2's `Conv1D`): the transpose of the edit view.
    InOut,
}

/// A dimension of a stored tensor, resolved against a model's [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Dim {
    Vocab,
    Hidden,
    /// The MLP's intermediate width.
    Ff,
    /// `num_heads · head_dim`.
    Queries,
    /// `num_kv_heads · head_dim`.
    KeyValues,
    HeadDim,
    /// Learned positions (`max_positions`).
    Positions,
    /// Queries, keys and values stacked (a fused projection's output).
    Qkv,
    /// A gated MLP's gate and up projections stacked (`2 · Ff`).
    GateUp,
}

/// The dimensions tensors are checked against: a [`Config`]'s, or a GGUF file's.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub positions: usize,
}

impl Dims {
    pub fn of(&self, d: Dim) -> usize {
        match d {
            Dim::Vocab => self.vocab,
            Dim::Hidden => self.hidden,
            Dim::Ff => self.ff,
            Dim::Queries => self.heads * self.head_dim,
            Dim::KeyValues => self.kv_heads * self.head_dim,
            Dim::HeadDim => self.head_dim,
            Dim::Positions => self.positions,
            Dim::Qkv => (self.heads + 2 * self.kv_heads) * self.head_dim,
            Dim::GateUp => 2 * self.ff,
        }
    }
}

/// One stored tensor: its Hugging Face name template (`{layer}` is replaced), its llama.cpp GGUF
/// name where one exists, its shape in the edit view (`[out, in]` for a matrix, `[n]` for a
/// vector) and orientation, and whether a bias is stored beside it (`….bias`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Projection {
    pub name: &'static str,
    pub gguf: Option<&'static str>,
    pub orientation: Orientation,
    pub shape: &'static [Dim],
    pub bias: bool,
}

impl Projection {
    /// A torch `nn.Linear` weight `[out, in]`, no bias.
    pub const fn linear(name: &'static str, gguf: Option<&'static str>, shape: &'static [Dim; 2]) -> Self {
        Projection { name, gguf, orientation: Orientation::OutIn, shape, bias: false }
    }

    /// A norm's weight, or another vector.
    pub const fn vector(name: &'static str, gguf: Option<&'static str>, shape: &'static [Dim; 1]) -> Self {
        Projection { name, gguf, orientation: Orientation::OutIn, shape, bias: false }
    }

    /// A LayerNorm over the hidden size: its weight, with its bias beside it (no GGUF name).
    pub const fn layer_norm(name: &'static str) -> Self {
        Projection::vector(name, None, &[Dim::Hidden]).with_bias()
    }

    /// The same tensor with a bias stored beside it.
    pub const fn with_bias(self) -> Self {
        Projection { bias: true, ..self }
    }

    /// The same matrix stored `[in, out]`.
    pub const fn stored_in_out(self) -> Self {
        Projection { orientation: Orientation::InOut, ..self }
    }

    /// The stored tensor's name at `layer`.
    pub fn at(&self, layer: usize) -> String {
        self.name.replace("{layer}", &layer.to_string())
    }

    /// The stored bias's name at `layer` (`….weight` → `….bias`), when there is one.
    pub fn bias_at(&self, layer: usize) -> Option<String> {
        self.bias.then(|| self.at(layer).strip_suffix(".weight").map(|p| format!("{p}.bias"))).flatten()
    }

    /// The GGUF name at `layer`, when there is one.
    pub fn gguf_at(&self, layer: usize) -> Option<String> {
        self.gguf.map(|g| g.replace("{layer}", &layer.to_string()))
    }

    /// The layer whose stored tensor is `name`, if `name` is this projection at some layer.
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        let (prefix, suffix) = self.name.split_once("{layer}")?;
        let layer = name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()?;
        (self.at(layer) == name).then_some(layer)
    }

    /// The edit-view shape under `dims`.
    pub fn view_shape(&self, dims: &Dims) -> Vec<usize> {
        self.shape.iter().map(|&d| dims.of(d)).collect()
    }

    /// The stored shape under `dims` (the edit view, transposed for [`Orientation::InOut`]).
    pub fn stored_shape(&self, dims: &Dims) -> Vec<usize> {
        let mut s = self.view_shape(dims);
        if self.orientation == Orientation::InOut {
            s.reverse();
        }
        s
    }
}

/// How a block computes queries, keys and values.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Qkv {
    /// Three projections.
    Separate { q: Projection, k: Projection, v: Projection },
    /// One projection whose output rows are queries, then keys, then values (GPT-2's `c_attn`).
    Fused(Projection),
    /// One projection whose output rows are, head by head, the head's query, key and value
    /// (`[heads, 3, head_dim]`: GPT-NeoX's `query_key_value`).
    FusedPerHead(Projection),
}

/// The MLP's input projections.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum MlpInputs {
    /// `act(gate·x) ⊙ (up·x)`.
    Gated { gate: Projection, up: Projection },
    /// A gated MLP whose gate and up projections are one matrix, the gate's rows first (Phi-3's
    /// `gate_up_proj`).
    FusedGated(Projection),
    /// `act(fc·x)`.
    Plain(Projection),
}

impl MlpInputs {
    /// The stored projections.
    pub fn projections(&self) -> Vec<&Projection> {
        match self {
            MlpInputs::Gated { gate, up } => vec![gate, up],
            MlpInputs::FusedGated(p) | MlpInputs::Plain(p) => vec![p],
        }
    }
}

/// The normalisation layers of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms,
    /// `x / sqrt(mean(x²) + eps) · (1 + w)` (Gemma; `1 + w` formed in f32 on load, as transformers does).
    RmsPlusOne,
    /// `(x − mean) / sqrt(var + eps) · w + b`, the bias stored beside the weight.
    Layer,
}

/// One decoder block's tensors and optional parts: `x += post_attn_norm(o(attn(attn_norm(x))))`,
/// then `x += post_mlp_norm(mlp_out(act(mlp_in(mlp_norm(x)))))`, each post-norm only where the
/// table has one. In a parallel block ([`Config::parallel_residual`](super::Config)) the MLP reads
/// the block's input instead: `x + attn(..) + mlp(mlp_norm(x))`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BlockTable {
    pub attn_norm: Projection,
    pub qkv: Qkv,
    /// Per-head norms of queries and keys before rotary embedding (Qwen3).
    pub qk_norm: Option<(Projection, Projection)>,
    pub o: Projection,
    /// A norm of the attention output before the residual sum (Gemma's `post_attention_layernorm`).
    pub post_attn_norm: Option<Projection>,
    /// The MLP's input norm; none where the MLP reads the attention norm's output (GPT-J's one
    /// `ln_1`, in a parallel block).
    pub mlp_norm: Option<Projection>,
    /// A norm of the MLP output before the residual sum (Gemma's `post_feedforward_layernorm`).
    pub post_mlp_norm: Option<Projection>,
}

/// A model family described as data.
#[derive(Debug, Serialize)]
pub struct Family {
    pub name: &'static str,
    /// `model_type` values in `config.json` that belong to this family.
    pub model_types: &'static [&'static str],
    pub embed: Projection,
    /// Input embeddings are multiplied by √hidden_size (Gemma).
    pub scaled_embedding: bool,
    /// Learned absolute positions (GPT-2); families without rotate queries and keys.
    pub positions: Option<Projection>,
    pub final_norm: Projection,
    /// The unembedding (with its bias where the table has one: GPT-J's), when stored; otherwise
    /// the embedding, if the config ties them.
    pub unembed: Projection,
    pub block: BlockTable,
    pub norm: NormKind,
    /// How rotary embeddings pair each head's dimensions.
    pub rotary: RotaryLayout,
    /// The MLP's activation (of the gate, in a gated MLP).
    pub activation: Activation,
    /// The MLP's input projections.
    pub mlp_in: MlpInputs,
    /// The MLP's output projection: the matrix ROME and MEMIT edit. Its input is the "key".
    pub mlp_out: Projection,
    /// Layers MEMIT edits by default in a model that has them all (see [`Family::edit_layers`]).
    pub default_edit_layers: &'static [usize],
    /// Which of those layers ROME and EMMET edit by default (an index into them; the last one
    /// in a shallower model that has fewer).
    pub rome_layer_index: usize,
    /// The `config.json` key of the layer count.
    pub layers_key: &'static str,
    /// KN's integrated-gradient steps by default (the peers' setting for the family).
    pub kn_steps: usize,
    /// The target optimisation's weight on keeping what the model says after the new answer
    /// (`answer_kl`) by default: 0, but for Gemma 3, whose edits without it sent greedy
    /// continuations after the answer into `<start_of_image>` (docs/families.md).
    pub answer_kl: f64,
    /// Reads and validates `config.json` (the family's serde struct).
    #[serde(skip)]
    pub(super) config: fn(&serde_json::Value, &Path) -> Result<Config>,
}

impl Family {
    /// The layers MEMIT edits by default in a model of `num_layers` layers (ROME edits the one
    /// [`Family::rome_layer_index`] picks): [`Family::default_edit_layers`] when the model has
    /// them all; in a shallower model, the same relative depths, each once: layer `l` becomes
    /// `l·n / (last + 1)` for `n` layers and `last` the deepest default. A 2-layer Llama gets
    /// `[0, 1]`, a 1-layer one `[0]`.
    pub fn edit_layers(&self, num_layers: usize) -> Vec<usize> {
        let last = *self.default_edit_layers.iter().max().expect("at least one default edit layer");
        if last < num_layers {
            return self.default_edit_layers.to_vec();
        }
        let mut layers: Vec<usize> = self.default_edit_layers.iter().map(|&l| l * num_layers / (last + 1)).collect();
        layers.dedup();
        layers
    }

    /// Whether the MLP output joins the residual stream as it is (no `post_mlp_norm`), so that a
    /// residual change splits linearly into MLP output changes across layers: MEMIT's target is
    /// then the residual stream; otherwise it is the down projection's output (docs/families.md).
    pub fn mlp_joins_residual(&self) -> bool {
        self.block.post_mlp_norm.is_none()
    }

    /// Every per-layer tensor, in block order.
    pub fn layer_tensors(&self) -> Vec<&Projection> {
        let b = &self.block;
        let mut t = vec![&b.attn_norm];
        match &b.qkv {
            Qkv::Separate { q, k, v } => t.extend([q, k, v]),
            Qkv::Fused(qkv) | Qkv::FusedPerHead(qkv) => t.push(qkv),
        }
        if let Some((q, k)) = &b.qk_norm {
            t.extend([q, k]);
        }
        t.push(&b.o);
        t.extend(&b.post_attn_norm);
        t.extend(&b.mlp_norm);
        t.extend(self.mlp_in.projections());
        t.push(&self.mlp_out);
        t.extend(&b.post_mlp_norm);
        t
    }

    /// Every global tensor; the unembedding is last, and optional when the embedding is tied.
    pub fn global_tensors(&self) -> Vec<&Projection> {
        let mut t = vec![&self.embed];
        t.extend(&self.positions);
        t.extend([&self.final_norm, &self.unembed]);
        t
    }
}
