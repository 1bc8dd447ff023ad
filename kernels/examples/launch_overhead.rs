//! Where CubeCL 0.10's launch time goes: host time per launch of a kernel that does nothing,
//! with 1 and with 6 buffer arguments, measured as the time to enqueue N launches (host side)
//! and the time until the device has run them (enqueue + sync). The gap between the two and the
//! per-launch figure bound what a replayed graph can save (decode-replay issue).
//!
//! `cargo run --release -p rocforge-kernels --features cuda --example launch_overhead -- [N]`

use std::time::Instant;

use cubecl::prelude::*;

type R = cubecl::cuda::CudaRuntime;

#[cube(launch_unchecked)]
fn touch_one(out: &mut Array<f32>) {
    if ABSOLUTE_POS == 0 {
        out[0] += 1.0;
    }
}

#[cube(launch_unchecked)]
fn touch_six(
    a: &Array<f32>,
    b: &Array<f32>,
    c: &Array<f32>,
    d: &Array<f32>,
    e: &Array<f32>,
    out: &mut Array<f32>,
    n: u32,
) {
    if ABSOLUTE_POS == 0 {
        out[0] += a[0] + b[0] + c[0] + d[0] + e[0] + f32::cast_from(n);
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let client = R::client(&Default::default());
    let bufs: Vec<_> = (0..6)
        .map(|_| client.create_from_slice(f32::as_bytes(&[0.0f32; 64])))
        .collect();
    let arg = |i: usize| unsafe { ArrayArg::<R>::from_raw_parts(bufs[i].clone(), 64) };
    let sync = || cubecl::future::block_on(client.sync()).unwrap();
    for (name, six) in [("1 buffer", false), ("6 buffers + 1 scalar", true)] {
        for round in 0..2 {
            sync();
            let t0 = Instant::now();
            for i in 0..n {
                unsafe {
                    if six {
                        touch_six::launch_unchecked::<R>(
                            &client,
                            CubeCount::Static(1, 1, 1),
                            CubeDim::new_1d(32),
                            arg(0),
                            arg(1),
                            arg(2),
                            arg(3),
                            arg(4),
                            arg(5),
                            i as u32,
                        )
                    } else {
                        touch_one::launch_unchecked::<R>(
                            &client,
                            CubeCount::Static(1, 1, 1),
                            CubeDim::new_1d(32),
                            arg(5),
                        )
                    }
                }
            }
            let enqueue = t0.elapsed();
            sync();
            let total = t0.elapsed();
            if round == 1 {
                println!(
                    "{name}: {n} launches, enqueue {:.2} us/launch, enqueue + run {:.2} us/launch",
                    enqueue.as_secs_f64() * 1e6 / n as f64,
                    total.as_secs_f64() * 1e6 / n as f64
                );
            }
        }
    }
}
