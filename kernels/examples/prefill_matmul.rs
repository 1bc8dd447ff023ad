//! Measures cubek's prefill mat-mat on Llama-3-8B-shaped projections, per element type and
//! strategy, to choose the prefill path by measurement: `Y[M, N] = X[M, K] · W[N, K]ᵀ` with `W`
//! read as the column-major `[K, N]` right operand (how `ops::matmul` lays out its dequantized
//! scratch). Prints TFLOP/s per (shape, types, strategy); a strategy that refuses the problem
//! prints why.
//!
//! `cargo run --release -p rocforge-kernels --features cuda --example prefill_matmul -- [M ...]`

use std::marker::PhantomData;
use std::time::Instant;

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek::matmul::definition::MatmulElems;
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::std::InputBinding;

type R = cubecl::cuda::CudaRuntime;

/// (N, K) of the 8B shape's projections: q, fused qkv, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)];

fn elems(input: StorageType, acc: StorageType) -> MatmulElems {
    MatmulElems {
        lhs_global: input,
        rhs_global: input,
        acc_global: acc,
        lhs_stage: input,
        rhs_stage: input,
        acc_stage: acc,
        lhs_register: input,
        rhs_register: input,
        acc_register: acc,
    }
}

fn strategies() -> Vec<(&'static str, Strategy)> {
    vec![
        ("Auto", Strategy::Auto),
        (
            "SimpleCyclicCmma",
            Strategy::SimpleCyclicCmma(Default::default()),
        ),
        (
            "SimpleCyclicMma",
            Strategy::SimpleCyclicMma(Default::default()),
        ),
        (
            "DoubleCyclicCmma",
            Strategy::DoubleCyclicCmma(Default::default()),
        ),
        (
            "DoubleCyclicMma",
            Strategy::DoubleCyclicMma(Default::default()),
        ),
        (
            "DoubleTilewiseMma",
            Strategy::DoubleTilewiseMma(Default::default()),
        ),
        (
            "DoubleHybridMma",
            Strategy::DoubleHybridMma(Default::default()),
        ),
        (
            "OrderedDoubleMma",
            Strategy::OrderedDoubleMma(Default::default()),
        ),
        ("SimpleTmaMma", Strategy::SimpleTmaMma(Default::default())),
        ("DoubleTmaMma", Strategy::DoubleTmaMma(Default::default())),
        (
            "SpecializedTmaMma",
            Strategy::SpecializedTmaMma(Default::default()),
        ),
        (
            "SpecializedCyclicMma",
            Strategy::SpecializedCyclicMma(Default::default()),
        ),
    ]
}

fn binding(h: &Handle, shape: [usize; 2], strides: [usize; 2]) -> TensorBinding<R> {
    TensorBinding::<R> {
        handle: h.clone().binding(),
        shape: shape.to_vec().into(),
        strides: strides.to_vec().into(),
        runtime: PhantomData,
    }
}

fn main() {
    let ms: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ms = if ms.is_empty() { vec![512, 2048] } else { ms };
    let client = R::client(&Default::default());
    let f32_t = f32::as_type_native_unchecked().storage_type();
    let f16_t = half::f16::as_type_native_unchecked().storage_type();
    let bf16_t = half::bf16::as_type_native_unchecked().storage_type();
    let max_elems = ms.iter().max().unwrap() * 14336 + 14336 * 4096;
    // One buffer per element type, large enough for any operand; values in [-1, 1).
    let vals: Vec<f32> = (0..max_elems)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect();
    let buf32 = client.create_from_slice(f32::as_bytes(&vals));
    let v16: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
    let buf16 = client.create_from_slice(bytemuck::cast_slice(&v16));
    let vb16: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let bufb16 = client.create_from_slice(bytemuck::cast_slice(&vb16));
    let out = client.empty(ms.iter().max().unwrap() * 14336 * 4);
    let rhs_off = |buf: &Handle, bytes: usize, m: usize, k: usize| {
        buf.clone().offset_start((m * k * bytes) as u64)
    };
    println!("| M | N x K | inputs | strategy | ms | TFLOP/s |");
    println!("|---:|---|---|---|---:|---:|");
    for &m in &ms {
        for &(n, k) in &SHAPES {
            for (tname, buf, ty, bytes) in [
                ("f32 (tf32)", &buf32, f32_t, 4),
                ("f16", &buf16, f16_t, 2),
                ("bf16", &bufb16, bf16_t, 2),
            ] {
                for (sname, strategy) in strategies() {
                    if tname.starts_with("f32") && sname != "Auto" {
                        continue;
                    }
                    let run = || {
                        let lhs = InputBinding::Normal(binding(buf, [m, k], [k, 1]), ty);
                        let rhs = InputBinding::Normal(
                            binding(&rhs_off(buf, bytes, m, k), [k, n], [1, k]),
                            ty,
                        );
                        let mut dtypes = elems(ty, f32_t);
                        launch_ref(
                            &strategy,
                            &client,
                            lhs,
                            rhs,
                            binding(&out, [m, n], [n, 1]),
                            &mut dtypes,
                        )
                    };
                    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
                    match first {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            println!(
                                "| {m} | {n} x {k} | {tname} | {sname} | refused: {} | |",
                                format!("{e:?}").chars().take(80).collect::<String>()
                            );
                            continue;
                        }
                        Err(_) => {
                            println!("| {m} | {n} x {k} | {tname} | {sname} | panicked | |");
                            continue;
                        }
                    }
                    cubecl::future::block_on(client.sync()).unwrap();
                    let iters = 10;
                    let t = Instant::now();
                    for _ in 0..iters {
                        let _ = run();
                    }
                    cubecl::future::block_on(client.sync()).unwrap();
                    let ms_each = t.elapsed().as_secs_f64() * 1000.0 / iters as f64;
                    let tflops = 2.0 * (m * n * k) as f64 / (ms_each / 1000.0) / 1e12;
                    println!(
                        "| {m} | {n} x {k} | {tname} | {sname} | {ms_each:.3} | {tflops:.1} |"
                    );
                }
            }
        }
    }
}
