//! AVX2 + FMA + F16C row dot products, after llama.cpp's x86 `ggml_vec_dot_*`: unpack a
//! block's weights to 32 bytes, `maddubs` them with the int8 activations, one float FMA per
//! block. Every function carries the target features, so they inline into each other and into
//! the `#[target_feature]` row loops of the parent module; call them only after detection.
//!
//! Weights are read through unaligned loads at byte offsets of `ggml-common.h`'s layouts
//! (the offsets are checked against [`crate::quant::blocks`] by `offset_of!` below).

use std::arch::x86_64::*;
use std::mem::offset_of;

use crate::quant::blocks::*;

const _: () = {
    assert!(offset_of!(BlockQ4_1, m) == 2 && offset_of!(BlockQ4_1, qs) == 4);
    assert!(offset_of!(BlockQ5_0, qh) == 2 && offset_of!(BlockQ5_0, qs) == 6);
    assert!(offset_of!(BlockQ5_1, qh) == 4 && offset_of!(BlockQ5_1, qs) == 8);
    assert!(offset_of!(BlockQ4K, scales) == 4 && offset_of!(BlockQ4K, qs) == 16);
    assert!(offset_of!(BlockQ5K, qh) == 16 && offset_of!(BlockQ5K, qs) == 48);
    assert!(offset_of!(BlockQ6K, qh) == 128 && offset_of!(BlockQ6K, scales) == 192);
    assert!(offset_of!(BlockQ6K, d) == 208);
};

/// `f16` bits at `p` (any alignment) as `f32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_val(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// 16 bytes of nibbles to 32 bytes 0..16: low nibbles first, then high nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let lo = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// 32 bits at `p` to 32 bytes, 0xFF where the bit is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
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

/// Sums of pairs of `u8 * i8` products as 8 i32 (pairs fit i16: |sum| <= 2 * 255 * 127 only
/// if `ux` < 128, which holds for every caller).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_u8i8(ux: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(ux, y), _mm256_set1_epi16(1))
}

/// `i8 * i8` through the sign trick (`|x| * sign(x) * y`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_i8i8(x: __m256i, y: __m256i) -> __m256i {
    dot_u8i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load32(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q4_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let p = row.as_ptr();
    let (a, b) = two_way(y.len(), _mm256_setzero_ps(), |i, acc| {
        let b = p.add(i * 18);
        let y = y.get_unchecked(i);
        let d = _mm256_set1_ps(f16_at(b) * f16_val(y.d));
        let qx = _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8));
        let sum = dot_i8i8(qx, load32(y.qs.as_ptr()));
        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc)
    });
    hsum(_mm256_add_ps(a, b))
}

/// Two adjacent f16 values at `p` as lanes 0 and 1 (`Q4_1`'s `d, m`; `Q8_1`'s `d, s`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_pair_at(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
}

/// Runs `block(i, acc)` over blocks `0..nb` with two independent accumulators, so the FMA
/// latency of one block overlaps the next block's integer work.
#[inline(always)]
unsafe fn two_way<A: Copy>(nb: usize, zero: A, mut block: impl FnMut(usize, A) -> A) -> (A, A) {
    let (mut a0, mut a1) = (zero, zero);
    let mut i = 0;
    while i + 2 <= nb {
        a0 = block(i, a0);
        a1 = block(i + 1, a1);
        i += 2;
    }
    if i < nb {
        a0 = block(i, a0);
    }
    (a0, a1)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q4_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    let p = row.as_ptr();
    // acc.0: sum of d_x d_y sum(q_x q_y); lane 1 of acc.1: sum of m_x s_y.
    let zero = (_mm256_setzero_ps(), _mm_setzero_ps());
    let (a, b) = two_way(y.len(), zero, |i, (acc, summs)| {
        let b = p.add(i * 20);
        let y = y.get_unchecked(i);
        let ds = _mm_mul_ps(
            f16_pair_at(b),
            f16_pair_at(y as *const BlockQ8_1 as *const u8),
        );
        let sum = dot_u8i8(nibbles(b.add(4)), load32(y.qs.as_ptr()));
        (
            _mm256_fmadd_ps(_mm256_broadcastss_ps(ds), _mm256_cvtepi32_ps(sum), acc),
            _mm_add_ps(summs, ds),
        )
    });
    let summs = _mm_add_ps(a.1, b.1);
    hsum(_mm256_add_ps(a.0, b.0)) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q5_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let p = row.as_ptr();
    let mut acc = _mm256_setzero_ps();
    for (i, y) in y.iter().enumerate() {
        let b = p.add(i * 22);
        let d = _mm256_set1_ps(f16_at(b) * f16_val(y.d));
        // High bit clear -> nibble | 0xF0 == nibble - 16 as i8; set -> nibble (== q - 16).
        let hi = _mm256_andnot_si256(bits_to_bytes(b.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        let qx = _mm256_or_si256(nibbles(b.add(6)), hi);
        let sum = dot_i8i8(qx, load32(y.qs.as_ptr()));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q5_1(row: &[u8], y: &[BlockQ8_1]) -> f32 {
    let p = row.as_ptr();
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (i, y) in y.iter().enumerate() {
        let b = p.add(i * 24);
        summs += f16_at(b.add(2)) * f16_val(y.s);
        let d = _mm256_set1_ps(f16_at(b) * f16_val(y.d));
        let hi = _mm256_and_si256(bits_to_bytes(b.add(4)), _mm256_set1_epi8(0x10));
        let qx = _mm256_or_si256(nibbles(b.add(8)), hi);
        let sum = dot_u8i8(qx, load32(y.qs.as_ptr()));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc);
    }
    hsum(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q8_0(row: &[u8], y: &[BlockQ8_0]) -> f32 {
    let p = row.as_ptr();
    let (a, b) = two_way(y.len(), _mm256_setzero_ps(), |i, acc| {
        let b = p.add(i * 34);
        let y = y.get_unchecked(i);
        let d = _mm256_set1_ps(f16_at(b) * f16_val(y.d));
        let sum = dot_i8i8(load32(b.add(2) as *const i8), load32(y.qs.as_ptr()));
        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc)
    });
    hsum(_mm256_add_ps(a, b))
}

/// Scales of the 8 sub-blocks and `sum_j mins[j] * bsums(sub-block j)` of a `Q4_K`/`Q5_K`.
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

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q4k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let p = row.as_ptr();
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (i, y) in y.iter().enumerate() {
        let b = p.add(i * 144);
        let scales = (b.add(4) as *const [u8; K_SCALE_SIZE]).read_unaligned();
        let (sc, summ) = k4_scales(&scales, &y.bsums);
        mins += f16_at(b.add(2)) * y.d * summ as f32;
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let q4 = _mm256_loadu_si256(b.add(16 + 32 * j) as *const __m256i);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let plo = _mm256_maddubs_epi16(lo, load32(y.qs.as_ptr().add(64 * j)));
            let phi = _mm256_maddubs_epi16(hi, load32(y.qs.as_ptr().add(64 * j + 32)));
            let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j] as i16));
            let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        let d = _mm256_set1_ps(f16_at(b) * y.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) - mins
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q5k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let p = row.as_ptr();
    let m4 = _mm256_set1_epi8(0xF);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (i, y) in y.iter().enumerate() {
        let b = p.add(i * 176);
        let scales = (b.add(4) as *const [u8; K_SCALE_SIZE]).read_unaligned();
        let (sc, summ) = k4_scales(&scales, &y.bsums);
        mins += f16_at(b.add(2)) * y.d * summ as f32;
        // Bit k of qh[l] is bit 4 of element 32k + l: shift right once per sub-block.
        let mut hbits = _mm256_loadu_si256(b.add(16) as *const __m256i);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let q4 = _mm256_loadu_si256(b.add(48 + 32 * j) as *const __m256i);
            let hlo = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4);
            hbits = _mm256_srli_epi16(hbits, 1);
            let hhi = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4);
            hbits = _mm256_srli_epi16(hbits, 1);
            let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), hlo);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), hhi);
            let plo = _mm256_maddubs_epi16(lo, load32(y.qs.as_ptr().add(64 * j)));
            let phi = _mm256_maddubs_epi16(hi, load32(y.qs.as_ptr().add(64 * j + 32)));
            let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j] as i16));
            let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        let d = _mm256_set1_ps(f16_at(b) * y.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) - mins
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q6k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let p = row.as_ptr();
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    for (i, y) in y.iter().enumerate() {
        let b = p.add(i * 210);
        let sc = b.add(192) as *const i8;
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let ql0 = _mm256_loadu_si256(b.add(64 * half) as *const __m256i);
            let ql1 = _mm256_loadu_si256(b.add(64 * half + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i);
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
                let yq = load32(y.qs.as_ptr().add(128 * half + 32 * k));
                // (q - 32) * y == q * y - 32 * y; both products fit i16.
                let p16 =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(q, yq), _mm256_maddubs_epi16(m32, yq));
                let s = 8 * half + 2 * k;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(*sc.add(s + 1) as i16),
                    _mm_set1_epi16(*sc.add(s) as i16),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scale));
            }
        }
        let d = _mm256_set1_ps(f16_at(b.add(208)) * y.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
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

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let p = row.as_ptr() as *const f32;
    dot_float(
        x,
        |i| _mm256_loadu_ps(p.add(i)),
        |i| p.add(i).read_unaligned(),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    let p = row.as_ptr();
    dot_float(
        x,
        |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
        |i| f16_at(p.add(2 * i)),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
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
