//! Fuzzes the GGUF importer: arbitrary bytes as a `.gguf` file, imported into a fresh folder.
//! Must never panic, hang or allocate beyond what the file holds; a failed import leaves nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, data).unwrap();
    let out = dir.path().join("out");
    if factpatch::gguf::import(&gguf, &out, factpatch::gguf::OutDtype::F32).is_err() {
        assert!(!out.exists(), "a failed import left {}", out.display());
    }
});
