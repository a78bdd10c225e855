//! MEND (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale"): a trained editor network
//! turns the fine-tuning gradient of one edit, given as rank-one factors per token, into a
//! low-rank weight update of each edited matrix. Here the edited matrices are the MLP output
//! projections of the chosen layers — the matrix every other method edits, so MEND patches
//! apply, merge, audit and export like theirs.
//!
//! - [`factors`]: the edit loss and its gradient factors `u_t`, `δ_t`;
//! - [`Editor`] (`editor.rs`): the network and the update it makes;
//! - `file.rs`: the editor file (`formats/mend.md`), content-addressed and checked on reading;
//! - [`train`] (`train.rs`): training, validation, checkpoints and resume.

mod editor;
pub mod factors;
mod file;
mod train;

pub use editor::{normalisation, Editor, Shape};
pub use file::{read, write, EditorFile, Meta, FORMAT, FORMAT_VERSION};
pub use train::{train, training_loss, TextLocality, TrainSpec, TrainSummary, Training};

use crate::model::{self, Model};
use factors::{LayerFactors, Sequence};
use ndarray::Array2;
use std::path::PathBuf;

/// Everything that can go wrong training, reading or using an editor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The editor file is not a well-formed editor.
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    /// The editor was made for another model or other layers, or a run folder holds another run.
    #[error("{path}: {problem}")]
    Mismatch { path: PathBuf, problem: String },
    /// The training settings or records cannot be used.
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Io(#[from] crate::IoError),
    #[error(transparent)]
    Model(#[from] model::Error),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::Error),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenize::Error),
    #[error(transparent)]
    Requests(#[from] crate::edit::request::Error),
    /// Validating an editor (boxed: evaluation errors are large).
    #[error(transparent)]
    Eval(Box<crate::eval::Error>),
    #[error(transparent)]
    Plot(#[from] crate::plot::Error),
}

impl From<crate::eval::Error> for Error {
    fn from(e: crate::eval::Error) -> Self {
        Error::Eval(Box::new(e))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One layer's update `ΔW = U·Vᵀ`: the layer, `U [out, r]` and `V [in, r]` (f64).
pub type Update = (usize, Array2<f64>, Array2<f64>);

/// The edit of `seq` (a prompt with its teacher-forced new target) on `model`: the gradient
/// factors of its loss at the editor's layers, through the editor, one [`Update`] a layer (rank:
/// the sequence's tokens).
pub fn updates(model: &Model, editor: &Editor, seq: &Sequence) -> model::Result<Vec<Update>> {
    let fs = factors::gradient_factors(model, std::slice::from_ref(seq), &editor.layers, None)?;
    fs.iter().map(|f| layer_update(editor, f)).collect()
}

fn layer_update(editor: &Editor, f: &LayerFactors) -> model::Result<Update> {
    let (u, v) = editor.update(f)?;
    let array = |t: &candle_core::Tensor| -> model::Result<Array2<f64>> {
        let (r, c) = t.dims2()?;
        let values: Vec<f64> = t.detach().to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1()?;
        Ok(Array2::from_shape_vec((r, c), values).expect("dims"))
    };
    Ok((f.layer, array(&u)?, array(&v)?))
}
