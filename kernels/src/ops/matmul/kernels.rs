//! The CubeCL kernels: mat-vec (optionally several tokens, optionally accumulating into the
//! output), fused gate/up + SwiGLU, and the dequantize pass of the prefill path.
//!
//! Mat-vec layout: a cube is `lanes x rows_per_cube` units; each row of units owns one weight
//! row, its lanes stride over the row's units, then the lanes' partial sums are reduced with
//! `plane_sum` when `lanes` is exactly the plane width, else through shared memory.

use cubecl::prelude::*;

use super::decode::{decode_slot, decode_unit, slot_col};
use super::format::KernelFormat;

/// Comptime shape of a mat-vec launch.
#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub struct MatvecConfig {
    /// Lanes per row (`CUBE_DIM_X`), a power of two.
    pub lanes: u32,
    /// Rows per cube (`CUBE_DIM_Y`).
    pub rows_per_cube: u32,
    /// Reduce with `plane_sum` (`lanes` equals the plane width) instead of shared memory.
    pub plane_reduce: bool,
}

/// Weight row this unit works on; cubes are numbered over a 2D grid so row counts past 65535
/// cubes (output projections) fit every backend's grid limits.
#[cube]
fn cube_row(#[comptime] cfg: MatvecConfig) -> u32 {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * cfg.rows_per_cube + UNIT_POS_Y
}

/// Sum of `v` over the lanes of this row, valid in every lane. Every unit of the cube must
/// call it (it synchronizes the cube on the shared-memory path).
#[cube]
fn lane_sum(v: f32, smem: &mut SharedMemory<f32>, #[comptime] cfg: MatvecConfig) -> f32 {
    if comptime![cfg.plane_reduce] {
        plane_sum(v)
    } else {
        shared_lane_sum(v, smem)
    }
}

/// Tree sum over `CUBE_DIM_X` (a power of two) lanes through shared memory.
#[cube]
fn shared_lane_sum(v: f32, smem: &mut SharedMemory<f32>) -> f32 {
    let base = UNIT_POS_Y * CUBE_DIM_X;
    smem[(base + UNIT_POS_X) as usize] = v;
    sync_cube();
    let mut stride = CUBE_DIM_X / 2;
    while stride > 0 {
        if UNIT_POS_X < stride {
            let other = smem[(base + UNIT_POS_X + stride) as usize];
            smem[(base + UNIT_POS_X) as usize] += other;
        }
        sync_cube();
        stride /= 2;
    }
    let out = smem[base as usize];
    // The next call overwrites the row's slots; everyone must have read the sum first.
    sync_cube();
    out
}

/// `vals · x[x_off..]` over one unit; `guard` masks columns past `cols` (padded plain rows).
#[cube]
fn dot_unit(
    vals: &Array<f32>,
    x: &Array<f32>,
    x_off: u32,
    col0: u32,
    cols: u32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let mut s = 0.0f32;
    let guard = comptime![matches!(fmt, KernelFormat::F32 | KernelFormat::F16)];
    #[unroll]
    for i in 0..comptime![fmt.elems_per_unit()] {
        if comptime![guard] {
            if col0 + i < cols {
                s += vals[i as usize] * x[(x_off + i) as usize];
            }
        } else {
            s += vals[i as usize] * x[(x_off + i) as usize];
        }
    }
    s
}

/// `y[t * rows + r] (+)= W[r, :] · x[t * cols ..]` for `tokens` tokens. Each weight unit is
/// decoded once and used for every token, so small batches cost one weight read.
#[cube(launch_unchecked)]
pub fn matvec_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    x: &Array<f32>,
    y: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
    #[comptime] tokens: u32,
    #[comptime] accumulate: bool,
) {
    let eu = comptime![fmt.elems_per_unit()];
    let row = cube_row(cfg);
    let units = blocks_per_row * comptime![fmt.units_per_block()];
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let mut vals = Array::<f32>::new(comptime![eu as usize]);
    let mut acc = Array::<f32>::new(comptime![tokens as usize]);
    #[unroll]
    for t in 0..tokens {
        acc[t as usize] = 0.0;
    }
    if row < rows {
        let mut unit = UNIT_POS_X;
        while unit < units {
            decode_unit(w, scales, row, unit, blocks_per_row, &mut vals, fmt);
            let col0 = unit * eu;
            #[unroll]
            for t in 0..tokens {
                acc[t as usize] += dot_unit(&vals, x, t * cols + col0, col0, cols, fmt);
            }
            unit += CUBE_DIM_X;
        }
    }
    #[unroll]
    for t in 0..tokens {
        let sum = lane_sum(acc[t as usize], &mut smem, cfg);
        if UNIT_POS_X == 0 && row < rows {
            let out = (t * rows + row) as usize;
            if comptime![accumulate] {
                y[out] += sum;
            } else {
                y[out] = sum;
            }
        }
    }
}

/// Dot of the decoded slot `vals` with `x` at vec4 index `x4_at(g)` for each run `g`.
#[cube]
fn dot_slot(
    vals: &Array<f32>,
    x4: &Array<Vector<f32, Const<4>>>,
    base: u32,
    slot: u32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for g in 0..comptime![fmt.groups_per_slot()] {
        let xv = x4[((base + slot_col(slot, g, fmt)) / 4) as usize];
        let o = (4 * g) as usize;
        s += vals[o] * xv[0] + vals[o + 1] * xv[1] + vals[o + 2] * xv[2] + vals[o + 3] * xv[3];
    }
    s
}

/// `1 / sqrt(mean(x^2) + eps)` over `x4[0..n4]` (`cols` values), computed by the whole cube
/// (every unit must call it); `smem` holds one `f32` per unit.
#[cube]
fn cube_rms_inv(
    x4: &Array<Vector<f32, Const<4>>>,
    n4: u32,
    cols: u32,
    eps: f32,
    smem: &mut SharedMemory<f32>,
) -> f32 {
    let tid = UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X;
    let threads = CUBE_DIM_X * CUBE_DIM_Y;
    let mut ss = 0.0f32;
    let mut i = tid;
    while i < n4 {
        let v = x4[i as usize];
        ss += v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
        i += threads;
    }
    smem[tid as usize] = ss;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if tid < stride {
            let other = smem[(tid + stride) as usize];
            smem[tid as usize] += other;
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[0];
    // `smem` is reused by the lane sums that follow.
    sync_cube();
    1.0 / f32::sqrt(total / f32::cast_from(cols) + eps)
}

/// [`dot_slot`] with `x` scaled elementwise by the RMSNorm weight `w4` (the `1/rms` factor is
/// applied once to the row's sum).
#[cube]
fn dot_slot_weighted(
    vals: &Array<f32>,
    x4: &Array<Vector<f32, Const<4>>>,
    w4: &Array<Vector<f32, Const<4>>>,
    base: u32,
    slot: u32,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for g in 0..comptime![fmt.groups_per_slot()] {
        let i = ((base + slot_col(slot, g, fmt)) / 4) as usize;
        let xv = x4[i];
        let wv = w4[i];
        let o = (4 * g) as usize;
        s += vals[o] * (xv[0] * wv[0])
            + vals[o + 1] * (xv[1] * wv[1])
            + vals[o + 2] * (xv[2] * wv[2])
            + vals[o + 3] * (xv[3] * wv[3]);
    }
    s
}

/// `y[r] = W[r, :] · rmsnorm(x)` for one token: the RMSNorm before a projection folded into it
/// (each cube recomputes the norm of `x`, `cols` values, which is cheap beside its weight rows).
/// Coalesced like [`matvec_q_kernel`].
#[cube(launch_unchecked)]
pub fn matvec_norm_q_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    x4: &Array<Vector<f32, Const<4>>>,
    norm_w4: &Array<Vector<f32, Const<4>>>,
    y: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    eps: f32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
) {
    let spb = comptime![fmt.slots_per_block()];
    let step = comptime![(cfg.lanes / fmt.slots_per_block()).max(1)];
    let epb = comptime![fmt.elems_per_block()];
    let row = cube_row(cfg);
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let inv = cube_rms_inv(x4, cols / 4, cols, eps, &mut smem);
    let mut vals = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
    let mut acc = 0.0f32;
    if row < rows && UNIT_POS_X < comptime![step * spb] {
        let slot = UNIT_POS_X % spb;
        let mut b = UNIT_POS_X / spb;
        while b < blocks_per_row {
            decode_slot(w, scales, row * blocks_per_row + b, slot, &mut vals, fmt);
            acc += dot_slot_weighted(&vals, x4, norm_w4, b * epb, slot, fmt);
            b += step;
        }
    }
    let sum = lane_sum(acc, &mut smem, cfg);
    if UNIT_POS_X == 0 && row < rows {
        y[row as usize] = sum * inv;
    }
}

/// `h[r] = silu(Wg[r, :] · n) * (Wu[r, :] · n)` with `n = rmsnorm(x)`: the FFN's RMSNorm,
/// both input projections and the SwiGLU in one launch (one token).
#[cube(launch_unchecked)]
pub fn matvec_swiglu_norm_q_kernel(
    w_gate: &Array<u32>,
    scales_gate: &Array<u32>,
    w_up: &Array<u32>,
    scales_up: &Array<u32>,
    x4: &Array<Vector<f32, Const<4>>>,
    norm_w4: &Array<Vector<f32, Const<4>>>,
    h: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    eps: f32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
) {
    let spb = comptime![fmt.slots_per_block()];
    let step = comptime![(cfg.lanes / fmt.slots_per_block()).max(1)];
    let epb = comptime![fmt.elems_per_block()];
    let row = cube_row(cfg);
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let inv = cube_rms_inv(x4, cols / 4, cols, eps, &mut smem);
    let mut vals = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
    let mut gate = 0.0f32;
    let mut up = 0.0f32;
    if row < rows && UNIT_POS_X < comptime![step * spb] {
        let slot = UNIT_POS_X % spb;
        let mut b = UNIT_POS_X / spb;
        while b < blocks_per_row {
            let block = row * blocks_per_row + b;
            decode_slot(w_gate, scales_gate, block, slot, &mut vals, fmt);
            gate += dot_slot_weighted(&vals, x4, norm_w4, b * epb, slot, fmt);
            decode_slot(w_up, scales_up, block, slot, &mut vals, fmt);
            up += dot_slot_weighted(&vals, x4, norm_w4, b * epb, slot, fmt);
            b += step;
        }
    }
    let gate = lane_sum(gate, &mut smem, cfg) * inv;
    let up = lane_sum(up, &mut smem, cfg) * inv;
    if UNIT_POS_X == 0 && row < rows {
        h[row as usize] = gate / (1.0 + f32::exp(-gate)) * up;
    }
}

/// The quantized formats' mat-vec, coalesced: `KernelFormat::slots_per_block` lanes share a
/// block, each decoding one slot (a word of quants, runs of 4 weights), so a plane reads
/// consecutive quant words and 16-byte runs of `x` (`x4`: `x` as vec4, `cols % 4 == 0`).
/// Same contract as [`matvec_kernel`]: `y[t * rows + r] (+)= W[r, :] · x[t * cols ..]`.
#[cube(launch_unchecked)]
pub fn matvec_q_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    x4: &Array<Vector<f32, Const<4>>>,
    y: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
    #[comptime] tokens: u32,
    #[comptime] accumulate: bool,
) {
    let spb = comptime![fmt.slots_per_block()];
    let step = comptime![(cfg.lanes / fmt.slots_per_block()).max(1)];
    let epb = comptime![fmt.elems_per_block()];
    let row = cube_row(cfg);
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let mut vals = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
    let mut acc = Array::<f32>::new(comptime![tokens as usize]);
    #[unroll]
    for t in 0..tokens {
        acc[t as usize] = 0.0;
    }
    if row < rows && UNIT_POS_X < comptime![step * spb] {
        let slot = UNIT_POS_X % spb;
        let mut b = UNIT_POS_X / spb;
        while b < blocks_per_row {
            decode_slot(w, scales, row * blocks_per_row + b, slot, &mut vals, fmt);
            #[unroll]
            for t in 0..tokens {
                acc[t as usize] += dot_slot(&vals, x4, t * cols + b * epb, slot, fmt);
            }
            b += step;
        }
    }
    #[unroll]
    for t in 0..tokens {
        let sum = lane_sum(acc[t as usize], &mut smem, cfg);
        if UNIT_POS_X == 0 && row < rows {
            let out = (t * rows + row) as usize;
            if comptime![accumulate] {
                y[out] += sum;
            } else {
                y[out] = sum;
            }
        }
    }
}

/// [`matvec_swiglu_kernel`] for the quantized formats, coalesced as [`matvec_q_kernel`].
#[cube(launch_unchecked)]
pub fn matvec_swiglu_q_kernel(
    w_gate: &Array<u32>,
    scales_gate: &Array<u32>,
    w_up: &Array<u32>,
    scales_up: &Array<u32>,
    x4: &Array<Vector<f32, Const<4>>>,
    h: &mut Array<f32>,
    rows: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
) {
    let spb = comptime![fmt.slots_per_block()];
    let step = comptime![(cfg.lanes / fmt.slots_per_block()).max(1)];
    let epb = comptime![fmt.elems_per_block()];
    let row = cube_row(cfg);
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let mut vals = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
    let mut gate = 0.0f32;
    let mut up = 0.0f32;
    if row < rows && UNIT_POS_X < comptime![step * spb] {
        let slot = UNIT_POS_X % spb;
        let mut b = UNIT_POS_X / spb;
        while b < blocks_per_row {
            let block = row * blocks_per_row + b;
            decode_slot(w_gate, scales_gate, block, slot, &mut vals, fmt);
            gate += dot_slot(&vals, x4, b * epb, slot, fmt);
            decode_slot(w_up, scales_up, block, slot, &mut vals, fmt);
            up += dot_slot(&vals, x4, b * epb, slot, fmt);
            b += step;
        }
    }
    let gate = lane_sum(gate, &mut smem, cfg);
    let up = lane_sum(up, &mut smem, cfg);
    if UNIT_POS_X == 0 && row < rows {
        h[row as usize] = gate / (1.0 + f32::exp(-gate)) * up;
    }
}

/// `h[r] = silu(Wg[r, :] · x) * (Wu[r, :] · x)`: both FFN input projections and the SwiGLU
/// in one launch (decode, one token). Gate and up share shape and format.
#[cube(launch_unchecked)]
pub fn matvec_swiglu_kernel(
    w_gate: &Array<u32>,
    scales_gate: &Array<u32>,
    w_up: &Array<u32>,
    scales_up: &Array<u32>,
    x: &Array<f32>,
    h: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
) {
    let eu = comptime![fmt.elems_per_unit()];
    let row = cube_row(cfg);
    let units = blocks_per_row * comptime![fmt.units_per_block()];
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.rows_per_cube) as usize]);
    let mut vals = Array::<f32>::new(comptime![eu as usize]);
    let mut gate = 0.0f32;
    let mut up = 0.0f32;
    if row < rows {
        let mut unit = UNIT_POS_X;
        while unit < units {
            let col0 = unit * eu;
            decode_unit(
                w_gate,
                scales_gate,
                row,
                unit,
                blocks_per_row,
                &mut vals,
                fmt,
            );
            gate += dot_unit(&vals, x, col0, col0, cols, fmt);
            decode_unit(w_up, scales_up, row, unit, blocks_per_row, &mut vals, fmt);
            up += dot_unit(&vals, x, col0, col0, cols, fmt);
            unit += CUBE_DIM_X;
        }
    }
    let gate = lane_sum(gate, &mut smem, cfg);
    let up = lane_sum(up, &mut smem, cfg);
    if UNIT_POS_X == 0 && row < rows {
        h[row as usize] = gate / (1.0 + f32::exp(-gate)) * up;
    }
}

/// Dequantizes the whole matrix into row-major `f32` `out[rows, cols]`, one unit per unit of
/// work (the prefill path's scratch, fed to cubek's matmul).
#[cube(launch_unchecked)]
pub fn dequantize_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    out: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
) {
    let eu = comptime![fmt.elems_per_unit()];
    let units = blocks_per_row * comptime![fmt.units_per_block()];
    let id = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let row = id / units;
    let unit = id % units;
    if row < rows {
        let mut vals = Array::<f32>::new(comptime![eu as usize]);
        decode_unit(w, scales, row, unit, blocks_per_row, &mut vals, fmt);
        let col0 = unit * eu;
        #[unroll]
        for i in 0..eu {
            if col0 + i < cols {
                out[(row * cols + col0 + i) as usize] = vals[i as usize];
            }
        }
    }
}

/// `out[t * cols + c] = W[id_t, c]` with `id_t = tokens[t]` (or `token0` for one token passed
/// as an argument): the embedding lookup on a weight in the mat-vec layout, any format, one
/// unit per lane, decoded by the same `decode_unit` as every other kernel here.
///
/// With `ranged`, `W` is the row block `row0..row0 + rows` of a larger table: tokens outside it
/// are skipped (another block's launch writes their rows) and the others read row `id_t - row0`.
#[cube(launch_unchecked)]
pub fn embed_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    tokens: &Array<u32>,
    out: &mut Array<f32>,
    token0: u32,
    n: u32,
    cols: u32,
    blocks_per_row: u32,
    row0: u32,
    rows: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] from_scalar: bool,
    #[comptime] ranged: bool,
) {
    let eu = comptime![fmt.elems_per_unit()];
    let units = blocks_per_row * comptime![fmt.units_per_block()];
    let id = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let t = id / units;
    let unit = id % units;
    if t < n {
        let mut tok = token0;
        if comptime![!from_scalar] {
            tok = tokens[t as usize];
        }
        let mut inside = true;
        if comptime![ranged] {
            inside = tok >= row0 && tok < row0 + rows;
        }
        if inside {
            if comptime![ranged] {
                tok -= row0;
            }
            let mut vals = Array::<f32>::new(comptime![eu as usize]);
            decode_unit(w, scales, tok, unit, blocks_per_row, &mut vals, fmt);
            let col0 = unit * eu;
            #[unroll]
            for i in 0..eu {
                if col0 + i < cols {
                    out[(t * cols + col0 + i) as usize] = vals[i as usize];
                }
            }
        }
    }
}
