//! Device-side decoding of one *slot* of weights from the two upload planes (see `layout`):
//! the only place that unpacks a format. The mat-vec, the embedding lookup and the prefill
//! dequantize pass all call [`decode_slot`].
//!
//! A slot comes out as small integers `q` (exact in `f32`) and, per run of 4 weights, an
//! affine map `a * q + m`: the mat-vec sums `q * x` over a run and applies the run's scale
//! once, so a weight costs an integer extract, an `or`, a subtract and an FMA. Integers
//! become floats by the exponent trick (`2^23 | n` read as `f32`, minus `2^23`) instead of
//! an int-to-float conversion, which runs at a quarter of the FMA rate on NVIDIA GPUs.
//! `f16` scales are decoded with integer ops only, so no kernel needs the `shader-f16`
//! feature (lavapipe and many Vulkan drivers lack it).

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

/// The 6-bit scales and mins of `Q4_K`/`Q5_K` sub-blocks `2j` and `2j + 1` (ggml's
/// `get_scale_min_k4`) of global block `block`, from its packed scale bytes 0..12 (words `s0..s2`
/// after `d` and `dmin` in the scale plane's 16-byte header), as the bytes of one word: scale
/// `2j`, scale `2j + 1`, min `2j`, min `2j + 1`. Sub-blocks 0..4 keep them in
/// the low 6 bits of bytes `k` (scales, `s0`) and `4 + k` (mins, `s1`); sub-blocks 4..8 in the
/// nibbles of byte `8 + k` (`s2`) below the top 2 bits of bytes `k` and `4 + k`. A sub-block
/// pair is one byte pair of each word: branch-free, as lanes of one plane decode different
/// chunks.
#[cube]
fn k4_pair(scales: &Array<u32>, block: u32, j: u32) -> u32 {
    let s0 = scales[(4 * block + 1) as usize];
    let s1 = scales[(4 * block + 2) as usize];
    let s2 = scales[(4 * block + 3) as usize];
    let sh = 16 * (j % 2);
    // Scale bytes below, min bytes above.
    let ab = ((s0 >> sh) & 0xFFFF) | ((s1 >> sh) << 16);
    let c = s2 >> sh;
    let low = ab & 0x3F3F_3F3F;
    let high = (c & 0x0F0F) | ((c << 12) & 0x0F0F_0000) | ((ab >> 2) & 0x3030_3030);
    select(j < 2, low, high)
}

/// Byte `k` of `v` as `f32`.
#[cube]
fn byte_f32(v: u32, #[comptime] k: u32) -> f32 {
    int_f32((v >> comptime![8 * k]) & 0xFF, 0.0)
}

/// `n` as `f32` for `n < 2^23`, minus `offset`: `2^23 + n` built from its bits, then one
/// subtraction (exact while the result is representable, as it is for every quant here).
#[cube]
fn int_f32(n: u32, #[comptime] offset: f32) -> f32 {
    f32::reinterpret(n | 0x4B00_0000) - comptime![8_388_608.0f32 + offset]
}

/// First column, inside its block, of run `g` (4 consecutive weights) of slot `slot`: the
/// layout [`decode_slot`] fills `q` in.
#[cube]
pub fn slot_col(slot: u32, g: u32, #[comptime] fmt: KernelFormat) -> u32 {
    match fmt {
        // A block is one slot of 4 weights.
        KernelFormat::F32 | KernelFormat::F16 => 0,
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
    }
}

/// Decodes slot `slot` of global block `block` (see `KernelFormat::slots_per_block`): the
/// weight at column `slot_col(slot, g) + k` of the block is `a[g] * q[4g + k] + m[g]` (`m`
/// is written only where `fmt.has_min()`). Operation order per weight follows
/// `quant::reference` (`(n - 8) * d`, `n * d + m`, `d1 * n - m1`, `(d * sc) * (v - 32)`).
#[cube]
pub fn decode_slot(
    w: &Array<u32>,
    scales: &Array<u32>,
    block: u32,
    slot: u32,
    q: &mut Array<f32>,
    a: &mut Array<f32>,
    m: &mut Array<f32>,
    #[comptime] fmt: KernelFormat,
) {
    let wb = block * comptime![fmt.words_per_block()];
    match fmt {
        KernelFormat::F32 => {
            #[unroll]
            for k in 0..4u32 {
                q[k as usize] = f32::reinterpret(w[(wb + k) as usize]);
            }
            a[0] = 1.0;
        }
        KernelFormat::F16 => {
            #[unroll]
            for i in 0..2u32 {
                let word = w[(wb + i) as usize];
                q[(2 * i) as usize] = f16_bits_to_f32(word & 0xFFFF);
                q[(2 * i + 1) as usize] = f16_bits_to_f32(word >> 16);
            }
            a[0] = 1.0;
        }
        KernelFormat::Q4_0 | KernelFormat::Q4_1 | KernelFormat::Q5_0 | KernelFormat::Q5_1 => {
            // Q4_0: `(n - 8) * d`; Q4_1: `n * d + m` (`d`, `m` the block's two halves); Q5_0 and
            // Q5_1 add a fifth bit per weight from the block's `qh` word (Q5_0's offset is 16).
            let five = comptime![matches!(fmt, KernelFormat::Q5_0 | KernelFormat::Q5_1)];
            let min = comptime![fmt.has_min()];
            let offset = comptime![match (fmt.has_min(), five) {
                (true, _) => 0.0f32,
                (false, false) => 8.0f32,
                (false, true) => 16.0f32,
            }];
            let halves = comptime![fmt.halves_per_block()];
            let d = half_at(scales, halves * block);
            // Q5_x keep `qh` in their first quant word, the nibbles after it.
            let nibbles = comptime![if five { 1u32 } else { 0u32 }];
            let word = w[(wb + nibbles + slot) as usize];
            let mut qh = 0u32;
            if comptime![five] {
                qh = w[wb as usize] >> (4 * slot);
            }
            #[unroll]
            for k in 0..4u32 {
                let mut lo = (word >> (8 * k)) & 0xF;
                let mut hi = (word >> (8 * k + 4)) & 0xF;
                if comptime![five] {
                    lo |= ((qh >> k) & 1) << 4;
                    hi |= ((qh >> (k + 16)) & 1) << 4;
                }
                q[k as usize] = int_f32(lo, offset);
                q[(4 + k) as usize] = int_f32(hi, offset);
            }
            a[0] = d;
            a[1] = d;
            if comptime![min] {
                let mn = half_at(scales, 2 * block + 1);
                m[0] = mn;
                m[1] = mn;
            }
        }
        KernelFormat::Q8_0 => {
            let d = half_at(scales, block);
            let q0 = w[(wb + 2 * slot) as usize];
            let q1 = w[(wb + 2 * slot + 1) as usize];
            // A signed byte s is `(s ^ 0x80) - 128` read unsigned.
            #[unroll]
            for k in 0..4u32 {
                q[k as usize] = int_f32(((q0 >> (8 * k)) & 0xFF) ^ 0x80, 128.0);
                q[(4 + k) as usize] = int_f32(((q1 >> (8 * k)) & 0xFF) ^ 0x80, 128.0);
            }
            a[0] = d;
            a[1] = d;
        }
        KernelFormat::Q4K | KernelFormat::Q5K => {
            // Low nibbles: sub-block 2j, high nibbles: 2j + 1 (`d1 * n - m1`); Q5_K adds the
            // fifth bits of its quant word (`q5k_fifth`).
            let j = slot / 8;
            let d = half_at(scales, 8 * block);
            let dmin = half_at(scales, 8 * block + 1);
            if comptime![fmt == KernelFormat::Q4K] {
                let word = w[(wb + slot) as usize];
                #[unroll]
                for k in 0..4u32 {
                    q[k as usize] = int_f32((word >> (8 * k)) & 0xF, 0.0);
                    q[(4 + k) as usize] = int_f32((word >> (8 * k + 4)) & 0xF, 0.0);
                }
            } else {
                let word = w[(wb + 8 + slot) as usize];
                let h = q5k_fifth(w[(wb + slot / 4) as usize], slot % 4);
                #[unroll]
                for k in 0..4u32 {
                    // Byte k's fifth bits: `layout::Q5K_FIFTH_LOW[k]`, the high nibble's 4 up.
                    let at = 4 + k % 2 + 16 * (k / 2);
                    let lo = ((word >> (8 * k)) & 0xF) | (((h >> at) & 1) << 4);
                    let hi = ((word >> (8 * k + 4)) & 0xF) | (((h >> (at + 4)) & 1) << 4);
                    q[k as usize] = int_f32(lo, 0.0);
                    q[(4 + k) as usize] = int_f32(hi, 0.0);
                }
            }
            let sm = k4_pair(scales, block, j);
            a[0] = d * byte_f32(sm, 0u32);
            m[0] = -(dmin * byte_f32(sm, 2u32));
            a[1] = d * byte_f32(sm, 1u32);
            m[1] = -(dmin * byte_f32(sm, 3u32));
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
                a[g as usize] = d * signed_byte(byte(w[(wb + 48 + idx / 4) as usize], idx % 4));
                let ql = select(g % 2 == 0, ql0, ql1);
                #[unroll]
                for k in 0..4u32 {
                    let low = (ql >> (8 * k + 4 * (g / 2))) & 0xF;
                    let high = (h >> (8 * k + 2 * g)) & 3;
                    q[(4 * g + k) as usize] = int_f32(low | (high << 4), 32.0);
                }
            }
        }
    }
}

/// The packed half pair in the low and high 16 bits of `bits`.
#[cube]
pub fn h2(bits: u32) -> Vector<half::f16, Const<2>> {
    Vector::<half::f16, Const<2>>::reinterpret(bits)
}

/// Two 4-bit (or 8-bit) integers in bits 0.. and 16.. of `n` as the halves `1024 + n`: `n`
/// fills the mantissa of `1024.0` (`0x6400`), so one `or` makes two weights (integers below
/// 1024 are exact).
#[cube]
fn magic_h2(n: u32) -> Vector<half::f16, Const<2>> {
    h2(n | magic())
}

/// `0x6400_6400` ([`magic_h2`]'s two exponents) in a register. `UNIT_POS_Z` is 0 in every
/// launch (cube dims are 1- or 2-D: `launch::settings` asserts it), but the compiler cannot
/// know it, so the constant is not an immediate, and the mask that takes a quant pair out of
/// its word (`word & 0x000F_000F`, an immediate) and this `or` can fold into one three-input
/// logic instruction (`LOP3`). With both as immediates ptxas issued them apart: the stacked
/// `Q4_0` mat-vec ran 17 instructions per quant word, 4 of them these `or`s (ncu's SASS on the
/// H200; with the register the stacked mat-vec gained 3-10 points of bandwidth on most shapes,
/// docs/performance.md, "the quant exponents in a register").
#[cube]
fn magic() -> u32 {
    0x6400_6400 | UNIT_POS_Z
}

/// The fifth bits of a `Q5_x` pair: bit 0 of `t` to bit `at`, bit 2 of `t` to bit `at + 16`
/// (`at` is 4 for a low-nibble pair, 8 for a high one, see [`slot_pairs`]).
#[cube]
fn fifth_bits(t: u32, #[comptime] at: u32) -> u32 {
    ((t << at) & comptime![1u32 << at]) | ((t << comptime![at + 14]) & comptime![1u32 << (at + 16)])
}

/// `Q5_K`: the fifth bits of quant word `m` (`slot % 4`) from its word of them `s` (quant
/// plane word `slot / 4` of the block, `layout::q5k_fifth_words`), aligned: byte `k`'s
/// low-nibble bit at 4, 5, 20, 21 for `k` = 0..3, its high-nibble bit 4 above, where
/// [`slot_pairs`]'s pairs take them (bytes 1 and 3 one bit up). Other words' bits stay in the
/// result; the pair masks drop them. Both arms shift by 0-6 for any `m` in 0..4 (`select`
/// evaluates both).
#[cube]
pub fn q5k_fifth(s: u32, m: u32) -> u32 {
    select(m < 2, s << (2 * (2 - u32::min(m, 2))), s >> (2 * m))
}

/// Quant pair `k` of [`slot_pairs`] (`b`, in bits 0.. and 16..) as the halves `q - offset`,
/// exact: `magic_h2` makes `1024 + q`, less [`KernelFormat::half_offset`]. A 4-bit format's
/// high-nibble pairs (`k` 2 and 3) sit 4 bits up, as `1024 + 16 q`: a sixteenth of it is
/// `64 + q`, and one fused multiply-add takes the offset away, so their unpacking needs no
/// shift.
#[cube]
#[allow(unused_assignments)]
fn quant_h2(
    b: u32,
    #[comptime] k: u32,
    #[comptime] fmt: KernelFormat,
) -> Vector<half::f16, Const<2>> {
    let m = magic_h2(b);
    let off = comptime![fmt.half_offset()];
    let mut q = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
    if comptime![k >= 2 && fmt != KernelFormat::Q8_0] {
        let sixteenth = Vector::<half::f16, Const<2>>::cast_from(0.0625f32);
        q = m * sixteenth - Vector::<half::f16, Const<2>>::cast_from(comptime![off - 960.0]);
    } else {
        q = m - Vector::<half::f16, Const<2>>::cast_from(off);
    }
    q
}

/// Slot `slot` of global block `block` against its activations, in packed half math: the
/// slot's weights (formats with [`KernelFormat::half_x`]) times `xh`, the activations scaled
/// into [-1, 1] per 32 columns, returned in `f32` with every scale applied. `xa` and `xb` hold
/// the slot's two runs of 4 columns (`slot_col(slot, 0)` and `slot_col(slot, 1)`) as two words
/// of halves in pair order: columns (0, 2) then (1, 3) of the run, the order in which one mask
/// takes two weights out of a quant word; `sa` and `sb` are their 32-column scales. The quant
/// integers (less the format's offset: `Q4_0` 8, `Q5_0` 16, `Q8_0`'s sign) are made halves by
/// the `1024 + n` mantissa trick; each product is at most 128 in magnitude and a lane sums at
/// most 4 per half, so nothing nears f16's range. Block scales and mins are applied in `f32`
/// once per run.
#[cube]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn dot_slot_h2(
    w: &Array<u32>,
    scales: &Array<u32>,
    block: u32,
    slot: u32,
    xa: Vector<u32, Const<2>>,
    xb: Vector<u32, Const<2>>,
    sa: f32,
    sb: f32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let wb = block * comptime![fmt.words_per_block()];
    let mut b = Array::<u32>::new(4usize);
    let kquant = comptime![matches!(fmt, KernelFormat::Q4K | KernelFormat::Q5K)];
    // A 32-weight block's scale (and min) first, so their loads issue with the quant word's.
    let halves = comptime![fmt.halves_per_block()];
    let mut d = 0.0f32;
    let mut mn = 0.0f32;
    if comptime![!kquant] {
        d = half_at_hw(scales, halves * block) * sa;
        if comptime![fmt.has_min()] {
            mn = half_at_hw(scales, halves * block + 1) * sa;
        }
    }
    load_slot_pairs(w, wb, slot, &mut b, fmt);
    let mut out = 0.0f32;
    if comptime![kquant] {
        let pa = quant_h2(b[0], 0u32, fmt) * h2(xa[0]) + quant_h2(b[1], 1u32, fmt) * h2(xa[1]);
        let pb = quant_h2(b[2], 2u32, fmt) * h2(xb[0]) + quant_h2(b[3], 3u32, fmt) * h2(xb[1]);
        let xsa = h2_sum(h2(xa[0]) + h2(xa[1]));
        let xsb = h2_sum(h2(xb[0]) + h2(xb[1]));
        out = k_pair_apply(
            scales,
            block,
            slot / 8,
            h2_sum(pa),
            h2_sum(pb),
            xsa,
            xsb,
            sa,
            sb,
        );
    } else {
        // One block: one scale (and min) for both runs, one activation scale (`sb` is `sa`):
        // one chain of products.
        let zero = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
        out = d * h2_sum(pair_chain(zero, &b, xa[0], xa[1], xb[0], xb[1], fmt));
        if comptime![fmt.has_min()] {
            out += mn * run_pair_sum(xa[0], xa[1], xb[0], xb[1]);
        }
    }
    out
}

/// Loads slot `slot`'s quant word(s) (block words from `wb`) and, for the 5-bit formats, its
/// word of fifth bits, and unpacks them into `b` ([`slot_pairs`]).
#[cube]
fn load_slot_pairs(
    w: &Array<u32>,
    wb: u32,
    slot: u32,
    b: &mut Array<u32>,
    #[comptime] fmt: KernelFormat,
) {
    let mut word2 = 0u32;
    let mut hi = 0u32;
    let first = comptime![match fmt {
        KernelFormat::Q5_0 | KernelFormat::Q5_1 => 1u32,
        KernelFormat::Q5K => 8u32,
        _ => 0u32,
    }];
    let per_slot = comptime![if fmt == KernelFormat::Q8_0 {
        2u32
    } else {
        1u32
    }];
    let word = w[(wb + first + per_slot * slot) as usize];
    if comptime![fmt == KernelFormat::Q8_0] {
        word2 = w[(wb + 2 * slot + 1) as usize];
    }
    if comptime![matches!(fmt, KernelFormat::Q5_0 | KernelFormat::Q5_1)] {
        hi = w[wb as usize];
    }
    if comptime![fmt == KernelFormat::Q5K] {
        hi = q5k_fifth(w[(wb + slot / 4) as usize], slot % 4);
    }
    slot_pairs(word, word2, hi, slot, b, fmt);
}

/// The four quant pairs of slot `slot` (see [`dot_slot_h2`]) from its loaded words, into
/// `b[0..4]` as integers in bits 0.. and 16.. (a 4-bit format's `b[2]`/`b[3]`: in bits 4..
/// and 20..) in `xh`'s pair order, to be read through [`quant_h2`]: `b[0]`/`b[1]` meet the
/// slot's first run of `x`, `b[2]`/`b[3]` its second. `word` is the slot's quant word (`Q8_0`:
/// the first of two, `word2` the second); `hi` holds the fifth bits (`Q5_0`/`Q5_1`: the
/// block's `qh` word; `Q5_K`: the slot's fifth bits aligned by [`q5k_fifth`]).
#[cube]
fn slot_pairs(
    word: u32,
    word2: u32,
    hi: u32,
    slot: u32,
    b: &mut Array<u32>,
    #[comptime] fmt: KernelFormat,
) {
    match fmt {
        KernelFormat::Q8_0 => {
            // Bytes (0, 2) and (1, 3) of each word, sign flipped: `s + 128`.
            b[0] = (word & 0x00FF_00FF) ^ 0x0080_0080;
            b[1] = ((word >> 8) & 0x00FF_00FF) ^ 0x0080_0080;
            b[2] = (word2 & 0x00FF_00FF) ^ 0x0080_0080;
            b[3] = ((word2 >> 8) & 0x00FF_00FF) ^ 0x0080_0080;
        }
        _ => {
            // 4-bit formats: byte k holds column 4 * slot + k (low nibble) and 16 + 4 * slot + k
            // (K-quants: the low nibbles are sub-block 2j, the high ones 2j + 1). The high
            // nibbles stay where they are, 4 bits up ([`quant_h2`] scales them down).
            let up = word >> 8;
            b[0] = word & 0x000F_000F;
            b[1] = up & 0x000F_000F;
            b[2] = word & 0x00F0_00F0;
            b[3] = up & 0x00F0_00F0;
            if comptime![matches!(fmt, KernelFormat::Q5_0 | KernelFormat::Q5_1)] {
                let qh = hi >> (4 * slot);
                b[0] |= fifth_bits(qh, 4u32);
                b[1] |= fifth_bits(qh >> 1, 4u32);
                b[2] |= fifth_bits(qh >> 16, 8u32);
                b[3] |= fifth_bits(qh >> 17, 8u32);
            }
            if comptime![fmt == KernelFormat::Q5K] {
                // Aligned: bytes 0 and 2 at the pairs' bits (4 and 20 low, 8 and 24 high),
                // bytes 1 and 3 one bit up.
                let up = hi >> 1;
                b[0] |= hi & 0x0010_0010;
                b[1] |= up & 0x0010_0010;
                b[2] |= hi & 0x0100_0100;
                b[3] |= up & 0x0100_0100;
            }
        }
    }
}

/// `acc + sum (q - offset) * x` over one slot's four pairs (`slot_pairs`) and its two runs of
/// `x`, one chain of packed FMAs.
#[cube]
#[allow(clippy::too_many_arguments)]
fn pair_chain(
    acc: Vector<half::f16, Const<2>>,
    b: &Array<u32>,
    xa0: u32,
    xa1: u32,
    xb0: u32,
    xb1: u32,
    #[comptime] fmt: KernelFormat,
) -> Vector<half::f16, Const<2>> {
    let mut p = acc + quant_h2(b[0], 0u32, fmt) * h2(xa0);
    p += quant_h2(b[1], 1u32, fmt) * h2(xa1);
    p += quant_h2(b[2], 2u32, fmt) * h2(xb0);
    p += quant_h2(b[3], 3u32, fmt) * h2(xb1);
    p
}

/// The sum of two runs of `x` (four packed pairs), in `f32`: what a min multiplies.
#[cube]
fn run_pair_sum(xa0: u32, xa1: u32, xb0: u32, xb1: u32) -> f32 {
    h2_sum(h2(xa0) + h2(xa1) + h2(xb0) + h2(xb1))
}

/// The two halves of `v` added in `f32`.
#[cube]
fn h2_sum(v: Vector<half::f16, Const<2>>) -> f32 {
    f32::cast_from(v[0]) + f32::cast_from(v[1])
}

/// The sum of `words` words of packed half `x` from word `first` of `xr` (a wide lane's
/// columns, see `dot_block_h2`), in `f32`, summed as halves 4 words at a time: the term a
/// format's min multiplies, computed once per block for every row.
#[cube]
pub fn x_words_sum(xr: &Array<u32>, #[comptime] first: u32, #[comptime] words: u32) -> f32 {
    let mut t = 0.0f32;
    #[unroll]
    for g in 0..comptime![words / 4] {
        let o = first + 4 * g;
        t += run_pair_sum(
            xr[o as usize],
            xr[(o + 1) as usize],
            xr[(o + 2) as usize],
            xr[(o + 3) as usize],
        );
    }
    t
}

/// A whole 32-weight block (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`) of global block `block`
/// against its 32 columns of `x` in packed half math, as [`dot_slot_h2`] does a slot: `xr` the
/// block's columns as 16 words of halves (in `xh`'s pair order), `s` their scale, `xsum`
/// their [`x_words_sum`] (read where the format has a min). The quants come in 16-byte loads
/// from `w4`, the quant plane seen as vectors of 4 words (`Q4_0`/`Q4_1`: a block each, `Q8_0`:
/// two), so a lane has its block's bytes in flight at once; `Q5_x` blocks (20 bytes, not 16-byte
/// aligned) load word by word from `w`. The four slots' chains meet in `f32`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn dot_block_h2(
    w: &Array<u32>,
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    block: u32,
    xr: &Array<u32>,
    s: f32,
    xsum: f32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let halves = comptime![fmt.halves_per_block()];
    let d = half_at_hw(scales, halves * block) * s;
    let mut mn = 0.0f32;
    if comptime![fmt.has_min()] {
        mn = half_at_hw(scales, halves * block + 1) * s;
    }
    let words = comptime![fmt.words_per_block()];
    let mut qw = Array::<u32>::new(comptime![words as usize]);
    match fmt {
        KernelFormat::Q4_0 | KernelFormat::Q4_1 => {
            let v = w4[block as usize];
            #[unroll]
            for i in 0..4u32 {
                qw[i as usize] = v[i as usize];
            }
        }
        KernelFormat::Q8_0 =>
        {
            #[unroll]
            for h in 0..2u32 {
                let v = w4[(2 * block + h) as usize];
                #[unroll]
                for i in 0..4u32 {
                    qw[(4 * h + i) as usize] = v[i as usize];
                }
            }
        }
        _ =>
        {
            #[unroll]
            for i in 0..comptime![words] {
                qw[i as usize] = w[(block * words + i) as usize];
            }
        }
    }
    let five = comptime![matches!(fmt, KernelFormat::Q5_0 | KernelFormat::Q5_1)];
    let mut b = Array::<u32>::new(4usize);
    let mut sum = 0.0f32;
    // A slot adds 4 products to each half of a chain.
    let per = comptime![fmt.half_chain() / 4];
    #[unroll]
    for c in 0..comptime![4 / per] {
        let mut chain = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
        #[unroll]
        for e in 0..per {
            let slot = c * per + e;
            let mut word2 = 0u32;
            let mut hi = 0u32;
            let mut word = qw[slot as usize];
            if comptime![fmt == KernelFormat::Q8_0] {
                word = qw[(2 * slot) as usize];
                word2 = qw[(2 * slot + 1) as usize];
            }
            if comptime![five] {
                word = qw[(1 + slot) as usize];
                hi = qw[0];
            }
            slot_pairs(word, word2, hi, slot, &mut b, fmt);
            // Runs of 4 columns are 2 words of `xr`.
            let ra = slot_col(slot, 0, fmt) / 2;
            let rb = slot_col(slot, 1, fmt) / 2;
            chain = pair_chain(
                chain,
                &b,
                xr[ra as usize],
                xr[(ra + 1) as usize],
                xr[rb as usize],
                xr[(rb + 1) as usize],
                fmt,
            );
        }
        sum += h2_sum(chain);
    }
    let mut out = d * sum;
    if comptime![fmt.has_min()] {
        out += mn * xsum;
    }
    out
}

/// One 64-weight chunk `j` (sub-blocks `2j` and `2j + 1`) of `Q4_K`/`Q5_K` global block `block`
/// against its 64 columns of `x`, in packed half math: the K-quant counterpart of
/// [`dot_block_h2`] for a wide lane. The chunk's 8 quant words (and `Q5_K`'s 2 words of fifth
/// bits, half of a 16-byte vector) come in 16-byte loads from `w4`; `xr` holds the chunk's
/// columns as 32 words of halves, `sa`/`sb` the scales and `xa`/`xb` the [`x_words_sum`]s of
/// its two 32-column halves (one per sub-block). The block's `d`, `dmin` and 6-bit scales are one aligned 16-byte header in the
/// scale plane (`KernelFormat::halves_per_block`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn dot_kchunk_h2(
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    block: u32,
    j: u32,
    xr: &Array<u32>,
    sa: f32,
    sb: f32,
    xa: f32,
    xb: f32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let q5 = comptime![fmt == KernelFormat::Q5K];
    // In vectors of 4 words: the block, its fifth-bit words (Q5_K), chunk j's quant words.
    let vb = block * comptime![fmt.words_per_block() / 4];
    let first = comptime![if q5 { 2u32 } else { 0u32 }];
    let mut qw = Array::<u32>::new(8usize);
    let mut qh = Array::<u32>::new(2usize);
    #[unroll]
    for v in 0..2u32 {
        let q = w4[(vb + first + 2 * j + v) as usize];
        #[unroll]
        for k in 0..4u32 {
            qw[(4 * v + k) as usize] = q[k as usize];
        }
    }
    if comptime![q5] {
        // Chunk j's fifth bits: words 2j and 2j + 1 (`layout::q5k_fifth_words`).
        let h = w4[(vb + j / 2) as usize];
        let odd = j % 2 == 1;
        qh[0] = select(odd, h[2], h[0]);
        qh[1] = select(odd, h[3], h[1]);
    }
    let mut b = Array::<u32>::new(4usize);
    // A chain per sub-block; a word adds 2 products to each half of each chain.
    let per = comptime![fmt.half_chain() / 2];
    let mut lo = 0.0f32;
    let mut hi = 0.0f32;
    #[unroll]
    for c in 0..comptime![8 / per] {
        let mut pa = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
        let mut pb = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
        #[unroll]
        for e in 0..per {
            let i = c * per + e;
            let mut h = 0u32;
            if comptime![q5] {
                h = q5k_fifth(qh[(i / 4) as usize], i % 4);
            }
            slot_pairs(qw[i as usize], 0u32, h, 8 * j + i, &mut b, fmt);
            // Low nibbles: chunk columns 4i.. (sub-block 2j); high: 32 + 4i.. (2j + 1).
            pa += quant_h2(b[0], 0u32, fmt) * h2(xr[(2 * i) as usize]);
            pa += quant_h2(b[1], 1u32, fmt) * h2(xr[(2 * i + 1) as usize]);
            pb += quant_h2(b[2], 2u32, fmt) * h2(xr[(16 + 2 * i) as usize]);
            pb += quant_h2(b[3], 3u32, fmt) * h2(xr[(17 + 2 * i) as usize]);
        }
        lo += h2_sum(pa);
        hi += h2_sum(pb);
    }
    k_pair_apply(scales, block, j, lo, hi, xa, xb, sa, sb)
}

/// Lane `t` of a `Q6_K` block (global block `block`) in packed half math: positions `16h ..
/// 16h + 16` (`h = t % 2`) of half-block `n = t / 2` in each of its 4 sub-rows `k` (see
/// `kernels::XLayout`), against `xr`, those columns of half `x` as 32 words (sub-row `k` at
/// words `8k ..`, runs of 4 columns in pair order), and `xs[k]`, the sub-row's 32-column
/// activation scale. The quant plane's block is 13 16-byte vectors: `ql` (8), `qh` (4), the
/// 16 signed sub-block scales (1). The lane's bytes sit together: `ql[64n + 16h ..]` (sub-rows
/// 0 and 2, low and high nibbles), `ql[64n + 32 + 16h ..]` (1 and 3), `qh[32n + 16h ..]` (2
/// bits each) and scales `8n + h + 2k`. Weights `q - 32` (in -32..31) times `x` (in [-1, 1]),
/// a sub-row's four runs (8 products) per half chain, meet in `f32`; `d`, the sub-block scale
/// and the activation scale are applied there.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn dot_q6k_h2(
    w: &Array<u32>,
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    block: u32,
    t: u32,
    xr: &Array<u32>,
    xs: &Array<f32>,
) -> f32 {
    let n = t / 2;
    let h = t % 2;
    let vb = block * 13;
    let d = half_at_hw(scales, block);
    let la = w4[(vb + 4 * n + h) as usize];
    let lb = w4[(vb + 4 * n + 2 + h) as usize];
    let hb = w4[(vb + 8 + 2 * n + h) as usize];
    // Sub-block scales 8n + h + 2k: bytes h and h + 2 of words 48 + 2n (k = 0, 1) and
    // 49 + 2n (k = 2, 3).
    let sw0 = w[(block * 52 + 48 + 2 * n) as usize] >> (8 * h);
    let sw1 = w[(block * 52 + 49 + 2 * n) as usize] >> (8 * h);
    let off = Vector::<half::f16, Const<2>>::cast_from(1056.0f32);
    let mut out = 0.0f32;
    #[unroll]
    for k in 0..4u32 {
        // A sub-row's 16 weights, one chain: 8 products per half, each at most 32 in magnitude.
        let mut p = Vector::<half::f16, Const<2>>::cast_from(0.0f32);
        #[unroll]
        for e in 0..4u32 {
            // Sub-rows 0 and 1 take the low nibbles of their `ql` run, 2 and 3 the high.
            let lw = select(k % 2 == 0, la[e as usize], lb[e as usize]) >> (4 * (k / 2));
            let hw = hb[e as usize] >> (2 * k);
            let p0 = (lw & 0x000F_000F) | ((hw & 0x0003_0003) << 4);
            let p1 = ((lw >> 8) & 0x000F_000F) | (((hw >> 8) & 0x0003_0003) << 4);
            p += (magic_h2(p0) - off) * h2(xr[(8 * k + 2 * e) as usize]);
            p += (magic_h2(p1) - off) * h2(xr[(8 * k + 2 * e + 1) as usize]);
        }
        let sw = select(k < 2, sw0, sw1) >> (16 * (k % 2));
        out += signed_byte(sw & 0xFF) * xs[k as usize] * h2_sum(p);
    }
    d * out
}

/// The scales of `Q4_K`/`Q5_K` sub-blocks `2j` and `2j + 1` of global block `block` applied to
/// their half-math sums (both half paths): `lo`/`hi` the sums of quants times scaled `x`,
/// `xa`/`xb` the sums of scaled `x`, `sa`/`sb` the activation scales, each sub-block
/// `s * (d * scale * sum - dmin * min * xsum)`. The header (`d`, `dmin` and the packed 6-bit
/// scales) is one aligned 16-byte run of the scale plane.
#[cube]
#[allow(clippy::too_many_arguments)]
fn k_pair_apply(
    scales: &Array<u32>,
    block: u32,
    j: u32,
    lo: f32,
    hi: f32,
    xa: f32,
    xb: f32,
    sa: f32,
    sb: f32,
) -> f32 {
    let d = half_at_hw(scales, 8 * block);
    let dmin = half_at_hw(scales, 8 * block + 1);
    let sm = k4_pair(scales, block, j);
    let ra = d * byte_f32(sm, 0u32) * lo - dmin * byte_f32(sm, 2u32) * xa;
    let rb = d * byte_f32(sm, 1u32) * hi - dmin * byte_f32(sm, 3u32) * xb;
    sa * ra + sb * rb
}

/// A wide lane's `slot` of global block `block` against its columns of half `x` (`xr`, the
/// block's columns `slot * wide_cols..`): `xs[g]` the scale of its `g`-th 32 columns
/// (`KernelFormat::wide_groups`), `xt[g]` their [`x_words_sum`] (formats with a min).
#[cube]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn dot_wide_h2(
    w: &Array<u32>,
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    block: u32,
    slot: u32,
    xr: &Array<u32>,
    xs: &Array<f32>,
    xt: &Array<f32>,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let mut out = 0.0f32;
    if comptime![matches!(fmt, KernelFormat::Q4K | KernelFormat::Q5K)] {
        out = dot_kchunk_h2(w4, scales, block, slot, xr, xs[0], xs[1], xt[0], xt[1], fmt);
    } else if comptime![fmt == KernelFormat::Q6K] {
        out = dot_q6k_h2(w, w4, scales, block, slot, xr, xs);
    } else {
        out = dot_block_h2(w, w4, scales, block, xr, xs[0], xt[0], fmt);
    }
    out
}

/// `f32` value of half `i` of the scale plane through the hardware conversion (kernels that
/// already need `f16`).
#[cube]
pub fn half_at_hw(scales: &Array<u32>, i: u32) -> f32 {
    // The half to the low bits, so the pair is indexed by a constant.
    let pair = h2(scales[(i / 2) as usize] >> ((i % 2) * 16));
    f32::cast_from(pair[0])
}

/// Slots `slot .. slot + n` of global block `block` (a format with [`KernelFormat::half_x`]) as
/// four packed half pairs of weights each, with their scales (and mins) applied, in
/// [`slot_pairs`]'s order: `p[4k]` holds the weights at columns 0 and 2 of slot `slot + k`'s
/// first run of 4 (`slot_col(slot + k, 0)`), `p[4k + 1]` columns 1 and 3, `p[4k + 2]`/`p[4k + 3]`
/// the same of its second run. With `n == 1` the slot's words are loaded one by one from `w`;
/// with `n == fmt.mma_quad()` (> 1) they come in one 16-byte load from `w4`, the quant plane as
/// vectors, and the scales (shared by the `n` slots) are decoded once.
/// The quants become halves by the `1024 + n` trick and each weight is `(q - offset) * a + m`
/// in packed half math: `q - offset` is exact, so a format without a min rounds once, as the
/// `f32` path's conversion to half does. Run scales are formed in `f32` (`K`-quants:
/// `d * scale`, `-dmin * min`), then rounded to half. Where `live` is false the scales and
/// mins are zero, so every weight is zero (the caller clamps `block` into the matrix): one
/// select per run rather than one per weight.
#[cube]
#[allow(unused_assignments, clippy::too_many_arguments)]
pub fn decode_slots_h2(
    w: &Array<u32>,
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    block: u32,
    slot: u32,
    live: bool,
    p: &mut Array<Vector<half::f16, Const<2>>>,
    #[comptime] n: u32,
    #[comptime] fmt: KernelFormat,
) {
    let wb = block * comptime![fmt.words_per_block()];
    let kquant = comptime![matches!(fmt, KernelFormat::Q4K | KernelFormat::Q5K)];
    let halves = comptime![fmt.halves_per_block()];
    // Scale and min of the slots' two runs (a `K`-quant's `n` slots share their sub-blocks).
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut m0 = 0.0f32;
    let mut m1 = 0.0f32;
    if comptime![kquant] {
        let j = slot / 8;
        let d = half_at_hw(scales, 8 * block);
        let dmin = half_at_hw(scales, 8 * block + 1);
        let sm = k4_pair(scales, block, j);
        a0 = d * byte_f32(sm, 0u32);
        m0 = -(dmin * byte_f32(sm, 2u32));
        a1 = d * byte_f32(sm, 1u32);
        m1 = -(dmin * byte_f32(sm, 3u32));
    } else {
        a0 = half_at_hw(scales, halves * block);
        a1 = a0;
        if comptime![fmt.has_min()] {
            m0 = half_at_hw(scales, halves * block + 1);
            m1 = m0;
        }
    }
    a0 = select(live, a0, 0.0);
    a1 = select(live, a1, 0.0);
    let sa = Vector::<half::f16, Const<2>>::cast_from(a0);
    let sb = Vector::<half::f16, Const<2>>::cast_from(a1);
    let ma = Vector::<half::f16, Const<2>>::cast_from(select(live, m0, 0.0));
    let mb = Vector::<half::f16, Const<2>>::cast_from(select(live, m1, 0.0));
    let mut b = Array::<u32>::new(4usize);
    if comptime![n == 1] {
        load_slot_pairs(w, wb, slot, &mut b, fmt);
        scale_pairs(&b, sa, sb, ma, mb, p, 0u32, fmt);
    } else {
        let first = comptime![if fmt == KernelFormat::Q5K { 8u32 } else { 0u32 }];
        let per_slot = comptime![4 / n];
        let quad = w4[((wb + first + per_slot * slot) / 4) as usize];
        // `Q5_K`: the `n` (4) slots' one word of fifth bits (`slot` is a multiple of `n`).
        let mut hs = 0u32;
        if comptime![fmt == KernelFormat::Q5K] {
            hs = w[(wb + slot / 4) as usize];
        }
        #[unroll]
        for k in 0..n {
            let mut word2 = 0u32;
            let mut hi = 0u32;
            if comptime![per_slot == 2] {
                word2 = quad[(2 * k + 1) as usize];
            }
            if comptime![fmt == KernelFormat::Q5K] {
                hi = q5k_fifth(hs, k);
            }
            slot_pairs(
                quad[(per_slot * k) as usize],
                word2,
                hi,
                slot + k,
                &mut b,
                fmt,
            );
            scale_pairs(&b, sa, sb, ma, mb, p, 4 * k, fmt);
        }
    }
}

/// `p[at ..at + 4]`: the quant pairs `b` ([`slot_pairs`]) as weights, `(q - offset) * scale + min`
/// per run.
#[cube]
#[allow(clippy::too_many_arguments)]
fn scale_pairs(
    b: &Array<u32>,
    sa: Vector<half::f16, Const<2>>,
    sb: Vector<half::f16, Const<2>>,
    ma: Vector<half::f16, Const<2>>,
    mb: Vector<half::f16, Const<2>>,
    p: &mut Array<Vector<half::f16, Const<2>>>,
    at: u32,
    #[comptime] fmt: KernelFormat,
) {
    p[at as usize] = quant_h2(b[0], 0u32, fmt) * sa;
    p[(at + 1) as usize] = quant_h2(b[1], 1u32, fmt) * sa;
    p[(at + 2) as usize] = quant_h2(b[2], 2u32, fmt) * sb;
    p[(at + 3) as usize] = quant_h2(b[3], 3u32, fmt) * sb;
    if comptime![fmt.has_min()] {
        p[at as usize] += ma;
        p[(at + 1) as usize] += ma;
        p[(at + 2) as usize] += mb;
        p[(at + 3) as usize] += mb;
    }
}
