//! The result record: one `RunRecord` per scenario and backend with every raw sample, inside a
//! `Report` that carries the build commit, host, model and settings. Printers, the chart and
//! comparisons all read this one structure; `results.json` is its serialization.

use std::path::Path;

use crate::error::{io_err, BenchError, Result};
use crate::host::Host;
use crate::model_info::ModelInfo;
use crate::stats::Summary;

/// The `schema` value of `results.json`; bumped when a field changes meaning.
pub const SCHEMA: &str = "rocforge-bench/1";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub schema: String,
    /// When the run started (UTC, RFC 3339).
    pub created: String,
    pub git_commit: String,
    pub host: Host,
    pub model: ModelInfo,
    pub settings: Settings,
    pub runs: Vec<RunRecord>,
    /// Per-op timing of one prefill and one decode step, per backend.
    #[serde(default)]
    pub profiles: Vec<KernelProfile>,
}

/// The suite settings a report was made with.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub iterations: usize,
    pub warmup: usize,
    pub batch: usize,
    /// KV-cache capacity of every session (the largest scenario's need).
    pub ctx: usize,
    pub quick: bool,
}

/// One scenario on one backend.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub scenario: String,
    pub backend: String,
    /// The device, in words.
    pub device: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub depth: usize,
    /// Measured iterations (warm-up excluded).
    pub iterations: usize,
    pub warmup: usize,
    /// Prompt submitted to first generated token id on the host.
    pub ttft_ms: Option<Summary>,
    /// Time to run the prompt.
    pub prompt_ms: Option<Summary>,
    pub prompt_tokens_per_s: Option<Summary>,
    /// Time of the decode steps.
    pub gen_ms: Option<Summary>,
    pub gen_tokens_per_s: Option<Summary>,
    /// Latency of each decode step, over all steps of all iterations.
    pub inter_token_ms: Option<Summary>,
    /// Device memory in use at peak (allocator's figure; 0 on the CPU).
    pub peak_device_bytes: u64,
    pub peak_device_reserved_bytes: u64,
    /// Peak resident set of the suite process so far (VmHWM; monotonic over the suite).
    pub peak_host_rss_bytes: u64,
    /// KV cache as allocated by the backend.
    pub kv_cache_bytes: u64,
    /// 2 x layers x kv_heads x head_dim x ctx x element size, with the measured element size.
    pub kv_cache_formula_bytes: u64,
    pub kv_element_bytes: u64,
    /// Weight bytes the backend holds (mapped file on the CPU, device buffers on a GPU).
    pub weights_bytes: u64,
    pub scratch_bytes: u64,
    pub samples: Samples,
}

/// Raw samples, one per measured iteration (`inter_token_ms`: one per decode step).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Samples {
    pub ttft_ms: Vec<f64>,
    pub prompt_ms: Vec<f64>,
    pub prompt_tokens_per_s: Vec<f64>,
    pub gen_ms: Vec<f64>,
    pub gen_tokens_per_s: Vec<f64>,
    pub inter_token_ms: Vec<f64>,
}

impl Samples {
    /// The samples of a metric by its JSON name.
    pub fn get(&self, metric: &str) -> &[f64] {
        match metric {
            "ttft_ms" => &self.ttft_ms,
            "prompt_ms" => &self.prompt_ms,
            "prompt_tokens_per_s" => &self.prompt_tokens_per_s,
            "gen_ms" => &self.gen_ms,
            "gen_tokens_per_s" => &self.gen_tokens_per_s,
            "inter_token_ms" => &self.inter_token_ms,
            _ => &[],
        }
    }
}

/// Time per op family for one prefill and one decode step on one backend.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelProfile {
    pub backend: String,
    pub prefill_tokens: usize,
    pub prefill: Vec<OpRecord>,
    pub decode: Vec<OpRecord>,
    /// Kernel launches (CPU: parallel regions) per token.
    pub prefill_launches_per_token: f64,
    pub decode_launches_per_token: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpRecord {
    pub op: String,
    pub calls: u64,
    pub total_ms: f64,
}

impl Report {
    /// Reads and checks a `results.json`.
    pub fn load(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let bad = |problem: String| BenchError::BadResults {
            path: path.to_path_buf(),
            problem,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => return Err(bad(format!("schema `{other}`, expected `{SCHEMA}`"))),
            None => return Err(bad(format!("no `schema` field (expected `{SCHEMA}`)"))),
        }
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }

    /// Writes the report as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a report serializes");
        std::fs::write(path, text + "\n").map_err(io_err(path))
    }

    /// Finds a run.
    pub fn run(&self, scenario: &str, backend: &str) -> Option<&RunRecord> {
        self.runs
            .iter()
            .find(|r| r.scenario == scenario && r.backend == backend)
    }
}
