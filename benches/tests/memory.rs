//! Memory figures are measured, and agree with the sizes they should have: the CPU KV cache
//! equals 2 x layers x kv_heads x head_dim x ctx x 4 bytes exactly, and the growth of the
//! process's peak resident set (VmHWM) over a run that fills the whole cache equals weights
//! + KV cache + scratch within 10 % + 8 MiB (allocator slack, thread stacks, the tokenizer).
//! Its own test binary, so no other test's allocations land in the measurement.

mod common;

use rocforge_bench::memory::{host_peak_rss_bytes, host_rss_bytes, kv_cache_formula_bytes};
use rocforge_bench::runner::{bench_tokens, prefill};
use rocforge_kernels::GgmlType;
use rocforge_runtime::synthetic::{writer, LlamaShape, SyntheticSpec};
use rocforge_runtime::{BackendKind, BackendOptions, Model, Session};

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn measured_memory_matches_weights_and_kv_cache() {
    let shape = LlamaShape {
        name: "memtest",
        n_layer: 8,
        n_embd: 512,
        n_head: 8,
        n_head_kv: 4,
        n_ff: 1536,
        n_vocab: 8192,
        n_ctx: 2048,
        rope_base: 10000,
    };
    let path = common::scratch("memory").join("memtest-q8_0.gguf");
    writer(&SyntheticSpec {
        shape,
        quant: GgmlType::Q8_0,
        output: None,
        seed: 7,
    })
    .write_file(&path)
    .unwrap();

    let before = host_rss_bytes();
    let model = Model::load(&path).unwrap();
    let ctx = 1024;
    let mut session = Session::new(
        model.clone(),
        BackendKind::Cpu,
        BackendOptions {
            ctx,
            max_batch: 256,
        },
    )
    .unwrap();
    let tokens = bench_tokens(model.config.n_vocab, ctx, 1);
    prefill(session.backend(), &tokens, 0).unwrap(); // touches every weight, writes every cache row
    session.backend().argmax().unwrap();
    let grown = host_peak_rss_bytes() - before;
    let m = session.memory();

    assert_eq!(
        m.kv_cache_bytes,
        kv_cache_formula_bytes(&model.config, ctx, 4)
    );
    assert_eq!(m.kv_cache_bytes, 2 * 8 * 4 * 64 * 1024 * 4);
    assert_eq!(m.weights_bytes, model.weights_bytes());
    let expected = (m.weights_bytes + m.kv_cache_bytes + m.scratch_bytes) as f64;
    let margin = 0.10 * expected + 8.0 * MIB;
    eprintln!(
        "peak RSS grew {:.1} MiB; weights {:.1} + KV {:.1} + scratch {:.1} = {:.1} MiB (margin ±{:.1} MiB)",
        grown as f64 / MIB,
        m.weights_bytes as f64 / MIB,
        m.kv_cache_bytes as f64 / MIB,
        m.scratch_bytes as f64 / MIB,
        expected / MIB,
        margin / MIB
    );
    assert!(
        (grown as f64 - expected).abs() <= margin,
        "RSS grew {grown} bytes, expected {expected} ± {margin}"
    );
}
