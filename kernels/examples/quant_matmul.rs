//! The batched mat-mat (`ops::matmul::matmul` above `MAX_MATVEC_TOKENS` tokens) on the shapes
//! of Llama-3-8B, printed as a markdown table: the quantized mat-mat on the matrix units
//! (`launch_mma`, every tile of `catalog::mma_configs`) against the dequantize pass + cubek
//! (`matmul_dequantized`), in ms per call and TFLOP/s. Made for the H200:
//!
//! ```text
//! cargo run --release -p rocforge-kernels --features cuda --example quant_matmul -- 16 64 512
//! ```
//!
//! Arguments: token counts (default 16 64 512); `--formats q4_0,q4_k` (default those two; any
//! format, K-quants as random blocks);
//! `--iters N` (default 50); `--tiles pm,pn,fm,fn;...` (tiles beyond the launched ones);
//! `--splits 1,2,4` (column splits to time beside `mma_splits`' choice, the `/sN` rows);
//! `--shape NxK,...` (these shapes instead); `--only` (the `--tiles` alone, no baseline: for
//! `ncu` runs); `--copies N` (N uploads of each weight, called in turn, so that reads come from
//! HBM as in a decode step rather than from L2).
//! Times are wall time between two syncs over back-to-back calls
//! on one weight (an 8B layer matrix of 4-10 MB stays in L2 at these sizes: this measures
//! the kernels' compute side; decode-step totals come from `rocforge-bench`).

use cubecl::prelude::*;
use rocforge_kernels::ops::gpu::Gpu;
use rocforge_kernels::ops::matmul::{self as mm, catalog, DequantScratch, KernelFormat, QWeight};

mod common;
use common::{any_weights, time};

type R = cubecl::cuda::CudaRuntime;

/// Llama-3-8B's layer matrices (rows x cols): fused QKV, attention output, gate (= up), down.
const SHAPES: [(usize, usize); 4] = [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let iters: usize = opt("--iters").and_then(|v| v.parse().ok()).unwrap_or(50);
    let formats: Vec<KernelFormat> = opt("--formats")
        .unwrap_or_else(|| "q4_0,q4_k".into())
        .split(',')
        .map(|n| {
            KernelFormat::ALL
                .into_iter()
                .find(|f| f.ggml().name().eq_ignore_ascii_case(n.trim()))
                .unwrap_or_else(|| panic!("unknown format {n}"))
        })
        .collect();
    let mut skip = false;
    let ms: Vec<usize> = args
        .iter()
        .filter(|a| {
            let s = skip;
            skip = a.starts_with("--");
            !s && !a.starts_with("--")
        })
        .filter_map(|a| a.parse().ok())
        .collect();
    let ms = if ms.is_empty() { vec![16, 64, 512] } else { ms };
    // `--tiles 2,4,1,1;4,2,1,1,128`: more tiles (planes and fragments along tokens and rows,
    // columns per step, default 256).
    let extra: Vec<[u32; 5]> = opt("--tiles")
        .map(|v| {
            v.split(';')
                .filter_map(|t| {
                    let p: Vec<u32> = t.split(',').filter_map(|n| n.parse().ok()).collect();
                    matches!(p.len(), 4 | 5)
                        .then(|| [p[0], p[1], p[2], p[3], p.get(4).copied().unwrap_or(256)])
                })
                .collect()
        })
        .unwrap_or_default();
    let splits: Vec<u32> = opt("--splits")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    // `--shape 1536x576,576x1536`: other weight shapes (SmolLM2's, say) instead of the 8B's.
    let shapes: Vec<(usize, usize)> = opt("--shape").map_or(SHAPES.to_vec(), |v| {
        v.split(',')
            .filter_map(|t| {
                let (n, k) = t.split_once('x')?;
                Some((n.trim().parse().ok()?, k.trim().parse().ok()?))
            })
            .collect()
    });
    let only = args.iter().any(|a| a == "--only");
    // `--copies N`: N uploads of each weight, called in turn (the L2 holds about 60 MB: a
    // decode step streams its weights from HBM, one weight called again and again does not).
    let copies: usize = opt("--copies")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let gpu = Gpu::<R>::new(R::client(&Default::default()));
    let client = gpu.client();
    let max_m = *ms.iter().max().unwrap();
    let widest = shapes.iter().map(|&(n, k)| n.max(k)).max().unwrap_or(1);
    let x = client.create_from_slice(f32::as_bytes(
        &(0..max_m * widest)
            .map(|i| ((i * 31 % 997) as f32 / 498.5) - 1.0)
            .collect::<Vec<_>>(),
    ));
    let y = client.empty(max_m * widest * 4);
    let scratch = DequantScratch::new(
        client,
        shapes.iter().map(|&(n, k)| n * k).max().unwrap_or(1),
    );
    let plane = match mm::prefill_kernel(client, 64) {
        mm::PrefillKernel::Mma(cfg) => cfg.plane,
        mm::PrefillKernel::Dequantize => panic!("this device has no f16 cmma"),
    };
    println!("| format | M | N x K | kernel | ms | TFLOP/s |");
    println!("|---|---:|---|---|---:|---:|");
    for &fmt in &formats {
        for &(n, k) in &shapes {
            let bytes = any_weights(fmt.ggml(), n, k);
            let ws: Vec<_> = (0..copies)
                .map(|_| QWeight::upload(client, fmt.ggml(), n, k, &bytes).expect("upload"))
                .collect();
            let w = &ws[0];
            // Each call takes the next copy, so with enough copies every read comes from HBM.
            let mut turn = 0usize;
            let mut next = || {
                turn += 1;
                &ws[turn % copies]
            };
            for &m in &ms {
                let flop = 2.0 * (m * n * k) as f64;
                let row = |name: String, s: f64| {
                    println!(
                        "| {} | {m} | {n} x {k} | {name} | {:.3} | {:.1} |",
                        fmt.ggml().name(),
                        s * 1e3,
                        flop / s / 1e12
                    )
                };
                if !only {
                    let s = time(&gpu, iters, || {
                        mm::matmul_dequantized(client, next(), &x, &y, m, Some(&scratch))
                            .expect("mm")
                    });
                    row("dequantize + cubek".into(), s);
                }
                let mut cfgs = if only {
                    Vec::new()
                } else {
                    catalog::mma_configs(plane)
                };
                cfgs.extend(extra.iter().map(|&t| mm::MmaConfig::from_tile(plane, t)));
                // Wide or slot-per-load staging as the runtime picks it.
                let wide = mm::mma_wide(m, fmt);
                for cfg in cfgs.into_iter().map(|c| mm::MmaConfig { wide, ..c }) {
                    let s = time(&gpu, iters, || {
                        mm::launch_mma(client, next(), &x, &y, m, cfg).expect("mma");
                    });
                    let auto = mm::mma_splits(client, w, m, cfg);
                    row(format!("mma {} (s{auto})", catalog::mma_tag(cfg)), s);
                    for &n in &splits {
                        let s = time(&gpu, iters, || {
                            mm::launch_mma_split(client, next(), &x, &y, m, cfg, n).expect("mma");
                        });
                        row(format!("mma {} /s{n}", catalog::mma_tag(cfg)), s);
                    }
                }
            }
        }
    }
}
