//! Printers of a [`Report`]: markdown (llama-bench's table, then latency and memory), JSON
//! and CSV. Each reads the same record, so they are interchangeable.

use std::fmt::Write;

use crate::record::{Report, RunRecord};
use crate::stats::Summary;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
    Csv,
}

impl std::str::FromStr for Format {
    type Err = crate::BenchError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "md" | "markdown" => Ok(Self::Markdown),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            _ => Err(crate::BenchError::InvalidArgument(format!(
                "unknown format `{s}` (choose md, json or csv)"
            ))),
        }
    }
}

pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Markdown => markdown(report),
        Format::Json => serde_json::to_string_pretty(report).expect("a report serializes") + "\n",
        Format::Csv => csv(report),
    }
}

/// `1.23 ± 0.04`.
pub fn mean_pm(s: &Summary) -> String {
    format!("{:.2} ± {:.2}", s.mean, s.stddev)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One llama-bench row per phase of a run: (test name, tokens/s).
pub fn throughput_rows(run: &RunRecord) -> Vec<(String, &Summary)> {
    let sc = crate::Scenario::new(&run.scenario, run.prompt_tokens, run.gen_tokens, run.depth);
    let (pp, tg) = sc.test_names();
    // `pp512` stays `pp512`; the phases of a workload carry its name: `tg50 (chat)`.
    let label = |n: String| {
        if n == run.scenario {
            n
        } else {
            format!("{n} ({})", run.scenario)
        }
    };
    let mut rows = Vec::new();
    if let (Some(name), Some(s)) = (pp.map(label), run.prompt_tokens_per_s.as_ref()) {
        rows.push((name, s));
    }
    if let (Some(name), Some(s)) = (tg.map(label), run.gen_tokens_per_s.as_ref()) {
        rows.push((name, s));
    }
    rows
}

fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.model;
    let _ = writeln!(
        out,
        "rocforge-bench {} · commit {} · {} · CPU: {}{}\n",
        r.created,
        r.git_commit,
        if r.settings.quick {
            "quick run"
        } else {
            "full run"
        },
        cpu_with_features(&r.host),
        r.host
            .gpu
            .as_ref()
            .map(|g| format!(" · GPU: {g}"))
            .unwrap_or_default()
    );
    let params = format!("{:.2} M", m.parameters as f64 / 1e6);
    if r.runs.iter().any(|run| !throughput_rows(run).is_empty()) {
        let _ = writeln!(out, "| model | size | params | backend | test | t/s |");
        let _ = writeln!(out, "| ----- | ---: | -----: | ------- | ---: | --: |");
    }
    for run in &r.runs {
        for (test, s) in throughput_rows(run) {
            let _ = writeln!(
                out,
                "| {} | {} | {params} | {} | {test} | {} |",
                m.label(),
                mib(m.weights_bytes),
                run.backend,
                mean_pm(s)
            );
        }
    }
    let _ = writeln!(out, "\n| scenario | backend | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | ITL p99 ms | peak RSS | peak device | KV cache (formula) |");
    let _ = writeln!(out, "| -------- | ------- | ---------: | ---------: | --------: | --------: | --------: | -------: | ----------: | -----------------: |");
    let f = |s: &Option<Summary>, p: fn(&Summary) -> f64| {
        s.as_ref()
            .map_or("–".to_string(), |s| format!("{:.2}", p(s)))
    };
    for run in &r.runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) |",
            run.scenario,
            run.backend,
            f(&run.ttft_ms, |s| s.p50),
            f(&run.ttft_ms, |s| s.p95),
            f(&run.inter_token_ms, |s| s.p50),
            f(&run.inter_token_ms, |s| s.p95),
            f(&run.inter_token_ms, |s| s.p99),
            mib(run.peak_host_rss_bytes),
            if run.peak_device_bytes > 0 {
                mib(run.peak_device_bytes)
            } else {
                "–".into()
            },
            mib(run.kv_cache_bytes),
            mib(run.kv_cache_formula_bytes),
        );
    }
    sweep_table(&mut out, r);
    for p in &r.profiles {
        let _ = writeln!(
            out,
            "\nPer-op time on {} (launches per token: prefill {:.1}, decode {:.0}):\n\n| op | prefill ({} tokens) ms | decode step ms |\n| -- | --: | --: |",
            p.backend, p.prefill_launches_per_token, p.decode_launches_per_token, p.prefill_tokens
        );
        if p.prefill.is_empty() && p.decode.is_empty() {
            let _ = writeln!(out, "| (this backend has no per-op profiler yet) | | |");
            continue;
        }
        let mut ops: Vec<&str> = Vec::new();
        for o in p.prefill.iter().chain(&p.decode) {
            if !ops.contains(&o.op.as_str()) {
                ops.push(&o.op);
            }
        }
        for op in ops {
            let t = |list: &[crate::record::OpRecord]| {
                list.iter().find(|o| o.op == op).map_or(0.0, |o| o.total_ms)
            };
            let _ = writeln!(out, "| {op} | {:.3} | {:.3} |", t(&p.prefill), t(&p.decode));
        }
    }
    for p in &r.batch_profiles {
        let _ = writeln!(
            out,
            "\nPer-op time of one decode step of {} sequences ({} tokens deep) on {} ({} launches):\n\n| op | calls | ms |\n| -- | --: | --: |",
            p.sequences, p.depth, p.backend, p.launches
        );
        for o in &p.ops {
            let _ = writeln!(out, "| {} | {} | {:.3} |", o.op, o.calls, o.total_ms);
        }
        let total: f64 = p.ops.iter().map(|o| o.total_ms).sum();
        let _ = writeln!(out, "| total | | {total:.3} |");
    }
    let _ = writeln!(
        out,
        "\n{} iterations after {} warm-up · batch {} · ctx {}{}",
        r.settings.iterations,
        r.settings.warmup,
        r.settings.batch,
        r.settings.ctx,
        if m.synthetic {
            " · synthetic weights"
        } else {
            ""
        }
    );
    out
}

/// The concurrency sweep: one row per level and backend; energy reasons under the table.
fn sweep_table(out: &mut String, r: &Report) {
    let sweep: Vec<&RunRecord> = r
        .runs
        .iter()
        .filter(|run| run.aggregate_gen_tokens_per_s.is_some())
        .collect();
    if sweep.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nConcurrency sweep (each request: {} prompt + {} generated tokens; TTFT from submission):\n",
        sweep[0].prompt_tokens, sweep[0].gen_tokens
    );
    let _ = writeln!(out, "| backend | concurrency | aggregate gen t/s | decode-phase t/s | requests/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | J/token |");
    let _ = writeln!(out, "| ------- | ----------: | ----------------: | ---------------: | ---------: | ----------: | ----------: | ---------: | ---------: | ------: |");
    let f = |s: &Option<Summary>, p: fn(&Summary) -> f64| {
        s.as_ref()
            .map_or("–".to_string(), |s| format!("{:.2}", p(s)))
    };
    let mut reasons: Vec<String> = Vec::new();
    for run in &sweep {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {:.2} | {} | {} | {} | {} | {} |",
            run.backend,
            run.concurrency,
            run.aggregate_gen_tokens_per_s.unwrap_or(0.0),
            run.aggregate_decode_tokens_per_s
                .map_or("–".to_string(), |v| format!("{v:.1}")),
            run.requests_per_s.unwrap_or(0.0),
            f(&run.ttft_ms, |s| s.p50),
            f(&run.ttft_ms, |s| s.p99),
            f(&run.inter_token_ms, |s| s.p50),
            f(&run.inter_token_ms, |s| s.p99),
            run.energy_j_per_gen_token
                .map_or("–".to_string(), |j| format!("{j:.4}")),
        );
        if run.energy_j_per_gen_token.is_none() {
            let why = format!(
                "{}: {}",
                run.backend,
                run.energy_source.as_deref().unwrap_or("absent")
            );
            if !reasons.contains(&why) {
                reasons.push(why);
            }
        }
    }
    if !reasons.is_empty() {
        let _ = writeln!(out, "\nEnergy – {}", reasons.join("; "));
    }
}

/// `AMD EPYC (2 threads), avx512_vnni`: the CPU with the instruction set of its dot products.
fn cpu_with_features(h: &crate::host::Host) -> String {
    if h.cpu_features.is_empty() {
        h.cpu.clone()
    } else {
        format!("{}, {}", h.cpu, h.cpu_features)
    }
}

fn csv(r: &Report) -> String {
    let mut out = String::from(
        "scenario,backend,prompt_tokens,gen_tokens,depth,concurrency,metric,mean,stddev,min,max,p50,p95,p99\n",
    );
    for run in &r.runs {
        let metrics = [
            ("ttft_ms", &run.ttft_ms),
            ("prompt_tokens_per_s", &run.prompt_tokens_per_s),
            ("gen_tokens_per_s", &run.gen_tokens_per_s),
            ("inter_token_ms", &run.inter_token_ms),
            (
                "aggregate_gen_tokens_per_s",
                &Summary::of(&run.samples.aggregate_gen_tokens_per_s),
            ),
        ];
        for (name, s) in metrics {
            if let Some(s) = s {
                let _ = writeln!(
                    out,
                    "\"{}\",{},{},{},{},{},{name},{},{},{},{},{},{},{}",
                    run.scenario,
                    run.backend,
                    run.prompt_tokens,
                    run.gen_tokens,
                    run.depth,
                    run.concurrency,
                    s.mean,
                    s.stddev,
                    s.min,
                    s.max,
                    s.p50,
                    s.p95,
                    s.p99
                );
            }
        }
    }
    out
}
