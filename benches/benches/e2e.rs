//! Divan targets: prompt processing and token generation on the CPU backend, with tokens
//! counted through `ItemsCount` (so Divan prints tokens/s). Quick numbers while iterating on
//! a change; the full statistics, memory figures and JSON come from `cargo xtask bench`.
//!
//! The model: `$ROCFORGE_TEST_MODEL`, else the cached SmolLM2, else a synthetic one.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use divan::counter::ItemsCount;
use divan::Bencher;
use rocforge_bench::model_info;
use rocforge_bench::runner::{bench_tokens, prefill};
use rocforge_runtime::{BackendKind, BackendOptions, Model, Session};

fn main() {
    divan::main();
}

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/rocforge-bench/models");
            let (path, _) = model_info::resolve(None, &dir).expect("a benchmark model");
            Model::load(&path).expect("the benchmark model loads")
        })
        .clone()
}

fn cpu_session(ctx: usize) -> Session {
    Session::new(
        model(),
        BackendKind::Cpu,
        BackendOptions {
            ctx,
            max_batch: 512,
        },
    )
    .expect("CPU session")
}

/// `ppN`: one prompt of N tokens from an empty cache.
#[divan::bench(args = [32, 128], sample_count = 5, sample_size = 1)]
fn prompt_processing(bencher: Bencher, n: usize) {
    let mut session = cpu_session(n + 1);
    let tokens = bench_tokens(session.model().config.n_vocab, n, 1);
    bencher.counter(ItemsCount::new(n)).bench_local(|| {
        let backend = session.backend();
        prefill(backend, &tokens, 0).expect("prefill");
        backend.argmax().expect("argmax")
    });
}

/// `tgN`: N decode steps from an empty cache, each reading its token id back.
#[divan::bench(args = [16], sample_count = 5, sample_size = 1)]
fn token_generation(bencher: Bencher, n: usize) {
    let mut session = cpu_session(n + 1);
    let start = bench_tokens(session.model().config.n_vocab, 1, 2)[0];
    bencher.counter(ItemsCount::new(n)).bench_local(|| {
        let backend = session.backend();
        let mut last = start;
        for pos in 0..n {
            backend.forward(&[last], pos, false).expect("decode");
            last = backend.argmax().expect("argmax");
        }
        last
    });
}
