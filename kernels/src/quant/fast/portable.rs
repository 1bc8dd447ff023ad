//! Portable row dot products: ggml's generic `ggml_vec_dot_*` (integer sums per block, one
//! float multiply-add per block), written over fixed-size arrays so LLVM can vectorize them.
//! Used where AVX2 is missing, and as the second opinion in the tests.

use half::{bf16, f16};

use crate::quant::blocks::*;

#[inline(always)]
fn idot32(a: &[i8; QK], b: &[i8; QK]) -> i32 {
    a.iter().zip(b).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Unpacks 32 nibbles to `q - offset` in ggml's element order.
#[inline(always)]
fn nibbles(qs: &[u8; QK / 2], offset: i8) -> [i8; QK] {
    let mut q = [0i8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) as i8 - offset;
        q[j + QK / 2] = (qs[j] >> 4) as i8 - offset;
    }
    q
}

#[inline(always)]
fn five_bits(qh: [u8; 4], qs: &[u8; QK / 2], offset: i8) -> [i8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0i8; QK];
    for j in 0..QK / 2 {
        q[j] = ((qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4)) as i8 - offset;
        q[j + QK / 2] = ((qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4)) as i8 - offset;
    }
    q
}

#[inline(always)]
pub fn dot_q4_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ4_0>(row).zip(y) {
        sum += idot32(&nibbles(&x.qs, 8), &y.qs) as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sum
}

#[inline(always)]
pub fn dot_q4_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ4_1>(row).zip(y) {
        let sumi = idot32(&nibbles(&x.qs, 0), &y.qs);
        sum += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sum
}

#[inline(always)]
pub fn dot_q5_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ5_0>(row).zip(y) {
        sum += idot32(&five_bits(x.qh, &x.qs, 16), &y.qs) as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sum
}

#[inline(always)]
pub fn dot_q5_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ5_1>(row).zip(y) {
        let sumi = idot32(&five_bits(x.qh, &x.qs, 0), &y.qs);
        sum += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sum
}

#[inline(always)]
pub fn dot_q8_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ8_0>(row).zip(y) {
        sum += idot32(&x.qs, &y.qs) as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sum
}

/// `sum_j mins[j] * (bsums of sub-block j)`, the `-dmin * m` term of `Q4_K`/`Q5_K`.
#[inline(always)]
fn k4_scales(scales: &[u8; K_SCALE_SIZE], bsums: &[i16; QK_K / 16]) -> ([u8; 8], i32) {
    let mut sc = [0u8; 8];
    let mut summ = 0i32;
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, scales);
        sc[j] = s;
        summ += m as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
    }
    (sc, summ)
}

#[inline(always)]
pub fn dot_q4k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ4K>(row).zip(y) {
        let (sc, summ) = k4_scales(&x.scales, &y.bsums);
        let mut sumi = 0i32;
        for j in 0..4 {
            let q = &x.qs[32 * j..32 * j + 32];
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                lo += (q[l] & 0xF) as i32 * y.qs[64 * j + l] as i32;
                hi += (q[l] >> 4) as i32 * y.qs[64 * j + 32 + l] as i32;
            }
            sumi += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
        }
        sum += x.d.to_f32() * y.d * sumi as f32 - x.dmin.to_f32() * y.d * summ as f32;
    }
    sum
}

#[inline(always)]
pub fn dot_q5k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ5K>(row).zip(y) {
        let (sc, summ) = k4_scales(&x.scales, &y.bsums);
        let mut sumi = 0i32;
        for j in 0..4 {
            let q = &x.qs[32 * j..32 * j + 32];
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let h = x.qh[l] >> (2 * j);
                let ql = (q[l] & 0xF) | ((h & 1) << 4);
                let qh = (q[l] >> 4) | ((h & 2) << 3);
                lo += ql as i32 * y.qs[64 * j + l] as i32;
                hi += qh as i32 * y.qs[64 * j + 32 + l] as i32;
            }
            sumi += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
        }
        sum += x.d.to_f32() * y.d * sumi as f32 - x.dmin.to_f32() * y.d * summ as f32;
    }
    sum
}

#[inline(always)]
pub fn dot_q6k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in blocks::<BlockQ6K>(row).zip(y) {
        let mut sumi = 0i32;
        for half in 0..2 {
            let ql = &x.ql[64 * half..64 * half + 64];
            let qh = &x.qh[32 * half..32 * half + 32];
            let yq = &y.qs[128 * half..128 * half + 128];
            // Four groups of 32 elements, each with two scales of 16.
            let mut g = [[0i32; 2]; 4];
            for l in 0..32 {
                let q = [
                    ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                    ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
                ];
                for k in 0..4 {
                    g[k][l / 16] += q[k] * yq[32 * k + l] as i32;
                }
            }
            for k in 0..4 {
                for s in 0..2 {
                    sumi += x.scales[8 * half + 2 * k + s] as i32 * g[k][s];
                }
            }
        }
        sum += x.d.to_f32() * y.d * sumi as f32;
    }
    sum
}

#[inline(always)]
pub fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(
        row.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        x,
    )
}

#[inline(always)]
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(
        row.chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        x,
    )
}

#[inline(always)]
pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(
        row.chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        x,
    )
}

/// Eight independent partial sums so the float adds can be vectorized.
#[inline(always)]
fn dot_lanes(w: impl Iterator<Item = f32>, x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (w, &x)) in w.zip(x).enumerate() {
        acc[i % 8] += w * x;
    }
    acc.iter().sum()
}
