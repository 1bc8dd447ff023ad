//! Rotary position embedding. llama.cpp's "normal" mode (the one `llama` GGUFs use) rotates
//! adjacent pairs (x[2i], x[2i+1]) of the first `rope_dim` dims of each head by
//! pos * base^(-2i/rope_dim) / freq_factor[i]; its "neox" mode (Gemma) rotates the pairs
//! (x[i], x[i + rope_dim/2]) by the same angles. Dims past `rope_dim` pass through.
//!
//! The CubeCL kernel rotates Q into the attention's input buffer and K on its way into the KV
//! cache, and copies V into the cache, in one launch; Q, K and V may come from one fused QKV
//! projection. Its cos/sin come from a table built once on the host with
//! [`rope_cache`], so every backend rotates by bit-identical angles.

/// Inverse frequencies `base^(-2i/rope_dim)` (divided by the optional `rope_freqs` factors).
pub fn inv_freqs(rope_dim: usize, base: f32, factors: Option<&[f32]>) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| {
            let f = base.powf(-2.0 * i as f32 / rope_dim as f32);
            f / factors.map_or(1.0, |fs| fs[i])
        })
        .collect()
}

/// Fills `cos`/`sin` (rope_dim/2 each) for position `pos`.
pub fn rope_cache(pos: usize, inv_freqs: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for (i, &f) in inv_freqs.iter().enumerate() {
        let theta = pos as f32 * f;
        cos[i] = theta.cos();
        sin[i] = theta.sin();
    }
}

/// Reference RoPE in place over `n_heads` heads of `head_dim` stored back to back.
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
}

/// Reference NeoX-mode RoPE in place: pairs `(i, i + rope_dim/2)` of each head.
pub fn rope_neox(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = a * s + b * c;
        }
    }
}

use cubecl::prelude::*;

use super::attention::{KvCache, KvType};
use super::gpu::{elementwise, Buf, Gpu, Pos};
use super::launch::{self, array_arg, Arg};

/// The cos and sin tables for positions `0..ctx`, each `(ctx, rope_dim/2)`, row-major.
pub fn rope_tables(ctx: usize, inv_freqs: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freqs.len();
    let (mut cos, mut sin) = (vec![0.0f32; ctx * half], vec![0.0f32; ctx * half]);
    for p in 0..ctx {
        rope_cache(
            p,
            inv_freqs,
            &mut cos[p * half..(p + 1) * half],
            &mut sin[p * half..(p + 1) * half],
        );
    }
    (cos, sin)
}

/// Shapes of one rope-and-store call.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub n_head: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// `rope_dim / 2`: pairs rotated per head; the rest pass through.
    pub rot_pairs: usize,
}

/// Where the projections of a rope-and-store call come from: three buffers, or one fused
/// QKV output whose token rows hold Q, K, V back to back (the fused projection's layout).
#[derive(Clone, Copy)]
pub enum RopeSrc<'a> {
    /// `q` `(n, n_head*head_dim)`, `k` and `v` `(n, n_kv_heads*head_dim)`.
    Separate { q: &'a Buf, k: &'a Buf, v: &'a Buf },
    /// `(n, (n_head + 2*n_kv_heads)*head_dim)`.
    Fused(&'a Buf),
}

/// One unit per (token, head, pair) over the Q heads then the KV heads; pair `i` is the dims
/// `(2i, 2i+1)`, or with `neox` `(i, i + rot_pairs)` while `i < rot_pairs` (the rest, past the
/// rotated dims, stay adjacent and pass through). Q pairs rotate into
/// `q_out`; K pairs rotate into `k_cache[pos + t]`; the same unit copies V's pair into
/// `v_cache`. Sources are read at `*_off + t * *_stride + ...`, so Q, K and V may be parts of
/// one fused buffer (bound three times, read-only).
#[cube(launch_unchecked)]
pub fn rope_store_kernel<K: Float>(
    q_src: &Array<f32>,
    k_src: &Array<f32>,
    v_src: &Array<f32>,
    q_out: &mut Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    k_cache: &mut Array<K>,
    v_cache: &mut Array<K>,
    pos_dev: &Array<u32>,
    meta: &Array<u32>,
    pos: u32,
    n_tokens: u32,
    n_head: u32,
    n_kv: u32,
    head_dim: u32,
    rot_pairs: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    q_stride: u32,
    kv_stride: u32,
    #[comptime] neox: bool,
    #[comptime] paged: bool,
) {
    let (n_head, n_kv, hd, rot) = (
        n_head as usize,
        n_kv as usize,
        head_dim as usize,
        rot_pairs as usize,
    );
    let pairs = hd / 2;
    let idx = ABSOLUTE_POS;
    if idx < n_tokens as usize * (n_head + n_kv) * pairs {
        let i = idx % pairs;
        let slot = (idx / pairs) % (n_head + n_kv);
        let t = idx / (pairs * (n_head + n_kv));
        let mut p = (pos + pos_dev[0]) as usize + t;
        // The cache row K and V go to: the position itself, or the slot of a paged batch.
        let mut row = p;
        if comptime!(paged) {
            p = meta[t] as usize;
            row = meta[n_tokens as usize + t] as usize;
        }
        let mut c = 1.0f32;
        let mut s = 0.0f32;
        if i < rot {
            c = cos[p * rot + i];
            s = sin[p * rot + i];
        }
        // The pair's two dims within the head: first at d0, second `gap` after it.
        let mut d0 = 2 * i;
        let mut gap = 1;
        if comptime!(neox) {
            if i < rot {
                d0 = i;
                gap = rot;
            }
        }
        if slot < n_head {
            let head = slot * hd + d0;
            let src = q_off as usize + t * q_stride as usize + head;
            let (a0, a1) = (q_src[src], q_src[src + gap]);
            let b = t * n_head * hd + head;
            q_out[b] = a0 * c - a1 * s;
            q_out[b + gap] = a0 * s + a1 * c;
        } else {
            let kv_dim = n_kv * hd;
            let off = (slot - n_head) * hd + d0;
            let ks = k_off as usize + t * kv_stride as usize + off;
            let vs = v_off as usize + t * kv_stride as usize + off;
            let dst = row * kv_dim + off;
            let (a0, a1) = (k_src[ks], k_src[ks + gap]);
            k_cache[dst] = K::cast_from(a0 * c - a1 * s);
            k_cache[dst + gap] = K::cast_from(a0 * s + a1 * c);
            v_cache[dst] = K::cast_from(v_src[vs]);
            v_cache[dst + gap] = K::cast_from(v_src[vs + gap]);
        }
    }
}

/// RoPE on `n` tokens at positions `pos..pos + n`: rotated Q into `q_out` `(n, n_head*head_dim)`,
/// rotated K and plain V into the cache's layer `layer`. Normal (adjacent-pair) mode.
#[allow(clippy::too_many_arguments)]
pub fn launch_rope_store<'a, R: Runtime>(
    gpu: &Gpu<R>,
    src: RopeSrc<'_>,
    q_out: &Buf,
    cos: &Buf,
    sin: &Buf,
    cache: &KvCache,
    layer: usize,
    pos: impl Into<Pos<'a>>,
    n: usize,
    shape: RopeShape,
) {
    launch_rope_store_mode(
        gpu, src, q_out, cos, sin, cache, layer, pos, n, shape, false,
    )
}

/// [`launch_rope_store`] in normal mode, or NeoX mode when `neox`.
#[allow(clippy::too_many_arguments)]
pub fn launch_rope_store_mode<'a, R: Runtime>(
    gpu: &Gpu<R>,
    src: RopeSrc<'_>,
    q_out: &Buf,
    cos: &Buf,
    sin: &Buf,
    cache: &KvCache,
    layer: usize,
    pos: impl Into<Pos<'a>>,
    n: usize,
    shape: RopeShape,
    neox: bool,
) {
    let pos: Pos<'a> = pos.into();
    let RopeShape {
        n_head,
        n_kv_heads,
        head_dim,
        rot_pairs,
    } = shape;
    let (q_dim, kv_dim) = (n_head * head_dim, n_kv_heads * head_dim);
    assert!(
        head_dim % 2 == 0 && rot_pairs * 2 <= head_dim,
        "rope: bad head shape {shape:?}"
    );
    let (q, k, v, offs, strides) = match src {
        RopeSrc::Separate { q, k, v } => {
            assert!(
                n * q_dim <= q.len() && n * kv_dim <= k.len().min(v.len()),
                "rope: {n} tokens out of range"
            );
            (q, k, v, [0, 0, 0], [q_dim, kv_dim])
        }
        RopeSrc::Fused(qkv) => {
            let row = q_dim + 2 * kv_dim;
            assert!(n * row <= qkv.len(), "rope: {n} fused tokens out of range");
            (qkv, qkv, qkv, [0, q_dim, q_dim + kv_dim], [row, row])
        }
    };
    assert!(
        n * q_dim <= q_out.len(),
        "rope: q_out too small for {n} tokens"
    );
    assert!(
        pos.end(n) * rot_pairs <= cos.len().min(sin.len()),
        "rope: table too short for position {}",
        pos.end(n)
    );
    assert!(
        pos.end(n) <= cache.capacity() && kv_dim == cache.kv_dim(),
        "rope: cache too small"
    );
    let (count, dim) = elementwise(n * (n_head + n_kv_heads) * head_dim / 2);
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    gpu.count();
    macro_rules! launch {
        ($k:ty) => {
            // SAFETY: the kernel guards its unit count; the indices it derives are within the
            // lengths asserted above.
            unsafe {
                launch::launch(
                    gpu.client(),
                    rope_store_kernel::RopeStoreKernel::<$k, R>::new(
                        launch::settings(dim),
                        gpu.client().clone(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
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
                        (),
                        (),
                        (),
                        neox,
                        pos.paged(),
                    ),
                    count,
                    &[
                        Arg::buf::<f32>(q),
                        Arg::buf::<f32>(k),
                        Arg::buf::<f32>(v),
                        Arg::buf::<f32>(q_out),
                        Arg::buf::<f32>(cos),
                        Arg::buf::<f32>(sin),
                        Arg::buf::<$k>(kc),
                        Arg::buf::<$k>(vc),
                        Arg::buf::<u32>(pos.buf(&cache.zero)),
                        Arg::buf::<u32>(pos.meta(&cache.zero)),
                        Arg::U32(pos.scalar()),
                        Arg::U32(n as u32),
                        Arg::U32(n_head as u32),
                        Arg::U32(n_kv_heads as u32),
                        Arg::U32(head_dim as u32),
                        Arg::U32(rot_pairs as u32),
                        Arg::U32(offs[0] as u32),
                        Arg::U32(offs[1] as u32),
                        Arg::U32(offs[2] as u32),
                        Arg::U32(strides[0] as u32),
                        Arg::U32(strides[1] as u32),
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

#[cfg(test)]
mod tests {
    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let inv = super::inv_freqs(4, 10000.0, None);
        let (mut c, mut s) = ([0.0; 2], [0.0; 2]);
        super::rope_cache(0, &inv, &mut c, &mut s);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        super::rope(&mut x, 4, &c, &s);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        super::rope_cache(7, &inv, &mut c, &mut s);
        super::rope(&mut x, 4, &c, &s);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }

    #[test]
    fn neox_rotates_half_apart_pairs() {
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        // Pair (0, 2) turns by 90 degrees, pair (1, 3) not at all; dims 4, 5 pass through.
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        super::rope_neox(&mut x[..4], 4, &c, &s);
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0, 5.0, 6.0]);
    }
}
