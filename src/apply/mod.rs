//! Consuming patches: stacks (verify, accumulate, materialize), streaming apply onto a
//! checkpoint folder, load-time overlay, merge and diff. Semantics: `formats/patch.md`.

mod diff;
mod merge;
mod overlay;
mod stack;
mod writer;

pub use diff::{diff, DiffSummary};
pub use merge::{merge, MergeSummary};
pub use overlay::Overlay;
pub use stack::{product, standalone, Stack};
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
    /// Patches in a stack edit the same fact with different targets (one line, `; `-separated).
    #[error("conflicting edits (use --allow-override to let later patches win): {0}")]
    Conflict(String),
    /// A RECT entry overlapping another patch cannot be merged without the base model.
    #[error("{patch}: tensor `{name}` uses RECT and is touched by several patches; merging it needs the base model")]
    NeedsModel { patch: PathBuf, name: String },
    /// Two checkpoints do not have the same tensors, dtypes and shapes.
    #[error("{from} → {to}: not the same architecture: {reason}")]
    Incompatible { from: PathBuf, to: PathBuf, reason: String },
    /// A change between two checkpoints cannot be expressed as an f32 delta.
    #[error("{path}: tensor `{name}` element {index}: {from} → {to} is not reachable by adding an f32 delta")]
    Unrepresentable { path: PathBuf, name: String, index: usize, from: f32, to: f32 },
    /// No patches were given.
    #[error("no patches given")]
    Empty,
    /// Drawing a chart (the audit heatmap) failed.
    #[error(transparent)]
    Plot(#[from] crate::plot::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
