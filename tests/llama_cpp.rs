//! llama.cpp (prebuilt in the npm package node-llama-cpp) loads an edited GGUF and an exported
//! LoRA adapter over the base GGUF, and both say the edited fact: `fixtures/check-llama-cpp.sh`.
//! Runs where node is installed; under CI (`CI` set) a missing node is a failure.

mod common;

#[test]
fn llama_cpp_says_the_edited_fact() {
    let has_node = ["node", "npm"].iter().all(|tool| std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()));
    if !has_node {
        assert!(std::env::var_os("CI").is_none(), "CI needs node and npm for the llama.cpp check");
        eprintln!("skipped: node and npm are not installed");
        return;
    }
    let out = std::process::Command::new("bash").arg(common::root().join("fixtures/check-llama-cpp.sh")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("check-llama-cpp: ok"), "{stdout}");
}
