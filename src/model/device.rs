//! Where forward passes run: the device chosen by `FACTPATCH_DEVICE` or the build, and its name.

use super::{Error, Result};
use candle_core::Device;

/// The device forward passes run on: `FACTPATCH_DEVICE` (`cpu`, `cuda` or `cuda:N`) when set,
/// else the first CUDA device when built with `cuda` and one opens, else the CPU.
pub fn default_device() -> Result<Device> {
    device_from(std::env::var("FACTPATCH_DEVICE").ok().as_deref())
}

fn device_from(spec: Option<&str>) -> Result<Device> {
    let bad = |s: &str, why: String| Error::Input(format!("FACTPATCH_DEVICE={s}: {why}"));
    match spec {
        None | Some("") if cfg!(feature = "cuda") => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        None | Some("") | Some("cpu") => Ok(Device::Cpu),
        Some(s) => {
            let ordinal = s
                .strip_prefix("cuda")
                .and_then(|n| if n.is_empty() { Some(0) } else { n.strip_prefix(':')?.parse().ok() })
                .ok_or_else(|| bad(s, "expected cpu, cuda or cuda:N".into()))?;
            Device::new_cuda(ordinal).map_err(|e| bad(s, e.to_string()))
        }
    }
}

/// `cpu`, `cuda:N` or `metal:N`: where a model runs, for reports.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec() {
        assert!(device_from(Some("cpu")).unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            assert!(device_from(None).unwrap().is_cpu());
            let e = device_from(Some("cuda:0")).unwrap_err().to_string();
            assert!(e.starts_with("FACTPATCH_DEVICE=cuda:0: "), "{e}");
        }
        for bad in ["gpu", "cuda0", "cuda:x"] {
            let e = device_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }
}
