//! `cargo xtask bench`: builds the suite binary `rocforge-bench` (with the GPU features the
//! chosen backends need) and runs it; the binary writes results.json, results.md and
//! chart.svg under target/rocforge-bench/<timestamp>/. `--save-baseline NAME` stores the
//! result as target/rocforge-bench/baselines/NAME.json; `--baseline NAME` compares the run
//! with it and exits non-zero on a regression. Every other flag goes to the binary.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn run(args: &[String]) -> Result<()> {
    let mut pass = Vec::new();
    let (mut save, mut baseline, mut threshold, mut features) = (None, None, None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--save-baseline" => save = Some(baseline_name(&value(a)?)?),
            "--baseline" => baseline = Some(baseline_name(&value(a)?)?),
            "--threshold" => threshold = Some(value(a)?),
            "--features" => features.extend(value(a)?.split(',').map(str::to_string)),
            "--out-dir" => bail!("results always go under target/rocforge-bench (run the rocforge-bench binary for another place)"),
            "--backend" => {
                let v = value(a)?;
                features.extend(v.split(',').filter(|b| ["cuda", "hip", "wgpu"].contains(b)).map(str::to_string));
                pass.extend([a.clone(), v]);
            }
            _ => pass.push(a.clone()),
        }
    }
    let out_dir = out_dir();
    let baseline_file = baseline.map(|n| out_dir.join("baselines").join(format!("{n}.json")));
    if let Some(b) = baseline_file.as_ref().filter(|b| !b.is_file()) {
        bail!(
            "no baseline {} (save one with `cargo xtask bench --save-baseline NAME`)",
            b.display()
        );
    }
    let bin = build_suite(&features)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("run").args(&pass).arg("--out-dir").arg(&out_dir);
    exit_on_failure(&mut cmd)?;
    let latest = std::fs::read_to_string(out_dir.join("LATEST"))
        .context("the suite wrote no LATEST file")?;
    let results = PathBuf::from(latest.trim()).join("results.json");
    if let Some(name) = save {
        let dest = out_dir.join("baselines").join(format!("{name}.json"));
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::copy(&results, &dest).with_context(|| format!("saving {}", dest.display()))?;
        eprintln!("saved baseline `{name}`: {}", dest.display());
    }
    if let Some(base) = baseline_file {
        let mut cmd = Command::new(&bin);
        cmd.arg("compare").arg(&base).arg(&results);
        if let Some(t) = threshold {
            cmd.args(["--threshold", &t]);
        }
        exit_on_failure(&mut cmd)?;
    }
    Ok(())
}

fn baseline_name(name: &str) -> Result<String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        bail!("baseline name `{name}` must be letters, digits, `-`, `_` or `.`");
    }
    Ok(name.to_string())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// target/rocforge-bench (respecting `$CARGO_TARGET_DIR`).
pub fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("rocforge-bench")
}

/// Builds `rocforge-bench` in release mode with `features` and returns its path.
pub fn build_suite(features: &[String]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "rocforge-bench",
        "--bin",
        "rocforge-bench",
    ]);
    if !features.is_empty() {
        let mut f = features.to_vec();
        f.sort();
        f.dedup();
        cmd.args(["--features", &f.join(",")]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building rocforge-bench failed");
    }
    let target = out_dir().parent().unwrap().to_path_buf();
    Ok(target
        .join("release")
        .join(format!("rocforge-bench{}", std::env::consts::EXE_SUFFIX)))
}

/// Runs `cmd` from the workspace root; on failure exits with its code (it has already said why, on one line).
pub fn exit_on_failure(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .context("running rocforge-bench")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Builds the suite (no GPU features) and runs one of its subcommands with `args`.
pub fn delegate(subcommand: &str, args: &[String]) -> Result<()> {
    let bin = build_suite(&[])?;
    exit_on_failure(Command::new(bin).arg(subcommand).args(args))
}
