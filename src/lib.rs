//! factpatch: compile fact edits (ROME, MEMIT, RECT) into small verifiable weight patches.

pub mod atomic;
pub mod checkpoint;
pub mod model;
pub mod stats;
pub mod tokenize;
