//! factpatch: compile fact edits (ROME, MEMIT, RECT) into small verifiable weight patches.

pub mod atomic;
pub mod checkpoint;
pub mod edit;
pub mod gguf;
pub mod model;
pub mod rect;
pub mod stats;
pub mod tokenize;
