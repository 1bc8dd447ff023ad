//! `cargo xtask test`: the project's whole test suite, as CI runs it (the README's test command).
//!
//! One build (profile `ci`: release without cross-crate LTO; features `wgpu,hip`) serves every
//! step, so CubeCL is compiled once:
//! 1. every crate's tests: CPU reference, golden tests on the real model (when fetched), GGUF
//!    corpus, CLI, bench library; and, with `wgpu`, every CubeCL kernel and the wgpu backend end
//!    to end on Mesa's lavapipe (Vulkan on the CPU); `--features hip` compiles alongside;
//! 2. the `hip_check` example that step 1 built: every kernel's HIP source compiled with hipcc
//!    for gfx90a and gfx1030 (`hip-check: N/M kernels compiled`), where hipcc is installed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const FEATURES: &str = "wgpu,hip";
pub const PROFILE: &str = "ci";

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo).args(args).status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

pub fn run(args: &[String]) -> Result<()> {
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut test = vec![
        "test",
        "--profile",
        PROFILE,
        "--workspace",
        "--features",
        FEATURES,
    ];
    test.extend(&extra);
    cargo(&test)?;
    if !hipcc_installed() {
        eprintln!("xtask test: hipcc not installed, skipping hip-check (apt-get install hipcc libamdhip64-dev rocm-device-libs)");
        return Ok(());
    }
    hip_check_binary()
}

/// `cargo xtask hip-check`: builds the `hip_check` example (as `cargo xtask test` does) and runs it.
pub fn hip_check() -> Result<()> {
    cargo(&[
        "build",
        "--profile",
        PROFILE,
        "-p",
        "rocforge-kernels",
        "--features",
        FEATURES,
        "--example",
        "hip_check",
    ])?;
    hip_check_binary()
}

fn hipcc_installed() -> bool {
    let hipcc = std::env::var("HIPCC").unwrap_or_else(|_| "hipcc".into());
    Command::new(hipcc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn hip_check_binary() -> Result<()> {
    let bin = target_dir()
        .join(PROFILE)
        .join("examples")
        .join("hip_check");
    let out = target_dir().join("hip-check");
    eprintln!("xtask: {} {}", bin.display(), out.display());
    let status = Command::new(&bin)
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("hip-check failed: some kernels did not compile with hipcc (see FAILED lines above)");
    }
    Ok(())
}
