//! RMSNorm (`attn_norm`, `ffn_norm`, `output_norm`): y = x / sqrt(mean(x²) + eps) * w.
//!
//! Beside the reference: the CubeCL kernel (one row per cube, a shared-memory sum) and its
//! fused form `x += y; out = rmsnorm(x)` that closes every residual block in one launch.

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

use cubecl::prelude::*;

use super::gpu::{row_grid, Buf, Gpu};

/// Threads per cube of the row kernels (a power of two: the sum halves it).
pub(crate) const ROW_CUBE: usize = 256;

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

/// Writes `weight * x / rms(x)` of the row that starts at `src` into `out[dst..]`. Every unit
/// reads back only the elements it accumulated, so `x` may have been written by the same unit.
#[cube]
fn normalize_row(
    x: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<f32>,
    src: usize,
    dst: usize,
    sum_sq: f32,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let scale = 1.0 / f32::sqrt(sum_sq / f32::cast_from(d) + eps);
    let mut i = UNIT_POS as usize;
    while i < d {
        out[dst + i] = x[src + i] * scale * weight[i];
        i += block;
    }
}

/// `out[r] = rmsnorm(x[row0 + r]) * weight` for each cube `r`.
#[cube(launch_unchecked)]
pub fn rms_norm_kernel(
    x: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<f32>,
    row0: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let r = CUBE_POS;
    let src = (row0 as usize + r) * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        let v = x[src + i];
        acc += v * v;
        i += block;
    }
    let sum_sq = cube_sum(acc, block);
    normalize_row(x, weight, out, src, r * d, sum_sq, eps, block);
}

/// Residual add then norm: `x[row0 + r] += y[row0 + r]; out[r] = rmsnorm(x[row0 + r]) * weight`.
#[cube(launch_unchecked)]
pub fn add_rms_norm_kernel(
    x: &mut Array<f32>,
    y: &Array<f32>,
    weight: &Array<f32>,
    out: &mut Array<f32>,
    row0: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let d = weight.len();
    let r = CUBE_POS;
    let src = (row0 as usize + r) * d;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < d {
        let v = x[src + i] + y[src + i];
        x[src + i] = v;
        acc += v * v;
        i += block;
    }
    let sum_sq = cube_sum(acc, block);
    normalize_row(x, weight, out, src, r * d, sum_sq, eps, block);
}

/// Rows `row0..row0 + rows` of `x` (rows of `weight.len()`), normalised into `out[0..rows]`.
pub fn launch_rms_norm<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    weight: &Buf,
    out: &Buf,
    row0: usize,
    rows: usize,
    eps: f32,
) {
    let d = weight.len();
    assert!(
        (row0 + rows) * d <= x.len() && rows * d <= out.len(),
        "rms_norm: rows out of range"
    );
    gpu.count();
    // SAFETY: every index is below the lengths checked above.
    unsafe {
        rms_norm_kernel::launch_unchecked::<R>(
            gpu.client(),
            row_grid(rows),
            CubeDim::new_1d(ROW_CUBE as u32),
            x.arg(),
            weight.arg(),
            out.arg(),
            row0 as u32,
            eps,
            ROW_CUBE,
        )
    }
}

/// `x += y` on rows `row0..row0 + rows`, then those rows normalised into `out[0..rows]`.
#[allow(clippy::too_many_arguments)]
pub fn launch_add_rms_norm<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    y: &Buf,
    weight: &Buf,
    out: &Buf,
    row0: usize,
    rows: usize,
    eps: f32,
) {
    let d = weight.len();
    assert!(
        (row0 + rows) * d <= x.len().min(y.len()) && rows * d <= out.len(),
        "add_rms_norm: rows out of range"
    );
    gpu.count();
    // SAFETY: every index is below the lengths checked above.
    unsafe {
        add_rms_norm_kernel::launch_unchecked::<R>(
            gpu.client(),
            row_grid(rows),
            CubeDim::new_1d(ROW_CUBE as u32),
            x.arg(),
            y.arg(),
            weight.arg(),
            out.arg(),
            row0 as u32,
            eps,
            ROW_CUBE,
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
}
