//! Quantizers, bit-for-bit equal to ggml's `quantize_row_*_ref` (and so to gguf-py's
//! `gguf.quants.quantize` where it has the format). `Q8_0`, `Q8_1` and `Q8_K` are also the
//! activation formats of the fast dot products in [`super::fast`].

use half::f16;

use super::blocks::*;
use super::{GgmlType, QuantError};

/// Quantizes `src` into `dst`, which must be exactly `ty.row_bytes(src.len())` bytes.
///
/// Supported: `F32`, `F16`, `BF16`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `Q8_1`, `Q8_K`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    use GgmlType::*;
    if !matches!(
        ty,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | Q8K
    ) {
        return Err(QuantError::Unsupported {
            ty,
            op: "quantize_row",
        });
    }
    QuantError::check_row(ty, src.len(), dst.len())?;
    match ty {
        F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        F16 => {
            for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f16::from_f32(s).to_le_bytes());
            }
        }
        BF16 => {
            for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f32_to_bf16_bits(s).to_le_bytes());
            }
        }
        Q4_0 => per_block(src, dst, quantize_q4_0),
        Q4_1 => per_block(src, dst, quantize_q4_1),
        Q5_0 => per_block(src, dst, quantize_q5_0),
        Q5_1 => per_block(src, dst, quantize_q5_1),
        Q8_0 => per_block(src, dst, quantize_q8_0),
        Q8_1 => per_block(src, dst, quantize_q8_1),
        Q8K => per_block(src, dst, quantize_q8k),
        _ => unreachable!("checked above"),
    }
    Ok(())
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaN forced quiet.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

fn per_block<B: Block>(src: &[f32], dst: &mut [u8], f: fn(&[f32]) -> B) {
    for (x, y) in src
        .chunks_exact(B::ELEMS)
        .zip(dst.chunks_exact_mut(size_of::<B>()))
    {
        y.copy_from_slice(bytemuck::bytes_of(&f(x)));
    }
}

/// The value of largest magnitude (first one on ties), as ggml's `Q4_0`/`Q5_0` search it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// ggml's `MAX(amax, fabsf(v))` fold.
fn absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |a, &v| if a > v.abs() { a } else { v.abs() })
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 values 0..16 as ggml does: element `j` in the low nibble of byte `j`, element
/// `j + 16` in its high nibble.
fn pack_nibbles(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4))
}

/// Bit 4 of each 5-bit value, as the little-endian `qh` word.
fn high_bits(q: &[u8; QK]) -> [u8; 4] {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &q)| h | (((q as u32 >> 4) & 1) << j));
    qh.to_le_bytes()
}

/// `(int8_t)v` of C for the non-negative values the quantizers produce, then `MIN(hi, ..)`.
fn trunc_clamp(v: f32, hi: u8) -> u8 {
    (v as i8).clamp(0, hi as i8) as u8
}

fn quantize_q4_0(x: &[f32]) -> BlockQ4_0 {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    let q: [u8; QK] = std::array::from_fn(|j| trunc_clamp(x[j] * id + 8.5, 15));
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs: pack_nibbles(&q),
    }
}

fn quantize_q4_1(x: &[f32]) -> BlockQ4_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let q: [u8; QK] = std::array::from_fn(|j| trunc_clamp((x[j] - min) * id + 0.5, 15));
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs: pack_nibbles(&q),
    }
}

fn quantize_q5_0(x: &[f32]) -> BlockQ5_0 {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    let q: [u8; QK] = std::array::from_fn(|j| trunc_clamp(x[j] * id + 16.5, 31));
    BlockQ5_0 {
        d: f16::from_f32(d),
        qh: high_bits(&q),
        qs: pack_nibbles(&q),
    }
}

fn quantize_q5_1(x: &[f32]) -> BlockQ5_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let q: [u8; QK] = std::array::from_fn(|j| trunc_clamp((x[j] - min) * id + 0.5, 31));
    BlockQ5_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qh: high_bits(&q),
        qs: pack_nibbles(&q),
    }
}

/// Shared by `Q8_0` and `Q8_1`: scale `amax / 127`, values `roundf(x / d)` (C's `roundf`,
/// half away from zero, which is Rust's `f32::round`).
fn q8_values(x: &[f32]) -> (f32, [i8; QK]) {
    let d = absmax(x) / 127.0;
    let id = inverse(d);
    (d, std::array::from_fn(|j| (x[j] * id).round() as i8))
}

pub(crate) fn quantize_q8_0(x: &[f32]) -> BlockQ8_0 {
    let (d, qs) = q8_values(x);
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

pub(crate) fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let (d, qs) = q8_values(x);
    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
    BlockQ8_1 {
        d: f16::from_f32(d),
        s: f16::from_f32(sum as f32 * d),
        qs,
    }
}

/// ggml's `nearest_int`: round half to even through the float mantissa.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12582912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

pub(crate) fn quantize_q8k(x: &[f32]) -> BlockQ8K {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut y = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    if amax == 0.0 {
        return y;
    }
    let iscale = -127.0 / max;
    for (q, &v) in y.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *s = q.iter().map(|&q| q as i16).sum();
    }
    y.d = 1.0 / iscale;
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        assert!(quantize_row(GgmlType::Q8_0, &[0.0; 32], &mut [0; 33]).is_err());
        assert!(quantize_row(GgmlType::Q8_0, &[0.0; 31], &mut [0; 34]).is_err());
        assert!(quantize_row(GgmlType::Q6K, &[0.0; 256], &mut [0; 210]).is_err());
    }

    #[test]
    fn q8_1_sum_is_d_times_sum_of_qs() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.7).cos()).collect();
        let b = quantize_q8_1(&x);
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        // ggml rounds `sum * d` with the f32 `d`, before `d` itself is rounded to f16.
        assert_eq!(b.s, f16::from_f32(sum as f32 * (absmax(&x) / 127.0)));
        assert_eq!(b.qs, quantize_q8_0(&x).qs);
    }

    #[test]
    fn q8k_roundtrip_and_bsums() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut bytes = vec![0u8; 292];
        quantize_row(GgmlType::Q8K, &x, &mut bytes).unwrap();
        let b: BlockQ8K = read_block(&bytes, 0);
        for (i, &s) in b.bsums.iter().enumerate() {
            assert_eq!(
                s as i32,
                b.qs[16 * i..16 * i + 16]
                    .iter()
                    .map(|&q| q as i32)
                    .sum::<i32>()
            );
        }
        for (&q, &v) in b.qs.iter().zip(&x) {
            assert!((q as f32 * b.d - v).abs() <= b.d.abs() * 0.5 + 1e-6);
        }
    }

    #[test]
    fn roundtrip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            let mut bytes = vec![0u8; ty.row_bytes(64).unwrap() as usize];
            quantize_row(ty, &x, &mut bytes).unwrap();
            let mut y = vec![0f32; 64];
            dequantize_row(ty, &bytes, &mut y).unwrap();
            // Half a step, except the symmetric formats clip one end to a whole step.
            let bound = match ty {
                GgmlType::Q8_0 => 0.5 * 3.0 / 127.0,
                GgmlType::Q4_0 => 3.0 / 8.0,
                GgmlType::Q5_0 => 3.0 / 16.0,
                GgmlType::Q5_1 => 0.5 * 6.0 / 31.0,
                _ => 0.5 * 6.0 / 15.0,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= bound * 1.01 + 1e-3, "{ty}: {a} vs {b}");
            }
        }
    }
}
