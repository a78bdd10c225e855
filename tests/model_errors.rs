//! Bad model folders get one clear error naming the file and the problem, never a panic.

use factpatch::model::Model;
use std::fs;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama")
}

/// A copy of the tiny Llama in a temp dir, to break.
fn copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(tiny().join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn error(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn folder_without_config() {
    let tmp = copy();
    fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = error(tmp.path());
    assert!(e.contains(&tmp.path().display().to_string()) && e.contains("no config.json"), "{e}");
}

#[test]
fn folder_without_weights() {
    let tmp = copy();
    fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn unknown_architecture() {
    let tmp = copy();
    let path = tmp.path().join("config.json");
    let text = fs::read_to_string(&path).unwrap().replace("\"llama\"", "\"mamba\"");
    fs::write(&path, text).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("config.json") && e.contains("unsupported model_type `mamba`") && e.contains("gpt2"), "{e}");
}

#[test]
fn malformed_config() {
    let tmp = copy();
    fs::write(tmp.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let e = error(tmp.path());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn missing_config_field() {
    let tmp = copy();
    let path = tmp.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    fs::write(&path, json.to_string()).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("config.json") && e.contains("`hidden_size` is missing"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let tmp = copy();
    let path = tmp.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn corrupt_header() {
    let tmp = copy();
    let path = tmp.path().join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[10] = b'\xff';
    fs::write(&path, &bytes).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn tensor_of_the_wrong_shape() {
    let tmp = copy();
    let path = tmp.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    json["intermediate_size"] = serde_json::json!(96);
    fs::write(&path, json.to_string()).unwrap();
    let e = error(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("gate_proj.weight") && e.contains("expected [96, 64]"), "{e}");
}
