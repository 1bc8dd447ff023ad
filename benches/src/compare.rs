//! Compares two reports metric by metric, on medians of the raw samples, and decides what
//! regressed: a metric regresses when its median is worse by more than the threshold (5 %
//! by default) *and* by more than the noise, `noise_sigmas` standard errors of the two
//! medians combined (estimated from the samples; skipped when a side has one sample).

use std::fmt::Write;

use crate::record::{Report, RunRecord};
use crate::stats::Summary;

/// When a change counts.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Relative change of a median that counts as a regression (0.05 = 5 %).
    pub regression: f64,
    /// How many combined standard errors a change must exceed to be more than noise.
    pub noise_sigmas: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            regression: 0.05,
            noise_sigmas: 2.0,
        }
    }
}

/// The compared metrics and whether higher is better.
pub const METRICS: [(&str, bool); 5] = [
    ("ttft_ms", false),
    ("prompt_tokens_per_s", true),
    ("gen_tokens_per_s", true),
    ("inter_token_ms", false),
    ("aggregate_gen_tokens_per_s", true),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Improved,
    Unchanged,
    /// Worse by more than the threshold, but within the noise of the samples.
    Noisy,
    Regressed,
    /// In the old report, absent from the new one.
    Missing,
}

/// One metric of one run, old against new.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    pub scenario: String,
    pub backend: String,
    pub metric: &'static str,
    pub old_p50: f64,
    pub new_p50: f64,
    /// Relative change of the median, (new - old) / old.
    pub change: f64,
    /// The same, signed so that positive is worse.
    pub worse_by: f64,
    /// Relative change the noise could explain.
    pub noise: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub changes: Vec<Change>,
    pub threshold: f64,
}

impl Comparison {
    pub fn regressions(&self) -> impl Iterator<Item = &Change> {
        self.changes
            .iter()
            .filter(|c| c.verdict == Verdict::Regressed)
    }
    pub fn passed(&self) -> bool {
        self.regressions().next().is_none()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| scenario | backend | metric | old p50 | new p50 | change | noise | verdict |\n",
        );
        out.push_str(
            "| -------- | ------- | ------ | ------: | ------: | -----: | ----: | ------- |\n",
        );
        for c in &self.changes {
            let verdict = match c.verdict {
                Verdict::Improved => "better",
                Verdict::Unchanged => "same",
                Verdict::Noisy => "noise",
                Verdict::Regressed => "REGRESSED",
                Verdict::Missing => "missing in new",
            };
            let (new, change) = if c.verdict == Verdict::Missing {
                ("–".to_string(), "–".to_string())
            } else {
                (
                    format!("{:.3}", c.new_p50),
                    format!("{:+.1} %", 100.0 * c.change),
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.3} | {new} | {change} | ±{:.1} % | {verdict} |",
                c.scenario,
                c.backend,
                c.metric,
                c.old_p50,
                100.0 * c.noise
            );
        }
        let n = self.regressions().count();
        let _ = writeln!(
            out,
            "\n{} (threshold {:.1} % on medians)",
            if n == 0 {
                "no regressions".to_string()
            } else {
                format!("{n} regression(s)")
            },
            100.0 * self.threshold
        );
        out
    }
}

/// Standard error of a median, relative to it: about 1.25 σ/√n for near-normal samples.
fn median_rel_se(samples: &[f64]) -> Option<f64> {
    let s = Summary::of(samples)?;
    (samples.len() >= 2 && s.p50 != 0.0)
        .then(|| 1.2533 * s.stddev / (samples.len() as f64).sqrt() / s.p50.abs())
}

fn compare_metric(
    old: &RunRecord,
    new: &RunRecord,
    metric: &'static str,
    higher_better: bool,
    th: Thresholds,
) -> Option<Change> {
    let (os, ns) = (old.samples.get(metric), new.samples.get(metric));
    let old_p50 = Summary::of(os)?.p50;
    let new_p50 = Summary::of(ns).map_or(f64::NAN, |s| s.p50);
    let rel = if old_p50 != 0.0 {
        (new_p50 - old_p50) / old_p50.abs()
    } else {
        0.0
    };
    let worse_by = if higher_better { -rel } else { rel };
    let noise = match (median_rel_se(os), median_rel_se(ns)) {
        (Some(a), Some(b)) => th.noise_sigmas * (a * a + b * b).sqrt(),
        _ => 0.0,
    };
    let verdict = if new_p50.is_nan() {
        Verdict::Missing
    } else if worse_by > th.regression {
        if worse_by > noise {
            Verdict::Regressed
        } else {
            Verdict::Noisy
        }
    } else if -worse_by > th.regression && -worse_by > noise {
        Verdict::Improved
    } else {
        Verdict::Unchanged
    };
    Some(Change {
        scenario: old.scenario.clone(),
        backend: old.backend.clone(),
        metric,
        old_p50,
        new_p50,
        change: rel,
        worse_by,
        noise,
        verdict,
    })
}

/// Compares every run of `old` with the same scenario and backend in `new`.
pub fn compare(old: &Report, new: &Report, th: Thresholds) -> Comparison {
    let mut changes = Vec::new();
    for o in &old.runs {
        let missing = RunRecord {
            samples: Default::default(),
            ..o.clone()
        };
        let n = new.run(&o.scenario, &o.backend).unwrap_or(&missing);
        for (metric, higher_better) in METRICS {
            changes.extend(compare_metric(o, n, metric, higher_better, th));
        }
    }
    Comparison {
        changes,
        threshold: th.regression,
    }
}
