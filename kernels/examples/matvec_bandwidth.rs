//! Mat-vec bandwidth per weight format (the tuned `ops::matmul::matvec`, decode's kernel)
//! against a plain copy kernel, printed as a markdown table. Made for the H200 (shapes of Llama-3-8B: 4096x4096, 14336x4096, 4096x14336):
//!
//! ```text
//! cargo run --release -p rocforge-kernels --features cuda --example matvec_bandwidth
//! cargo run --release -p rocforge-kernels --features wgpu --example matvec_bandwidth -- --small
//! ```
//!
//! Options: `--iters N` (default 200), `--small` (512x512 and 1024x512, for a CPU adapter),
//! `--hbm-mib M` (default 256: how much distinct weight data each measurement walks),
//! `--formats q4_0,q8_0` (only these, by GGUF type name; default every format), `--shapes
//! 4096x14336` (rows x cols, comma-separated; default the three 8B shapes), `--stacked-only`
//! (no cycled or replayed row: one launch a pass, which a profiler can pick out by count).
//!
//! The H200's L2 holds about 60 MB, so one matrix run again and again would be served from
//! cache. Each format is measured two ways over distinct copies of the weight totalling at
//! least `--hbm-mib`, so that every read comes from HBM, as in a decode step over 32 layers:
//! - `cycled`: back-to-back launches, one per copy, round robin (a real decode step's pattern;
//!   a kernel that runs faster than the host can launch, about 5 us, reports the launch rate:
//!   the table marks calls under 10 us);
//! - `replayed` (CUDA and HIP): the cycled launches, one per copy at the matrix's own shape,
//!   captured once into a graph (`ops::graph`, decode's replay) and replayed: back-to-back
//!   launches with the host's launch time out of the figure. `x` is converted to halves once
//!   before the capture, so only the mat-vecs are timed;
//! - `stacked`: the copies stacked into one tall matrix, one launch per pass, time divided by
//!   the copies: the kernel's own bandwidth with the host's launch time out of the figure, on a
//!   launch of many more rows than the shape's (so a launch rule that depends on the row count,
//!   such as `api::whole_rows`, may pick another layout than decode's for this shape).
//! Times are wall time between two syncs. Shares are of the copy kernel's rate on a buffer of
//! the same total size and of 4.23 TB/s (the copy rate measured on the H200).

// Without a runtime to measure on, only `main`'s hint is compiled in.
#![cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]

use cubecl::prelude::*;
use rocforge_kernels::ops::dequant::DEVICE_FORMATS;
use rocforge_kernels::ops::gpu::Gpu;
use rocforge_kernels::ops::matmul::{launch_matvec, HalfActs, KernelFormat, Matvec, QWeight};
#[cfg(any(feature = "cuda", feature = "hip"))]
use rocforge_kernels::ops::{graph, launch};

mod common;
use common::{any_weights, time, K_QUANTS};

/// `out[i] = input[i]`, 16-byte vectors: the bandwidth a mat-vec should approach.
#[cube(launch_unchecked)]
fn copy_kernel<N: Size>(input: &Array<Vector<u32, N>>, out: &mut Array<Vector<u32, N>>) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        out[i] = input[i];
    }
}

/// HBM copy rate of the H200 (copy kernel, large buffers), the issue's reference.
const H200_COPY_GBS: f64 = 4230.0;

fn run<R: Runtime>(
    gpu: Gpu<R>,
    shapes: &[(usize, usize)],
    iters: usize,
    hbm_bytes: usize,
    formats: &[String],
    stacked_only: bool,
) {
    let client = gpu.client().clone();
    println!(
        "device: {} ({iters} calls per row, >= {} MiB of distinct weights per measurement)\n",
        R::name(&client),
        hbm_bytes >> 20
    );
    println!("| shape (rows x cols) | kernel | copies | bytes per call | us/call | GB/s | % of copy | % of 4.23 TB/s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    // Copy rate on a buffer as large as the walked weights: read + write of `hbm_bytes`.
    let words = hbm_bytes / 4;
    let (src, dst) = (
        client.create_from_slice(&vec![0u8; words * 4]),
        client.empty(words * 4),
    );
    let copy_s = time(&gpu, iters.min(50), || unsafe {
        copy_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::new_2d(
                ((words / 4).div_ceil(256) as u32).min(65535),
                ((words / 4).div_ceil(256 * 65535)) as u32,
            ),
            CubeDim::new_1d(256),
            4usize,
            ArrayArg::from_raw_parts(src.clone(), words / 4),
            ArrayArg::from_raw_parts(dst.clone(), words / 4),
        )
    });
    let copy_gbs = (2 * words * 4) as f64 / copy_s / 1e9;
    println!(
        "| {} MiB | copy | 1 | {} | {:.1} | {copy_gbs:.1} | 100 | {:.0} |",
        hbm_bytes >> 20,
        2 * words * 4,
        copy_s * 1e6,
        100.0 * copy_gbs / H200_COPY_GBS
    );
    drop((src, dst));
    let note = |s: f64| if s < 10e-6 { " (launch-bound)" } else { "" };
    // `x` as packed halves for the 32-weight formats, as decode runs them (its conversion is
    // one launch per call, timed with it); `ROCFORGE_MATVEC_X=f32` measures the f32 path.
    let max_cols = shapes.iter().map(|s| s.1).max().unwrap_or(0);
    let half = HalfActs::new(&client, max_cols);
    for &(rows, cols) in shapes {
        let x = gpu.f32s(&vec![0.5f32; cols]);
        for ty in DEVICE_FORMATS.into_iter().chain(K_QUANTS) {
            if !formats.is_empty() && !formats.contains(&ty.to_string().to_lowercase()) {
                continue;
            }
            let bytes_w = any_weights(ty, rows, cols);
            let copies = hbm_bytes.div_ceil(bytes_w.len()).max(1);
            let bytes = bytes_w.len() + cols * 4 + rows * 4;
            let row = |kernel: &str, s: f64, launches_per_call: bool| {
                let gbs = bytes as f64 / s / 1e9;
                println!(
                    "| {rows}x{cols} | {kernel} {ty} | {copies} | {bytes} | {:.1}{} | {gbs:.1} | {:.0} | {:.0} |",
                    s * 1e6,
                    if launches_per_call { note(s) } else { "" },
                    100.0 * gbs / copy_gbs,
                    100.0 * gbs / H200_COPY_GBS
                );
            };
            // The tuned mat-vec of `ops::matmul` (decode's kernel), where it reads the format.
            let Ok(first) = QWeight::upload(&client, ty, rows, cols, &bytes_w) else {
                continue;
            };
            let hx =
                if half.is_some() && KernelFormat::from_ggml(ty).is_some_and(|f| f.matvec_half()) {
                    " (half x)"
                } else {
                    ""
                };
            // Replayed and stacked: at least 20 passes. With 3 (what `--iters 100` gave a
            // 4096x4096 format of 29 copies) the two syncs' overhead sat in a 0.3 ms figure and
            // cut it by a third.
            let passes = (iters / copies).clamp(20, 200);
            if !stacked_only {
                let mut qs = vec![first];
                for _ in 1..copies {
                    qs.push(QWeight::upload(&client, ty, rows, cols, &bytes_w).expect("upload"));
                }
                let out = gpu.zeros(rows);
                let mut next = 0;
                let cycled = time(&gpu, iters, || {
                    let op = Matvec {
                        half: half.as_ref(),
                        ..Matvec::new(&qs[next % copies], x.handle(), out.handle())
                    };
                    launch_matvec(&client, &op).expect("matvec");
                    next += 1;
                });
                row(&format!("matvec cycled{hx}"), cycled, true);
                // `x` converted once (the last cycled call left it in this format's layout).
                let replayed = replay_time(&gpu, out.handle(), copies, passes, |i| {
                    let op = Matvec {
                        half: half.as_ref(),
                        half_ready: true,
                        ..Matvec::new(&qs[i], x.handle(), out.handle())
                    };
                    launch_matvec(&client, &op).expect("matvec");
                });
                match replayed {
                    Ok(s) => row(&format!("matvec replayed{hx}"), s, false),
                    Err(e) => eprintln!("{rows}x{cols} {ty}: no replayed row: {e}"),
                }
            } else {
                drop(first);
            }
            let tall = QWeight::upload(&client, ty, rows * copies, cols, &bytes_w.repeat(copies))
                .expect("upload");
            let tall_out = gpu.zeros(rows * copies);
            let stacked = time(&gpu, passes, || {
                let op = Matvec {
                    half: half.as_ref(),
                    ..Matvec::new(&tall, x.handle(), tall_out.handle())
                };
                launch_matvec(&client, &op).expect("matvec")
            }) / copies as f64;
            row(&format!("matvec stacked{hx}"), stacked, false);
        }
    }
}

/// Seconds per launch of `launch(0..copies)`, captured once into a CUDA or HIP graph and
/// replayed `passes` times after one warm-up replay (`io`: a buffer the graph writes, read to
/// wait for the replays). `Err` where graphs are not available (wgpu) or the launches cannot be
/// recorded.
#[cfg(any(feature = "cuda", feature = "hip"))]
fn replay_time<R: Runtime>(
    gpu: &Gpu<R>,
    io: &cubecl::server::Handle,
    copies: usize,
    passes: usize,
    mut launch: impl FnMut(usize),
) -> Result<f64, String> {
    let ((), rec) = launch::record(|| (0..copies).for_each(&mut launch));
    if let Some(why) = rec.unrecordable {
        return Err(why);
    }
    // One launch per copy: a launch that reached CubeCL directly would be missing.
    if rec.nodes.len() != copies {
        return Err(format!("{copies} launches recorded as {}", rec.nodes.len()));
    }
    let mut r = graph::replayer(gpu.client(), &[io])?;
    let g = r.capture(rec)?;
    // The graph reads buffers CubeCL wrote (weights, `x`): its stream must see them done.
    gpu.sync().map_err(|e| e.to_string())?;
    r.replay(g)?;
    r.read_u32(0)?;
    let t = std::time::Instant::now();
    for _ in 0..passes {
        r.replay(g)?;
    }
    r.read_u32(0)?;
    Ok(t.elapsed().as_secs_f64() / (passes * copies) as f64)
}

#[cfg(not(any(feature = "cuda", feature = "hip")))]
fn replay_time<R: Runtime>(
    _: &Gpu<R>,
    _: &cubecl::server::Handle,
    _: usize,
    _: usize,
    _: impl FnMut(usize),
) -> Result<f64, String> {
    Err("graph replay runs on CUDA and HIP".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--iters takes a number"))
        .unwrap_or(200);
    let hbm_mib: usize = args
        .iter()
        .position(|a| a == "--hbm-mib")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--hbm-mib takes a number"))
        .unwrap_or(256);
    let formats: Vec<String> = args
        .iter()
        .position(|a| a == "--formats")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(|f| f.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let parsed: Option<Vec<(usize, usize)>> = args
        .iter()
        .position(|a| a == "--shapes")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|s| {
                    let (r, c) = s.trim().split_once('x').expect("--shapes takes RxC,RxC");
                    let n = |t: &str| t.parse().expect("--shapes takes numbers");
                    (n(r), n(c))
                })
                .collect()
        });
    let shapes: &[(usize, usize)] = if let Some(p) = &parsed {
        p
    } else if args.iter().any(|a| a == "--small") {
        &[(512, 512), (1024, 512)]
    } else {
        &[(4096, 4096), (14336, 4096), (4096, 14336)]
    };
    let stacked_only = args.iter().any(|a| a == "--stacked-only");
    #[cfg(feature = "cuda")]
    return run(
        Gpu::<cubecl::cuda::CudaRuntime>::on(&Default::default()),
        shapes,
        iters,
        hbm_mib << 20,
        &formats,
        stacked_only,
    );
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    return run(
        Gpu::<cubecl::wgpu::WgpuRuntime>::on(&Default::default()),
        shapes,
        iters,
        hbm_mib << 20,
        &formats,
        stacked_only,
    );
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (shapes, iters, hbm_mib, formats, stacked_only);
        eprintln!("build with --features cuda (or wgpu)");
    }
}
