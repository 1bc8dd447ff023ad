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
fn usage_errors_exit_2_with_one_line() {
    let out = rocforge(&["generate", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let dir = temp_dir("usage");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q8_0, 1).write_file(&p).unwrap();
    let p = p.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "tpu"], "unknown backend `tpu`"),
        // Found by the cli_parse fuzz target: a newline in the value split the message.
        (&["--backend", "cp\ns"], "unknown backend `cp\\ns`"),
        (
            &["--temperature", "nan"],
            "--temperature NaN is out of range (allowed: a finite number >= 0",
        ),
        (&["--temperature", "-1"], "--temperature -1 is out of range"),
        (
            &["--top-p", "1.5"],
            "--top-p 1.5 is out of range (allowed: 0 to 1",
        ),
        (
            &["--repeat-penalty", "0"],
            "--repeat-penalty 0 is out of range (allowed: a finite number > 0",
        ),
        (
            &["--repeat-penalty", "inf"],
            "--repeat-penalty inf is out of range",
        ),
        (
            &["--ctx", "0"],
            "--ctx 0 is out of range (allowed: 1 to 1048576)",
        ),
        (&["--ctx", "8000000"], "--ctx 8000000 is out of range"),
        (
            &["--batch", "0"],
            "--batch 0 is out of range (allowed: 1 to 65536)",
        ),
        (
            &["--batch", "18446744073709551615"],
            "--batch 18446744073709551615 is out of range",
        ),
        (&["--max-tokens", "18446744073709551616"], "--max-tokens"),
        (&["--max-tokens", "-1"], "--max-tokens"),
        (&["--top-k", "lots"], "--top-k"),
        (&["--seed", "1.5"], "--seed"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (extra, expect) in cases {
        let mut args = vec!["generate", "--model", p, "--prompt", "x"];
        args.extend_from_slice(extra);
        let out = rocforge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{extra:?}: not one line: {stderr}"
        );
        assert!(
            stderr.starts_with("rocforge: error: ") && stderr.contains(expect),
            "{extra:?}: `{stderr}` lacks `{expect}`"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = rocforge(&["perplexity", "--model", p, "--file", p, "--ctx", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ctx 3 is out of range (allowed: 4 to"));
    let out = rocforge(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
}

fn generate_json(model: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "hello",
        "--backend",
        "cpu",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = rocforge(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{extra:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    (out, v)
}

#[test]
fn huge_max_tokens_stops_at_the_full_context() {
    let dir = temp_dir("max-tokens");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q8_0, 1).write_file(&p).unwrap();
    let t = Instant::now();
    let (_, v) = generate_json(
        p.to_str().unwrap(),
        &[
            "-n",
            "18446744073709551615",
            "--ctx",
            "32",
            "--ignore-eos",
            "--temperature",
            "0.9",
            "--repeat-penalty",
            "1e-30",
        ],
    );
    assert_eq!(v["stop_reason"], "context_full");
    assert_eq!(
        v["prompt_tokens"].as_array().unwrap().len()
            + v["generated_tokens"].as_array().unwrap().len(),
        33
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn no_mmap_generates_the_same_tokens() {
    let dir = temp_dir("no-mmap");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q4_1, 4).write_file(&p).unwrap();
    let p = p.to_str().unwrap();
    let (_, mapped) = generate_json(p, &["-n", "8", "--temperature", "0", "--ignore-eos"]);
    let (_, copied) = generate_json(
        p,
        &["-n", "8", "--temperature", "0", "--ignore-eos", "--no-mmap"],
    );
    assert_eq!(mapped["generated_tokens"].as_array().unwrap().len(), 8);
    assert_eq!(mapped["generated_tokens"], copied["generated_tokens"]);
}

/// The tiny model with extra or replaced metadata, written to `dir/name`.
fn tiny_with(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut rocforge_runtime::gguf::GgufWriter),
) -> std::path::PathBuf {
    let mut w = tiny_model(GgmlType::Q8_0, 1);
    edit(&mut w);
    let p = dir.join(name);
    w.write_file(&p).unwrap();
    p
}

#[test]
fn a_chat_template_that_never_ends_falls_back_to_chatml_with_a_warning() {
    let dir = temp_dir("template");
    let hostile = [
        ("loop", "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"),
        ("flood", "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"),
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ];
    for (name, template) in hostile {
        let p = tiny_with(&dir, &format!("{name}.gguf"), |w| {
            w.meta_str("tokenizer.chat_template", template);
        });
        let t = Instant::now();
        let (out, v) = generate_json(
            p.to_str().unwrap(),
            &["--chat", "-n", "2", "--temperature", "0"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            t.elapsed()
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.contains("warning")
                && stderr.contains("the chat template failed")
                && stderr.contains("using ChatML"),
            "{name}: {stderr}"
        );
        // The ChatML prompt: <|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n.
        assert!(
            v["prompt_tokens"].as_array().unwrap().len() > 5,
            "{name}: {v}"
        );
    }
}

#[test]
fn a_path_with_a_newline_still_gives_one_line() {
    let out = rocforge(&["inspect", "--model", "no\nsuch.gguf"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no\\nsuch.gguf"), "{stderr}");
}

#[test]
fn a_chat_template_that_doubles_a_string_exits_1_with_one_line_fast() {
    let dir = temp_dir("template-memory");
    let hostile = [
        ("namespace", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
        ("macro", "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ d('xy', 60) }}"),
    ];
    for (name, template) in hostile {
        let p = tiny_with(&dir, &format!("{name}.gguf"), |w| {
            w.meta_str("tokenizer.chat_template", template);
        });
        let t = Instant::now();
        let out = rocforge(&[
            "generate",
            "--model",
            p.to_str().unwrap(),
            "--prompt",
            "hello",
            "--backend",
            "cpu",
            "--chat",
            "-n",
            "2",
        ]);
        let elapsed = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            "rocforge: error: the model's chat template allocated more than 64 MiB while rendering",
            "{name}"
        );
        assert!(out.stdout.is_empty(), "{name}: generated after the overrun");
        assert!(elapsed < Duration::from_secs(5), "{name}: took {elapsed:?}");
    }
    let rss = children_max_rss();
    assert!(
        rss < 512 << 20,
        "a doubling template took {} MiB",
        rss >> 20
    );
}

#[test]
fn real_shaped_chat_templates_still_render() {
    let dir = temp_dir("template-real");
    let templates = [
        ("chatml", "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        ("llama3", "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content | trim %}{% endif %}{% endfor %}{% for m in messages %}{% if m.role != 'system' %}<|start_header_id|>{{ m.role }}<|end_header_id|>\\n\\n{{ (ns.sys ~ m.content) | trim }}<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\\n\\n{% endif %}"),
    ];
    for (name, template) in templates {
        let p = tiny_with(&dir, &format!("{name}.gguf"), |w| {
            w.meta_str("tokenizer.chat_template", template);
        });
        let (out, v) = generate_json(
            p.to_str().unwrap(),
            &[
                "--chat",
                "--system",
                "Be brief.",
                "-n",
                "2",
                "--temperature",
                "0",
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("warning"), "{name}: {stderr}");
        assert!(
            v["prompt_tokens"].as_array().unwrap().len() > 5,
            "{name}: {v}"
        );
    }
}

#[test]
fn special_ids_outside_the_vocabulary_warn_and_run() {
    let dir = temp_dir("special-ids");
    let p = tiny_with(&dir, "eos.gguf", |w| {
        w.meta_u32("tokenizer.ggml.eos_token_id", 1_000_000);
    });
    let (out, v) = generate_json(p.to_str().unwrap(), &["-n", "4", "--temperature", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("warning")
            && stderr.contains("eos_token_id = 1000000 is outside the vocabulary"),
        "{stderr}"
    );
    assert!(v["generated_tokens"].as_array().is_some());
}

#[test]
fn a_token_list_beyond_the_cap_is_refused_before_the_tokenizer_is_built() {
    let dir = temp_dir("vocab-cap");
    // 2^20 + 1 one-byte tokens: a 9 MiB list; the model's rows do not matter, the cap comes first.
    let p = tiny_with(&dir, "vocab.gguf", |w| {
        w.meta_strings(
            "tokenizer.ggml.tokens",
            (0..(1u32 << 20) + 1)
                .map(|i| (b'a' + (i % 26) as u8) as char)
                .map(String::from)
                .collect(),
        );
    });
    let before = children_max_rss();
    let t = Instant::now();
    let out = rocforge(&[
        "generate",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "x",
        "--backend",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // `llama.vocab_size` (320) or the cap (2^20) refuses it, whichever the file states.
    assert!(
        stderr.contains("tokenizer.ggml.tokens")
            && (stderr.contains("more than 1048576") || stderr.contains("1048577 tokens")),
        "{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let rss = children_max_rss().max(before);
    assert!(
        rss < 400 << 20,
        "a 10 MiB file made rocforge use {} MiB",
        rss >> 20
    );
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

/// `generate --prompts FILE --parallel N --json` on the CPU, parsed as JSON Lines.
fn prompts_json(model: &str, file: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompts",
        file.to_str().unwrap(),
        "--backend",
        "cpu",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = rocforge(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{extra:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect()
}

#[test]
fn prompts_file_runs_in_parallel_and_prints_json_lines_in_input_order() {
    let dir = temp_dir("prompts");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q4_0, 2).write_file(&p).unwrap();
    let p = p.to_str().unwrap();
    let prompts = [
        "hello",
        "a longer prompt that takes more tokens than the others do",
        "hi",
        "one more",
        "and the last one",
    ];
    let file = dir.join("prompts.txt");
    std::fs::write(&file, prompts.join("\n") + "\n").unwrap();
    let parallel = prompts_json(p, &file, &["-n", "6", "--parallel", "3"]);
    let serial = prompts_json(p, &file, &["-n", "6", "--parallel", "1"]);
    assert_eq!(parallel.len(), prompts.len());
    // The same ids as a single `--prompt` run.
    let (_, one) = generate_json(p, &["-n", "6", "--temperature", "0", "--ignore-eos"]);
    assert_eq!(parallel[0]["generated_tokens"], one["generated_tokens"]);
    assert_eq!(parallel[0]["prompt_tokens"], one["prompt_tokens"]);
    for (i, (v, s)) in parallel.iter().zip(&serial).enumerate() {
        assert_eq!(v["index"], i);
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["generated_tokens"].as_array().unwrap().len(), 6);
        assert_eq!(v["stop_reason"], "max_tokens");
        assert!(v["text"].is_string() && v["ttft_ms"].as_f64().is_some());
        // Batching does not change greedy ids.
        assert_eq!(v["generated_tokens"], s["generated_tokens"], "prompt {i}");
    }
}

#[test]
fn bad_prompts_files_give_one_line_and_fail() {
    let dir = temp_dir("bad-prompts");
    let p = dir.join("tiny.gguf");
    tiny_model(GgmlType::Q8_0, 1).write_file(&p).unwrap();
    let p = p.to_str().unwrap();
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "one\n\nthree\n").unwrap();
    let good = dir.join("good.txt");
    std::fs::write(&good, "one\n").unwrap();
    let missing = dir.join("missing.txt");
    let cases: &[(&std::path::Path, &[&str], &str, i32)] = &[
        (&empty, &[], "the file has no prompts", 1),
        (&blank, &[], "line 2 is empty", 1),
        (&missing, &[], "missing.txt", 1),
        (
            &good,
            &["--parallel", "0"],
            "--parallel 0 is out of range",
            2,
        ),
    ];
    for &(file, extra, expect, code) in cases {
        let mut args = vec![
            "generate",
            "--model",
            p,
            "--prompts",
            file.to_str().unwrap(),
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let out = rocforge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{file:?} {extra:?}: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
