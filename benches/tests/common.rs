//! Helpers shared by the integration tests: scratch directories and the suite binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh directory under the system temp dir, unique to this test process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("rocforge-bench-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs the suite binary with `args`.
pub fn suite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rocforge-bench"))
        .args(args)
        .output()
        .expect("run rocforge-bench")
}

/// Asserts a bad-input failure: exit 1 and one line of stderr containing `phrase`.
pub fn assert_one_line_error(out: &Output, phrase: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.contains(phrase), "`{phrase}` not in: {stderr}");
}
