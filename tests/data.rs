//! The repository's data files are the ones its data card describes: every file listed in
//! `fixtures/data/SHA256SUMS` has that sha256, and every file there is listed.

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn data_files_match_their_sha256() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut listed = BTreeSet::new();
    for line in sums.lines() {
        let (sum, name) = line.split_once("  ").unwrap_or_else(|| panic!("SHA256SUMS: `{line}` is not `SUM  NAME`"));
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("fixtures/data/{name}: {e}"));
        let got = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(got, sum, "fixtures/data/{name}: sha256 differs from SHA256SUMS");
        listed.insert(name.to_string());
    }
    let mut present = BTreeSet::new();
    for sub in std::fs::read_dir(&dir).unwrap() {
        let sub = sub.unwrap();
        if sub.file_type().unwrap().is_dir() {
            for f in std::fs::read_dir(sub.path()).unwrap() {
                present.insert(format!("{}/{}", sub.file_name().to_string_lossy(), f.unwrap().file_name().to_string_lossy()));
            }
        }
    }
    assert_eq!(present, listed, "every data file is listed in SHA256SUMS, and every listed file is there");
}
