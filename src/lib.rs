//! factpatch: compile fact edits (ROME, MEMIT, RECT) into small verifiable weight patches.

pub mod apply;
pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod edit;
pub mod eval;
pub mod experiment;
pub mod gguf;
pub mod model;
pub mod patch;
pub mod plot;
pub mod rect;
pub mod stats;
pub mod tokenize;
