//! Fuzzes the key-statistics reader (`formats/stats.md`): arbitrary bytes as a statistics file,
//! read whole and header only. Must never panic, hang or allocate beyond the file's real tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let _ = factpatch::stats::read_meta(file.path());
    let _ = factpatch::stats::Stats::read(file.path());
});
