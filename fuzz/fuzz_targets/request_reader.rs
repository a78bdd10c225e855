//! Fuzzes the request reader (`formats/requests.md`): arbitrary bytes as a `.json` file and as a
//! `.jsonl` file, then the record check. Must never panic; errors name the file and record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    for name in ["requests.json", "requests.jsonl"] {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        if let Ok(requests) = factpatch::edit::request::read(&path) {
            let _ = factpatch::edit::request::check(requests);
        }
    }
});
