//! `cargo xtask fuzz [--seconds N] [--runs N] [--jobs J] [--target T]`: runs each cargo-fuzz
//! target of `fuzz/` (nightly toolchain, `cargo install cargo-fuzz`) one after the other, for N
//! seconds each (default 60, CI's budget) or N executions, in J processes (libFuzzer's
//! `-fork=J`, sharing the corpus; default 1), and prints one line per target: executions,
//! seconds, crashes. Each target first writes its seed corpus (tiny models, the broken-file
//! corpus, real-shaped templates and command lines) into fuzz/corpus/<target>; crashes land in
//! fuzz/artifacts/<target>/. `ROCFORGE_FUZZ_TARGET_DIR` sets cargo's target directory.
//! Long runs and their numbers are recorded in docs/fuzzing.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub const TARGETS: [&str; 5] = [
    "gguf_parse",
    "model_load",
    "tokenizer",
    "chat_template",
    "cli_parse",
];

pub fn run(args: &[String]) -> Result<()> {
    let (mut seconds, mut runs, mut jobs, mut targets) = (60u64, None, 1u32, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--seconds" => {
                seconds = value(a)?
                    .parse()
                    .context("--seconds takes a whole number")?
            }
            "--runs" => {
                runs = Some(
                    value(a)?
                        .parse::<u64>()
                        .context("--runs takes a whole number")?,
                )
            }
            "--jobs" => {
                jobs = value(a)?
                    .parse()
                    .ok()
                    .filter(|&j| j >= 1)
                    .context("--jobs takes a whole number of at least 1")?
            }
            "--target" => {
                let t = value(a)?;
                if !TARGETS.contains(&t.as_str()) {
                    bail!(
                        "unknown fuzz target `{t}` (targets: {})",
                        TARGETS.join(", ")
                    );
                }
                targets.push(t);
            }
            other => bail!(
                "unknown flag `{other}` (cargo xtask fuzz [--seconds N] [--runs N] [--jobs J] [--target T])"
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fuzz_dir = root.join("fuzz");
    let mut failed = Vec::new();
    for t in &targets {
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["+nightly", "fuzz", "run", "-O", "-a"]);
        if let Some(dir) = std::env::var_os("ROCFORGE_FUZZ_TARGET_DIR") {
            cmd.arg("--target-dir").arg(dir);
        }
        cmd.arg(t).arg(&corpus).arg("--");
        match runs {
            Some(n) => cmd.arg(format!("-runs={n}")),
            None => cmd.arg(format!("-max_total_time={seconds}")),
        };
        // A render or load that takes 10 s is a hang; 2 GiB is far above any tiny input's need.
        cmd.args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
        if jobs > 1 {
            // Fork mode: the parent stops at the first crash and reports the children's total.
            cmd.arg(format!("-fork={jobs}"));
        }
        cmd.env("ROCFORGE_FUZZ_SEED_DIR", &corpus);
        eprintln!("xtask: {cmd:?}");
        let start = Instant::now();
        let out = cmd.output().with_context(|| "running cargo +nightly fuzz (cargo install cargo-fuzz; rustup toolchain install nightly)")?;
        let secs = start.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&out.stderr);
        let execs = if jobs > 1 {
            fork_total(&log)
        } else {
            stat(&log, "stat::number_of_executed_units:")
        }
        .unwrap_or(0);
        let status = if out.status.success() { "ok" } else { "FAILED" };
        println!(
            "fuzz {t:<14} {status:<6} {execs:>12} executions {secs:>8.1} s  corpus {}",
            corpus_size(&corpus)
        );
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            failed.push(t.clone());
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The value of a libFuzzer final statistic.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Executions of all children in fork mode: the count of the parent's last `#N: cov: ...` line.
fn fork_total(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix('#')?.split_once(": cov:")?.0.parse().ok())
}

fn corpus_size(dir: &PathBuf) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_executions_of_a_plain_and_a_fork_run() {
        let plain = "Done 79356 runs in 6 second(s)\nstat::number_of_executed_units: 79356\nstat::average_exec_per_sec:     13226\n";
        assert_eq!(stat(plain, "stat::number_of_executed_units:"), Some(79356));
        let fork = "#10000: cov: 625 ft: 1417 corp: 123 exec/s: 5000 oom/timeout/crash: 0/0/0 time: 2s job: 1 dft_time: 0\n\
                    #44153: cov: 625 ft: 1417 corp: 123 exec/s: 4910 oom/timeout/crash: 0/0/0 time: 6s job: 3 dft_time: 0\n\
                    INFO: exiting: 0 time: 6s\n";
        assert_eq!(fork_total(fork), Some(44153));
        assert_eq!(fork_total("#1\tINITED cov: 3 ft: 4\n"), None);
    }
}
