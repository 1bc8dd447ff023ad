//! x86-64 row dot products, after llama.cpp's x86 `ggml_vec_dot_*`: unpack a block's weights
//! to 32 bytes, multiply them with the int8 activations into 8 i32 sums, one float FMA per
//! block. One body per format serves two instruction sets through [`IntDot`]:
//!
//! - [`Avx2`] (AVX2 + FMA + F16C): `maddubs` to i16 pairs, then `madd` to i32;
//! - [`Vnni`] (AVX-512 F/BW/VL/VNNI): one `vpdpbusd` on 256-bit vectors. 256 bits because a
//!   block of 32 weights is 32 bytes and Zen 4 splits 512-bit operations in two halves: wider
//!   vectors would add shuffles, not throughput.
//!
//! Each kernel dots one weight row with the activations of `T` tokens at once, so a weight
//! block is unpacked once for all of them (prefill); `T = 1` is decode. The operations per
//! token are the same for every `T`, so a result does not depend on how tokens are grouped.
//!
//! Bodies are `#[inline(always)]` without target features: they are compiled only inside the
//! `#[target_feature]` row loops of the parent module, which run after detection.
//!
//! Weights are read through unaligned loads at byte offsets of `ggml-common.h`'s layouts
//! (the offsets are checked against [`crate::quant::blocks`] by `offset_of!` below).

use std::arch::x86_64::*;
use std::mem::offset_of;

use crate::quant::blocks::*;

const _: () = {
    assert!(offset_of!(BlockQ4_1, m) == 2 && offset_of!(BlockQ4_1, qs) == 4);
    assert!(offset_of!(BlockQ5_0, qh) == 2 && offset_of!(BlockQ5_0, qs) == 6);
    assert!(offset_of!(BlockQ5_1, m) == 2 && offset_of!(BlockQ5_1, qh) == 4);
    assert!(offset_of!(BlockQ5_1, qs) == 8 && offset_of!(BlockQ8_1, s) == 2);
    assert!(offset_of!(BlockQ4K, scales) == 4 && offset_of!(BlockQ4K, qs) == 16);
    assert!(offset_of!(BlockQ5K, qh) == 16 && offset_of!(BlockQ5K, qs) == 48);
    assert!(offset_of!(BlockQ6K, qh) == 128 && offset_of!(BlockQ6K, scales) == 192);
    assert!(offset_of!(BlockQ6K, d) == 208);
};

/// How bytes are multiplied: sums of 4 adjacent `u8 * i8` products as 8 i32 lanes.
pub trait IntDot {
    /// Whether `dot_acc` takes unsigned bytes up to 255 exactly (VNNI), which the row x token
    /// tiles of [`tile_signed`] need for their offset weights.
    const TILES: bool;
    /// `acc + sum(x * y)` per group of 4 bytes. Exact when every `x < 128` (AVX2's `maddubs`
    /// saturates i16 pairs above that); every caller unpacks weights below 128.
    unsafe fn dot_acc(acc: __m256i, x: __m256i, y: __m256i) -> __m256i;
    /// Integer scales for [`IntDot::scaled`]: `s0` for bytes 0..16, `s1` for bytes 16..32.
    unsafe fn scales(s0: i32, s1: i32) -> __m256i;
    /// `sum(x * y) * scale` per group of 4 bytes, scales from [`IntDot::scales`].
    unsafe fn scaled(x: __m256i, y: __m256i, scales: __m256i) -> __m256i;
}

/// AVX2: `maddubs` (u8 x i8 -> i16 pairs), then `madd` (i16 pairs -> i32).
pub struct Avx2;

impl IntDot for Avx2 {
    const TILES: bool = false;
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, x: __m256i, y: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(x, y);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn scales(s0: i32, s1: i32) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16))
    }
    #[inline(always)]
    unsafe fn scaled(x: __m256i, y: __m256i, scales: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), scales)
    }
}

/// AVX-512 VNNI: `vpdpbusd` multiplies and sums groups of 4 bytes into i32 in one instruction.
pub struct Vnni;

impl IntDot for Vnni {
    const TILES: bool = true;
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, x, y)
    }
    #[inline(always)]
    unsafe fn scales(s0: i32, s1: i32) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi32(s1), _mm_set1_epi32(s0))
    }
    #[inline(always)]
    unsafe fn scaled(x: __m256i, y: __m256i, scales: __m256i) -> __m256i {
        _mm256_mullo_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y), scales)
    }
}

/// `f16` bits at `p` (any alignment) as `f32`. In assembly: for any intrinsic spelling LLVM
/// emits a 16-bit `vpinsrw` into a don't-care register, which ties the conversion to that
/// register's last writer; measured, that was often the previous block's accumulator and made
/// `Q8_0` decode 2.6x slower. A broadcast load writes the whole register.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let out: f32;
    std::arch::asm!(
        "vpbroadcastw {o}, word ptr [{p}]",
        "vcvtph2ps {o}, {o}",
        p = in(reg) p,
        o = out(xmm_reg) out,
        options(pure, readonly, nostack, preserves_flags),
    );
    out
}

/// Two adjacent f16 values at `p` as lanes 0 and 1 (`Q4_1`'s `d, m`; `Q8_1`'s `d, s`).
#[inline(always)]
unsafe fn f16_pair_at(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    hsum128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps(v, 1),
    ))
}

#[inline(always)]
unsafe fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// 16 bytes of nibbles to 32 bytes 0..16: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let lo = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// 32 bits at `p` to 32 bytes, 0xFF where the bit is set.
#[inline(always)]
unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned() as i32;
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[inline(always)]
unsafe fn load32(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Per-token accumulator: `v` sums `d_x d_y sum(q_x q_y)` over blocks, `s` a second term
/// (`m_x s_y` of the offset formats, the mins of the k-quants).
#[derive(Clone, Copy)]
struct Acc {
    v: __m256,
    s: __m128,
}

/// `for_blocks!(T, nb, |i, acc| body)` runs `body` for blocks `i` in `0..nb` with `acc` the
/// accumulators of the `T` tokens, and evaluates to them. Even and odd blocks accumulate into
/// two separate sets, so one block's FMA latency overlaps the next block's integer work
/// (decode has one token, hence one chain per set); the order of operations per token is the
/// same for every `T`. A macro, not a function taking a closure: a closure is inlined at
/// LLVM's discretion, and one left out of line runs without the row loop's target features
/// (every intrinsic a call; measured 100x slower).
macro_rules! for_blocks {
    ($t:expr, $nb:expr, |$i:ident, $acc:ident| $body:block) => {{
        let zero = Acc {
            v: _mm256_setzero_ps(),
            s: _mm_setzero_ps(),
        };
        let (mut even, mut odd) = ([zero; $t], [zero; $t]);
        let nb = $nb;
        let mut next = 0;
        while next + 2 <= nb {
            {
                let ($i, $acc) = (next, &mut even);
                $body
            }
            {
                let ($i, $acc) = (next + 1, &mut odd);
                $body
            }
            next += 2;
        }
        if next < nb {
            let ($i, $acc) = (next, &mut even);
            $body
        }
        for (e, o) in even.iter_mut().zip(odd) {
            e.v = _mm256_add_ps(e.v, o.v);
            e.s = _mm_add_ps(e.s, o.s);
        }
        even
    }};
}

/// `[f(acc[0]), .., f(acc[T - 1])]` as a loop: `array::map`'s closure may be left out of line
/// and then runs without the caller's target features (every intrinsic a call).
macro_rules! each {
    ($acc:expr, |$a:ident| $e:expr) => {{
        let acc = $acc;
        let mut out = [0f32; T];
        for k in 0..T {
            let $a = acc[k];
            out[k] = $e;
        }
        out
    }};
}

/// Formats with signed weights and a scale only (`Q4_0`, `Q5_0`, `Q8_0`) against `Q8_0`:
/// `unpack` gives a block's weights as i8; the sign trick (`|x| * sign(x) * y`) feeds them to
/// the unsigned-by-signed multiply.
#[inline(always)]
unsafe fn dot_signed<D: IntDot, const T: usize>(
    row: &[u8],
    ys: [&[BlockQ8_0]; T],
    block_bytes: usize,
    unpack: impl Fn(*const u8) -> __m256i,
) -> [f32; T] {
    let p = row.as_ptr();
    let acc = for_blocks!(T, ys[0].len(), |i, acc| {
        let b = p.add(i * block_bytes);
        let dx = f16_at(b);
        let qx = unpack(b);
        let ax = _mm256_sign_epi8(qx, qx);
        for (acc, ys) in acc.iter_mut().zip(&ys) {
            let y = ys.get_unchecked(i);
            let sy = _mm256_sign_epi8(load32(y.qs.as_ptr() as *const u8), qx);
            let sum = D::dot_acc(_mm256_setzero_si256(), ax, sy);
            let d = _mm256_set1_ps(dx * f16_at(y as *const BlockQ8_0 as *const u8));
            acc.v = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc.v);
        }
    });
    each!(acc, |a| hsum(a.v))
}

/// Formats with unsigned weights, scale and offset (`Q4_1`, `Q5_1`; `d, m` at byte 0) against
/// `Q8_1`: `d_x d_y sum(q_x q_y) + m_x s_y` per block.
#[inline(always)]
unsafe fn dot_offset<D: IntDot, const T: usize>(
    row: &[u8],
    ys: [&[BlockQ8_1]; T],
    block_bytes: usize,
    unpack: impl Fn(*const u8) -> __m256i,
) -> [f32; T] {
    let p = row.as_ptr();
    let acc = for_blocks!(T, ys[0].len(), |i, acc| {
        let b = p.add(i * block_bytes);
        let dm = f16_pair_at(b);
        let qx = unpack(b);
        for (acc, ys) in acc.iter_mut().zip(&ys) {
            let y = ys.get_unchecked(i);
            // Lane 0: d_x d_y; lane 1: m_x s_y.
            let ds = _mm_mul_ps(dm, f16_pair_at(y as *const BlockQ8_1 as *const u8));
            let sum = D::dot_acc(
                _mm256_setzero_si256(),
                qx,
                load32(y.qs.as_ptr() as *const u8),
            );
            acc.v = _mm256_fmadd_ps(_mm256_broadcastss_ps(ds), _mm256_cvtepi32_ps(sum), acc.v);
            acc.s = _mm_add_ps(acc.s, ds);
        }
    });
    each!(acc, |a| hsum(a.v) + _mm_cvtss_f32(_mm_movehdup_ps(a.s)))
}

/// Rows of a block-tile: weight rows dotted together with [`TILE_TOKENS`] tokens.
pub const TILE_ROWS: usize = 4;
/// Tokens of a block-tile.
pub const TILE_TOKENS: usize = 4;

/// [`dot_signed`] for [`TILE_ROWS`] rows and [`TILE_TOKENS`] tokens at once (prefill with
/// VNNI), over rows unpacked beforehand by [`unpack_signed_row`]: each row's bytes serve four
/// tokens and each activation block four rows. Weights are unsigned, `q + off` (no sign trick
/// per row and token), and each activation block's `off * sum(y)` is subtracted through the
/// accumulator's start value, so the integer sums are exactly `dot_signed`'s; the float steps
/// per (row, token) are the same too (even and odd blocks in two chains, `dx * dy` then one
/// FMA), so every result equals `dot_signed`'s bit for bit. The even blocks run in a first
/// pass and the odd ones in a second, so only one set of 16 accumulators is live.
///
/// # Safety
/// Every `qs[r]` holds `32 * ys[t].len()` bytes and `ds[r]` `ys[t].len()` scales; `D::TILES`.
#[inline(always)]
pub unsafe fn tile_signed<D: IntDot>(
    qs: [&[u8]; TILE_ROWS],
    ds: [&[f32]; TILE_ROWS],
    ys: [&[BlockQ8_0]; TILE_TOKENS],
    off: i8,
) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
    debug_assert!(D::TILES);
    let nb = ys[0].len();
    let offv = _mm256_set1_epi8(off);
    // The even chains wait in memory while the odd ones run: 16 more live vectors would spill
    // inside the loop instead.
    let mut even = [[[0f32; 8]; TILE_TOKENS]; TILE_ROWS];
    let mut out = [[0f32; TILE_TOKENS]; TILE_ROWS];
    for parity in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); TILE_TOKENS]; TILE_ROWS];
        let mut i = parity;
        while i < nb {
            // Loops, not `array::from_fn` or `map`: their closures may be left out of line,
            // without the caller's target features.
            let mut qx = [_mm256_setzero_si256(); TILE_ROWS];
            for r in 0..TILE_ROWS {
                qx[r] = load32(qs[r].as_ptr().add(32 * i));
            }
            for t in 0..TILE_TOKENS {
                let y = ys[t].get_unchecked(i);
                let yq = load32(y.qs.as_ptr() as *const u8);
                let start = _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    D::dot_acc(_mm256_setzero_si256(), offv, yq),
                );
                let dy = _mm256_set1_ps(f16_at(y as *const BlockQ8_0 as *const u8));
                for r in 0..TILE_ROWS {
                    let sum = D::dot_acc(start, qx[r], yq);
                    let d = _mm256_mul_ps(_mm256_set1_ps(*ds[r].get_unchecked(i)), dy);
                    acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc[r][t]);
                }
            }
            i += 2;
        }
        for r in 0..TILE_ROWS {
            for t in 0..TILE_TOKENS {
                let e = even[r][t].as_mut_ptr();
                if parity == 0 {
                    _mm256_storeu_ps(e, acc[r][t]);
                } else {
                    out[r][t] = hsum(_mm256_add_ps(_mm256_loadu_ps(e), acc[r][t]));
                }
            }
        }
    }
    out
}

/// A row of a signed format unpacked for [`tile_signed`]: block `i`'s weights as 32 unsigned
/// bytes at `q[32 i..]`, its scale at `d[i]`.
///
/// # Safety
/// `row` holds `d.len()` blocks of `block_bytes`, `q` is `32 * d.len()` long.
#[inline(always)]
pub unsafe fn unpack_signed_row(
    row: &[u8],
    block_bytes: usize,
    q: &mut [u8],
    d: &mut [f32],
    unpack_unsigned: impl Fn(*const u8) -> __m256i,
) {
    for (i, d) in d.iter_mut().enumerate() {
        let b = row.as_ptr().add(i * block_bytes);
        _mm256_storeu_si256(
            q.as_mut_ptr().add(32 * i) as *mut __m256i,
            unpack_unsigned(b),
        );
        *d = f16_at(b);
    }
}

/// `Q4_0` weights as unsigned bytes `q + 8`, i.e. the raw nibbles.
#[inline(always)]
pub unsafe fn unpack_q4_0_unsigned(b: *const u8) -> __m256i {
    nibbles(b.add(2))
}

/// `Q5_0` weights as unsigned bytes `q + 16`, i.e. the raw 5-bit values.
#[inline(always)]
pub unsafe fn unpack_q5_0_unsigned(b: *const u8) -> __m256i {
    let hi = _mm256_and_si256(bits_to_bytes(b.add(2)), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(b.add(6)), hi)
}

/// `Q8_0` weights as unsigned bytes `q + 128`.
#[inline(always)]
pub unsafe fn unpack_q8_0_unsigned(b: *const u8) -> __m256i {
    _mm256_xor_si256(load32(b.add(2)), _mm256_set1_epi8(-128))
}

#[inline(always)]
pub unsafe fn dot_q4_0<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8_0]; T]) -> [f32; T] {
    dot_signed::<D, T>(row, ys, 18, |b| {
        _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
    })
}

#[inline(always)]
pub unsafe fn dot_q4_1<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8_1]; T]) -> [f32; T] {
    dot_offset::<D, T>(row, ys, 20, |b| nibbles(b.add(4)))
}

#[inline(always)]
pub unsafe fn dot_q5_0<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8_0]; T]) -> [f32; T] {
    dot_signed::<D, T>(row, ys, 22, |b| {
        // High bit clear -> nibble | 0xF0 == nibble - 16 as i8; set -> nibble (== q - 16).
        let hi = _mm256_andnot_si256(bits_to_bytes(b.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(b.add(6)), hi)
    })
}

#[inline(always)]
pub unsafe fn dot_q5_1<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8_1]; T]) -> [f32; T] {
    dot_offset::<D, T>(row, ys, 24, |b| {
        let hi = _mm256_and_si256(bits_to_bytes(b.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(b.add(8)), hi)
    })
}

#[inline(always)]
pub unsafe fn dot_q8_0<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8_0]; T]) -> [f32; T] {
    dot_signed::<D, T>(row, ys, 34, |b| load32(b.add(2)))
}

/// The 6-bit scales (bytes 0..8) and mins (bytes 8..16) of a `Q4_K`/`Q5_K` block's packed
/// `scales` at `p`, as llama.cpp unpacks them (`kmask1..3`); equal to [`scale_min_k4`].
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let u = |k: usize| (p.add(4 * k) as *const u32).read_unaligned();
    let (u0, u1, u2) = (u(0), u(1), u(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

/// `Q4_K`/`Q5_K` against `Q8_K`: `q(j, block)` gives the unsigned 5-bit-or-less weights of
/// 32-element sub-block `j` (0..8) as bytes.
#[inline(always)]
unsafe fn dot_k4<D: IntDot, const T: usize>(
    row: &[u8],
    ys: [&[BlockQ8K]; T],
    block_bytes: usize,
    mut q: impl FnMut(usize, *const u8) -> __m256i,
) -> [f32; T] {
    let p = row.as_ptr();
    let acc = for_blocks!(T, ys[0].len(), |i, acc| {
        let b = p.add(i * block_bytes);
        let sm = k4_scales_mins(b.add(4));
        let sc: [u8; 16] = std::mem::transmute(sm);
        // Mins as 8 i16, dotted with the activation sums of each 32-element sub-block.
        let mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sm[3] as i32, sm[2] as i32));
        let mut sumi = [_mm256_setzero_si256(); T];
        for (j, &scale) in sc[..8].iter().enumerate() {
            let qx = q(j, b);
            let s = D::scales(scale as i32, scale as i32);
            for (sumi, ys) in sumi.iter_mut().zip(&ys) {
                let y = ys.get_unchecked(i).qs.as_ptr().add(32 * j) as *const u8;
                *sumi = _mm256_add_epi32(*sumi, D::scaled(qx, load32(y), s));
            }
        }
        let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
        for ((acc, ys), sumi) in acc.iter_mut().zip(&ys).zip(sumi) {
            let y = ys.get_unchecked(i);
            acc.v = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc.v);
            let bsums = load32(y.bsums.as_ptr() as *const u8);
            let sub = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256(bsums, 1),
            );
            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, sub));
            acc.s = _mm_fmadd_ps(_mm_set1_ps(dmin * y.d), m, acc.s);
        }
    });
    each!(acc, |a| hsum(a.v) - hsum128(a.s))
}

#[inline(always)]
pub unsafe fn dot_q4k<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8K]; T]) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0xF);
    let mut q4 = _mm256_setzero_si256();
    dot_k4::<D, T>(row, ys, 144, |j, b| {
        // Sub-blocks 2k and 2k+1 are the low and high nibbles of qs[32k..32k + 32].
        if j % 2 == 0 {
            q4 = load32(b.add(16 + 16 * j));
            _mm256_and_si256(q4, m4)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4)
        }
    })
}

#[inline(always)]
pub unsafe fn dot_q5k<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8K]; T]) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0xF);
    let one = _mm256_set1_epi8(1);
    let mut q4 = _mm256_setzero_si256();
    let mut hbits = _mm256_setzero_si256();
    dot_k4::<D, T>(row, ys, 176, |j, b| {
        if j == 0 {
            hbits = load32(b.add(16));
        }
        // Bit j of qh[l] is bit 4 of element 32j + l: shift right once per sub-block.
        let h = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4);
        hbits = _mm256_srli_epi16(hbits, 1);
        let lo = if j % 2 == 0 {
            q4 = load32(b.add(48 + 16 * j));
            _mm256_and_si256(q4, m4)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4)
        };
        _mm256_or_si256(lo, h)
    })
}

#[inline(always)]
pub unsafe fn dot_q6k<D: IntDot, const T: usize>(row: &[u8], ys: [&[BlockQ8K]; T]) -> [f32; T] {
    let p = row.as_ptr();
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let acc = for_blocks!(T, ys[0].len(), |i, acc| {
        let b = p.add(i * 210);
        let sc = b.add(192) as *const i8;
        let mut sumi = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            let ql0 = load32(b.add(64 * half));
            let ql1 = load32(b.add(64 * half + 32));
            let qh = load32(b.add(128 + 32 * half));
            let high = |shift: i32| -> __m256i {
                let h = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16(qh, 2),
                    4 => _mm256_srli_epi16(qh, 4),
                    _ => _mm256_srli_epi16(qh, 6),
                };
                _mm256_slli_epi16(_mm256_and_si256(h, m3), 4)
            };
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), high(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), high(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), high(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), high(6)),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let s = 8 * half + 2 * k;
                let scales = D::scales(*sc.add(s) as i32, *sc.add(s + 1) as i32);
                for (sumi, ys) in sumi.iter_mut().zip(&ys) {
                    let y = ys.get_unchecked(i).qs.as_ptr().add(128 * half + 32 * k);
                    *sumi = _mm256_add_epi32(*sumi, D::scaled(q, load32(y as *const u8), scales));
                }
            }
        }
        // The weights are q - 32: subtract 32 * sum_g scale_g * (activation sum of group g),
        // the 16-element groups being exactly Q8_K's bsums.
        let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i));
        let d = f16_at(b.add(208));
        for ((acc, ys), sumi) in acc.iter_mut().zip(&ys).zip(sumi) {
            let y = ys.get_unchecked(i);
            let bsums = load32(y.bsums.as_ptr() as *const u8);
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales16, bsums), 5);
            let sumi = _mm256_sub_epi32(sumi, offset);
            acc.v = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc.v);
        }
    });
    each!(acc, |a| hsum(a.v))
}

/// Float dot over `n` weights, 32 per step in four accumulators; `load8(i)` gives weights
/// `i..i + 8` as `f32`, `one(i)` weight `i`.
#[inline(always)]
unsafe fn dot_float(x: &[f32], load8: impl Fn(usize) -> __m256, one: impl Fn(usize) -> f32) -> f32 {
    let n = x.len();
    let xp = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load8(i + 8 * k), _mm256_loadu_ps(xp.add(i + 8 * k)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load8(i), _mm256_loadu_ps(xp.add(i)), acc[0]);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        sum += one(j) * x[j];
    }
    sum
}

#[inline(always)]
pub unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let p = row.as_ptr() as *const f32;
    dot_float(
        x,
        |i| _mm256_loadu_ps(p.add(i)),
        |i| p.add(i).read_unaligned(),
    )
}

#[inline(always)]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    let p = row.as_ptr();
    dot_float(
        x,
        |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
        |i| f16_at(p.add(2 * i)),
    )
}

#[inline(always)]
pub unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let p = row.as_ptr();
    dot_float(
        x,
        |i| {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        },
        |i| f32::from_bits(((p.add(2 * i) as *const u16).read_unaligned() as u32) << 16),
    )
}
