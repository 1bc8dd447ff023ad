//! Scalar reference dequantization and dot product: plain loops that mirror ggml's
//! `dequantize_row_*` (same operation order, so results are bit-identical to ggml and gguf-py).
//! These are the oracle every fast path and GPU kernel is tested against.

use half::{bf16, f16};

use super::blocks::*;
use super::{GgmlType, QuantError};

/// Dequantizes one row: `dst.len()` elements from `src`, which must be exactly
/// `ty.row_bytes(dst.len())` bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    if !ty.is_supported_weight() {
        return Err(QuantError::Unsupported {
            ty,
            op: "dequantize_row",
        });
    }
    QuantError::check_row(ty, dst.len(), src.len())?;
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => per_block(src, dst, dequant_q4_0),
        GgmlType::Q4_1 => per_block(src, dst, dequant_q4_1),
        GgmlType::Q5_0 => per_block(src, dst, dequant_q5_0),
        GgmlType::Q5_1 => per_block(src, dst, dequant_q5_1),
        GgmlType::Q8_0 => per_block(src, dst, dequant_q8_0),
        GgmlType::Q4K => per_block(src, dst, dequant_q4k),
        GgmlType::Q5K => per_block(src, dst, dequant_q5k),
        GgmlType::Q6K => per_block(src, dst, dequant_q6k),
        _ => unreachable!("is_supported_weight covers the arms above"),
    }
    Ok(())
}

/// Plain oracle for a row dot product: dequantize, then accumulate `w * x` in `f64`.
pub fn dot_ref(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, row, &mut w)?;
    Ok(w.iter()
        .zip(x)
        .map(|(&w, &x)| w as f64 * x as f64)
        .sum::<f64>() as f32)
}

fn per_block<B: Block>(src: &[u8], dst: &mut [f32], f: fn(&B, &mut [f32])) {
    for (b, y) in blocks::<B>(src).zip(dst.chunks_exact_mut(B::ELEMS)) {
        f(&b, y);
    }
}

fn dequant_q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for j in 0..QK / 2 {
        y[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for j in 0..QK / 2 {
        y[j] = (b.qs[j] & 0xF) as f32 * d + m;
        y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a `Q5_0`/`Q5_1` block, 0..32.
fn q5_values(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

fn dequant_q5_0(b: &BlockQ5_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, q) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
        *y = (q as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for (y, q) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
        *y = q as f32 * d + m;
    }
}

fn dequant_q8_0(b: &BlockQ8_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (y, &q) in y.iter_mut().zip(&b.qs) {
        *y = q as f32 * d;
    }
}

fn dequant_q4k(b: &BlockQ4K, y: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for (chunk, (q, y)) in
        b.qs.chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5k(b: &BlockQ5K, y: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for (chunk, (q, y)) in
        b.qs.chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Each 128-element half uses 64 bytes of `ql`, 32 of `qh` and 8 scales: element `l + 32 * k`
/// (`l < 32`) takes nibble `k / 2` of `ql[l + 32 * (k % 2)]` and bits `2k..2k+2` of `qh[l]`.
fn dequant_q6k(b: &BlockQ6K, y: &mut [f32]) {
    let d = b.d.to_f32();
    for half in 0..2 {
        let ql = &b.ql[64 * half..64 * half + 64];
        let qh = &b.qh[32 * half..32 * half + 32];
        let sc = &b.scales[8 * half..8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = [0f32; 32];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0; 17], &mut out),
            Err(QuantError::ByteLength {
                expected: 18,
                got: 17,
                ..
            })
        ));
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0; 18], &mut out[..31]),
            Err(QuantError::PartialBlock { .. })
        ));
        assert!(matches!(
            dequantize_row(GgmlType::Q2K, &[0; 84], &mut [0f32; 256]),
            Err(QuantError::Unsupported { .. })
        ));
        assert!(dot_ref(GgmlType::F32, &[0; 12], &[0.0; 4]).is_err());
    }

    #[test]
    fn q4_0_by_hand() {
        let mut bytes = [0u8; 18];
        bytes[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        bytes[2] = 0xF0; // element 0 -> 0 - 8, element 16 -> 15 - 8
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_0, &bytes, &mut out).unwrap();
        assert_eq!(out[0], -4.0);
        assert_eq!(out[16], 3.5);
        assert_eq!(out[1], -4.0);
    }
}
