//! ROCforge's end-to-end benchmark suite, as a library: scenarios (chat, summarization, long
//! context, llama-bench's `pp512`/`tg128`, context depth), device-synchronized timing with
//! warm-up runs excluded, summary statistics, measured memory, per-op profiles, one result
//! record per run printed through interchangeable printers, an SVG chart, and comparison
//! against baselines or llama-bench.
//!
//! The `rocforge-bench` binary (`cargo xtask bench`) drives it; the Divan targets in
//! `benches/` reuse its runner and report tokens through `ItemsCount`.

pub mod chart;
pub mod compare;
pub mod config;
pub mod energy;
pub mod error;
pub mod host;
pub mod llama_bench;
pub mod memory;
pub mod model_info;
pub mod printers;
pub mod record;
pub mod runner;
pub mod stats;

pub use config::{BenchConfig, Scenario};
pub use error::{BenchError, Result};
pub use record::{Report, RunRecord, SCHEMA};
pub use stats::Summary;
