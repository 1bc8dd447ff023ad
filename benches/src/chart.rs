//! The SVG chart of a report: throughput (prompt and generation tokens/s) and latency
//! percentiles (TTFT and inter-token P50/P95/P99) per scenario, one bar per backend; and the
//! concurrency sweep's throughput-versus-latency curves.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{BenchError, Result};
use crate::record::{Report, RunRecord};
use crate::stats::Summary;

/// One bar series: a label and a value per category (scenario).
type Series = (String, Vec<Option<f64>>);

pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    draw(report, path).map_err(BenchError::Chart)
}

fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let mut scenarios: Vec<String> = Vec::new();
    let mut backends: Vec<String> = Vec::new();
    for r in &report.runs {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario.clone());
        }
        if !backends.contains(&r.backend) {
            backends.push(r.backend.clone());
        }
    }
    let value = |backend: &str, metric: fn(&RunRecord) -> Option<f64>| -> Vec<Option<f64>> {
        scenarios
            .iter()
            .map(|sc| report.run(sc, backend).and_then(metric))
            .collect()
    };
    let per_backend = |metric: fn(&RunRecord) -> Option<f64>| -> Vec<Series> {
        backends
            .iter()
            .map(|b| (b.clone(), value(b, metric)))
            .collect()
    };
    let percentiles = |field: fn(&RunRecord) -> Option<Summary>| -> Vec<Series> {
        let mut out = Vec::new();
        for b in &backends {
            let picks: [(&str, fn(&Summary) -> f64); 3] =
                [("p50", |s| s.p50), ("p95", |s| s.p95), ("p99", |s| s.p99)];
            for (name, pick) in picks {
                let values = scenarios
                    .iter()
                    .map(|sc| report.run(sc, b).and_then(field).map(|s| pick(&s)))
                    .collect();
                out.push((format!("{b} {name}"), values));
            }
        }
        out
    };

    let root = SVGBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let title = format!(
        "rocforge-bench · {} · {} · {}",
        report.model.label(),
        report.git_commit,
        report.created
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((2, 2));
    bar_panel(
        &panels[0],
        "prompt processing (tokens/s, mean)",
        &scenarios,
        &per_backend(|r| r.prompt_tokens_per_s.map(|s| s.mean)),
    )?;
    bar_panel(
        &panels[1],
        "generation (tokens/s, mean)",
        &scenarios,
        &per_backend(|r| r.gen_tokens_per_s.map(|s| s.mean)),
    )?;
    bar_panel(
        &panels[2],
        "time to first token (ms)",
        &scenarios,
        &percentiles(|r| r.ttft_ms),
    )?;
    bar_panel(
        &panels[3],
        "inter-token latency (ms)",
        &scenarios,
        &percentiles(|r| r.inter_token_ms),
    )?;
    root.present().map_err(|e| e.to_string())
}

/// Grouped bars: one group per category, one bar per series; x is in bar-width units.
fn bar_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    categories: &[String],
    series: &[Series],
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .cloned()
        .fold(0.0f64, f64::max);
    let group = series.len() as i32 + 1; // bars plus a gap
    let width = categories.len() as i32 * group;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0..width, 0.0..(max * 1.2).max(1e-9))
        .map_err(|e| err(&e))?;
    let label_at = |x: &i32| {
        let (i, j) = (x / group, x % group);
        if j == (group - 1) / 2 {
            categories.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(width as usize + 1)
        .x_label_formatter(&label_at)
        .y_labels(8)
        .draw()
        .map_err(|e| err(&e))?;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let bars = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as i32 * group + k as i32, v)));
        chart
            .draw_series(bars.map(|(x, v)| Rectangle::new([(x, 0.0), (x + 1, v)], color.filled())))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))
}

/// The concurrency sweep's chart: aggregate generated tokens/s (x) against inter-token
/// latency (y), one curve per backend and percentile (p50 solid, p99 thin), each point
/// labelled with its concurrency.
pub fn write_sweep_svg(report: &Report, path: &Path) -> Result<()> {
    draw_sweep(report, path).map_err(BenchError::Chart)
}

/// One level of a sweep: aggregate tokens/s, ITL p50 and p99 (ms), concurrency.
type SweepPoint = (f64, f64, f64, usize);
/// A curve of the sweep chart: its name, how it reads y from a point, its line width.
type Curve = (&'static str, fn(&SweepPoint) -> f64, u32);

fn draw_sweep(report: &Report, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut curves: Vec<(String, Vec<SweepPoint>)> = Vec::new();
    for r in &report.runs {
        let (Some(agg), Some(itl)) = (r.aggregate_gen_tokens_per_s, r.inter_token_ms) else {
            continue;
        };
        let point = (agg, itl.p50, itl.p99, r.concurrency);
        match curves.iter_mut().find(|(b, _)| *b == r.backend) {
            Some((_, pts)) => pts.push(point),
            None => curves.push((r.backend.clone(), vec![point])),
        }
    }
    for (_, pts) in &mut curves {
        pts.sort_by_key(|p| p.3);
    }
    let all = curves.iter().flat_map(|(_, p)| p.iter());
    let (x_max, y_max) = all.fold((0.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.2)));
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "throughput vs inter-token latency · {} · {} · {}",
        report.model.label(),
        report.git_commit,
        report.created
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..(x_max * 1.15).max(1e-9), 0.0..(y_max * 1.2).max(1e-9))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("aggregate generated tokens/s")
        .y_desc("inter-token latency (ms)")
        .draw()
        .map_err(|e| err(&e))?;
    for (k, (backend, pts)) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let picks: [Curve; 2] = [("p50", |p| p.1, 3), ("p99", |p| p.2, 1)];
        for (name, y, width) in picks {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, y(p))),
                    color.stroke_width(width),
                ))
                .map_err(|e| err(&e))?
                .label(format!("{backend} ITL {name}"))
                .legend(move |(x, yy)| {
                    PathElement::new(vec![(x, yy), (x + 16, yy)], color.stroke_width(width))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.0, y(p)), 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(pts.iter().map(|p| {
                Text::new(
                    format!("c{}", p.3),
                    (p.0, p.2),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
