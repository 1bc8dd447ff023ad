//! Board energy counters, read around the measured part of a run so that a report can give
//! joules per generated token next to tokens/s. A counter that is absent gives no figure and
//! a one-line reason, never an estimate.
//!
//! - NVIDIA (the `cuda` backend): NVML's total energy counter of device 0 (millijoules since
//!   the driver loaded; Volta and later), through the `nvml-wrapper` crate, which loads
//!   `libnvidia-ml.so` at run time. Built with the `nvml` feature (`cuda` turns it on).
//!   Device 0 in NVML's order is the device the CUDA backend uses when the two orders agree
//!   (`CUDA_DEVICE_ORDER=PCI_BUS_ID`, or one GPU).
//! - AMD (the `hip` backend): absent. AMD SMI has no maintained Rust binding that this
//!   workspace depends on yet.
//! - The CPU and wgpu backends: absent (no counter is read).

use rocforge_runtime::BackendKind;

/// An energy counter, or why there is none.
pub struct EnergyMeter {
    counter: std::result::Result<Counter, String>,
}

enum Counter {
    #[cfg(feature = "nvml")]
    Nvml(nvml_wrapper::Nvml),
    #[cfg(not(feature = "nvml"))]
    #[allow(dead_code)]
    None,
}

impl EnergyMeter {
    /// The counter of the device `kind` runs on (the backend actually created, not `auto`).
    pub fn for_backend(kind: BackendKind) -> Self {
        let counter = match kind {
            BackendKind::Cuda => nvml(),
            BackendKind::Hip => Err(
                "absent: AMD SMI is not read (no maintained Rust binding is a dependency yet)"
                    .into(),
            ),
            BackendKind::Cpu => Err("absent: no energy counter is read on the CPU".into()),
            BackendKind::Wgpu => Err("absent: wgpu exposes no energy counter".into()),
            BackendKind::Auto => Err("absent: the backend is not resolved".into()),
        };
        Self { counter }
    }

    /// The counter's name (`nvml`), or why there is none.
    pub fn source(&self) -> String {
        match &self.counter {
            Ok(_) => "nvml".into(),
            Err(why) => why.clone(),
        }
    }

    /// Energy used since an arbitrary origin, in joules; `None` without a counter or when a
    /// read fails.
    pub fn joules(&self) -> Option<f64> {
        match self.counter.as_ref().ok()? {
            #[cfg(feature = "nvml")]
            Counter::Nvml(nvml) => {
                let mj = nvml
                    .device_by_index(0)
                    .ok()?
                    .total_energy_consumption()
                    .ok()?;
                Some(mj as f64 / 1000.0)
            }
            #[cfg(not(feature = "nvml"))]
            Counter::None => None,
        }
    }
}

#[cfg(feature = "nvml")]
fn nvml() -> std::result::Result<Counter, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("absent: NVML: {e}"))?;
    // Probe once: a GPU older than Volta has no energy counter.
    nvml.device_by_index(0)
        .and_then(|d| d.total_energy_consumption())
        .map_err(|e| format!("absent: NVML energy counter of device 0: {e}"))?;
    Ok(Counter::Nvml(nvml))
}

#[cfg(not(feature = "nvml"))]
fn nvml() -> std::result::Result<Counter, String> {
    Err("absent: built without NVML (the `nvml` feature; `cuda` turns it on)".into())
}

/// Joules per generated token between two readings, when both exist and tokens were made.
pub fn per_token(before: Option<f64>, after: Option<f64>, tokens: usize) -> Option<f64> {
    let (b, a) = (before?, after?);
    (tokens > 0 && a >= b).then(|| (a - b) / tokens as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_counters_say_why_and_give_no_figure() {
        for kind in [BackendKind::Cpu, BackendKind::Hip, BackendKind::Wgpu] {
            let m = EnergyMeter::for_backend(kind);
            assert!(m.joules().is_none());
            assert!(m.source().starts_with("absent: "), "{}", m.source());
        }
        assert_eq!(per_token(Some(10.0), Some(16.0), 3), Some(2.0));
        assert_eq!(per_token(None, Some(16.0), 3), None);
        assert_eq!(per_token(Some(10.0), Some(16.0), 0), None);
        assert_eq!(per_token(Some(10.0), Some(9.0), 3), None, "a counter reset");
    }
}
