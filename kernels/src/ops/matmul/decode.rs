//! Device-side decoding of one unit of weights from the two upload planes (see `layout`).
//!
//! One function per concern: `decode_unit` turns a unit into `f32` weights in registers (the
//! same code feeds the mat-vec dot and the prefill dequantize pass), the helpers below read
//! `f16` and bytes out of `u32` words with integer ops only, so no kernel needs the
//! `shader-f16` feature (lavapipe and many Vulkan drivers lack it).

use cubecl::prelude::*;

use super::format::KernelFormat;

/// `f32` value of the IEEE half in the low 16 bits of `bits`. Subnormals are exact;
/// inf/NaN (never a GGUF scale) come out as large finite values.
#[cube]
pub fn f16_bits_to_f32(bits: u32) -> f32 {
    let sign = (bits & 0x8000) << 16;
    let exp = (bits >> 10) & 0x1F;
    let mant = bits & 0x3FF;
    let normal = f32::reinterpret(sign | ((exp + 112) << 23) | (mant << 13));
    let magnitude = f32::cast_from(mant) * 5.960_464_5e-8; // mant * 2^-24
    let subnormal = select(sign != 0, -magnitude, magnitude);
    select(exp == 0, subnormal, normal)
}

/// Half `i` of the scale plane.
#[cube]
fn half_at(scales: &Array<u32>, i: u32) -> f32 {
    let word = scales[(i / 2) as usize];
    f16_bits_to_f32((word >> ((i % 2) * 16)) & 0xFFFF)
}

/// Byte `k` (0..4) of a little-endian word.
#[cube]
fn byte(word: u32, k: u32) -> u32 {
    (word >> (8 * k)) & 0xFF
}

/// The byte as a two's-complement `i8`, in `f32`.
#[cube]
fn signed_byte(b: u32) -> f32 {
    f32::cast_from(b) - f32::cast_from((b >> 7) * 256)
}

/// Byte `i` (0..12) of the packed `Q4_K`/`Q5_K` scales held in words `s0..s2`.
#[cube]
fn k4_byte(i: u32, s0: u32, s1: u32, s2: u32) -> u32 {
    let word = select(i < 4, s0, select(i < 8, s1, s2));
    byte(word, i % 4)
}

/// 6-bit scale of sub-block `j` (ggml's `get_scale_min_k4`, first half). Branch-free:
/// lanes of one plane decode different sub-blocks.
#[cube]
fn k4_scale(j: u32, s0: u32, s1: u32, s2: u32) -> f32 {
    let low = k4_byte(j, s0, s1, s2) & 63;
    let high = (k4_byte(j + 4, s0, s1, s2) & 0xF) | ((k4_byte((j + 4) % 8, s0, s1, s2) >> 6) << 4);
    f32::cast_from(select(j < 4, low, high))
}

/// 6-bit min of sub-block `j` (ggml's `get_scale_min_k4`, second half).
#[cube]
fn k4_min(j: u32, s0: u32, s1: u32, s2: u32) -> f32 {
    let low = k4_byte(j + 4, s0, s1, s2) & 63;
    let high = (k4_byte(j + 4, s0, s1, s2) >> 4) | ((k4_byte(j, s0, s1, s2) >> 6) << 4);
    f32::cast_from(select(j < 4, low, high))
}

/// Decodes unit `unit` of row `row` into `vals[0..elems_per_unit]`: the weights of columns
/// `unit * elems_per_unit ..` in order. Operation order follows `quant::reference`.
#[cube]
pub fn decode_unit(
    w: &Array<u32>,
    scales: &Array<u32>,
    row: u32,
    unit: u32,
    blocks_per_row: u32,
    vals: &mut Array<f32>,
    #[comptime] fmt: KernelFormat,
) {
    let units_per_block = comptime![fmt.units_per_block()];
    let block = row * blocks_per_row + unit / units_per_block;
    let part = unit % units_per_block;
    let wb = block * comptime![fmt.words_per_block()];
    match fmt {
        KernelFormat::F32 =>
        {
            #[unroll]
            for i in 0..4u32 {
                vals[i as usize] = f32::reinterpret(w[(wb + i) as usize]);
            }
        }
        KernelFormat::F16 =>
        {
            #[unroll]
            for i in 0..2u32 {
                let q = w[(wb + i) as usize];
                vals[(2 * i) as usize] = f16_bits_to_f32(q & 0xFFFF);
                vals[(2 * i + 1) as usize] = f16_bits_to_f32(q >> 16);
            }
        }
        KernelFormat::Q4_0 => {
            let d = half_at(scales, block);
            #[unroll]
            for j in 0..4u32 {
                let q = w[(wb + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let b = byte(q, k);
                    vals[(4 * j + k) as usize] = (f32::cast_from(b & 0xF) - 8.0) * d;
                    vals[(4 * j + k + 16) as usize] = (f32::cast_from(b >> 4) - 8.0) * d;
                }
            }
        }
        KernelFormat::Q4_1 => {
            let d = half_at(scales, 2 * block);
            let m = half_at(scales, 2 * block + 1);
            #[unroll]
            for j in 0..4u32 {
                let q = w[(wb + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let b = byte(q, k);
                    vals[(4 * j + k) as usize] = f32::cast_from(b & 0xF) * d + m;
                    vals[(4 * j + k + 16) as usize] = f32::cast_from(b >> 4) * d + m;
                }
            }
        }
        KernelFormat::Q5_0 => {
            let d = half_at(scales, block);
            let qh = w[wb as usize];
            #[unroll]
            for j in 0..4u32 {
                let q = w[(wb + 1 + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let e = 4 * j + k;
                    let b = byte(q, k);
                    let lo = (b & 0xF) | (((qh >> e) & 1) << 4);
                    let hi = (b >> 4) | (((qh >> (e + 16)) & 1) << 4);
                    vals[e as usize] = (f32::cast_from(lo) - 16.0) * d;
                    vals[(e + 16) as usize] = (f32::cast_from(hi) - 16.0) * d;
                }
            }
        }
        KernelFormat::Q5_1 => {
            let d = half_at(scales, 2 * block);
            let m = half_at(scales, 2 * block + 1);
            let qh = w[wb as usize];
            #[unroll]
            for j in 0..4u32 {
                let q = w[(wb + 1 + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let e = 4 * j + k;
                    let b = byte(q, k);
                    let lo = (b & 0xF) | (((qh >> e) & 1) << 4);
                    let hi = (b >> 4) | (((qh >> (e + 16)) & 1) << 4);
                    vals[e as usize] = f32::cast_from(lo) * d + m;
                    vals[(e + 16) as usize] = f32::cast_from(hi) * d + m;
                }
            }
        }
        KernelFormat::Q8_0 => {
            let d = half_at(scales, block);
            #[unroll]
            for j in 0..8u32 {
                let q = w[(wb + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    vals[(4 * j + k) as usize] = signed_byte(byte(q, k)) * d;
                }
            }
        }
        KernelFormat::Q4K => {
            // Unit = 64-weight chunk `part`: low nibbles of 32 qs bytes, then high nibbles.
            let d = half_at(scales, 2 * block);
            let dmin = half_at(scales, 2 * block + 1);
            let s0 = w[wb as usize];
            let s1 = w[(wb + 1) as usize];
            let s2 = w[(wb + 2) as usize];
            let d1 = d * k4_scale(2 * part, s0, s1, s2);
            let m1 = dmin * k4_min(2 * part, s0, s1, s2);
            let d2 = d * k4_scale(2 * part + 1, s0, s1, s2);
            let m2 = dmin * k4_min(2 * part + 1, s0, s1, s2);
            let qs = wb + 3 + 8 * part;
            #[unroll]
            for j in 0..8u32 {
                let q = w[(qs + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let b = byte(q, k);
                    vals[(4 * j + k) as usize] = d1 * f32::cast_from(b & 0xF) - m1;
                    vals[(4 * j + k + 32) as usize] = d2 * f32::cast_from(b >> 4) - m2;
                }
            }
        }
        KernelFormat::Q5K => {
            // As Q4_K, plus bit `2 * part` (low half) / `2 * part + 1` (high half) of qh[l].
            let d = half_at(scales, 2 * block);
            let dmin = half_at(scales, 2 * block + 1);
            let s0 = w[wb as usize];
            let s1 = w[(wb + 1) as usize];
            let s2 = w[(wb + 2) as usize];
            let d1 = d * k4_scale(2 * part, s0, s1, s2);
            let m1 = dmin * k4_min(2 * part, s0, s1, s2);
            let d2 = d * k4_scale(2 * part + 1, s0, s1, s2);
            let m2 = dmin * k4_min(2 * part + 1, s0, s1, s2);
            let qs = wb + 11 + 8 * part;
            #[unroll]
            for j in 0..8u32 {
                let q = w[(qs + j) as usize];
                let h = w[(wb + 3 + j) as usize];
                #[unroll]
                for k in 0..4u32 {
                    let b = byte(q, k);
                    let hb = byte(h, k);
                    let lo = (b & 0xF) + ((hb >> (2 * part)) & 1) * 16;
                    let hi = (b >> 4) + ((hb >> (2 * part + 1)) & 1) * 16;
                    vals[(4 * j + k) as usize] = d1 * f32::cast_from(lo) - m1;
                    vals[(4 * j + k + 32) as usize] = d2 * f32::cast_from(hi) - m2;
                }
            }
        }
        KernelFormat::Q6K => {
            // Unit = weights 128 * half + 32 * k .. + 32: nibble k / 2 of ql[64 * half +
            // 32 * (k % 2) + l], bits 2k..2k+2 of qh[32 * half + l], scale 8 * half + 2k
            // (+1 for l >= 16). Plane offsets: ql 0, qh 32 words, scales 48 words.
            let d = half_at(scales, block);
            let half = part / 4;
            let k = part % 4;
            let ql = wb + 16 * half + 8 * (k % 2);
            let qh = wb + 32 + 8 * half;
            let sc_word = w[(wb + 48 + 2 * half + k / 2) as usize];
            let sc_lo = signed_byte(byte(sc_word, (2 * k) % 4));
            let sc_hi = signed_byte(byte(sc_word, (2 * k) % 4 + 1));
            let nibble = 4 * (k / 2);
            #[unroll]
            for j in 0..8u32 {
                let q = w[(ql + j) as usize];
                let h = w[(qh + j) as usize];
                let sc = select(j < 4, sc_lo, sc_hi);
                #[unroll]
                for b in 0..4u32 {
                    let low = (byte(q, b) >> nibble) & 0xF;
                    let high = (byte(h, b) >> (2 * k)) & 3;
                    let v = f32::cast_from(low | (high << 4)) - 32.0;
                    vals[(4 * j + b) as usize] = d * sc * v;
                }
            }
        }
    }
}

/// First column, inside its block, of run `g` (4 consecutive weights) of slot `slot`: the
/// layout [`decode_slot`] fills `vals` in.
#[cube]
pub fn slot_col(slot: u32, g: u32, #[comptime] fmt: KernelFormat) -> u32 {
    match fmt {
        // Byte k of word `slot` holds weights 4*slot + k (low nibble) and 16 + 4*slot + k.
        KernelFormat::Q4_0 | KernelFormat::Q4_1 | KernelFormat::Q5_0 | KernelFormat::Q5_1 => {
            4 * slot + 16 * g
        }
        // Words 2*slot and 2*slot + 1: weights 8*slot .. 8*slot + 8.
        KernelFormat::Q8_0 => 8 * slot + 4 * g,
        // qs word `slot` of chunk j = slot / 8: weights 64j + l0 + k (low), 64j + 32 + l0 + k.
        KernelFormat::Q4K | KernelFormat::Q5K => 64 * (slot / 8) + 4 * (slot % 8) + 32 * g,
        // Half n = slot / 8, l0 = 4 * (slot % 8): weights 128n + 32g + l0 + k.
        KernelFormat::Q6K => 128 * (slot / 8) + 4 * (slot % 8) + 32 * g,
        _ => 4 * slot,
    }
}

/// Decodes slot `slot` of global block `block` (see `KernelFormat::slots_per_block`) into
/// `vals[4 * g + k]`, the weight at column `slot_col(slot, g) + k` of the block. Operation
/// order per weight follows `quant::reference`, like [`decode_unit`].
#[cube]
pub fn decode_slot(
    w: &Array<u32>,
    scales: &Array<u32>,
    block: u32,
    slot: u32,
    vals: &mut Array<f32>,
    #[comptime] fmt: KernelFormat,
) {
    let wb = block * comptime![fmt.words_per_block()];
    match fmt {
        KernelFormat::Q4_0 => {
            let d = half_at(scales, block);
            let q = w[(wb + slot) as usize];
            #[unroll]
            for k in 0..4u32 {
                let b = byte(q, k);
                vals[k as usize] = (f32::cast_from(b & 0xF) - 8.0) * d;
                vals[(4 + k) as usize] = (f32::cast_from(b >> 4) - 8.0) * d;
            }
        }
        KernelFormat::Q4_1 => {
            let d = half_at(scales, 2 * block);
            let m = half_at(scales, 2 * block + 1);
            let q = w[(wb + slot) as usize];
            #[unroll]
            for k in 0..4u32 {
                let b = byte(q, k);
                vals[k as usize] = f32::cast_from(b & 0xF) * d + m;
                vals[(4 + k) as usize] = f32::cast_from(b >> 4) * d + m;
            }
        }
        KernelFormat::Q5_0 => {
            let d = half_at(scales, block);
            let qh = w[wb as usize];
            let q = w[(wb + 1 + slot) as usize];
            #[unroll]
            for k in 0..4u32 {
                let e = 4 * slot + k;
                let b = byte(q, k);
                let lo = (b & 0xF) | (((qh >> e) & 1) << 4);
                let hi = (b >> 4) | (((qh >> (e + 16)) & 1) << 4);
                vals[k as usize] = (f32::cast_from(lo) - 16.0) * d;
                vals[(4 + k) as usize] = (f32::cast_from(hi) - 16.0) * d;
            }
        }
        KernelFormat::Q5_1 => {
            let d = half_at(scales, 2 * block);
            let m = half_at(scales, 2 * block + 1);
            let qh = w[wb as usize];
            let q = w[(wb + 1 + slot) as usize];
            #[unroll]
            for k in 0..4u32 {
                let e = 4 * slot + k;
                let b = byte(q, k);
                let lo = (b & 0xF) | (((qh >> e) & 1) << 4);
                let hi = (b >> 4) | (((qh >> (e + 16)) & 1) << 4);
                vals[k as usize] = f32::cast_from(lo) * d + m;
                vals[(4 + k) as usize] = f32::cast_from(hi) * d + m;
            }
        }
        KernelFormat::Q8_0 => {
            let d = half_at(scales, block);
            let q0 = w[(wb + 2 * slot) as usize];
            let q1 = w[(wb + 2 * slot + 1) as usize];
            #[unroll]
            for k in 0..4u32 {
                vals[k as usize] = signed_byte(byte(q0, k)) * d;
                vals[(4 + k) as usize] = signed_byte(byte(q1, k)) * d;
            }
        }
        KernelFormat::Q4K => {
            let j = slot / 8;
            let d = half_at(scales, 2 * block);
            let dmin = half_at(scales, 2 * block + 1);
            let s0 = w[wb as usize];
            let s1 = w[(wb + 1) as usize];
            let s2 = w[(wb + 2) as usize];
            let d1 = d * k4_scale(2 * j, s0, s1, s2);
            let m1 = dmin * k4_min(2 * j, s0, s1, s2);
            let d2 = d * k4_scale(2 * j + 1, s0, s1, s2);
            let m2 = dmin * k4_min(2 * j + 1, s0, s1, s2);
            let q = w[(wb + 3 + slot) as usize];
            #[unroll]
            for k in 0..4u32 {
                let b = byte(q, k);
                vals[k as usize] = d1 * f32::cast_from(b & 0xF) - m1;
                vals[(4 + k) as usize] = d2 * f32::cast_from(b >> 4) - m2;
            }
        }
        KernelFormat::Q5K => {
            let j = slot / 8;
            let d = half_at(scales, 2 * block);
            let dmin = half_at(scales, 2 * block + 1);
            let s0 = w[wb as usize];
            let s1 = w[(wb + 1) as usize];
            let s2 = w[(wb + 2) as usize];
            let d1 = d * k4_scale(2 * j, s0, s1, s2);
            let m1 = dmin * k4_min(2 * j, s0, s1, s2);
            let d2 = d * k4_scale(2 * j + 1, s0, s1, s2);
            let m2 = dmin * k4_min(2 * j + 1, s0, s1, s2);
            let q = w[(wb + 11 + slot) as usize];
            let h = w[(wb + 3 + slot % 8) as usize];
            #[unroll]
            for k in 0..4u32 {
                let b = byte(q, k);
                let hb = byte(h, k);
                let lo = (b & 0xF) + ((hb >> (2 * j)) & 1) * 16;
                let hi = (b >> 4) + ((hb >> (2 * j + 1)) & 1) * 16;
                vals[k as usize] = d1 * f32::cast_from(lo) - m1;
                vals[(4 + k) as usize] = d2 * f32::cast_from(hi) - m2;
            }
        }
        KernelFormat::Q6K => {
            // Run g: nibble g / 2 of ql[64n + 32 (g % 2) + l], bits 2g..2g+2 of qh[32n + l],
            // scale 8n + l / 16 + 2g. Plane offsets: ql 0, qh 32 words, scales 48 words.
            let n = slot / 8;
            let i = slot % 8;
            let d = half_at(scales, block);
            let ql0 = w[(wb + 16 * n + i) as usize];
            let ql1 = w[(wb + 16 * n + 8 + i) as usize];
            let h = w[(wb + 32 + 8 * n + i) as usize];
            let is = 8 * n + i / 4;
            #[unroll]
            for g in 0..4u32 {
                let idx = is + 2 * g;
                let sc = signed_byte(byte(w[(wb + 48 + idx / 4) as usize], idx % 4));
                let q = select(g % 2 == 0, ql0, ql1);
                #[unroll]
                for k in 0..4u32 {
                    let low = (byte(q, k) >> (4 * (g / 2))) & 0xF;
                    let high = (byte(h, k) >> (2 * g)) & 3;
                    let v = f32::cast_from(low | (high << 4)) - 32.0;
                    vals[(4 * g + k) as usize] = d * sc * v;
                }
            }
        }
        _ => {}
    }
}
