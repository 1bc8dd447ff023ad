//! llama-bench results (`llama-bench -o json`, or `-o jsonl`) beside ROCforge's, test by test
//! (`pp512`, `tg128`, `tg128 @ d2048`).

use std::fmt::Write;
use std::path::Path;

use crate::error::{io_err, BenchError, Result};
use crate::printers::{mean_pm, throughput_rows};
use crate::record::Report;

/// The fields of a llama-bench record this comparison reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LlamaBenchRecord {
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub model_n_params: u64,
    #[serde(default)]
    pub backends: String,
    #[serde(default)]
    pub build_commit: String,
    pub n_prompt: u64,
    pub n_gen: u64,
    #[serde(default)]
    pub n_depth: u64,
    pub avg_ts: f64,
    #[serde(default)]
    pub stddev_ts: f64,
}

impl LlamaBenchRecord {
    /// llama-bench's test name: `pp512`, `tg128`, `pp512+tg128`, with ` @ dN`.
    pub fn test_name(&self) -> String {
        let base = match (self.n_prompt, self.n_gen) {
            (p, 0) => format!("pp{p}"),
            (0, g) => format!("tg{g}"),
            (p, g) => format!("pp{p}+tg{g}"),
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }
}

/// Reads a llama-bench JSON array (or JSON lines).
pub fn load(path: &Path) -> Result<Vec<LlamaBenchRecord>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |problem: String| BenchError::BadLlamaBench {
        path: path.to_path_buf(),
        problem,
    };
    let records: Vec<LlamaBenchRecord> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?
    };
    if records.is_empty() {
        return Err(bad("no records".into()));
    }
    Ok(records)
}

/// A markdown table: each llama-bench test beside ROCforge's runs of the same test.
pub fn side_by_side(records: &[LlamaBenchRecord], report: &Report) -> String {
    let mut out = String::new();
    let first = &records[0];
    let _ = writeln!(
        out,
        "llama.cpp: {} ({} params, build {})",
        first.model_type, first.model_n_params, first.build_commit
    );
    let _ = writeln!(
        out,
        "ROCforge:  {} ({} params, commit {})",
        report.model.label(),
        report.model.parameters,
        report.git_commit
    );
    let (a, b) = (first.model_n_params as f64, report.model.parameters as f64);
    if a > 0.0 && (a - b).abs() / a > 0.01 {
        let _ = writeln!(
            out,
            "warning: the parameter counts differ; these may not be the same model"
        );
    }
    let _ = writeln!(out, "\n| test | llama.cpp backend | llama.cpp t/s | ROCforge backend | ROCforge t/s | ROCforge / llama.cpp |");
    let _ = writeln!(out, "| ---- | ----------------- | ------------: | ---------------- | -----------: | -------------------: |");
    for rec in records {
        let test = rec.test_name();
        let ours: Vec<_> = report
            .runs
            .iter()
            .flat_map(|run| {
                throughput_rows(run)
                    .into_iter()
                    .filter(|(name, _)| *name == test)
                    .map(move |(_, s)| (run.backend.as_str(), s))
            })
            .collect();
        let theirs = format!("{:.2} ± {:.2}", rec.avg_ts, rec.stddev_ts);
        if ours.is_empty() {
            let _ = writeln!(out, "| {test} | {} | {theirs} | – | – | – |", rec.backends);
        }
        for (backend, s) in ours {
            let _ = writeln!(
                out,
                "| {test} | {} | {theirs} | {backend} | {} | {:.2}x |",
                rec.backends,
                mean_pm(s),
                s.mean / rec.avg_ts
            );
        }
    }
    out
}
