//! A memory-mapped file truncated while it is read: the process prints one `error: ` line naming
//! the file and exits with status 1 instead of dying of SIGBUS. The mapping and the read happen in
//! a child process (this test binary again, running the ignored test below).

use std::process::Command;

const CHILD: &str = "FACTPATCH_SIGBUS_CHILD";

#[test]
fn a_file_truncated_under_its_map_is_named_in_one_error_line() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("weights.bin");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "truncated_while_mapped", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD, &file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(errors, [format!("error: {}: the file was truncated while it was read; nothing was written", file.display())], "{stderr}");
}

/// The child: maps the file, truncates it, reads past the new end.
#[test]
#[ignore = "run by the test above in a child process"]
fn truncated_while_mapped() {
    let Some(path) = std::env::var_os(CHILD) else { return };
    factpatch::init_process();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the point of the test: the file shrinks under the map.
    let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
    let sum: u64 = map.iter().map(|&b| b as u64).sum();
    panic!("read {sum} past the end without SIGBUS");
}
