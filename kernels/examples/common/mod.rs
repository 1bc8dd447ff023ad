//! Helpers the measurement examples share (a folder without `main.rs`, so Cargo does not take
//! it for an example of its own).
#![allow(dead_code)]

use std::time::Instant;

use cubecl::prelude::*;
use rocforge_kernels::ops::gpu::Gpu;
use rocforge_kernels::quant::quantize_row;
use rocforge_kernels::GgmlType;

/// Seconds per call of `f`, after a warm-up, over `iters` calls between two syncs.
pub fn time<R: Runtime>(gpu: &Gpu<R>, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    gpu.sync().expect("sync");
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.sync().expect("sync");
    t.elapsed().as_secs_f64() / iters as f64
}

/// Deterministic weights in [-1, 1), quantized to `ty`, row by row.
pub fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    use rayon::prelude::*;
    let rb = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
    let mut bytes = vec![0u8; rows * rb];
    bytes.par_chunks_mut(rb).enumerate().for_each(|(r, dst)| {
        let mut s = r as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
        let src: Vec<f32> = (0..cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        quantize_row(ty, &src, dst).expect("quantize");
    });
    bytes
}

/// The K-quant formats (no quantizer here: random quant bytes with small `f16` scales).
pub const K_QUANTS: [GgmlType; 3] = [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

/// Random blocks of a K-quant format; `d`/`dmin` set to small finite halves (random header
/// bytes could be inf or NaN, which does not change the speed but makes the output useless).
pub fn random_k_blocks(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut bytes: Vec<u8> = (0..rows * cols / bs * ts)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let small = half::f16::from_f32(0.01).to_le_bytes();
    // Q4_K/Q5_K: d and dmin at the block start; Q6_K: d at the end.
    let heads: &[usize] = if ty == GgmlType::Q6K {
        &[ts - 2]
    } else {
        &[0, 2]
    };
    for block in bytes.chunks_exact_mut(ts) {
        for &h in heads {
            block[h..h + 2].copy_from_slice(&small);
        }
    }
    bytes
}

/// Weights of any format for a speed measurement: quantized from deterministic values where
/// `quant::quantize_row` writes the format, random K-quant blocks otherwise.
pub fn any_weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    if K_QUANTS.contains(&ty) {
        random_k_blocks(ty, rows, cols)
    } else {
        weights(ty, rows, cols)
    }
}
