//! Rotary position embedding, llama.cpp's "normal" mode (the one `llama` GGUFs use):
//! adjacent pairs (x[2i], x[2i+1]) of the first `rope_dim` dims of each head are rotated by
//! pos * base^(-2i/rope_dim) / freq_factor[i].
//!
//! The CubeCL kernel rotates Q in place and K on its way into the KV cache, and copies V into
//! the cache, in one launch. Its cos/sin come from a table built once on the host with
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

use cubecl::prelude::*;

use super::attention::{KvCache, KvType};
use super::gpu::{elementwise, Buf, Gpu};

/// The cos and sin tables for positions `0..ctx`, each `(ctx, rope_dim/2)`, row-major.
pub fn rope_tables(ctx: usize, inv_freqs: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freqs.len();
    let (mut cos, mut sin) = (vec![0.0f32; ctx * half], vec![0.0f32; ctx * half]);
    for p in 0..ctx {
        rope_cache(p, inv_freqs, &mut cos[p * half..(p + 1) * half], &mut sin[p * half..(p + 1) * half]);
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

/// One unit per (token, head, pair) over the Q heads then the KV heads. Q pairs rotate in
/// place; K pairs rotate into `k_cache[pos + t]`; the same unit copies V's pair into `v_cache`.
#[cube(launch_unchecked)]
pub fn rope_store_kernel<K: Float>(
    q: &mut Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    k_cache: &mut Array<K>,
    v_cache: &mut Array<K>,
    pos: u32,
    n_tokens: u32,
    n_head: u32,
    n_kv: u32,
    head_dim: u32,
    rot_pairs: u32,
) {
    let (n_head, n_kv, hd, rot) = (n_head as usize, n_kv as usize, head_dim as usize, rot_pairs as usize);
    let pairs = hd / 2;
    let idx = ABSOLUTE_POS;
    if idx < n_tokens as usize * (n_head + n_kv) * pairs {
        let i = idx % pairs;
        let slot = (idx / pairs) % (n_head + n_kv);
        let t = idx / (pairs * (n_head + n_kv));
        let p = pos as usize + t;
        let mut c = 1.0f32;
        let mut s = 0.0f32;
        if i < rot {
            c = cos[p * rot + i];
            s = sin[p * rot + i];
        }
        if slot < n_head {
            let b = t * n_head * hd + slot * hd + 2 * i;
            let (a0, a1) = (q[b], q[b + 1]);
            q[b] = a0 * c - a1 * s;
            q[b + 1] = a0 * s + a1 * c;
        } else {
            let kv_dim = n_kv * hd;
            let off = (slot - n_head) * hd + 2 * i;
            let src = t * kv_dim + off;
            let dst = p * kv_dim + off;
            let (a0, a1) = (k[src], k[src + 1]);
            k_cache[dst] = K::cast_from(a0 * c - a1 * s);
            k_cache[dst + 1] = K::cast_from(a0 * s + a1 * c);
            v_cache[dst] = K::cast_from(v[src]);
            v_cache[dst + 1] = K::cast_from(v[src + 1]);
        }
    }
}

/// RoPE on `n` tokens at positions `pos..pos + n`: Q rotated in place, rotated K and plain V
/// written into the cache's layer `layer`.
#[allow(clippy::too_many_arguments)]
pub fn launch_rope_store<R: Runtime>(
    gpu: &Gpu<R>,
    q: &Buf,
    k: &Buf,
    v: &Buf,
    cos: &Buf,
    sin: &Buf,
    cache: &KvCache,
    layer: usize,
    pos: usize,
    n: usize,
    shape: RopeShape,
) {
    let RopeShape { n_head, n_kv_heads, head_dim, rot_pairs } = shape;
    let kv_dim = n_kv_heads * head_dim;
    assert!(head_dim % 2 == 0 && rot_pairs * 2 <= head_dim, "rope: bad head shape {shape:?}");
    assert!(n * n_head * head_dim <= q.len() && n * kv_dim <= k.len().min(v.len()), "rope: {n} tokens out of range");
    assert!((pos + n) * rot_pairs <= cos.len().min(sin.len()), "rope: table too short for position {}", pos + n);
    assert!((pos + n) * kv_dim <= cache.capacity() * kv_dim && kv_dim == cache.kv_dim(), "rope: cache too small");
    let (count, dim) = elementwise(n * (n_head + n_kv_heads) * head_dim / 2);
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    gpu.count();
    macro_rules! launch {
        ($k:ty) => {
            // SAFETY: the kernel guards its unit count; the indices it derives are within the
            // lengths asserted above.
            unsafe {
                rope_store_kernel::launch_unchecked::<$k, R>(
                    gpu.client(),
                    count,
                    dim,
                    q.arg(),
                    k.arg(),
                    v.arg(),
                    cos.arg(),
                    sin.arg(),
                    kc.arg(),
                    vc.arg(),
                    pos as u32,
                    n as u32,
                    n_head as u32,
                    n_kv_heads as u32,
                    head_dim as u32,
                    rot_pairs as u32,
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
}
