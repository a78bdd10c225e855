//! factpatch: compile fact edits (ROME, MEMIT, RECT) into small verifiable weight patches.

pub mod apply;
pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod patch;
pub mod rect;
