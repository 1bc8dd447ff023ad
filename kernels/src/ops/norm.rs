//! RMSNorm (`attn_norm`, `ffn_norm`, `output_norm`): y = x / sqrt(mean(x²) + eps) * w.
//!
//! Beside the reference: the CubeCL kernel (one row per cube, a shared-memory sum) and its
//! fused form `x += y; out = rmsnorm(x)` that closes every residual block in one launch.
//! Gemma adds two forms: the post-norm residual `x += rmsnorm(p) * w` (`post_attention_norm`,
//! `post_ffw_norm`) and the per-head norm of q and k (`attn_q_norm`, `attn_k_norm`, one
//! `head_dim` weight shared by every head), in place.

/// Reference RMSNorm of one row, written to `out` (same length as `x` and `weight`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), out.len());
    let sum_sq = super::dot(x, x);
    let scale = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Reference post-norm residual: `x += rmsnorm(p) * weight` (one row).
pub fn add_rms_normed(x: &mut [f32], p: &[f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), p.len());
    let scale = 1.0 / (super::dot(p, p) / p.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in x.iter_mut().zip(p).zip(weight) {
        *o += v * scale * w;
    }
}

/// Reference per-head RMSNorm in place: each `weight.len()`-wide chunk of `x` (a head) is
/// normalised and scaled by `weight`.
pub fn rms_norm_heads(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for head in x.chunks_exact_mut(d) {
        let scale = 1.0 / (super::dot(head, head) / d as f32 + eps).sqrt();
        for (v, &w) in head.iter_mut().zip(weight) {
            *v *= scale * w;
        }
    }
}

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::gpu::{row_grid, Buf, Gpu};
use super::matmul::kernels::pair_slot;

/// Threads per cube of the row kernels (a power of two: the sum halves it).
pub(crate) const ROW_CUBE: usize = 256;

/// Elements a unit of [`rms_norm_kernel`] and [`add_rms_norm_kernel`] loads per trip, issued
/// together (clamped, the extras' sums dropped): a batch's norm is one cube per row, too few
/// cubes to hide a load's latency, and a trip of one load waited for each (8B at 64 sequences
/// on the H200: 13 µs a launch for 64 rows of 4,096). `ROCFORGE_NORM_UNROLL=1` for A/B runs.
pub const NORM_UNROLL: usize = 4;

/// [`NORM_UNROLL`], or 1 with `ROCFORGE_NORM_UNROLL=1`. Read once.
fn norm_unroll() -> usize {
    static U: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *U.get_or_init(|| {
        if std::env::var("ROCFORGE_NORM_UNROLL").is_ok_and(|v| v == "1") {
            1
        } else {
            NORM_UNROLL
        }
    })
}

/// Sum of `v` over the cube's `block` units (a power of two), returned to every unit.
#[cube]
pub(crate) fn cube_sum(v: f32, #[comptime] block: usize) -> f32 {
    let mut shared = SharedMemory::<f32>::new(block);
    let u = UNIT_POS as usize;
    shared[u] = v;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if u < stride {
            shared[u] += shared[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// Writes `weight * x / rms(x)` of the row that starts at `src` into `out[dst..]`, in the
/// mat-mat's pair order with `pairs` (`matmul::kernels::pair_slot`). Every unit reads back only
/// the elements it accumulated, so `x` may have been written by the same unit.
#[cube]
#[allow(clippy::too_many_arguments)]
fn normalize_row<O: Float>(
    x: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<O>,
    src: usize,
    dst: usize,
    sum_sq: f32,
    eps: f32,
    #[comptime] block: usize,
    #[comptime] pairs: bool,
    #[comptime] unroll: usize,
) {
    let d = weight.len();
    let scale = 1.0 / f32::sqrt(sum_sq / f32::cast_from(d) + eps);
    let mut i = UNIT_POS as usize;
    while i < d {
        #[unroll]
        for k in 0..unroll {
            let j = i + k * block;
            let c = select(j < d, j, d - 1);
            let v = O::cast_from(x[src + c] * scale * weight[c]);
            if j < d {
                out[dst + pair_slot(j, pairs)] = v;
            }
        }
        i += unroll * block;
    }
}

/// Input row of output row `r`: `row0 + r`, or `pick[r]` when the launch gathers rows (the
/// last token of each sequence of a multi-sequence batch, for its logits).
#[cube]
fn src_row(pick: &Array<u32>, row0: u32, r: usize, #[comptime] gather: bool) -> usize {
    let mut row = row0 as usize + r;
    if comptime!(gather) {
        row = pick[r] as usize;
    }
    row
}

/// `out[r] = rmsnorm(x[row0 + r]) * weight` for each cube `r` (`O`: f32, or f16 in the
/// mat-mat's pair order with `pairs`).
#[cube(launch_unchecked)]
pub fn rms_norm_kernel<O: Float>(
    x: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<O>,
    pick: &Array<u32>,
    row0: u32,
    eps: f32,
    #[comptime] block: usize,
    #[comptime] gather: bool,
    #[comptime] pairs: bool,
    #[comptime] unroll: usize,
) {
    let d = weight.len();
    let r = CUBE_POS;
    let src = src_row(pick, row0, r, gather) * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        #[unroll]
        for k in 0..unroll {
            let j = i + k * block;
            let v = x[src + select(j < d, j, d - 1)];
            acc += select(j < d, v * v, 0.0);
        }
        i += unroll * block;
    }
    let sum_sq = cube_sum(acc, block);
    normalize_row::<O>(
        x,
        weight,
        out,
        src,
        r * d,
        sum_sq,
        eps,
        block,
        pairs,
        unroll,
    );
}

/// Residual add then norm: `x[row0 + r] += y[row0 + r]; out[r] = rmsnorm(x[row0 + r]) * weight`
/// (`O` and `pairs` as in [`rms_norm_kernel`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_kernel<O: Float>(
    x: &mut Array<f32>,
    y: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<O>,
    pick: &Array<u32>,
    row0: u32,
    eps: f32,
    #[comptime] block: usize,
    #[comptime] gather: bool,
    #[comptime] pairs: bool,
    #[comptime] unroll: usize,
) {
    let d = weight.len();
    let r = CUBE_POS;
    let src = src_row(pick, row0, r, gather) * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        #[unroll]
        for k in 0..unroll {
            let j = i + k * block;
            let c = src + select(j < d, j, d - 1);
            let v = x[c] + y[c];
            if j < d {
                x[c] = v;
                acc += v * v;
            }
        }
        i += unroll * block;
    }
    let sum_sq = cube_sum(acc, block);
    normalize_row::<O>(
        x,
        weight,
        out,
        src,
        r * d,
        sum_sq,
        eps,
        block,
        pairs,
        unroll,
    );
}

/// Post-norm residual: `x[r] += rmsnorm(p[r]) * weight` for each cube `r`.
#[cube(launch_unchecked)]
pub fn add_rms_normed_kernel(
    x: &mut Array<f32>,
    p: &Array<f32>,
    weight: &Array<f32>,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let src = CUBE_POS * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        let v = p[src + i];
        acc += v * v;
        i += block;
    }
    let sum_sq = cube_sum(acc, block);
    let scale = 1.0 / f32::sqrt(sum_sq / f32::cast_from(d) + eps);
    let mut j = UNIT_POS as usize;
    while j < d {
        x[src + j] += p[src + j] * scale * weight[j];
        j += block;
    }
}

/// Per-head RMSNorm in place: cube `r` normalises head `r % heads` of token `r / heads`, the
/// `weight.len()` values at `off + token * stride + head * weight.len()`.
#[cube(launch_unchecked)]
pub fn rms_norm_heads_kernel(
    x: &mut Array<f32>,
    weight: &Array<f32>,
    off: u32,
    stride: u32,
    heads: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let r = CUBE_POS;
    let base = off as usize + (r / heads as usize) * stride as usize + (r % heads as usize) * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        let v = x[base + i];
        acc += v * v;
        i += block;
    }
    let sum_sq = cube_sum(acc, block);
    normalize_row_in_place(x, weight, base, sum_sq, eps, block);
}

/// [`normalize_row`] writing back into the row it reads (each unit its own elements).
#[cube]
fn normalize_row_in_place(
    x: &mut Array<f32>,
    weight: &Array<f32>,
    base: usize,
    sum_sq: f32,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let scale = 1.0 / f32::sqrt(sum_sq / f32::cast_from(d) + eps);
    let mut i = UNIT_POS as usize;
    while i < d {
        x[base + i] = x[base + i] * scale * weight[i];
        i += block;
    }
}

/// Which rows of `x` a norm launch reads; output row `r` is the `r`-th of them.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// `first..first + count`.
    Range { first: usize, count: usize },
    /// Rows `pick[0..count]`, every one below `end`.
    Picked {
        pick: &'a Buf,
        count: usize,
        end: usize,
    },
}

impl Rows<'_> {
    fn count(&self) -> usize {
        match *self {
            Rows::Range { count, .. } | Rows::Picked { count, .. } => count,
        }
    }
    fn end(&self) -> usize {
        match *self {
            Rows::Range { first, count } => first + count,
            Rows::Picked { end, .. } => end,
        }
    }
    fn first(&self) -> u32 {
        match *self {
            Rows::Range { first, .. } => first as u32,
            Rows::Picked { .. } => 0,
        }
    }
    /// The pick buffer, or `x` (bound but unread) for a range.
    fn pick<'b>(&'b self, x: &'b Buf) -> &'b Buf {
        match self {
            Rows::Range { .. } => x,
            Rows::Picked { pick, count, .. } => {
                assert!(
                    *count <= pick.len(),
                    "rms_norm: {count} picked rows out of range"
                );
                pick
            }
        }
    }
    fn gather(&self) -> bool {
        matches!(self, Rows::Picked { .. })
    }
}

/// `rows` of `x` (rows of `weight.len()`), normalised into `out[0..rows.count]`: f32, or f16
/// in the quantized mat-mat's pair order where `out` holds 2-byte elements (its activations,
/// `matmul::launch_mma_half`; rows of a multiple of 4).
pub fn launch_rms_norm<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    weight: &Buf,
    out: &Buf,
    rows: Rows<'_>,
    eps: f32,
) {
    launch_norm(gpu, x, None, weight, out, rows, eps)
}

/// `x += y` on `rows`, then those rows normalised into `out[0..rows.count]` (f32 or f16 pairs,
/// as [`launch_rms_norm`]).
pub fn launch_add_rms_norm<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    y: &Buf,
    weight: &Buf,
    out: &Buf,
    rows: Rows<'_>,
    eps: f32,
) {
    launch_norm(gpu, x, Some(y), weight, out, rows, eps)
}

/// [`launch_rms_norm`], adding `y` into `x` first where given.
fn launch_norm<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    y: Option<&Buf>,
    weight: &Buf,
    out: &Buf,
    rows: Rows<'_>,
    eps: f32,
) {
    let d = weight.len();
    let name = if y.is_some() {
        "add_rms_norm"
    } else {
        "rms_norm"
    };
    assert!(
        rows.end() * d <= x.len().min(y.map_or(usize::MAX, Buf::len))
            && rows.count() * d <= out.len(),
        "{name}: rows out of range"
    );
    let half = out.elem_bytes() == 2;
    assert!(
        !half || d.is_multiple_of(4),
        "{name}: f16 pairs need rows of a multiple of 4, not {d}"
    );
    gpu.count();
    let unroll = norm_unroll();
    let grid = row_grid(rows.count());
    let (first, pick) = (Arg::U32(rows.first()), Arg::buf::<u32>(rows.pick(x)));
    macro_rules! launch {
        ($o:ty) => {
            // SAFETY: every index is below the lengths checked above; pair order permutes
            // within runs of 4 of a row.
            unsafe {
                match y {
                    None => launch::launch(
                        gpu.client(),
                        rms_norm_kernel::RmsNormKernel::<$o, R>::new(
                            launch::settings(CubeDim::new_1d(ROW_CUBE as u32)),
                            gpu.client().clone(),
                            array_arg(),
                            array_arg(),
                            array_arg(),
                            array_arg(),
                            (),
                            (),
                            ROW_CUBE,
                            rows.gather(),
                            half,
                            unroll,
                        ),
                        grid,
                        &[
                            Arg::buf::<f32>(&x),
                            Arg::buf::<f32>(&weight),
                            Arg::buf::<$o>(&out),
                            pick,
                            first,
                            Arg::F32(eps),
                        ],
                    ),
                    Some(y) => launch::launch(
                        gpu.client(),
                        add_rms_norm_kernel::AddRmsNormKernel::<$o, R>::new(
                            launch::settings(CubeDim::new_1d(ROW_CUBE as u32)),
                            gpu.client().clone(),
                            array_arg(),
                            array_arg(),
                            array_arg(),
                            array_arg(),
                            array_arg(),
                            (),
                            (),
                            ROW_CUBE,
                            rows.gather(),
                            half,
                            unroll,
                        ),
                        grid,
                        &[
                            Arg::buf::<f32>(&x),
                            Arg::buf::<f32>(&y),
                            Arg::buf::<f32>(&weight),
                            Arg::buf::<$o>(&out),
                            pick,
                            first,
                            Arg::F32(eps),
                        ],
                    ),
                }
            }
        };
    }
    if half {
        launch!(half::f16)
    } else {
        launch!(f32)
    }
}

/// `x[r] += rmsnorm(p[r]) * weight` on rows `0..rows` (rows of `weight.len()`).
pub fn launch_add_rms_normed<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    p: &Buf,
    weight: &Buf,
    rows: usize,
    eps: f32,
) {
    let d = weight.len();
    assert!(
        rows * d <= x.len().min(p.len()),
        "add_rms_normed: rows out of range"
    );
    gpu.count();
    // SAFETY: every index is below the lengths checked above.
    unsafe {
        launch::launch(
            gpu.client(),
            add_rms_normed_kernel::AddRmsNormedKernel::<R>::new(
                launch::settings(CubeDim::new_1d(ROW_CUBE as u32)),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                array_arg(),
                (),
                ROW_CUBE,
            ),
            row_grid(rows),
            &[
                Arg::buf::<f32>(&x),
                Arg::buf::<f32>(&p),
                Arg::buf::<f32>(&weight),
                Arg::F32(eps),
            ],
        )
    }
}

/// Where the heads of a per-head norm lie: `tokens` rows of `stride` floats, each holding
/// `heads` heads of `weight.len()` back to back from `off`.
#[derive(Debug, Clone, Copy)]
pub struct HeadRows {
    pub tokens: usize,
    pub heads: usize,
    pub off: usize,
    pub stride: usize,
}

/// Per-head RMSNorm in place over the heads `at` describes.
pub fn launch_rms_norm_heads<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    weight: &Buf,
    at: HeadRows,
    eps: f32,
) {
    let d = weight.len();
    let HeadRows {
        tokens,
        heads,
        off,
        stride,
    } = at;
    assert!(
        tokens >= 1 && heads * d <= stride && off + (tokens - 1) * stride + heads * d <= x.len(),
        "rms_norm_heads: {at:?} out of range"
    );
    gpu.count();
    // SAFETY: cube r touches token r / heads, head r % heads, within the length checked above.
    unsafe {
        launch::launch(
            gpu.client(),
            rms_norm_heads_kernel::RmsNormHeadsKernel::<R>::new(
                launch::settings(CubeDim::new_1d(ROW_CUBE as u32)),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                (),
                (),
                (),
                (),
                ROW_CUBE,
            ),
            row_grid(tokens * heads),
            &[
                Arg::buf::<f32>(&x),
                Arg::buf::<f32>(&weight),
                Arg::U32(off as u32),
                Arg::U32(stride as u32),
                Arg::U32(heads as u32),
                Arg::F32(eps),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_rms_gives_weight() {
        let x = [1.0f32, -1.0, 1.0, -1.0];
        let w = [0.5f32, 2.0, 1.0, 3.0];
        let mut out = [0.0; 4];
        super::rms_norm(&x, &w, 0.0, &mut out);
        assert_eq!(out, [0.5, -2.0, 1.0, -3.0]);
    }

    #[test]
    fn post_norm_adds_the_normalised_row_and_heads_normalise_alone() {
        let mut x = [1.0f32, 1.0, 1.0, 1.0];
        super::add_rms_normed(&mut x, &[2.0, -2.0, 2.0, -2.0], &[1.0, 1.0, 0.5, 0.5], 0.0);
        assert_eq!(x, [2.0, 0.0, 1.5, 0.5]);
        let mut heads = [3.0f32, -3.0, 0.5, 0.5];
        super::rms_norm_heads(&mut heads, &[1.0, 2.0], 0.0);
        assert_eq!(heads, [1.0, -2.0, 1.0, 2.0]);
    }
}
