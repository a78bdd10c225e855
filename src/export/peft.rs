//! The PEFT adapter folder, named and shaped as PEFT's `save_pretrained` writes it:
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` in
//! `adapter_model.safetensors`, and `adapter_config.json`. The patch's provenance is in the
//! safetensors `__metadata__` (key `factpatch`), which PEFT does not read.

use super::{max_rank, provenance, Lora, Result};
use crate::io_err;
use crate::model::{Family, Orientation};
use crate::patch::Patch;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Writes the adapter into `dir` (the output's temporary folder); returns the bytes written and
/// each tensor's module name.
pub(super) fn write(p: &Patch, family: &Family, loras: &[Lora], dir: &Path) -> Result<(u64, Vec<String>)> {
    let modules: Vec<String> = loras.iter().map(|l| l.tensor.strip_suffix(".weight").unwrap_or(&l.tensor).to_string()).collect();
    let r = max_rank(loras);
    // Modules of another rank keep the scale at 1 with their own r and lora_alpha.
    let pattern: BTreeMap<&str, usize> = modules.iter().zip(loras).filter(|(_, l)| l.rank != r).map(|(m, l)| (m.as_str(), l.rank)).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": p.manifest().model.name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": modules,
        "fan_in_fan_out": family.mlp_out.orientation == Orientation::InOut,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let mut config = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    config.push('\n');

    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = modules
        .iter()
        .zip(loras)
        .flat_map(|(m, l)| {
            [
                (format!("base_model.model.{m}.lora_A.weight"), vec![l.rank, l.in_features], bytes(&l.a)),
                (format!("base_model.model.{m}.lora_B.weight"), vec![l.out_features, l.rank], bytes(&l.b)),
            ]
        })
        .collect();
    let views = data.iter().map(|(name, shape, b)| (name.as_str(), TensorView::new(Dtype::F32, shape.clone(), b).expect("sizes match shapes")));
    // One metadata key: safetensors writes its map in hash order, which must not vary.
    let metadata = HashMap::from([("factpatch".to_string(), provenance(p).to_string())]);
    let weights = safetensors::serialize(views, Some(metadata)).expect("F32 tensors of matching sizes serialize");

    let mut written = 0;
    for (name, content) in [("adapter_config.json", config.as_bytes()), ("adapter_model.safetensors", &weights[..])] {
        let path = dir.join(name);
        std::fs::File::create_new(&path).and_then(|mut f| f.write_all(content)).map_err(io_err(&path))?;
        written += content.len() as u64;
    }
    Ok((written, modules))
}
