//! Runs scenarios on a backend and measures them.
//!
//! Timing is host wall clock around backend calls that end in a read to the host (the
//! argmax of the last token, one `u32`), so every figure is device-synchronized. The KV
//! cache is written at explicit positions: each iteration starts at the scenario's depth,
//! overwriting the previous iteration's entries, so a `@ d2048` cache is filled only once.

use std::time::Instant;

use rocforge_runtime::engine::{Engine, Event, Request};
use rocforge_runtime::{Backend, GenerateOptions, SamplerConfig, Session};

use crate::config::Scenario;
use crate::energy::{self, EnergyMeter};
use crate::error::{BenchError, Result};
use crate::memory::{self, PeakMemory};
use crate::record::{BatchProfile, KernelProfile, OpRecord, RunRecord, Samples};
use crate::stats::Summary;

/// Deterministic pseudo-random token ids below `n_vocab` (what llama-bench feeds too: speed
/// does not depend on which tokens they are).
pub fn bench_tokens(n_vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % n_vocab as u64) as u32
        })
        .collect()
}

/// Evaluates `tokens` at positions `pos..` in chunks of the backend's batch size; returns the
/// kernel launches (CPU: parallel regions) issued.
pub fn prefill(backend: &mut dyn Backend, tokens: &[u32], pos: usize) -> Result<u64> {
    let mut launches = 0;
    let batch = backend.max_batch();
    for (i, chunk) in tokens.chunks(batch).enumerate() {
        backend.forward(chunk, pos + i * batch, false)?;
        launches += backend.launches_last_forward();
    }
    Ok(launches)
}

/// The timings of one iteration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationTiming {
    /// Prompt submitted to its last logits on the device, synchronized by reading the first
    /// token id; this is also the time to first token.
    pub prompt_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    /// Each decode step: forward one token, read the next token id.
    pub inter_token_ms: Vec<f64>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// One iteration of `sc`: the cache already holds `sc.depth` tokens.
pub fn run_iteration(
    backend: &mut dyn Backend,
    sc: &Scenario,
    prompt: &[u32],
    start_token: u32,
) -> Result<IterationTiming> {
    let mut out = IterationTiming::default();
    let mut pos = sc.depth;
    let mut last = start_token;
    if !prompt.is_empty() {
        let t0 = Instant::now();
        prefill(backend, prompt, pos)?;
        last = backend.argmax()?;
        let elapsed = ms_since(t0);
        out.prompt_ms = Some(elapsed);
        out.ttft_ms = (sc.gen_tokens > 0).then_some(elapsed);
        pos += prompt.len();
    }
    out.inter_token_ms.reserve(sc.decode_steps());
    for _ in 0..sc.decode_steps() {
        let t = Instant::now();
        backend.forward(&[last], pos, false)?;
        last = backend.argmax()?;
        out.inter_token_ms.push(ms_since(t));
        pos += 1;
    }
    Ok(out)
}

/// Runs `warmup + iterations` iterations of `sc` on the session's backend and summarizes the
/// measured ones. `on_iteration(done)` reports progress.
pub fn run_scenario(
    session: &mut Session,
    sc: &Scenario,
    iterations: usize,
    warmup: usize,
    mut on_iteration: impl FnMut(usize),
) -> Result<RunRecord> {
    let model = session.model().clone();
    let config = &model.config;
    let capacity = session.capacity();
    if sc.context_needed() > capacity {
        return Err(BenchError::InvalidArgument(format!(
            "scenario `{}` needs {} cache positions, the session holds {capacity}",
            sc.name,
            sc.context_needed()
        )));
    }
    let (backend_name, device) = (
        session.backend_kind().name().to_string(),
        session.device_name(),
    );
    let prompt = bench_tokens(config.n_vocab, sc.prompt_tokens, 1);
    let start_token = bench_tokens(config.n_vocab, 1, 2)[0];
    let backend = session.backend();
    let mut peak = PeakMemory::default();
    peak.sample(backend.memory());
    if sc.depth > 0 {
        prefill(backend, &bench_tokens(config.n_vocab, sc.depth, 3), 0)?;
        backend.argmax()?;
    }
    let mut samples = Samples::default();
    for i in 0..warmup + iterations {
        let t = run_iteration(backend, sc, &prompt, start_token)?;
        peak.sample(backend.memory());
        on_iteration(i + 1);
        if i < warmup {
            continue;
        }
        if let Some(p) = t.prompt_ms {
            samples.prompt_ms.push(p);
            samples.prompt_tokens_per_s.push(rate(sc.prompt_tokens, p));
        }
        samples.ttft_ms.extend(t.ttft_ms);
        if !t.inter_token_ms.is_empty() {
            let gen_ms: f64 = t.inter_token_ms.iter().sum();
            samples.gen_ms.push(gen_ms);
            samples
                .gen_tokens_per_s
                .push(rate(t.inter_token_ms.len(), gen_ms));
            samples.inter_token_ms.extend(&t.inter_token_ms);
        }
    }
    let m = peak.last;
    let element = memory::kv_element_bytes(config, capacity, m.kv_cache_bytes).unwrap_or(4);
    Ok(RunRecord {
        scenario: sc.name.clone(),
        backend: backend_name,
        device,
        prompt_tokens: sc.prompt_tokens,
        gen_tokens: sc.gen_tokens,
        depth: sc.depth,
        iterations,
        warmup,
        ttft_ms: Summary::of(&samples.ttft_ms),
        prompt_ms: Summary::of(&samples.prompt_ms),
        prompt_tokens_per_s: Summary::of(&samples.prompt_tokens_per_s),
        gen_ms: Summary::of(&samples.gen_ms),
        gen_tokens_per_s: Summary::of(&samples.gen_tokens_per_s),
        inter_token_ms: Summary::of(&samples.inter_token_ms),
        peak_device_bytes: peak.device_in_use,
        peak_device_reserved_bytes: peak.device_reserved,
        peak_host_rss_bytes: memory::host_peak_rss_bytes(),
        kv_cache_bytes: m.kv_cache_bytes,
        kv_cache_formula_bytes: memory::kv_cache_formula_bytes(config, capacity, element as usize),
        kv_element_bytes: element,
        weights_bytes: m.weights_bytes,
        scratch_bytes: m.scratch_bytes,
        concurrency: 1,
        aggregate_gen_tokens_per_s: None,
        aggregate_decode_tokens_per_s: None,
        requests_per_s: None,
        energy_j_per_gen_token: None,
        energy_source: None,
        samples,
    })
}

/// The name of a sweep level's run: `pp128+tg128 @c8`.
pub fn sweep_run_name(sc: &Scenario, level: usize) -> String {
    format!("{} @c{level}", sc.name)
}

/// One level of the concurrency sweep: `level` requests of `sc` (distinct prompts, greedy,
/// end-of-generation ignored so each makes `sc.gen_tokens`) added to `engine` together and
/// run to completion, `warmup + iterations` times. Per request: TTFT (from submission, so
/// queueing behind the others' prefill counts) and every inter-token latency; per
/// iteration: generated tokens of all requests / wall time, and requests / wall time.
/// Energy is read around the measured iterations.
pub fn run_sweep_level(
    engine: &mut Engine,
    sc: &Scenario,
    level: usize,
    iterations: usize,
    warmup: usize,
    meter: &EnergyMeter,
    mut on_iteration: impl FnMut(usize),
) -> Result<RunRecord> {
    if level > engine.parallel() {
        return Err(BenchError::InvalidArgument(format!(
            "concurrency {level} needs {level} sequences at once; the {} engine runs {}",
            engine.backend_kind(),
            engine.parallel()
        )));
    }
    let model = engine.model().clone();
    let config = &model.config;
    let opts = GenerateOptions {
        max_tokens: sc.gen_tokens,
        sampler: SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
        stop_at_eog: false,
    };
    let prompts: Vec<Vec<u32>> = (0..level)
        .map(|r| bench_tokens(config.n_vocab, sc.prompt_tokens, 100 + r as u64))
        .collect();
    let mut peak = PeakMemory::default();
    peak.sample(engine.memory());
    let mut samples = Samples::default();
    let (mut rps, mut energy_start, mut generated) = (Vec::new(), None, 0usize);
    let mut decode_rates = Vec::new();
    for i in 0..warmup + iterations {
        if i == warmup {
            energy_start = meter.joules();
        }
        let t0 = Instant::now();
        for p in &prompts {
            engine.add(Request::new(p.clone(), opts.clone()))?;
        }
        let mut gens = Vec::with_capacity(level);
        engine.run(|e| {
            if let Event::Finished { generation, .. } = e {
                gens.push(generation.clone());
            }
        })?;
        let wall = t0.elapsed().as_secs_f64();
        peak.sample(engine.memory());
        on_iteration(i + 1);
        if i < warmup {
            continue;
        }
        let tokens: usize = gens.iter().map(|g| g.generated_tokens.len()).sum();
        generated += tokens;
        samples
            .aggregate_gen_tokens_per_s
            .push(tokens as f64 / wall.max(1e-9));
        rps.push(gens.len() as f64 / wall.max(1e-9));
        decode_rates.extend(decode_phase_rate(&gens, wall * 1000.0));
        for g in &gens {
            samples.ttft_ms.push(g.timings.ttft_ms);
            samples.inter_token_ms.extend(&g.timings.inter_token_ms);
        }
    }
    let energy = energy::per_token(energy_start, meter.joules(), generated);
    let m = peak.last;
    let capacity = engine.capacity();
    let element = memory::kv_element_bytes(config, capacity, m.kv_cache_bytes).unwrap_or(4);
    let mean = |v: &[f64]| Summary::of(v).map(|s| s.mean);
    Ok(RunRecord {
        scenario: sweep_run_name(sc, level),
        backend: engine.backend_kind().name().to_string(),
        device: engine.device_name(),
        prompt_tokens: sc.prompt_tokens,
        gen_tokens: sc.gen_tokens,
        depth: 0,
        iterations,
        warmup,
        ttft_ms: Summary::of(&samples.ttft_ms),
        prompt_ms: None,
        prompt_tokens_per_s: None,
        gen_ms: None,
        gen_tokens_per_s: None,
        inter_token_ms: Summary::of(&samples.inter_token_ms),
        peak_device_bytes: peak.device_in_use,
        peak_device_reserved_bytes: peak.device_reserved,
        peak_host_rss_bytes: memory::host_peak_rss_bytes(),
        kv_cache_bytes: m.kv_cache_bytes,
        kv_cache_formula_bytes: memory::kv_cache_formula_bytes(config, capacity, element as usize),
        kv_element_bytes: element,
        weights_bytes: m.weights_bytes,
        scratch_bytes: m.scratch_bytes,
        concurrency: level,
        aggregate_gen_tokens_per_s: mean(&samples.aggregate_gen_tokens_per_s),
        aggregate_decode_tokens_per_s: mean(&decode_rates),
        requests_per_s: mean(&rps),
        energy_j_per_gen_token: energy,
        energy_source: Some(meter.source()),
        samples,
    })
}

/// Tokens per second made after the last request's first token, until the end (`wall_ms`
/// after the common submission): each token's time is its request's TTFT plus its gaps.
/// `None` when nothing was made after that instant.
pub fn decode_phase_rate(gens: &[rocforge_runtime::Generation], wall_ms: f64) -> Option<f64> {
    let start = gens
        .iter()
        .map(|g| g.timings.ttft_ms)
        .fold(0.0f64, f64::max);
    let mut tokens = 0usize;
    for g in gens {
        let mut at = g.timings.ttft_ms;
        for gap in &g.timings.inter_token_ms {
            at += gap;
            if at > start {
                tokens += 1;
            }
        }
    }
    let span = wall_ms - start;
    (tokens > 0 && span > 0.0).then(|| tokens as f64 * 1000.0 / span)
}

fn rate(tokens: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        tokens as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// Times one prefill of `prefill_tokens` and one decode step per op family (the backend's
/// profiler; on a GPU it synchronizes after every op, so these runs are not the timed ones).
pub fn profile(session: &mut Session, prefill_tokens: usize) -> Result<KernelProfile> {
    let n_vocab = session.model().config.n_vocab;
    let prefill_tokens = prefill_tokens.clamp(1, session.capacity().saturating_sub(1).max(1));
    let backend_name = session.backend_kind().name().to_string();
    let backend = session.backend();
    let ops = |b: &dyn Backend| {
        b.op_profile()
            .into_iter()
            .map(|o| OpRecord {
                op: o.op,
                calls: o.calls,
                total_ms: o.total_ms,
            })
            .collect()
    };

    backend.set_profiling(true);
    let launches = prefill(backend, &bench_tokens(n_vocab, prefill_tokens, 4), 0)?;
    let next = backend.argmax()?;
    let prefill_ops = ops(backend);
    backend.set_profiling(true); // clears
    backend.forward(&[next], prefill_tokens, false)?;
    backend.argmax()?;
    let decode_ops = ops(backend);
    let decode_launches = backend.launches_last_forward();
    backend.set_profiling(false);
    Ok(KernelProfile {
        backend: backend_name,
        prefill_tokens,
        prefill: prefill_ops,
        decode: decode_ops,
        prefill_launches_per_token: launches as f64 / prefill_tokens as f64,
        decode_launches_per_token: decode_launches as f64,
    })
}

/// Times one decode step of `level` sequences of `sc` per op family: `level` requests are
/// added and stepped until each has its first token (every prompt in the cache), then one
/// step runs with the backend's profiler on; the requests are then cancelled.
pub fn profile_sweep_step(
    engine: &mut Engine,
    sc: &Scenario,
    level: usize,
) -> Result<BatchProfile> {
    let n_vocab = engine.model().config.n_vocab;
    let opts = GenerateOptions {
        max_tokens: sc.gen_tokens.max(2),
        sampler: SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
        stop_at_eog: false,
    };
    let mut ids = Vec::with_capacity(level);
    for r in 0..level {
        let prompt = bench_tokens(n_vocab, sc.prompt_tokens, 100 + r as u64);
        ids.push(engine.add(Request::new(prompt, opts.clone()))?);
    }
    let mut started = std::collections::HashSet::new();
    while started.len() < level && !engine.is_idle() {
        for e in engine.step()? {
            if let Event::Token { id, .. } = e {
                started.insert(id);
            }
        }
    }
    engine.set_profiling(true);
    engine.step()?;
    let ops = engine
        .op_profile()
        .into_iter()
        .map(|o| OpRecord {
            op: o.op,
            calls: o.calls,
            total_ms: o.total_ms,
        })
        .collect();
    let launches = engine.launches_last_step();
    engine.set_profiling(false);
    for id in ids {
        engine.cancel(id);
    }
    engine.run(|_| {})?;
    Ok(BatchProfile {
        backend: engine.backend_kind().name().to_string(),
        sequences: level,
        depth: sc.prompt_tokens,
        ops,
        launches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocforge_runtime::{Generation, StopReason, Timings};

    fn gen(ttft_ms: f64, gaps: &[f64]) -> Generation {
        Generation {
            prompt_tokens: vec![1],
            generated_tokens: vec![2; gaps.len() + 1],
            text: String::new(),
            stop_reason: StopReason::MaxTokens,
            timings: Timings {
                ttft_ms,
                inter_token_ms: gaps.to_vec(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn decode_phase_counts_tokens_after_the_last_first_token() {
        // First tokens at 10 and 30 ms; tokens at 20, 30 | 40, 50 and 40, 50: four after 30 ms,
        // over the 20 ms from 30 to the end at 50.
        let gens = [
            gen(10.0, &[10.0, 10.0, 10.0, 10.0]),
            gen(30.0, &[10.0, 10.0]),
        ];
        assert_eq!(decode_phase_rate(&gens, 50.0), Some(200.0));
        assert_eq!(decode_phase_rate(&[gen(10.0, &[])], 10.0), None);
    }
}
