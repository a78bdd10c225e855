//! Fuzzes the patch reader: arbitrary bytes, and the same bytes with a valid trailing hash
//! (so mutations reach the manifest and payload decoders). Must never panic or over-allocate.
#![no_main]

use factpatch::patch::Patch;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = Patch::from_bytes(data.to_vec(), Path::new("fuzz"));
    if data.len() >= 32 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 32;
        let hash = blake3::hash(&fixed[..body]);
        fixed[body..].copy_from_slice(hash.as_bytes());
        if let Ok(p) = Patch::from_bytes(fixed, Path::new("fuzz")) {
            for i in 0..p.manifest().entries.len() {
                let _ = p.delta(i);
            }
        }
    }
});
