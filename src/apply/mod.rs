//! Consuming patches: stacks (verify, accumulate, materialize), streaming apply onto a
//! checkpoint folder, load-time overlay, merge and diff. Semantics: `formats/patch.md`.

mod diff;
mod merge;
mod overlay;
mod stack;
mod writer;

pub use diff::{diff, DiffSummary};
pub use merge::{merge, merge_with, MergeOptions, MergeSummary};
pub use overlay::Overlay;
pub use stack::{product, standalone, standalone_deltas, ModelIdentity, Stack};
pub(crate) use writer::copy_range;
pub use writer::{apply, apply_to, apply_with, ApplyOptions, ApplySummary};

use crate::{checkpoint, patch};
use std::path::PathBuf;

/// Everything that can go wrong applying, merging or diffing patches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A patch file is unreadable, corrupt or malformed.
    #[error(transparent)]
    Patch(#[from] patch::Error),
    /// A checkpoint folder is unreadable or malformed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The output path exists already; nothing is overwritten.
    #[error("{0}: output already exists")]
    OutputExists(PathBuf),
    /// Writing an output failed.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// A patch touches a tensor the model does not have.
    #[error("{patch}: tensor `{name}` is not in the model at {model}")]
    MissingTensor { patch: PathBuf, name: String, model: PathBuf },
    /// A patch records a dtype or shape that differs from the model's tensor.
    #[error("{patch}: tensor `{name}` is {found} in the model, the patch expects {expected}")]
    ShapeMismatch { patch: PathBuf, name: String, expected: String, found: String },
    /// A touched tensor is not the one the patch was compiled against.
    #[error("{patch}: tensor `{name}` differs from the patch's base (blake3 {found}, patch expects {expected}): patch for another model or out of order")]
    BaseMismatch { patch: PathBuf, name: String, expected: String, found: String },
    /// The patched tensor would contain NaN or infinity.
    #[error("{patch}: tensor `{name}` element {index} becomes non-finite once patched")]
    NonFinite { patch: PathBuf, name: String, index: usize },
    /// A patch's parent is not the patch before it in the stack.
    #[error("{patch}: compiled on top of {parent}, but follows {previous} in the stack")]
    ParentChain { patch: PathBuf, parent: String, previous: String },
    /// A patch comes before its own parent in the stack.
    #[error("{patch}: compiled on top of {parent} ({parent_path}), which comes after it in the stack: put the parent first")]
    ParentAfterChild { patch: PathBuf, parent: String, parent_path: PathBuf },
    /// The stack's first patch has a parent the model does not have applied.
    #[error("{patch}: compiled on top of {parent}, which is not earlier in the stack: {why}")]
    MissingParent { patch: PathBuf, parent: String, why: String },
    /// A patch records another base model than the one it is applied to.
    #[error("{patch}: made for the model with identity {expected}, but {model} has identity {found}: another model, or one with patches applied (--allow-other-base accepts it, checking every touched tensor's hash)")]
    OtherBase { patch: PathBuf, expected: String, model: PathBuf, found: String },
    /// Two patches of a stack record different base models.
    #[error("{patch} was made for the model with identity {base}, {first} for {first_base}: patches for different models")]
    DifferentBases { first: PathBuf, first_base: String, patch: PathBuf, base: String },
    /// A patch changes a tensor an earlier patch changed without having been compiled on top of it.
    #[error("{patch} and {earlier} both change tensor `{name}`, but {patch} does not descend from {earlier} (no parent link between them): it was compiled on another state of the model, e.g. the same base; compile it on top (--on) or merge with --model to check the tensor hashes")]
    NotDescendant { earlier: PathBuf, patch: PathBuf, name: String },
    /// The written output does not hash to the identity computed while writing it.
    #[error("{output}: the written weights have identity {found}, but {printed} was computed while writing them")]
    OutputMismatch { output: PathBuf, printed: String, found: String },
    /// Patches in a stack edit the same fact with different targets (one line, `; `-separated).
    #[error("conflicting edits (use --allow-override to let later patches win): {0}")]
    Conflict(String),
    /// A RECT entry overlapping another patch cannot be merged without the base model.
    #[error("{patch}: tensor `{name}` uses RECT and is touched by several patches; merging it needs the base model")]
    NeedsModel { patch: PathBuf, name: String },
    /// A RECT entry's delta was asked for without the base weights its mask depends on.
    #[error("{patch}: tensor `{name}` uses RECT, whose mask depends on the base weights: give the model")]
    NeedsBase { patch: PathBuf, name: String },
    /// Two checkpoints do not have the same tensors, dtypes and shapes.
    #[error("{from} → {to}: not the same architecture: {reason}")]
    Incompatible { from: PathBuf, to: PathBuf, reason: String },
    /// A change between two checkpoints cannot be expressed as an f32 delta.
    #[error("{path}: tensor `{name}` element {index}: {from} → {to} is not reachable by adding an f32 delta")]
    Unrepresentable { path: PathBuf, name: String, index: usize, from: f32, to: f32 },
    /// No patches were given.
    #[error("no patches given")]
    Empty,
    /// A patch's signature is missing, untrusted or wrong (`apply --trusted`).
    #[error(transparent)]
    Signature(#[from] crate::sign::Error),
    /// Drawing a chart (the audit heatmap) failed.
    #[error(transparent)]
    Plot(#[from] crate::plot::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
