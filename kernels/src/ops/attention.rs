//! Causal grouped-query attention over a KV cache.
//!
//! Cache layout (per layer): `[ctx][n_kv_heads][head_dim]`, f32. Query head `h` reads KV
//! head `h / (n_heads / n_kv_heads)`.
//!
//! The CubeCL path keeps the same layout on the device, in f32 or f16 ([`KvType`]). Decode
//! (and any call the matrix units cannot take) runs [`attention_kernel`]: a cube per (query
//! token, head, split of the keys) walks its keys in tiles of `head_dim` with an online softmax
//! (flash-decoding); when a query's keys are split, a second kernel combines the partial
//! results. A prefill of [`FLASH_MIN_TOKENS`] or more tokens on a device with `f16` `cmma` runs
//! [`flash_attention_kernel`]: a cube per (tile of tokens, KV head) stages each tile of keys
//! and values once for all the group's query heads and multiplies on the matrix units, never
//! holding more than a tile of scores. Query `t` of a call at `pos`
//! sees keys `0..=pos + t`, which is the causal mask; with a sliding window of `w` keys
//! (Gemma's local layers) only the last `w` of them, `pos + t + 1 - w ..= pos + t`, as
//! llama.cpp's `is_masked_swa` (key p0 is seen by query p1 iff p1 - p0 < w).

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Reference attention of one query head at position `pos` (it sees keys 0..=pos):
/// `out = softmax(q·K[0..=pos] / sqrt(head_dim)) V[0..=pos]`, with a one-pass (online) softmax
/// so no score buffer is needed.
pub fn attend_head(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_head: usize,
    pos: usize,
    shape: AttnShape,
    out: &mut [f32],
) {
    attend_head_window(q, k_cache, v_cache, kv_head, pos, None, shape, out)
}

/// The first key a query at `pos` sees: 0, or with a window of `w` keys `pos + 1 - w`.
pub fn first_key(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// [`attend_head`] over the keys `first_key(pos, window)..=pos`.
#[allow(clippy::too_many_arguments)]
pub fn attend_head_window(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_head: usize,
    pos: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
) {
    attend_head_rows(q, k_cache, v_cache, kv_head, pos, window, shape, out, |t| t)
}

/// [`attend_head_window`] with position `t` stored at cache row `row(t)` (a paged cache maps
/// positions to the slots of its pages): the same online softmax in the same order, so a
/// sequence gives the same numbers paged as contiguous.
#[allow(clippy::too_many_arguments)]
pub fn attend_head_rows(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_head: usize,
    pos: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
    row: impl Fn(usize) -> usize,
) {
    let hd = shape.head_dim;
    let stride = shape.n_kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    out.fill(0.0);
    for t in first_key(pos, window)..=pos {
        let base = row(t) * stride + kv_head * hd;
        let k = &k_cache[base..base + hd];
        let s = super::dot(q, k) * scale;
        let v = &v_cache[base..base + hd];
        if s > max {
            let r = (max - s).exp();
            sum *= r;
            for o in out.iter_mut() {
                *o *= r;
            }
            max = s;
        }
        let p = (s - max).exp();
        sum += p;
        for (o, &vv) in out.iter_mut().zip(v) {
            *o += p * vv;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Query tokens per call of [`attend_tokens`] that the CPU backend runs as one task: the
/// tile's rows (every query head of these tokens) share each pass over the keys.
pub const TILE_TOKENS: usize = 16;

/// Keys per step of [`attend_tokens`]: one transposed chunk of K (`head_dim x KEY_CHUNK`) and
/// the tile's scores for it stay in cache.
const KEY_CHUNK: usize = 64;
const _: () = assert!(KEY_CHUNK.is_multiple_of(16));

/// Query rows per step of the score and value loops (with [`KEY_CHUNK`] or 64 dimensions,
/// 4 x 64 f32 accumulators: 16 AVX-512 registers).
const ROWS: usize = 4;

/// Whether [`attend_tokens`] takes this shape: head dimensions in whole steps of 64.
pub fn tiled_supported(shape: AttnShape) -> bool {
    shape.head_dim.is_multiple_of(64)
        && shape.n_kv_heads > 0
        && shape.n_heads.is_multiple_of(shape.n_kv_heads)
}

/// Causal attention of `n` consecutive query tokens at positions `pos0..pos0 + n`, every head:
/// `q` and `out` are `(n, n_heads * head_dim)`, the cache as in [`attend_head`]. The same
/// result as [`attend_head_window`] per (token, head), up to the order of the sums: the query
/// heads of one KV head and all `n` tokens walk the keys together, in chunks of
/// [`KEY_CHUNK`], scores as a small matrix product and an online softmax per row. Needs
/// [`tiled_supported`]; compiled for AVX-512 or AVX2 when the CPU has them.
#[allow(clippy::too_many_arguments)]
pub fn attend_tokens(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    pos0: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
) {
    assert!(
        tiled_supported(shape),
        "attend_tokens: unsupported shape {shape:?}"
    );
    let q_dim = shape.n_heads * shape.head_dim;
    assert!(q.len().is_multiple_of(q_dim) && out.len() == q.len());
    let n = q.len() / q_dim;
    let kv_dim = shape.n_kv_heads * shape.head_dim;
    assert!(k_cache.len() >= (pos0 + n) * kv_dim && v_cache.len() >= (pos0 + n) * kv_dim);
    TILE_SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { tiles_avx512(q, k_cache, v_cache, pos0, window, shape, out, s) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { tiles_avx2(q, k_cache, v_cache, pos0, window, shape, out, s) };
            }
        }
        tiles_body::<false>(q, k_cache, v_cache, pos0, window, shape, out, s)
    })
}

/// Per-thread buffers of [`attend_tokens`], grown to the largest tile seen.
#[derive(Default)]
struct TileScratch {
    q: Vec<f32>,  // (rows, head_dim) the tile's queries, pre-scaled
    kt: Vec<f32>, // (head_dim, KEY_CHUNK) a chunk of keys, transposed
    s: Vec<f32>,  // (rows, KEY_CHUNK) scores, then probabilities
    o: Vec<f32>,  // (rows, head_dim) unnormalised outputs
    m: Vec<f32>,  // (rows) running max
    l: Vec<f32>,  // (rows) running sum
}

thread_local! {
    static TILE_SCRATCH: std::cell::RefCell<TileScratch> = Default::default();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn tiles_avx512(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos0: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
    s: &mut TileScratch,
) {
    tiles_body::<true>(q, kc, vc, pos0, window, shape, out, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn tiles_avx2(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos0: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
    s: &mut TileScratch,
) {
    tiles_body::<true>(q, kc, vc, pos0, window, shape, out, s)
}

/// `a * b + c`, fused where the caller is compiled with FMA (else `mul_add` is a libm call).
#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tiles_body<const FMA: bool>(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos0: usize,
    window: Option<usize>,
    shape: AttnShape,
    out: &mut [f32],
    s: &mut TileScratch,
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let (q_dim, kv_dim) = (shape.n_heads * hd, shape.n_kv_heads * hd);
    let n = q.len() / q_dim;
    let rows = n * group;
    let scale = 1.0 / (hd as f32).sqrt();
    s.q.resize(rows * hd, 0.0);
    s.kt.resize(hd * KEY_CHUNK, 0.0);
    s.s.resize(rows * KEY_CHUNK, 0.0);
    s.o.resize(rows * hd, 0.0);
    s.m.resize(rows, 0.0);
    s.l.resize(rows, 0.0);
    // Row r is token r / group, query head kv_head * group + r % group.
    let pos_of = |r: usize| pos0 + r / group;
    for kv_head in 0..shape.n_kv_heads {
        for r in 0..rows {
            let (t, h) = (r / group, kv_head * group + r % group);
            let src = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            for (d, &v) in s.q[r * hd..(r + 1) * hd].iter_mut().zip(src) {
                *d = v * scale;
            }
        }
        s.o.fill(0.0);
        s.m.fill(f32::NEG_INFINITY);
        s.l.fill(0.0);
        let (lo, hi) = (first_key(pos0, window), pos0 + n - 1);
        let mut c = lo;
        while c <= hi {
            let kn = KEY_CHUNK.min(hi + 1 - c);
            // K[c..c + kn] of this head, transposed to (dim, key); missing keys are zero.
            for j in 0..KEY_CHUNK {
                if j < kn {
                    let base = (c + j) * kv_dim + kv_head * hd;
                    for (d, &v) in kc[base..base + hd].iter().enumerate() {
                        s.kt[d * KEY_CHUNK + j] = v;
                    }
                } else {
                    for d in 0..hd {
                        s.kt[d * KEY_CHUNK + j] = 0.0;
                    }
                }
            }
            scores::<FMA>(&s.q, &s.kt, &mut s.s, rows, hd);
            let mut any = false;
            for r in 0..rows {
                let p = pos_of(r);
                let first = first_key(p, window);
                let sr = &mut s.s[r * KEY_CHUNK..(r + 1) * KEY_CHUNK];
                // Keys c + j visible to this row: first..=p.
                let j0 = first.saturating_sub(c).min(KEY_CHUNK);
                let j1 = (p + 1).saturating_sub(c).min(kn);
                if j0 >= j1 {
                    sr.fill(0.0);
                    continue;
                }
                any = true;
                let mut mx = f32::NEG_INFINITY;
                for &v in &sr[j0..j1] {
                    mx = if v > mx { v } else { mx };
                }
                let m_old = s.m[r];
                let m_new = if mx > m_old { mx } else { m_old };
                // Separate loops so each vectorizes: the masked exponentials, then their sum
                // in 16 partial sums (one serial chain of adds would not).
                for (j, v) in sr.iter_mut().enumerate() {
                    let e = super::activation::exp_approx(*v - m_new);
                    *v = if j >= j0 && j < j1 { e } else { 0.0 };
                }
                let mut partial = [0f32; 16];
                for c in sr.chunks_exact(16) {
                    for (p, &e) in partial.iter_mut().zip(c) {
                        *p += e;
                    }
                }
                let sum: f32 = partial.iter().sum();
                if m_new > m_old {
                    let alpha = if m_old == f32::NEG_INFINITY {
                        0.0
                    } else {
                        super::activation::exp_approx(m_old - m_new)
                    };
                    s.l[r] *= alpha;
                    for o in &mut s.o[r * hd..(r + 1) * hd] {
                        *o *= alpha;
                    }
                    s.m[r] = m_new;
                }
                s.l[r] += sum;
            }
            if any {
                values::<FMA>(&s.s, vc, c, kn, kv_dim, kv_head * hd, &mut s.o, rows, hd);
            }
            c += KEY_CHUNK;
        }
        for r in 0..rows {
            let (t, h) = (r / group, kv_head * group + r % group);
            let inv = 1.0 / s.l[r];
            let dst = &mut out[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            for (d, &o) in dst.iter_mut().zip(&s.o[r * hd..(r + 1) * hd]) {
                *d = o * inv;
            }
        }
    }
}

/// `s[r][j] = q[r] . kt[.][j]` for `rows` rows and [`KEY_CHUNK`] keys: [`ROWS`] rows at a time
/// with `ROWS x KEY_CHUNK` accumulators, each key column loaded once for the rows.
#[inline(always)]
fn scores<const FMA: bool>(q: &[f32], kt: &[f32], s: &mut [f32], rows: usize, hd: usize) {
    let mut r = 0;
    while r + ROWS <= rows {
        let mut acc = [[0f32; KEY_CHUNK]; ROWS];
        for d in 0..hd {
            let k: &[f32; KEY_CHUNK] = kt[d * KEY_CHUNK..(d + 1) * KEY_CHUNK].try_into().unwrap();
            for (i, acc) in acc.iter_mut().enumerate() {
                let qv = q[(r + i) * hd + d];
                for j in 0..KEY_CHUNK {
                    acc[j] = fmadd::<FMA>(qv, k[j], acc[j]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            s[(r + i) * KEY_CHUNK..(r + i + 1) * KEY_CHUNK].copy_from_slice(acc);
        }
        r += ROWS;
    }
    while r < rows {
        let mut acc = [0f32; KEY_CHUNK];
        for d in 0..hd {
            let k: &[f32; KEY_CHUNK] = kt[d * KEY_CHUNK..(d + 1) * KEY_CHUNK].try_into().unwrap();
            let qv = q[r * hd + d];
            for j in 0..KEY_CHUNK {
                acc[j] = fmadd::<FMA>(qv, k[j], acc[j]);
            }
        }
        s[r * KEY_CHUNK..(r + 1) * KEY_CHUNK].copy_from_slice(&acc);
        r += 1;
    }
}

/// `o[r] += sum_j p[r][j] V[c + j]` for the `kn` keys of the chunk: [`ROWS`] rows and 64
/// dimensions at a time, each value row loaded once for the rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn values<const FMA: bool>(
    p: &[f32],
    vc: &[f32],
    c: usize,
    kn: usize,
    kv_dim: usize,
    head_off: usize,
    o: &mut [f32],
    rows: usize,
    hd: usize,
) {
    const D: usize = 64;
    let mut r = 0;
    while r < rows {
        let nr = ROWS.min(rows - r);
        for d0 in (0..hd).step_by(D) {
            let mut acc = [[0f32; D]; ROWS];
            for (i, acc) in acc.iter_mut().enumerate().take(nr) {
                acc.copy_from_slice(&o[(r + i) * hd + d0..(r + i) * hd + d0 + D]);
            }
            for j in 0..kn {
                let base = (c + j) * kv_dim + head_off + d0;
                let v: &[f32; D] = vc[base..base + D].try_into().unwrap();
                if nr == ROWS {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let pv = p[(r + i) * KEY_CHUNK + j];
                        for k in 0..D {
                            acc[k] = fmadd::<FMA>(pv, v[k], acc[k]);
                        }
                    }
                } else {
                    for (i, acc) in acc.iter_mut().enumerate().take(nr) {
                        let pv = p[(r + i) * KEY_CHUNK + j];
                        for k in 0..D {
                            acc[k] = fmadd::<FMA>(pv, v[k], acc[k]);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(nr) {
                o[(r + i) * hd + d0..(r + i) * hd + d0 + D].copy_from_slice(acc);
            }
        }
        r += nr;
    }
}

/// Keys per split of one decode query: a query's keys are cut into splits of this many, each
/// split a task that keeps a partial softmax ([`attend_split`]), and [`combine_splits`] merges
/// them (flash-decoding). Fixed, so a sequence's numbers do not depend on its batch.
pub const DECODE_SPLIT: usize = 256;

/// How many splits [`attend_split`] cuts the keys of a query at `pos` into.
pub fn decode_splits(pos: usize, window: Option<usize>) -> usize {
    (pos + 1 - first_key(pos, window)).div_ceil(DECODE_SPLIT)
}

/// Floats of one split's partial result: `(group, head_dim)` unnormalised outputs, then the
/// `group` running maxima and the `group` running sums.
pub fn split_len(shape: AttnShape) -> usize {
    let group = shape.n_heads / shape.n_kv_heads;
    group * (shape.head_dim + 2)
}

/// Split `split` of [`decode_splits`] of one query token's attention, for the query heads of
/// `kv_head`: `q` is the token's `(n_heads * head_dim)` queries, the cache as in
/// [`attend_head_rows`] (position `t` at row `row(t)`), `part` receives [`split_len`] floats.
/// The group's query heads walk the split's keys together, in chunks of [`KEY_CHUNK`]; the dot
/// products and `P·V` are compiled for AVX-512 or AVX2 when the CPU has them. The exponentials
/// are libm's: decode is bound by reading the cache, and [`super::activation::exp_approx`]'s 2 ulp
/// flip Gemma 3's near-tie in `gemma3-greedy.json` (third prompt, step 10) to a third token.
#[allow(clippy::too_many_arguments)]
pub fn attend_split(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_head: usize,
    pos: usize,
    window: Option<usize>,
    split: usize,
    shape: AttnShape,
    part: &mut [f32],
    row: impl Fn(usize) -> usize,
) {
    let lo = first_key(pos, window) + split * DECODE_SPLIT;
    let keys = lo..(lo + DECODE_SPLIT).min(pos + 1);
    assert!(keys.start < keys.end && part.len() == split_len(shape));
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { split_avx512(q, k_cache, v_cache, kv_head, keys, shape, part, row) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { split_avx2(q, k_cache, v_cache, kv_head, keys, shape, part, row) };
        }
    }
    split_body::<false>(
        q,
        k_cache,
        v_cache,
        kv_head,
        keys,
        shape,
        part,
        row,
        super::dot,
    )
}

/// Merges the `splits` partial results in `parts` (one after another, [`split_len`] each) into
/// the normalised outputs of the group's query heads, `out`: `(group, head_dim)`.
pub fn combine_splits(parts: &[f32], shape: AttnShape, out: &mut [f32]) {
    let (hd, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads);
    let len = split_len(shape);
    let stats = |p: &[f32], r: usize| (p[group * hd + r], p[group * hd + group + r]);
    for (r, out) in out.chunks_exact_mut(hd).enumerate().take(group) {
        let m = parts
            .chunks_exact(len)
            .map(|p| stats(p, r).0)
            .fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut sum = 0.0;
        for p in parts.chunks_exact(len) {
            let (mp, lp) = stats(p, r);
            let w = (mp - m).exp();
            sum += w * lp;
            for (o, &v) in out.iter_mut().zip(&p[r * hd..(r + 1) * hd]) {
                *o += w * v;
            }
        }
        let inv = 1.0 / sum;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn split_avx512(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    kv_head: usize,
    keys: std::ops::Range<usize>,
    shape: AttnShape,
    part: &mut [f32],
    row: impl Fn(usize) -> usize,
) {
    // SAFETY: the caller's CPU has AVX-512F.
    let dot = |a: &[f32], b: &[f32]| unsafe { dot_avx512(a, b) };
    split_body::<true>(q, kc, vc, kv_head, keys, shape, part, row, dot)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn split_avx2(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    kv_head: usize,
    keys: std::ops::Range<usize>,
    shape: AttnShape,
    part: &mut [f32],
    row: impl Fn(usize) -> usize,
) {
    // SAFETY: the caller's CPU has AVX2 and FMA.
    let dot = |a: &[f32], b: &[f32]| unsafe { dot_avx2(a, b) };
    split_body::<true>(q, kc, vc, kv_head, keys, shape, part, row, dot)
}

/// `a · b`: 16 lanes of FMAs, one horizontal sum, the last `len % 16` products scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within both slices.
        acc =
            unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc) };
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// `a · b`: two 8-lane FMA chains, one horizontal sum, the last `len % 8` products scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY (both loops): every load ends at or before n, within both slices.
    while i + 16 <= n {
        unsafe {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                a1,
            );
        }
        i += 16;
    }
    if i + 8 <= n {
        a0 = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), a0) };
        i += 8;
    }
    let v = _mm256_add_ps(a0, a1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// The largest query group [`split_body`] keeps its scaled queries and scores for on the stack.
const MAX_GROUP: usize = 16;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn split_body<const FMA: bool>(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    kv_head: usize,
    keys: std::ops::Range<usize>,
    shape: AttnShape,
    part: &mut [f32],
    row: impl Fn(usize) -> usize,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let (hd, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads);
    let stride = shape.n_kv_heads * hd;
    let head_off = kv_head * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let (o, stats) = part.split_at_mut(group * hd);
    let (m, l) = stats.split_at_mut(group);
    o.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let qs = &q[kv_head * group * hd..(kv_head + 1) * group * hd];
    let mut s = [[0f32; KEY_CHUNK]; MAX_GROUP];
    assert!(
        group <= MAX_GROUP,
        "attend_split: a group of {group} query heads"
    );
    let mut c = keys.start;
    while c < keys.end {
        let kn = KEY_CHUNK.min(keys.end - c);
        // Scores of the chunk's keys, each key row read once for the group.
        for j in 0..kn {
            let base = row(c + j) * stride + head_off;
            let k = &kc[base..base + hd];
            for (r, s) in s.iter_mut().enumerate().take(group) {
                s[j] = dot(&qs[r * hd..(r + 1) * hd], k) * scale;
            }
        }
        for (r, s) in s.iter_mut().enumerate().take(group) {
            let mut mx = f32::NEG_INFINITY;
            for &v in &s[..kn] {
                mx = if v > mx { v } else { mx };
            }
            let m_new = if mx > m[r] { mx } else { m[r] };
            for (j, v) in s.iter_mut().enumerate() {
                let e = (*v - m_new).exp();
                *v = if j < kn { e } else { 0.0 };
            }
            let mut partial = [0f32; 16];
            for c in s.chunks_exact(16) {
                for (p, &e) in partial.iter_mut().zip(c) {
                    *p += e;
                }
            }
            let sum: f32 = partial.iter().sum();
            if m_new > m[r] {
                let alpha = if m[r] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m[r] - m_new).exp()
                };
                l[r] *= alpha;
                for o in &mut o[r * hd..(r + 1) * hd] {
                    *o *= alpha;
                }
                m[r] = m_new;
            }
            l[r] += sum;
        }
        // o[r] += sum_j p[r][j] V[c + j], each value row read once for the group.
        for j in 0..kn {
            let base = row(c + j) * stride + head_off;
            let v = &vc[base..base + hd];
            for (r, s) in s.iter().enumerate().take(group) {
                let p = s[j];
                for (o, &v) in o[r * hd..(r + 1) * hd].iter_mut().zip(v) {
                    *o = fmadd::<FMA>(p, v, *o);
                }
            }
        }
        c += kn;
    }
}

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::gpu::{row_grid, Buf, Gpu, Pos};
use super::matmul::mma::fragment;

/// Element type of the device KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// The device KV cache: per layer, K and V as `(capacity, kv_dim)`.
pub struct KvCache {
    pub(crate) k: Vec<Buf>,
    pub(crate) v: Vec<Buf>,
    ty: KvType,
    capacity: usize,
    kv_dim: usize,
    /// One 0: the device position the kernels add when the host passes it ([`Pos::Host`]).
    pub(crate) zero: Buf,
}

impl KvCache {
    /// A zeroed cache of `n_layer` layers of `capacity` positions.
    pub fn new<R: Runtime>(
        gpu: &Gpu<R>,
        n_layer: usize,
        capacity: usize,
        kv_dim: usize,
        ty: KvType,
    ) -> Self {
        let alloc = || {
            (0..n_layer)
                .map(|_| gpu.zeros_of(capacity * kv_dim, ty.bytes()))
                .collect()
        };
        Self {
            k: alloc(),
            v: alloc(),
            ty,
            capacity,
            kv_dim,
            zero: gpu.zeros(1),
        }
    }
    pub fn ty(&self) -> KvType {
        self.ty
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }
    /// Bytes of all layers' K and V.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(Buf::bytes).sum()
    }
    /// Layer `layer`'s K and V as f32 (tests and debug dumps).
    pub fn read_layer<R: Runtime>(
        &self,
        gpu: &Gpu<R>,
        layer: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), super::gpu::GpuError> {
        let read = |b: &Buf| -> Result<Vec<f32>, super::gpu::GpuError> {
            Ok(match self.ty {
                KvType::F32 => gpu.read_f32(b)?,
                KvType::F16 => gpu.read_f16(b)?.into_iter().map(f32::from).collect(),
            })
        };
        Ok((read(&self.k[layer])?, read(&self.v[layer])?))
    }
}

/// Keys one split covers before decode splits the sequence further. A single split is one cube
/// per head walking its keys in tiles, latency-bound on a GPU: on the H200 with decode
/// replayed, 64 keys ran SmolLM2 tg128 / chat tg50 / tg128 @ d2048 at 1,106 / 1,055 / 807 t/s
/// against 1,046 / 777 / 597 at 256 (docs/performance.md).
pub const SPLIT_KEYS: usize = 64;

/// Keys per split of a decode query: [`SPLIT_KEYS`], or `ROCFORGE_ATTN_SPLIT_KEYS` (32 to 512,
/// a power of two) for tuning runs. Read once.
pub fn split_keys() -> usize {
    static KEYS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEYS.get_or_init(|| tuning_knob("ROCFORGE_ATTN_SPLIT_KEYS", 32..=512, SPLIT_KEYS))
}

/// A power of two in `range` from the environment variable `name`, else `default`.
fn tuning_knob(name: &str, range: std::ops::RangeInclusive<usize>, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|k: &usize| k.is_power_of_two() && range.contains(k))
        .unwrap_or(default)
}

/// Query heads a cube of [`attention_kernel`] takes together, sharing each key and value row
/// they read: in a paged batch (the decode step of several sequences) the largest of 4, 3 and
/// 2 that divides the query group, else 1. One sequence keeps a cube per head, whose splits
/// fill the GPU from a single query (a long context's decode is latency-bound on few cubes).
/// On the H200, 8B Q4_0 at 64 sequences (group 4): docs/performance.md. `ROCFORGE_ATTN_GROUP=0`
/// turns the sharing off (A/B runs). Read once.
pub fn heads_per_cube(shape: AttnShape, paged: bool) -> usize {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("ROCFORGE_ATTN_GROUP").is_ok_and(|v| v == "0"));
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    if off || !paged {
        return 1;
    }
    [4, 3, 2].into_iter().find(|h| group % h == 0).unwrap_or(1)
}

/// Largest head dimension the kernels take (a unit per dimension in one cube).
pub const MAX_HEAD_DIM: usize = 1024;
/// Splits a single decode query may use (so long contexts still fill the GPU).
pub const MAX_DECODE_SPLITS: usize = 32;

/// Tokens per page of the KV cache when a batch holds several sequences
/// (`Backend::forward_seqs`): position `p` of a sequence lives in cache row
/// `pages[p / KV_PAGE_SIZE] * KV_PAGE_SIZE + p % KV_PAGE_SIZE` of its page table.
pub const KV_PAGE_SIZE: usize = 16;

/// The device layout of a paged batch ([`Pos::Paged`]) of sequences `(first position,
/// tokens, page table)`, their tokens one sequence after another: for the batch's `n` tokens,
/// their positions (`meta[t]`), their cache rows (`meta[n + t]`) and where their sequence's
/// page table starts in `meta` (`meta[2n + t]`), then the page tables. The caller has
/// checked that every position has a page. Written into `meta` (cleared first), so a caller
/// that builds one per step keeps its allocation.
pub fn paged_meta<'a, I>(seqs: I, meta: &mut Vec<u32>)
where
    I: IntoIterator<Item = (usize, usize, &'a [u32])>,
    I::IntoIter: Clone,
{
    let seqs = seqs.into_iter();
    let n: usize = seqs.clone().map(|s| s.1).sum();
    meta.clear();
    meta.resize(3 * n, 0);
    let mut t = 0;
    for (pos, len, pages) in seqs {
        let table = meta.len() as u32;
        meta.extend_from_slice(pages);
        for p in pos..pos + len {
            meta[t] = p as u32;
            meta[n + t] =
                (pages[p / KV_PAGE_SIZE] as usize * KV_PAGE_SIZE + p % KV_PAGE_SIZE) as u32;
            meta[2 * n + t] = table;
            t += 1;
        }
    }
}

/// Cache row of key `key` for a query whose sequence's page table starts at `meta[table]`,
/// or `key` itself when the batch is one sequence in order.
#[cube]
fn key_row(meta: &Array<u32>, table: usize, key: usize, #[comptime] paged: bool) -> usize {
    let mut row = key;
    if comptime!(paged) {
        let page = comptime!(KV_PAGE_SIZE);
        row = meta[table + key / page] as usize * page + key % page;
    }
    row
}

/// [`MAX_DECODE_SPLITS`], or `ROCFORGE_ATTN_MAX_SPLITS` (8 to 128, a power of two) for tuning
/// runs. Read once.
pub fn max_decode_splits() -> usize {
    static SPLITS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SPLITS.get_or_init(|| tuning_knob("ROCFORGE_ATTN_MAX_SPLITS", 8..=128, MAX_DECODE_SPLITS))
}

/// Partial results of split attention: `(rows, head_dim)` outputs and `(rows, 2)` (max, sum),
/// a row per (token, head, split).
pub struct AttnScratch {
    part_o: Buf,
    part_ml: Buf,
    rows: usize,
}

impl AttnScratch {
    /// Room for `max_batch` tokens of `n_head` heads, or one token with the most splits.
    pub fn new<R: Runtime>(gpu: &Gpu<R>, max_batch: usize, shape: AttnShape) -> Self {
        let rows = shape.n_heads * max_batch.max(max_decode_splits());
        Self {
            part_o: gpu.zeros(rows * shape.head_dim),
            part_ml: gpu.zeros(rows * 2),
            rows,
        }
    }
    pub fn bytes(&self) -> u64 {
        self.part_o.bytes() + self.part_ml.bytes()
    }
}

/// How a call splits its keys: `(splits, keys per split)`. More splits only when the cubes
/// of one split per query would leave the GPU idle (decode on a long context).
pub fn plan_splits(
    n_tokens: usize,
    n_head: usize,
    kv_len: usize,
    scratch_rows: usize,
) -> (usize, usize) {
    let want = kv_len.div_ceil(split_keys());
    let fit = scratch_rows / (n_tokens * n_head);
    let splits = want.min(fit).clamp(1, max_decode_splits());
    (splits, kv_len.div_ceil(splits))
}

/// Values of a key row one load of [`attention_kernel`] takes: 4 where `head_dim` allows (a
/// `vec4`, which every backend has), else 1.
pub fn key_width(head_dim: usize) -> usize {
    if head_dim % 4 == 0 {
        4
    } else {
        1
    }
}

/// The plane width [`attention_kernel`] takes its tile maxima with on `client`'s device for
/// head dimension `hd`: the device's plane width where it has plane operations, one fixed
/// width (CUDA, HIP; wgpu where the adapter's subgroups are one size) that divides `hd`, else
/// 0 (the tile's scores read through shared memory). `ROCFORGE_ATTN_PLANE=0` takes 0
/// everywhere (A/B runs). Read once.
pub fn attention_plane<R: Runtime>(client: &ComputeClient<R>, hd: usize) -> usize {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("ROCFORGE_ATTN_PLANE").is_ok_and(|v| v == "0")) {
        return 0;
    }
    let hw = &client.properties().hardware;
    let ops = client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops);
    if ops && hw.plane_size_min == hw.plane_size_max {
        plane_for(hw.plane_size_min as usize, hd)
    } else {
        0
    }
}

/// [`attention_plane`] for a device of plane width `plane`: `plane` where it is a power of two
/// of 8 to 64 dividing `hd`, else 0.
pub fn plane_for(plane: usize, hd: usize) -> usize {
    if plane.is_power_of_two() && (8..=64).contains(&plane) && hd.is_multiple_of(plane) {
        plane
    } else {
        0
    }
}

/// Cube `(t, hb, s)` (row-major) with `head_dim` units: attention of query `t`, heads
/// `hb * hpc .. (hb + 1) * hpc` (`hpc` heads of one KV head) over keys
/// `s * chunk .. min((s + 1) * chunk, pos + t + 1)`, those below `pos + t + 1 - window` left out
/// when `window > 0`. The `hpc` heads share each load of a key and value row, so a KV head's
/// rows are read once for them rather than once per head; each head's sums run in the same
/// order as with `hpc == 1`, so the results do not depend on it. With `finalize` (one split) it
/// writes the normalised output `(t, h*head_dim)` of each head `h`; otherwise the unnormalised
/// output and (max, sum) of row `(t, h, s)`; a split with no key left gives (-1e30, 0), which
/// the combine weighs zero.
///
/// The query sits in shared memory as `N`-vectors, one load per key vector. With `plane` (the
/// device's fixed plane width, dividing `hd`: [`attention_plane`]) a tile's max comes from
/// `plane_max` and one value per plane; without (`plane == 0`) every unit reads the tile's
/// scores. The max is exact either way, so the results do not depend on `plane`.
#[cube(launch_unchecked)]
pub fn attention_kernel<K: Float, N: Size>(
    q: &Array<Vector<f32, N>>,
    k_cache: &Array<Vector<K, N>>,
    v_cache: &Array<K>,
    out: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    pos_dev: &Array<u32>,
    meta: &Array<u32>,
    pos: u32,
    n_tokens: u32,
    chunk: u32,
    n_splits: u32,
    n_head: u32,
    n_kv: u32,
    scale: f32,
    window: u32,
    #[comptime] hd: usize,
    #[comptime] hpc: usize,
    #[comptime] finalize: bool,
    #[comptime] paged: bool,
    #[comptime] plane: usize,
) {
    let (n_head, n_kv, splits) = (n_head as usize, n_kv as usize, n_splits as usize);
    let blocks = n_head / hpc;
    let u = UNIT_POS as usize;
    let cube = CUBE_POS;
    let s = cube % splits;
    let h0 = ((cube / splits) % blocks) * hpc;
    let t = cube / (splits * blocks);
    let kv_dim = n_kv * hd;
    let kv_off = (h0 / (n_head / n_kv)) * hd;
    // Query t's position, and where its sequence's page table starts when paged.
    let mut qpos = (pos + pos_dev[0]) as usize + t;
    let mut table = 0usize;
    if comptime!(paged) {
        qpos = meta[t] as usize;
        table = meta[2 * n_tokens as usize + t] as usize;
    }
    let mut start = s * chunk as usize;
    let end = min(start + chunk as usize, qpos + 1);
    let w = window as usize;
    if w > 0 && qpos + 1 > w {
        start = max(start, qpos + 1 - w);
    }

    // Head g's query at vector `g * hd / N`, its scores (then weights) of the tile at `g * hd`;
    // with `plane`, each plane's tile max of head g at `p * hpc + g`.
    let width = N::value();
    let hdv = comptime!(hd / width);
    let mut q_sh = SharedMemory::<Vector<f32, N>>::new(hdv * hpc);
    let mut p_sh = SharedMemory::<f32>::new(hd * hpc);
    let mut max_sh =
        SharedMemory::<f32>::new(comptime!(if plane > 0 { hd / plane * hpc } else { 1 }));
    if u < hdv {
        #[unroll]
        for g in 0..hpc {
            q_sh[g * hdv + u] = q[(t * n_head + h0 + g) * hdv + u];
        }
    }
    sync_cube();

    // -1e30 stands in for minus infinity: it keeps exp(m_old - m_new) free of inf - inf.
    let mut m = Array::<f32>::new(hpc);
    let mut l = Array::<f32>::new(hpc);
    let mut acc = Array::<f32>::new(hpc);
    #[unroll]
    for g in 0..hpc {
        m[g] = f32::new(-1.0e30);
        l[g] = 0.0;
        acc[g] = 0.0;
    }
    let mut score = Array::<f32>::new(hpc);
    let mut corr = Array::<f32>::new(hpc);
    let mut m_new = Array::<f32>::new(hpc);
    let mut o = Array::<f32>::new(hpc);
    let mut sum_p = Array::<f32>::new(hpc);
    let mut t0 = start;
    while t0 < end {
        // Unit u scores key t0 + u for every head of the cube.
        let key = t0 + u;
        #[unroll]
        for g in 0..hpc {
            score[g] = f32::new(-1.0e30);
        }
        if key < end {
            // A unit walks its own key's row, so each load takes `N` values of it (the
            // launcher's widest vector dividing `head_dim`): a warp's loads touch one cache
            // line per key, and `N` times fewer loads wait on them.
            let base = (key_row(meta, table, key, paged) * kv_dim + kv_off) / width;
            let mut dot = Array::<f32>::new(hpc);
            #[unroll]
            for g in 0..hpc {
                dot[g] = 0.0;
            }
            for c in 0..hdv {
                let kv = k_cache[base + c];
                #[unroll]
                for g in 0..hpc {
                    let qv = q_sh[g * hdv + c];
                    #[unroll]
                    for i in 0..width {
                        dot[g] += qv[i] * f32::cast_from(kv[i]);
                    }
                }
            }
            #[unroll]
            for g in 0..hpc {
                score[g] = dot[g] * scale;
            }
        }
        if comptime!(plane > 0) {
            // Each plane's max, then theirs: a read per plane rather than per key.
            #[unroll]
            for g in 0..hpc {
                let pm = plane_max(score[g]);
                if UNIT_POS_PLANE == 0 {
                    max_sh[(u / plane) * hpc + g] = pm;
                }
            }
            sync_cube();
            #[unroll]
            for g in 0..hpc {
                let mut tile_max = f32::new(-1.0e30);
                #[unroll]
                for p in 0..hd / plane {
                    tile_max = max(tile_max, max_sh[p * hpc + g]);
                }
                m_new[g] = max(m[g], tile_max);
                corr[g] = f32::exp(m[g] - m_new[g]);
            }
        } else {
            #[unroll]
            for g in 0..hpc {
                p_sh[g * hd + u] = score[g];
            }
            sync_cube();
            #[unroll]
            for g in 0..hpc {
                let mut tile_max = f32::new(-1.0e30);
                for j in 0..hd {
                    tile_max = max(tile_max, p_sh[g * hd + j]);
                }
                m_new[g] = max(m[g], tile_max);
                corr[g] = f32::exp(m[g] - m_new[g]);
            }
            sync_cube();
        }
        #[unroll]
        for g in 0..hpc {
            let mut p = 0.0f32;
            if key < end {
                p = f32::exp(score[g] - m_new[g]);
            }
            p_sh[g * hd + u] = p;
        }
        sync_cube();
        // Unit u accumulates output dim u over the tile's keys.
        let n_keys = min(hd, end - t0);
        #[unroll]
        for g in 0..hpc {
            sum_p[g] = 0.0;
            o[g] = acc[g] * corr[g];
        }
        for j in 0..n_keys {
            let vrow = key_row(meta, table, t0 + j, paged);
            let v = f32::cast_from(v_cache[vrow * kv_dim + kv_off + u]);
            #[unroll]
            for g in 0..hpc {
                let pj = p_sh[g * hd + j];
                sum_p[g] += pj;
                o[g] += pj * v;
            }
        }
        #[unroll]
        for g in 0..hpc {
            l[g] = l[g] * corr[g] + sum_p[g];
            acc[g] = o[g];
            m[g] = m_new[g];
        }
        sync_cube();
        t0 += hd;
    }
    #[unroll]
    for g in 0..hpc {
        let row = (t * n_head + h0 + g) * splits + s;
        if comptime!(finalize) {
            out[row * hd + u] = acc[g] / l[g];
        } else {
            out[row * hd + u] = acc[g];
            if u == 0 {
                part_ml[row * 2] = m[g];
                part_ml[row * 2 + 1] = l[g];
            }
        }
    }
}

/// Cube `(t, h)` with `head_dim` units: merges the `n_splits` partial results of that query.
#[cube(launch_unchecked)]
pub fn attention_combine_kernel(
    part_o: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<f32>,
    n_splits: u32,
    #[comptime] hd: usize,
) {
    let splits = n_splits as usize;
    let u = UNIT_POS as usize;
    let row = CUBE_POS;
    let mut m = f32::new(-1.0e30);
    for s in 0..splits {
        m = max(m, part_ml[(row * splits + s) * 2]);
    }
    let mut num = 0.0f32;
    let mut den = 0.0f32;
    for s in 0..splits {
        let r = row * splits + s;
        let w = f32::exp(part_ml[r * 2] - m);
        num += w * part_o[r * hd + u];
        den += w * part_ml[r * 2 + 1];
    }
    out[row * hd + u] = num / den;
}

/// Query rows (a token's query heads of one KV head, tokens after one another) per cube of
/// [`flash_attention_kernel`]: 4 planes of 16.
pub const FLASH_ROWS: usize = 64;
/// Keys per tile of [`flash_attention_kernel`].
pub const FLASH_KEYS: usize = 64;
/// Fewest queries a call takes to [`flash_attention_kernel`] (prefill and its chunks); fewer
/// (decode) keep [`attention_kernel`], whose splits fill the GPU from one query.
pub const FLASH_MIN_TOKENS: usize = 16;

/// Shared memory a cube of [`flash_attention_kernel`] holds for head dimension `hd` and `units`
/// units: `Q`, `K` and `V` tiles in `f16`, the scores in `f32` and as `f16` probabilities, the
/// output rows in `f32`, and the per-row statistics.
pub const fn flash_shared_bytes(hd: usize, units: usize) -> usize {
    3 * FLASH_ROWS * (hd + 8) * 2
        + FLASH_ROWS * (FLASH_KEYS + 4) * 4
        + FLASH_ROWS * (FLASH_KEYS + 8) * 2
        + FLASH_ROWS * (hd + 4) * 4
        + units * 4
        + 3 * FLASH_ROWS * 4
}

/// The plane width [`flash_attention_kernel`] runs at for `n` queries of `shape`,
/// or `None` where the call keeps [`attention_kernel`]: a paged batch (a multi-sequence step,
/// whose tiles are one token each: measured slower on the H200 than [`attention_kernel`] at 8
/// and 64 sequences, docs/performance.md; `ROCFORGE_FLASH_PAGED=1` takes it there for A/B
/// runs), HIP (see the body), fewer than [`FLASH_MIN_TOKENS`] queries, a device without `f16`
/// `cmma`, a head dimension not a multiple of 16, a query group over [`FLASH_ROWS`] heads, a
/// cube's shared memory too small, or `ROCFORGE_FLASH=0`.
pub fn flash_plane<R: Runtime>(
    gpu: &Gpu<R>,
    n: usize,
    shape: AttnShape,
    paged: bool,
) -> Option<u32> {
    static KNOBS: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    let (off, paged_on) = *KNOBS.get_or_init(|| {
        let is = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
        (is("ROCFORGE_FLASH", "0"), is("ROCFORGE_FLASH_PAGED", "1"))
    });
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    if off
        || (paged && !paged_on)
        || n < FLASH_MIN_TOKENS
        || !shape.head_dim.is_multiple_of(16)
        || !(1..=FLASH_ROWS).contains(&group)
    {
        return None;
    }
    // CubeCL 0.10's HIP WMMA code names its execute helper by element types only, so this
    // kernel's two products (`B` column-major for the scores, row-major for the values) define
    // it twice and hipcc rejects the source: HIP keeps flash-decoding.
    if R::name(gpu.client()) == "hip" {
        return None;
    }
    let plane = super::matmul::api::f16_cmma_plane(gpu.client())?;
    let units = 4 * plane as usize;
    (units >= FLASH_ROWS
        && flash_shared_bytes(shape.head_dim, units)
            <= gpu.client().properties().hardware.max_shared_memory_size)
        .then_some(plane)
}

/// Causal attention of a tile of queries on the matrix units (flash attention): cube `(x, y)`
/// takes KV head `y` and tokens `x * tpc ..` (`tpc = FLASH_ROWS / group` tokens in order, each
/// with its `group` query heads: the tile's rows; one token when `paged`, as a multi-sequence
/// batch's tokens may each be another sequence), 4 planes of 16 rows. Per tile of [`FLASH_KEYS`] keys
/// it stages `K` and `V` once for the whole group (as `f16`), multiplies the scores `Q·Kᵀ` on
/// `cmma`, updates each row's running max and sum (online softmax, causal and window masks per
/// element), rescales the output rows and adds `P·V` on `cmma`. `Q` is staged once, scaled
/// by `scale`, in `f16`; the output rows stay in `f32` shared memory until the last tile.
#[cube(launch_unchecked)]
pub fn flash_attention_kernel<K: Float>(
    q: &Array<Vector<f32, Const<4>>>,
    k_cache: &Array<Vector<K, Const<4>>>,
    v_cache: &Array<Vector<K, Const<4>>>,
    out: &mut Array<f32>,
    pos_dev: &Array<u32>,
    meta: &Array<u32>,
    pos: u32,
    n_tokens: u32,
    tpc: u32,
    n_head: u32,
    n_kv: u32,
    scale: f32,
    window: u32,
    #[comptime] hd: u32,
    #[comptime] plane: u32,
    #[comptime] paged: bool,
) {
    let rows = comptime![FLASH_ROWS as u32];
    let keys = comptime![FLASH_KEYS as u32];
    let units = comptime![4 * plane];
    // Row strides: staged f16 tiles in halves (8 past hd keeps fragment starts 16-byte
    // aligned and in different banks), and in vectors of 4.
    let ld = comptime![hd + 8];
    let ldv = comptime![(hd + 8) / 4];
    let pld = comptime![FLASH_KEYS as u32 + 8];
    // f32 strides of the scores and the output rows: 4 past a multiple of 32 banks, so the
    // 16 rows of a fragment's load or store fall in different banks.
    let lds = comptime![FLASH_KEYS as u32 + 4];
    let ldo = comptime![hd + 4];
    let hd4 = comptime![hd / 4];
    // Threads per row in the softmax pass, and the columns each takes.
    let lpr = comptime![4 * plane / FLASH_ROWS as u32];
    let runs = comptime![FLASH_KEYS as u32 / (4 * plane / FLASH_ROWS as u32) / 4];

    let unit = UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X;
    let pl = UNIT_POS_Y;
    let group = n_head / n_kv;
    let kvh = CUBE_POS_Y;
    let t0 = CUBE_POS_X * tpc;
    let t_end = min(t0 + tpc, n_tokens);
    let base = pos + pos_dev[0];
    let kv_dim = n_kv * hd;

    let mut qs = SharedMemory::<Vector<half::f16, Const<4>>>::new(comptime![
        (FLASH_ROWS as u32 * (hd + 8) / 4) as usize
    ]);
    let mut ks = SharedMemory::<Vector<half::f16, Const<4>>>::new(comptime![
        (FLASH_KEYS as u32 * (hd + 8) / 4) as usize
    ]);
    let mut vs = SharedMemory::<Vector<half::f16, Const<4>>>::new(comptime![
        (FLASH_KEYS as u32 * (hd + 8) / 4) as usize
    ]);
    let mut ss = SharedMemory::<f32>::new(comptime![FLASH_ROWS * (FLASH_KEYS + 4)]);
    let mut ps = SharedMemory::<Vector<half::f16, Const<4>>>::new(comptime![
        FLASH_ROWS * (FLASH_KEYS + 8) / 4
    ]);
    let mut os = SharedMemory::<f32>::new(comptime![(FLASH_ROWS as u32 * (hd + 4)) as usize]);
    let mut red = SharedMemory::<f32>::new(comptime![(4 * plane) as usize]);
    let mut ms = SharedMemory::<f32>::new(comptime![FLASH_ROWS]);
    let mut ls = SharedMemory::<f32>::new(comptime![FLASH_ROWS]);
    let mut al = SharedMemory::<f32>::new(comptime![FLASH_ROWS]);

    let zero4 = Vector::<half::f16, Const<4>>::cast_from(0.0f32);
    // Q rows, scaled, as f16 (zero past the batch); the output rows and statistics cleared.
    #[unroll]
    for i in 0..comptime![(FLASH_ROWS as u32 * hd / 4).div_ceil(4 * plane)] {
        let e = unit + i * units;
        if e < comptime![FLASH_ROWS as u32 * hd / 4] {
            let r = e / hd4;
            let c4 = e % hd4;
            let t = t0 + r / group;
            let h = kvh * group + r % group;
            let valid = r < tpc * group && t < t_end;
            let v = q[select(valid, ((t * n_head + h) * hd) / 4 + c4, 0u32) as usize];
            let mut hv = Vector::<half::f16, Const<4>>::empty();
            #[unroll]
            for j in 0..4u32 {
                hv[j as usize] = half::f16::cast_from(v[j as usize] * scale);
            }
            qs[(r * ldv + c4) as usize] = select(valid, hv, zero4);
        }
    }
    #[unroll]
    for i in 0..comptime![(FLASH_ROWS as u32 * (hd + 4)).div_ceil(4 * plane)] {
        let e = unit + i * units;
        if e < comptime![FLASH_ROWS as u32 * (hd + 4)] {
            os[e as usize] = 0.0;
        }
    }
    if unit < rows {
        // -1e30 stands in for minus infinity: exp(m_old - m_new) stays free of inf - inf.
        ms[unit as usize] = -1.0e30;
        ls[unit as usize] = 0.0;
    }

    // The tile's keys: from the first key its first token sees to its last token's own (a
    // paged tile is one token: the tokens of a batch may belong to different sequences).
    let first_q = query_pos(meta, base, t0, paged);
    let last_q = query_pos(meta, base, t_end - 1, paged);
    let mut table = 0u32;
    if comptime![paged] {
        table = meta[(2 * n_tokens + t0) as usize];
    }
    let mut k_lo = 0u32;
    if window > 0 && first_q + 1 > window {
        k_lo = first_q + 1 - window;
    }
    let k_end = last_q + 1;
    // This thread's row in the softmax pass: its token's position and first visible key.
    let row = unit / lpr;
    let part = unit % lpr;
    let row_live = row < tpc * group && t0 + row / group < t_end;
    let row_q = query_pos(meta, base, select(row_live, t0 + row / group, t0), paged);
    let mut row_lo = 0u32;
    if window > 0 && row_q + 1 > window {
        row_lo = row_q + 1 - window;
    }
    sync_cube();

    let tiles = (k_end - k_lo).div_ceil(keys);
    for it in 0..tiles {
        let k0 = k_lo + it * keys;
        // K and V rows of the tile, f16, zero past the last key (a zero value row keeps a
        // masked key's zero probability from meeting garbage).
        #[unroll]
        for i in 0..comptime![(FLASH_KEYS as u32 * hd / 4).div_ceil(4 * plane)] {
            let e = unit + i * units;
            if e < comptime![FLASH_KEYS as u32 * hd / 4] {
                let j = e / hd4;
                let c4 = e % hd4;
                let key = k0 + j;
                let valid = key < k_end;
                let kr = cache_row(meta, table, select(valid, key, 0u32), paged);
                let at = select(valid, (kr * kv_dim + kvh * hd) / 4 + c4, 0u32) as usize;
                let kv = k_cache[at];
                let vv = v_cache[at];
                let mut hk = Vector::<half::f16, Const<4>>::empty();
                let mut hv = Vector::<half::f16, Const<4>>::empty();
                #[unroll]
                for c in 0..4u32 {
                    hk[c as usize] = half::f16::cast_from(kv[c as usize]);
                    hv[c as usize] = half::f16::cast_from(vv[c as usize]);
                }
                ks[(j * ldv + c4) as usize] = select(valid, hk, zero4);
                vs[(j * ldv + c4) as usize] = select(valid, hv, zero4);
            }
        }
        sync_cube();
        // Scores of the plane's 16 rows against the tile's keys.
        let mut sc = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime![FLASH_KEYS / 16] {
            sc.push(cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::Undefined,
                0.0,
            ));
        }
        #[unroll]
        for d in 0..comptime![hd / 16] {
            let af = fragment(
                &qs,
                ((pl * 16 * ld + 16 * d) / 4) as usize,
                cmma::MatrixIdent::A,
                cmma::MatrixLayout::RowMajor,
                4usize,
                ld,
            );
            #[unroll]
            for j in 0..comptime![FLASH_KEYS as u32 / 16] {
                let bf = fragment(
                    &ks,
                    ((16 * j * ld + 16 * d) / 4) as usize,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::ColMajor,
                    4usize,
                    ld,
                );
                let c = &sc[comptime![j as usize]];
                cmma::execute::<half::f16, half::f16, f32, f32>(&af, &bf, c, c);
            }
        }
        #[unroll]
        for j in 0..comptime![FLASH_KEYS as u32 / 16] {
            let off = (pl * 16 * lds + 16 * j) as usize;
            cmma::store(
                &mut ss.slice_mut(off, off + comptime![15 * (FLASH_KEYS + 4) + 16]),
                &sc[comptime![j as usize]],
                lds,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_cube();
        // Online softmax of the row's new scores, `lpr` threads a row, each taking runs of 4
        // columns `lpr` runs apart (neighbouring lanes read neighbouring runs, so a warp's
        // reads spread over the banks).
        let m_old = ms[row as usize];
        let mut mx = f32::new(-1.0e30);
        #[unroll]
        for g in 0..runs {
            #[unroll]
            for i in 0..4u32 {
                let c = 4 * (part + lpr * g) + i;
                let key = k0 + c;
                let live = row_live && key <= row_q && key >= row_lo;
                mx = select(live, max(mx, ss[(row * lds + c) as usize]), mx);
            }
        }
        red[unit as usize] = mx;
        sync_cube();
        let mut m_new = m_old;
        #[unroll]
        for i in 0..lpr {
            m_new = max(m_new, red[(row * lpr + i) as usize]);
        }
        let alpha = f32::exp(m_old - m_new);
        if part == 0 {
            al[row as usize] = alpha;
        }
        sync_cube();
        let mut sum = 0.0f32;
        #[unroll]
        for g in 0..runs {
            let c4 = part + lpr * g;
            let mut v = Vector::<half::f16, Const<4>>::empty();
            #[unroll]
            for i in 0..4u32 {
                let c = 4 * c4 + i;
                let key = k0 + c;
                let live = row_live && key <= row_q && key >= row_lo;
                let p = select(live, f32::exp(ss[(row * lds + c) as usize] - m_new), 0.0f32);
                sum += p;
                v[i as usize] = half::f16::cast_from(p);
            }
            ps[(row * (pld / 4) + c4) as usize] = v;
        }
        red[unit as usize] = sum;
        // The plane's output rows scaled by their rows' alpha, lanes on consecutive columns.
        #[unroll]
        for i in 0..comptime![16 * hd / plane] {
            let e = i * comptime![plane] + UNIT_POS_X;
            let r = pl * 16 + e / hd;
            let at = (r * ldo + e % hd) as usize;
            os[at] = os[at] * al[r as usize];
        }
        sync_cube();
        if part == 0 {
            let mut s = 0.0f32;
            #[unroll]
            for i in 0..lpr {
                s += red[(row * lpr + i) as usize];
            }
            ls[row as usize] = ls[row as usize] * alpha + s;
            ms[row as usize] = m_new;
        }
        // O += P·V for the plane's rows, 16 output columns at a time.
        let mut pf = Sequence::<cmma::Matrix<half::f16>>::new();
        #[unroll]
        for j in 0..comptime![FLASH_KEYS as u32 / 16] {
            pf.push(fragment(
                &ps,
                ((pl * 16 * pld + 16 * j) / 4) as usize,
                cmma::MatrixIdent::A,
                cmma::MatrixLayout::RowMajor,
                4usize,
                pld,
            ));
        }
        #[unroll]
        for d in 0..comptime![hd / 16] {
            let off = (pl * 16 * ldo + 16 * d) as usize;
            let acc = unsafe {
                cmma::Matrix::<f32>::uninitialized(
                    cmma::MatrixIdent::Accumulator,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::Undefined,
                )
            };
            cmma::load_with_layout(
                &acc,
                &os.slice(off, off + comptime![(15 * (hd + 4) + 16) as usize]),
                ldo,
                cmma::MatrixLayout::RowMajor,
            );
            #[unroll]
            for j in 0..comptime![FLASH_KEYS as u32 / 16] {
                let bf = fragment(
                    &vs,
                    ((16 * j * ld + 16 * d) / 4) as usize,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::RowMajor,
                    4usize,
                    ld,
                );
                cmma::execute::<half::f16, half::f16, f32, f32>(
                    &pf[comptime![j as usize]],
                    &bf,
                    &acc,
                    &acc,
                );
            }
            cmma::store(
                &mut os.slice_mut(off, off + comptime![(15 * (hd + 4) + 16) as usize]),
                &acc,
                ldo,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_cube();
    }

    // Normalised rows out, `(t, h * hd)`.
    #[unroll]
    for i in 0..comptime![(FLASH_ROWS as u32 * hd).div_ceil(4 * plane)] {
        let e = unit + i * units;
        if e < comptime![FLASH_ROWS as u32 * hd] {
            let r = e / hd;
            let c = e % hd;
            let t = t0 + r / group;
            let h = kvh * group + r % group;
            if r < tpc * group {
                if t < t_end {
                    out[((t * n_head + h) * hd + c) as usize] =
                        os[(r * ldo + c) as usize] / ls[r as usize];
                }
            }
        }
    }
}

/// Position of query `t`: `base + t`, or from the batch's `meta` when paged.
#[cube]
fn query_pos(meta: &Array<u32>, base: u32, t: u32, #[comptime] paged: bool) -> u32 {
    let mut p = base + t;
    if comptime![paged] {
        p = meta[t as usize];
    }
    p
}

/// Cache row of `key` for the sequence whose page table starts at `meta[table]` ([`key_row`]
/// in `u32`).
#[cube]
fn cache_row(meta: &Array<u32>, table: u32, key: u32, #[comptime] paged: bool) -> u32 {
    let mut row = key;
    if comptime![paged] {
        let page = comptime![KV_PAGE_SIZE as u32];
        row = meta[(table + key / page) as usize] * page + key % page;
    }
    row
}

/// Launches [`flash_attention_kernel`] at plane width `plane` (see [`flash_plane`]).
#[allow(clippy::too_many_arguments)]
fn launch_flash<R: Runtime>(
    gpu: &Gpu<R>,
    q: &Buf,
    cache: &KvCache,
    layer: usize,
    out: &Buf,
    pos: &Pos<'_>,
    n: usize,
    shape: AttnShape,
    window: Option<usize>,
    plane: u32,
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let tpc = if pos.paged() { 1 } else { FLASH_ROWS / group };
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    let scale = 1.0 / (hd as f32).sqrt();
    gpu.count();
    macro_rules! launch {
        ($k:ty) => {
            // SAFETY: cube (x, y) reads the rows of its tokens in `q` and cache rows below
            // their last position (asserted within the cache by the caller), and writes its
            // tokens' rows of `out`; every index past the batch is clamped or skipped.
            unsafe {
                launch::launch(
                    gpu.client(),
                    flash_attention_kernel::FlashAttentionKernel::<$k, R>::new(
                        launch::settings(CubeDim::new_2d(plane, 4)),
                        gpu.client().clone(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        (),
                        (),
                        (),
                        (),
                        (),
                        (),
                        (),
                        hd as u32,
                        plane,
                        pos.paged(),
                    ),
                    CubeCount::new_2d(n.div_ceil(tpc) as u32, shape.n_kv_heads as u32),
                    &[
                        Arg::vec::<f32>(q.handle(), q.len() / 4, 4),
                        Arg::vec::<$k>(kc.handle(), kc.len() / 4, 4),
                        Arg::vec::<$k>(vc.handle(), vc.len() / 4, 4),
                        Arg::buf::<f32>(out),
                        Arg::buf::<u32>(pos.buf(&cache.zero)),
                        Arg::buf::<u32>(pos.meta(&cache.zero)),
                        Arg::U32(pos.scalar()),
                        Arg::U32(n as u32),
                        Arg::U32(tpc as u32),
                        Arg::U32(shape.n_heads as u32),
                        Arg::U32(shape.n_kv_heads as u32),
                        Arg::F32(scale),
                        Arg::U32(window.unwrap_or(0) as u32),
                    ],
                )
            }
        };
    }
    match cache.ty() {
        KvType::F32 => launch!(f32),
        KvType::F16 => launch!(half::f16),
    }
}

/// Causal attention of `n` queries at positions `pos..pos + n` (rows of `q`, heads back to
/// back) over layer `layer` of the cache, which already holds their keys. Output: `(n, n_head *
/// head_dim)` in `out`. One launch, or two when the keys are split.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention<R: Runtime>(
    gpu: &Gpu<R>,
    q: &Buf,
    cache: &KvCache,
    layer: usize,
    scratch: &AttnScratch,
    out: &Buf,
    pos: usize,
    n: usize,
    shape: AttnShape,
) {
    launch_attention_window(gpu, q, cache, layer, scratch, out, pos, n, shape, None)
}

/// [`launch_attention`] with an optional sliding window of `window` keys.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_window<'a, R: Runtime>(
    gpu: &Gpu<R>,
    q: &Buf,
    cache: &KvCache,
    layer: usize,
    scratch: &AttnScratch,
    out: &Buf,
    pos: impl Into<Pos<'a>>,
    n: usize,
    shape: AttnShape,
    window: Option<usize>,
) {
    let pos: Pos<'a> = pos.into();
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let q_dim = n_heads * hd;
    assert!(
        n >= 1 && n * q_dim <= q.len().min(out.len()),
        "attention: {n} queries out of range"
    );
    assert!(
        pos.end(n) <= cache.capacity() && cache.kv_dim() == n_kv_heads * hd,
        "attention: cache too small"
    );
    assert!(
        n_kv_heads >= 1 && n_heads % n_kv_heads == 0 && (1..=MAX_HEAD_DIM).contains(&hd),
        "attention: bad shape {shape:?}"
    );
    assert!(
        window.is_none_or(|w| (1..=u32::MAX as usize).contains(&w)),
        "attention: window {window:?} out of range"
    );
    if let Some(plane) = flash_plane(gpu, n, shape, pos.paged()) {
        return launch_flash(gpu, q, cache, layer, out, &pos, n, shape, window, plane);
    }
    // A device position plans for the largest it may hold: splits past its keys find none.
    let kv_len = pos.end(n);
    let (splits, chunk) = plan_splits(n, n_heads, kv_len, scratch.rows);
    let finalize = splits == 1;
    let hpc = heads_per_cube(shape, pos.paged());
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    let dst = if finalize { out } else { &scratch.part_o };
    let scale = 1.0 / (hd as f32).sqrt();
    let width = key_width(hd);
    let plane = attention_plane(gpu.client(), hd);
    gpu.count();
    macro_rules! launch {
        ($k:ty) => {
            // SAFETY: cube (t, hb, s) reads q row t, cache rows below pos + n, and writes rows
            // (t, h, s) of `dst` for its `hpc` heads h (`hpc` divides the query group), all
            // within the lengths asserted above.
            unsafe {
                launch::launch(
                    gpu.client(),
                    attention_kernel::AttentionKernel::<$k, R>::new(
                        launch::settings(CubeDim::new_1d(hd as u32)),
                        gpu.client().clone(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        (),
                        (),
                        (),
                        (),
                        (),
                        (),
                        (),
                        (),
                        width,
                        hd,
                        hpc,
                        finalize,
                        pos.paged(),
                        plane,
                    ),
                    row_grid(n * n_heads / hpc * splits),
                    &[
                        Arg::vec::<f32>(q.handle(), q.len() / width, width),
                        Arg::vec::<$k>(kc.handle(), kc.len() / width, width),
                        Arg::buf::<$k>(vc),
                        Arg::buf::<f32>(dst),
                        Arg::buf::<f32>(&scratch.part_ml),
                        Arg::buf::<u32>(pos.buf(&cache.zero)),
                        Arg::buf::<u32>(pos.meta(&cache.zero)),
                        Arg::U32(pos.scalar()),
                        Arg::U32(n as u32),
                        Arg::U32(chunk as u32),
                        Arg::U32(splits as u32),
                        Arg::U32(n_heads as u32),
                        Arg::U32(n_kv_heads as u32),
                        Arg::F32(scale),
                        Arg::U32(window.unwrap_or(0) as u32),
                    ],
                )
            }
        };
    }
    match cache.ty() {
        KvType::F32 => launch!(f32),
        KvType::F16 => launch!(half::f16),
    }
    if !finalize {
        gpu.count();
        // SAFETY: cube (t, h) reads its `splits` partial rows and writes row (t, h) of `out`.
        unsafe {
            launch::launch(
                gpu.client(),
                attention_combine_kernel::AttentionCombineKernel::<R>::new(
                    launch::settings(CubeDim::new_1d(hd as u32)),
                    gpu.client().clone(),
                    array_arg(),
                    array_arg(),
                    array_arg(),
                    (),
                    hd,
                ),
                row_grid(n * n_heads),
                &[
                    Arg::buf::<f32>(&scratch.part_o),
                    Arg::buf::<f32>(&scratch.part_ml),
                    Arg::buf::<f32>(&out),
                    Arg::U32(splits as u32),
                ],
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_two_pass_softmax() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let k: Vec<f32> = (0..12).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.5).collect();
        let v: Vec<f32> = (0..12).map(|i| ((i * 3) % 7) as f32 * 0.2 - 0.4).collect();
        let q = [0.4f32, -0.2, 0.9, 0.1];
        let mut out = [0.0f32; 4];
        attend_head(&q, &k, &v, 0, 2, shape, &mut out);
        let s: Vec<f32> = (0..3)
            .map(|t| (0..4).map(|d| q[d] * k[t * 4 + d]).sum::<f32>() / 2.0)
            .collect();
        let m = s.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for d in 0..4 {
            let want: f32 = (0..3).map(|t| e[t] / z * v[t * 4 + d]).sum();
            assert!((out[d] - want).abs() < 1e-6, "{d}: {} vs {want}", out[d]);
        }
    }

    #[test]
    fn tiles_match_the_reference_per_head() {
        let mut seed = 0x2545_f491u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        for (n_heads, n_kv_heads, head_dim) in [(4, 1, 256), (9, 3, 64), (2, 2, 128)] {
            let shape = AttnShape {
                n_heads,
                n_kv_heads,
                head_dim,
            };
            let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
            let ctx = 220;
            // Large keys make scores of a few units: the running max moves between chunks.
            let k: Vec<f32> = (0..ctx * kv_dim).map(|_| rand() * 3.0).collect();
            let v: Vec<f32> = (0..ctx * kv_dim).map(|_| rand()).collect();
            for (pos0, n) in [(0, 1), (0, 16), (5, 7), (70, 19), (150, 70)] {
                let q: Vec<f32> = (0..n * q_dim).map(|_| rand()).collect();
                for window in [None, Some(5), Some(100)] {
                    // The dispatched path (AVX-512 here when the CPU has it), and the AVX2 and
                    // portable instantiations of the same body.
                    let mut runs = Vec::new();
                    let mut got = vec![0f32; n * q_dim];
                    attend_tokens(&q, &k, &v, pos0, window, shape, &mut got);
                    runs.push(("dispatched", got));
                    let mut scratch = TileScratch::default();
                    let mut got = vec![0f32; n * q_dim];
                    tiles_body::<false>(&q, &k, &v, pos0, window, shape, &mut got, &mut scratch);
                    runs.push(("portable", got));
                    #[cfg(target_arch = "x86_64")]
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        let mut got = vec![0f32; n * q_dim];
                        // SAFETY: the CPU has the features.
                        unsafe {
                            tiles_avx2(&q, &k, &v, pos0, window, shape, &mut got, &mut scratch)
                        };
                        runs.push(("avx2", got));
                    }
                    let mut want = vec![0f32; head_dim];
                    for t in 0..n {
                        for h in 0..n_heads {
                            let at = t * q_dim + h * head_dim..t * q_dim + (h + 1) * head_dim;
                            let kv_head = h / (n_heads / n_kv_heads);
                            attend_head_window(
                                &q[at.clone()],
                                &k,
                                &v,
                                kv_head,
                                pos0 + t,
                                window,
                                shape,
                                &mut want,
                            );
                            for (path, got) in &runs {
                                for (d, (&g, &w)) in got[at.clone()].iter().zip(&want).enumerate() {
                                    assert!(
                                        (g - w).abs() < 2e-5,
                                        "{path} {shape:?} pos {} head {h} dim {d} window {window:?}: {g} vs {w}",
                                        pos0 + t
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every split of a decode query through `run`, merged by [`combine_splits`].
    fn decode_by_splits(
        q: &[f32],
        pos: usize,
        window: Option<usize>,
        shape: AttnShape,
        mut run: impl FnMut(usize, usize, &mut [f32]),
    ) -> Vec<f32> {
        let (hd, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads);
        let len = split_len(shape);
        let splits = decode_splits(pos, window);
        let mut out = vec![0f32; q.len()];
        for (g, out) in out.chunks_exact_mut(group * hd).enumerate() {
            let mut parts = vec![0f32; splits * len];
            for (s, part) in parts.chunks_exact_mut(len).enumerate() {
                run(g, s, part);
            }
            combine_splits(&parts, shape, out);
        }
        out
    }

    #[test]
    fn decode_splits_match_the_reference_per_head() {
        let mut seed = 0x1234_5677u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        for (n_heads, n_kv_heads, head_dim) in [(9, 3, 64), (4, 1, 256), (2, 2, 80), (3, 1, 72)] {
            let shape = AttnShape {
                n_heads,
                n_kv_heads,
                head_dim,
            };
            let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
            let ctx = 700;
            let k: Vec<f32> = (0..ctx * kv_dim).map(|_| rand() * 3.0).collect();
            let v: Vec<f32> = (0..ctx * kv_dim).map(|_| rand()).collect();
            // The same cache with position t at row perm(t): a paged layout.
            let perm = |t: usize| (t * 337) % ctx;
            let (mut kp, mut vp) = (vec![0f32; k.len()], vec![0f32; v.len()]);
            for t in 0..ctx {
                let (src, dst) = (t * kv_dim..(t + 1) * kv_dim, perm(t) * kv_dim);
                kp[dst..dst + kv_dim].copy_from_slice(&k[src.clone()]);
                vp[dst..dst + kv_dim].copy_from_slice(&v[src]);
            }
            for pos in [0, 4, 63, 64, 255, 256, 300, 699] {
                let q: Vec<f32> = (0..q_dim).map(|_| rand()).collect();
                for window in [None, Some(5), Some(300)] {
                    let mut runs = Vec::new();
                    let got = decode_by_splits(&q, pos, window, shape, |g, s, part| {
                        attend_split(&q, &k, &v, g, pos, window, s, shape, part, |t| t)
                    });
                    runs.push(("dispatched", got));
                    let lo = |s: usize| first_key(pos, window) + s * DECODE_SPLIT;
                    let keys = |s: usize| lo(s)..(lo(s) + DECODE_SPLIT).min(pos + 1);
                    let got = decode_by_splits(&q, pos, window, shape, |g, s, part| {
                        split_body::<false>(
                            &q,
                            &k,
                            &v,
                            g,
                            keys(s),
                            shape,
                            part,
                            |t| t,
                            crate::ops::dot,
                        )
                    });
                    runs.push(("portable", got));
                    #[cfg(target_arch = "x86_64")]
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        let got = decode_by_splits(&q, pos, window, shape, |g, s, part| {
                            // SAFETY: the CPU has the features.
                            unsafe { split_avx2(&q, &k, &v, g, keys(s), shape, part, |t| t) }
                        });
                        runs.push(("avx2", got));
                    }
                    let paged = decode_by_splits(&q, pos, window, shape, |g, s, part| {
                        attend_split(&q, &kp, &vp, g, pos, window, s, shape, part, perm)
                    });
                    assert_eq!(paged, runs[0].1, "{shape:?} pos {pos}: paged as contiguous");
                    let mut want = vec![0f32; head_dim];
                    for h in 0..n_heads {
                        let at = h * head_dim..(h + 1) * head_dim;
                        let kv_head = h / (n_heads / n_kv_heads);
                        attend_head_window(
                            &q[at.clone()],
                            &k,
                            &v,
                            kv_head,
                            pos,
                            window,
                            shape,
                            &mut want,
                        );
                        for (path, got) in &runs {
                            for (d, (&g, &w)) in got[at.clone()].iter().zip(&want).enumerate() {
                                assert!(
                                    (g - w).abs() < 2e-5,
                                    "{path} {shape:?} pos {pos} head {h} dim {d} window {window:?}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn window_sees_the_last_keys_only() {
        let shape = AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        // Keys 0..4 with values 0..4: a window of 2 at position 3 averages values 2 and 3
        // (all scores are equal, q = 0).
        let k = [0.0f32; 8];
        let v: Vec<f32> = (0..4).flat_map(|t| [t as f32, 0.0]).collect();
        let mut out = [0.0f32; 2];
        attend_head_window(&[0.0, 0.0], &k, &v, 0, 3, Some(2), shape, &mut out);
        assert_eq!(out, [2.5, 0.0]);
        assert_eq!(
            (
                first_key(3, Some(2)),
                first_key(0, Some(512)),
                first_key(9, None)
            ),
            (2, 0, 0)
        );
    }
}
