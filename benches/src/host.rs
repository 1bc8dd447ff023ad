//! The machine a run happened on: CPU, GPU and driver, OS, and the source revision.

use std::process::Command;

/// Host description stored with every result.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Host {
    pub cpu: String,
    /// The first GPU a run used, `None` for CPU-only results.
    pub gpu: Option<String>,
    /// GPU driver version (NVIDIA or amdgpu kernel module), if one is loaded.
    pub driver: Option<String>,
    /// Backends run, comma-separated.
    pub backend: String,
    pub os: String,
}

impl Host {
    pub fn detect(backends: &str, gpu: Option<String>) -> Self {
        Host {
            cpu: rocforge_runtime::backend::cpu::cpu_name(),
            gpu,
            driver: gpu_driver(),
            backend: backends.to_string(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// NVIDIA's `/proc/driver/nvidia/version` or the amdgpu module's version.
fn gpu_driver() -> Option<String> {
    if let Ok(v) = std::fs::read_to_string("/proc/driver/nvidia/version") {
        let line = v.lines().next()?.to_string();
        let version = line
            .split_whitespace()
            .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'));
        return Some(format!("nvidia {}", version.unwrap_or(&line)));
    }
    std::fs::read_to_string("/sys/module/amdgpu/version")
        .ok()
        .map(|v| format!("amdgpu {}", v.trim()))
}

/// `git describe`-like revision of the working tree: the commit, `-dirty` when it has changes;
/// `$ROCFORGE_GIT_COMMIT` where there is no git (a copied binary); else `unknown`.
pub fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => std::env::var("ROCFORGE_GIT_COMMIT").unwrap_or_else(|_| "unknown".into()),
    }
}

/// UTC time now as `2025-01-31T12:34:56Z`, and as a directory name `20250131-123456`.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}-{h:02}{m:02}{s:02}"),
    )
}
