//! The suite binary end to end on a tiny synthetic model: results.json (schema, every field),
//! results.md, chart.svg and LATEST; gen-model; and one-line errors for bad input.

mod common;

use common::{assert_one_line_error, scratch, suite};
use rocforge_bench::Report;

#[test]
fn runs_scenarios_and_writes_json_table_and_chart() {
    let dir = scratch("run");
    let model = dir.join("tiny-q8_0.gguf");
    let out = suite(&[
        "gen-model",
        "--shape",
        "tiny",
        "--quant",
        "q8_0",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let results = dir.join("results");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--scenario",
        "pp16,tg8,pp8+tg4@d8",
        "--iterations",
        "3",
        "--warmup",
        "1",
        "--out-dir",
        results.to_str().unwrap(),
    ];
    let out = suite(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| cpu | pp16 |") && stdout.contains("| cpu | tg8 |"),
        "{stdout}"
    );
    assert!(stdout.contains("(synthetic weights)"), "{stdout}");

    let run_dir = std::fs::read_to_string(results.join("LATEST")).unwrap();
    let run_dir = std::path::Path::new(run_dir.trim());
    let report = Report::load(&run_dir.join("results.json")).unwrap();
    assert!(std::fs::read_to_string(run_dir.join("chart.svg"))
        .unwrap()
        .starts_with("<svg"));
    assert!(std::fs::read_to_string(run_dir.join("results.md"))
        .unwrap()
        .contains("| pp16 |"));

    assert_eq!(
        (report.model.quant.as_str(), report.model.synthetic),
        ("Q8_0", true)
    );
    assert_eq!(report.model.sha256.len(), 64);
    assert_eq!(report.runs.len(), 3);
    let pp = report.run("pp16", "cpu").unwrap();
    assert_eq!((pp.iterations, pp.samples.prompt_ms.len()), (3, 3));
    assert!(
        pp.ttft_ms.is_none()
            && pp.gen_tokens_per_s.is_none()
            && pp.prompt_tokens_per_s.unwrap().min > 0.0
    );
    let tg = report.run("tg8", "cpu").unwrap();
    assert_eq!(tg.samples.inter_token_ms.len(), 3 * 8);
    let mixed = report.run("pp8+tg4 @ d8", "cpu").unwrap();
    assert_eq!(
        (
            mixed.depth,
            mixed.samples.ttft_ms.len(),
            mixed.samples.inter_token_ms.len()
        ),
        (8, 3, 3 * 3)
    );
    let s = mixed.inter_token_ms.unwrap();
    assert!(s.min <= s.p50 && s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max);
    // The CPU cache is f32 and matches the formula exactly.
    assert_eq!(
        (mixed.kv_element_bytes, mixed.kv_cache_bytes),
        (4, mixed.kv_cache_formula_bytes)
    );
    assert!(mixed.peak_host_rss_bytes > 0 && mixed.weights_bytes == report.model.weights_bytes);
    assert_eq!(report.profiles.len(), 1);
    // The profile charges time to the model definition's steps, one entry per step kind.
    let decode = &report.profiles[0].decode;
    for step in [
        "embed",
        "attn_in",
        "rope_store",
        "attention",
        "attn_out",
        "ffn_in",
        "ffn_out",
        "logits",
    ] {
        assert!(
            decode.iter().any(|o| o.op == step),
            "no `{step}` in the decode profile"
        );
    }
    assert!(report.profiles[0].decode_launches_per_token > 0.0);

    // Every field the issue names is in the JSON.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["schema"], "rocforge-bench/2");
    for key in ["git_commit", "host", "model", "runs"] {
        assert!(!json[key].is_null(), "{key}");
    }
    // The SIMD level of the CPU dot products, in the JSON and in the table's header.
    let features = json["host"]["cpu_features"].as_str().unwrap();
    assert!(
        ["avx512_vnni", "avx2", "portable"].contains(&features),
        "host.cpu_features = {features:?}"
    );
    assert!(std::fs::read_to_string(run_dir.join("results.md"))
        .unwrap()
        .contains(&format!(", {features}")));
    for key in [
        "path",
        "sha256",
        "architecture",
        "parameters",
        "quant",
        "synthetic",
    ] {
        assert!(!json["model"][key].is_null(), "model.{key}");
    }
    let run = &json["runs"][2];
    for key in [
        "scenario",
        "backend",
        "prompt_tokens",
        "gen_tokens",
        "iterations",
        "peak_device_bytes",
        "peak_host_rss_bytes",
        "kv_cache_bytes",
        "weights_bytes",
        "samples",
    ] {
        assert!(!run[key].is_null(), "runs[].{key}");
    }
    for key in [
        "ttft_ms",
        "prompt_tokens_per_s",
        "gen_tokens_per_s",
        "inter_token_ms",
    ] {
        for stat in ["mean", "stddev", "min", "max", "p50", "p95", "p99"] {
            assert!(run[key][stat].is_number(), "runs[].{key}.{stat}");
        }
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = scratch("bad");
    let out_dir = dir.display().to_string();
    assert_one_line_error(
        &suite(&["--model", "/nonexistent/model.gguf", "--out-dir", &out_dir]),
        "does not exist",
    );
    assert_one_line_error(
        &suite(&["--backend", "tpu", "--out-dir", &out_dir]),
        "unknown backend `tpu`",
    );
    assert_one_line_error(
        &suite(&[
            "--scenario",
            "pp",
            "--model",
            "/nonexistent/m.gguf",
            "--out-dir",
            &out_dir,
        ]),
        "does not exist",
    );
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"GGML not a model").unwrap();
    assert_one_line_error(
        &suite(&["--model", junk.to_str().unwrap(), "--out-dir", &out_dir]),
        "junk.gguf",
    );
    assert_one_line_error(
        &suite(&[
            "gen-model",
            "--shape",
            "llama9",
            "--quant",
            "q4_0",
            "--out",
            "/tmp/x.gguf",
        ]),
        "unknown shape `llama9`",
    );
    assert_one_line_error(
        &suite(&[
            "gen-model",
            "--shape",
            "tiny",
            "--quant",
            "q3_xx",
            "--out",
            "/tmp/x.gguf",
        ]),
        "unknown quant `q3_xx`",
    );
    assert_one_line_error(
        &suite(&[
            "compare",
            "--out-dir",
            &out_dir,
            "--llama-bench",
            "/nonexistent/lb.json",
        ]),
        "no latest run",
    );
}

#[test]
fn concurrency_sweep_writes_fields_table_and_chart() {
    let dir = scratch("sweep");
    let model = dir.join("tiny-q4_0.gguf");
    let out = suite(&[
        "gen-model",
        "--shape",
        "tiny",
        "--quant",
        "q4_0",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let results = dir.join("results");
    let out = suite(&[
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--quick",
        "--concurrency",
        "1,4",
        "--iterations",
        "2",
        "--warmup",
        "1",
        "--out-dir",
        results.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Concurrency sweep"), "{stdout}");
    assert!(
        stdout.contains("Per-op time of one decode step of 4 sequences (32 tokens deep) on cpu"),
        "{stdout}"
    );
    assert!(stdout.contains("| cpu | 4 |"), "{stdout}");
    let run_dir = std::fs::read_to_string(results.join("LATEST")).unwrap();
    let run_dir = std::path::Path::new(run_dir.trim());
    let svg = std::fs::read_to_string(run_dir.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("c4"), "sweep chart");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["schema"], "rocforge-bench/2");
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "the sweep replaces the default scenarios");
    // The profiled step of the largest level: every sequence decoding, time per op family.
    let bp = &json["batch_profiles"][0];
    assert_eq!(
        (bp["backend"].as_str(), bp["sequences"].as_u64()),
        (Some("cpu"), Some(4))
    );
    let ops = bp["ops"].as_array().unwrap();
    assert!(ops.iter().any(|o| o["op"] == "attention"), "{bp}");
    assert!(
        ops.iter().all(|o| o["total_ms"].as_f64().unwrap() >= 0.0),
        "{bp}"
    );
    for (run, level) in runs.iter().zip([1u64, 4]) {
        assert_eq!(run["scenario"], format!("pp32+tg32 @c{level}"));
        assert_eq!(run["concurrency"], level);
        assert_eq!(
            (run["prompt_tokens"].as_u64(), run["gen_tokens"].as_u64()),
            (Some(32), Some(32))
        );
        assert!(run["aggregate_gen_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(run["requests_per_s"].as_f64().unwrap() > 0.0);
        assert!(run["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        for metric in ["ttft_ms", "inter_token_ms"] {
            let s = &run[metric];
            assert!(
                s["p50"].as_f64().unwrap() > 0.0 && s["p99"].as_f64() >= s["p50"].as_f64(),
                "{metric}: {s}"
            );
        }
        let samples = &run["samples"];
        // Two measured iterations of `level` requests: one TTFT each, 31 gaps between
        // their 32 tokens, one aggregate rate per iteration.
        assert_eq!(
            samples["ttft_ms"].as_array().unwrap().len() as u64,
            2 * level
        );
        assert_eq!(
            samples["inter_token_ms"].as_array().unwrap().len() as u64,
            2 * level * 31
        );
        assert_eq!(
            samples["aggregate_gen_tokens_per_s"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // No energy counter on the CPU: null and the reason, never a number.
        assert!(run["energy_j_per_gen_token"].is_null());
        assert!(run["energy_source"]
            .as_str()
            .unwrap()
            .starts_with("absent: "));
    }
    // Reports of schema 1 still load, as single-sequence runs.
    let old = Report::load(&common::fixture("cpu-baseline.json")).unwrap();
    assert_eq!(old.schema, "rocforge-bench/1");
    assert!(old
        .runs
        .iter()
        .all(|r| r.concurrency == 1 && r.aggregate_gen_tokens_per_s.is_none()));
    let bad = suite(&["--model", model.to_str().unwrap(), "--concurrency", "0"]);
    common::assert_one_line_error(&bad, "--concurrency `0`");
}
