//! Memory, measured: host resident set from /proc/self/status, device usage from the backend's
//! allocator (CubeCL's memory usage, through `MemoryUsage`), and the KV-cache size formula the
//! measurement is checked against.

use rocforge_runtime::{MemoryUsage, ModelConfig};

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`); `None` off Linux.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Peak resident set of this process so far (`VmHWM`).
pub fn host_peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM").unwrap_or(0)
}

/// Resident set of this process now (`VmRSS`).
pub fn host_rss_bytes() -> u64 {
    proc_status_bytes("VmRSS").unwrap_or(0)
}

/// KV-cache bytes by formula: K and V, per layer, per KV head, `head_dim` elements per position.
pub fn kv_cache_formula_bytes(config: &ModelConfig, ctx: usize, element_bytes: usize) -> u64 {
    (2 * config.n_layer * config.n_head_kv * config.head_dim * ctx * element_bytes) as u64
}

/// Element size the measured cache implies (4 for the CPU's f32 cache, 2 for f16), if whole.
pub fn kv_element_bytes(config: &ModelConfig, ctx: usize, kv_cache_bytes: u64) -> Option<u64> {
    let elements = kv_cache_formula_bytes(config, ctx, 1);
    (elements > 0 && kv_cache_bytes % elements == 0).then(|| kv_cache_bytes / elements)
}

/// Peak of the measured figures over a run, sampled after every iteration.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakMemory {
    pub device_in_use: u64,
    pub device_reserved: u64,
    pub last: MemoryUsage,
}

impl PeakMemory {
    pub fn sample(&mut self, m: MemoryUsage) {
        self.device_in_use = self.device_in_use.max(m.device_bytes_in_use);
        self.device_reserved = self.device_reserved.max(m.device_bytes_reserved);
        self.last = m;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_proc_status() {
        if cfg!(target_os = "linux") {
            // RSS first: the high-water mark read afterwards is at least any earlier RSS
            // (the other order races with the test harness's own allocations).
            let now = super::host_rss_bytes();
            let peak = super::host_peak_rss_bytes();
            assert!(now > 0 && peak >= now, "VmHWM {peak} VmRSS {now}");
        }
    }
}
