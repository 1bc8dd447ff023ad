//! The `rocforge` binary as a user runs it: exit codes, one-line errors, JSON output.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rocforge_kernels::GgmlType;
use rocforge_runtime::testing::{
    real_model, skip_or_fail, tiny_model, write_broken_corpus, FETCH_SMOLLM2,
};

fn rocforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rocforge"))
        .args(args)
        .output()
        .expect("run rocforge")
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rocforge-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Largest resident set (bytes) of any child this process has waited for.
fn children_max_rss() -> u64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss as u64 * 1024
}

#[test]
fn broken_files_give_one_clear_line_fast_and_small() {
    let dir = temp_dir("broken");
    for (path, expect) in write_broken_corpus(&dir).unwrap() {
        let p = path.to_str().unwrap();
        for cmd in [
            vec!["inspect", "--model", p],
            vec![
                "generate",
                "--model",
                p,
                "--prompt",
                "hi",
                "--backend",
                "cpu",
            ],
        ] {
            let t = Instant::now();
            let out = rocforge(&cmd);
            let elapsed = t.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let code = out.status.code();
            assert!(
                matches!(code, Some(1) | Some(2)),
                "{p} {cmd:?}: exit {code:?}, stderr {stderr}"
            );
            assert!(
                !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
                "{p}: {stderr}"
            );
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{p}: not one line: {stderr}"
            );
            assert!(
                stderr.contains(p) && stderr.contains(expect),
                "{p}: `{stderr}` lacks the path or `{expect}`"
            );
            assert!(elapsed < Duration::from_secs(1), "{p}: took {elapsed:?}");
        }
    }
    let rss = children_max_rss();
    assert!(
        rss < 100 << 20,
        "a broken file made rocforge use {} MiB",
        rss >> 20
    );
}

#[test]
fn usage_errors_exit_2_and_unknown_backend_exits_1() {
    let out = rocforge(&["generate", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let dir = temp_dir("usage");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q8_0, 1).write_file(&p).unwrap();
    let out = rocforge(&[
        "generate",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "x",
        "--backend",
        "tpu",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend `tpu`"));
}

#[test]
fn generate_json_on_a_tiny_model() {
    let dir = temp_dir("json");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q4_0, 2).write_file(&p).unwrap();
    let out = rocforge(&[
        "generate",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "hello",
        "-n",
        "8",
        "--temperature",
        "0",
        "--backend",
        "cpu",
        "--json",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 5);
    assert_eq!(v["generated_tokens"].as_array().unwrap().len(), 8);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["prefill_ms"].as_f64().is_some() && v["text"].is_string());
}

#[test]
fn inspect_reports_format_and_tensors() {
    let dir = temp_dir("inspect");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q4_1, 3).write_file(&p).unwrap();
    let out = rocforge(&["inspect", "--model", p.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["quant"]["format"], "Q4_1");
    assert_eq!(v["quant"]["tensor_types"]["q4_1"], 15);
    assert_eq!(v["config"]["n_layer"], 2);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 20);
}

#[test]
fn real_model_greedy_capital_of_france() {
    let Some(m) = real_model() else {
        return skip_or_fail("real model", FETCH_SMOLLM2);
    };
    let out = rocforge(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--backend",
        "cpu",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(" Paris.\n\nThe United States"), "{text:?}");
}
