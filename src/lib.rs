pub fn placeholder() {}

pub mod gguf;
