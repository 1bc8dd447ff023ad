//! The quantized mat-mat on the matrix units: `Y[t, r] = W[r, :] · X[t, :]` for batches above
//! `MAX_MATVEC_TOKENS` tokens (prefill, and batched decode of many sequences), reading the
//! weights in their uploaded (quantized) layout.
//!
//! A cube computes a `block_m x block_n` tile of `Y` (tokens x weight rows). Per step of
//! [`k_step`] columns it stages that slice of `X` (already `f16`, 16-byte loads) and of `W`
//! (each slot decoded once, as packed half pairs by `decode::decode_slot_h2` for the formats
//! with `KernelFormat::half_x`, else by `decode_slot`) in shared memory; then each plane
//! multiplies its `frags_m x frags_n` 16x16 fragments with CubeCL's `cmma` (f16 x f16 -> f32).
//! A weight is read once per tile row of tokens and never written back dequantized: no
//! scratch, no dequantize launch.
//!
//! What bounds it (ncu on the H200, docs/performance.md): the staging instructions, not bytes or
//! the matrix units. Hence the `f16` activations converted once per launch rather than per cube,
//! the half-pair decode, and loads that no branch separates (clamped indices, `select`).

use cubecl::prelude::*;

use super::decode::{decode_slot, decode_slot_h2, slot_col};
use super::format::KernelFormat;

/// Comptime shape of a quantized mat-mat launch. A cube is `plane x planes_m * planes_n`
/// units; plane `(pm, pn)` owns fragments `pm * frags_m ..` along the tokens and
/// `pn * frags_n ..` along the weight rows.
#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub struct MmaConfig {
    /// Lanes per plane (`CUBE_DIM_X`): the hardware plane width.
    pub plane: u32,
    /// Planes along the tokens and along the weight rows (`CUBE_DIM_Y = planes_m * planes_n`).
    pub planes_m: u32,
    pub planes_n: u32,
    /// 16x16 accumulator fragments per plane along the tokens and the weight rows.
    pub frags_m: u32,
    pub frags_n: u32,
}

impl MmaConfig {
    /// Tokens per cube.
    pub const fn block_m(&self) -> u32 {
        16 * self.planes_m * self.frags_m
    }
    /// Weight rows per cube.
    pub const fn block_n(&self) -> u32 {
        16 * self.planes_n * self.frags_n
    }
    /// Units per cube.
    pub const fn units(&self) -> u32 {
        self.plane * self.planes_m * self.planes_n
    }
}

/// Columns staged per step: a whole number of every format's blocks (a K-quant's 256-weight
/// super-block), and enough loads in flight per step to cover memory latency with one cube
/// per SM (a batched-decode step has few cubes). Measured on the H200 (docs/performance.md):
/// with steps of 64 columns a 4096x4096 Q4_0 weight took 0.22 ms at 16 tokens.
pub const fn k_step(_fmt: KernelFormat) -> u32 {
    256
}

/// Row stride of the staged tiles, in halves: 8 past `k_step` so the 16 rows a fragment load
/// reads start in different shared-memory banks (a multiple of 8 halves keeps each fragment's
/// start 16-byte aligned, as `cmma` loads require).
pub const fn stage_stride(fmt: KernelFormat) -> u32 {
    k_step(fmt) + 8
}

/// `y[t * rows + r] = Σ_c W[r, c] · x[t * cols + c]` for `t < m`, `r < rows`: `x` and `y`
/// row-major, `x` in `f16` read as 16-byte vectors (`cols` a multiple of 8), `y` in `f32`, `W` in
/// the layout of `layout::pack`. Grid: `(rows / block_n, m / block_m)`
/// cubes, rounded up (edges masked).
#[cube(launch_unchecked)]
pub fn mma_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    x: &Array<Vector<half::f16, Const<8>>>,
    y: &mut Array<f32>,
    m: u32,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MmaConfig,
) {
    let bk = comptime![k_step(fmt)];
    let ld = comptime![stage_stride(fmt)];
    let bm = comptime![cfg.block_m()];
    let bn = comptime![cfg.block_n()];
    let units = comptime![cfg.units()];
    let groups = comptime![fmt.groups_per_slot()];
    let slots = comptime![k_step(fmt) / (4 * fmt.groups_per_slot())];
    let spb = comptime![fmt.slots_per_block()];
    let epb = comptime![fmt.elems_per_block()];
    let x_trips = comptime![(cfg.block_m() * k_step(fmt) / 8).div_ceil(cfg.units())];
    let w_trips = comptime![
        (cfg.block_n() * (k_step(fmt) / (4 * fmt.groups_per_slot()))).div_ceil(cfg.units())
    ];

    let unit = UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X;
    let plane = UNIT_POS_Y;
    let pm = plane / comptime![cfg.planes_n];
    let pn = plane % comptime![cfg.planes_n];
    let row0 = CUBE_POS_X * bn;
    let tok0 = CUBE_POS_Y * bm;

    let mut xs =
        SharedMemory::<half::f16>::new(comptime![(cfg.block_m() * stage_stride(fmt)) as usize]);
    let mut ws =
        SharedMemory::<half::f16>::new(comptime![(cfg.block_n() * stage_stride(fmt)) as usize]);
    let mut stage =
        SharedMemory::<f32>::new(comptime![(256 * cfg.planes_m * cfg.planes_n) as usize]);

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime![cfg.frags_m * cfg.frags_n] {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    let zero = half::f16::cast_from(0.0f32);
    let x_full = comptime![(cfg.block_m() * k_step(fmt) / 8) % cfg.units() == 0];
    let w_full =
        comptime![(cfg.block_n() * (k_step(fmt) / (4 * fmt.groups_per_slot()))) % cfg.units() == 0];

    let steps = (blocks_per_row * epb).div_ceil(bk);
    for step in 0..steps {
        let k0 = step * bk;
        // Activations: `bm` tokens x `bk` columns in 16-byte loads, zero past the batch and
        // the row. No load sits behind a branch (clamped index, then `select`), so the
        // compiler issues a step's loads together rather than one latency per trip.
        #[unroll]
        for i in 0..x_trips {
            let e = unit + i * units;
            if x_full || e < comptime![cfg.block_m() * k_step(fmt) / 8] {
                let r = e / comptime![k_step(fmt) / 8];
                let c = 8 * (e % comptime![k_step(fmt) / 8]);
                let t = tok0 + r;
                let col = k0 + c;
                let valid = t < m && col < cols;
                let v = x[select(valid, (t * cols + col) / 8, 0u32) as usize];
                let o = r * ld + c;
                #[unroll]
                for j in 0..8u32 {
                    xs[(o + j) as usize] = select(valid, v[j as usize], zero);
                }
            }
        }
        // Weights: `bn` rows x `slots` slots, each decoded once (clamped into the matrix and
        // zeroed past it, again without a branch around the loads).
        #[unroll]
        for i in 0..w_trips {
            let u = unit + i * units;
            if w_full || u < comptime![cfg.block_n() * (k_step(fmt) / (4 * fmt.groups_per_slot()))]
            {
                let r = u / slots;
                let s = step * slots + u % slots;
                let blk = s / spb;
                let slot = s % spb;
                let row = row0 + r;
                let live = row < rows && blk < blocks_per_row;
                let blk_w = select(live, row * blocks_per_row + blk, 0u32);
                if comptime![fmt.half_x()] {
                    // Packed half pairs (columns 0/2 and 1/3 of each run of 4).
                    let mut p = Array::<Vector<half::f16, Const<2>>>::new(4usize);
                    decode_slot_h2(w, scales, blk_w, slot, &mut p, fmt);
                    #[unroll]
                    for g in 0..2u32 {
                        let o = r * ld + blk * epb + slot_col(slot, g, fmt) - k0;
                        let lo = p[(2 * g) as usize];
                        let hi = p[(2 * g + 1) as usize];
                        xs_w(&mut ws, o, select(live, lo[0], zero));
                        xs_w(&mut ws, o + 2, select(live, lo[1], zero));
                        xs_w(&mut ws, o + 1, select(live, hi[0], zero));
                        xs_w(&mut ws, o + 3, select(live, hi[1], zero));
                    }
                } else {
                    let mut q = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
                    let mut a = Array::<f32>::new(comptime![fmt.groups_per_slot() as usize]);
                    let mut mn = Array::<f32>::new(comptime![fmt.groups_per_slot() as usize]);
                    decode_slot(w, scales, blk_w, slot, &mut q, &mut a, &mut mn, fmt);
                    #[unroll]
                    for g in 0..groups {
                        let c0 = blk * epb + slot_col(slot, g, fmt);
                        #[unroll]
                        for k in 0..4u32 {
                            let mut v = a[g as usize] * q[(4 * g + k) as usize];
                            if comptime![fmt.has_min()] {
                                v += mn[g as usize];
                            }
                            let h = select(live && c0 + k < cols, half::f16::cast_from(v), zero);
                            ws[(r * ld + c0 + k - k0) as usize] = h;
                        }
                    }
                }
            }
        }
        sync_cube();
        #[unroll]
        for kk in 0..comptime![k_step(fmt) / 16] {
            #[unroll]
            for i in 0..comptime![cfg.frags_m] {
                let a_off = ((pm * comptime![cfg.frags_m] + i) * 16 * ld + 16 * kk) as usize;
                let af = fragment(&xs, a_off, cmma::MatrixIdent::A, fmt);
                #[unroll]
                for j in 0..comptime![cfg.frags_n] {
                    let b_off = ((pn * comptime![cfg.frags_n] + j) * 16 * ld + 16 * kk) as usize;
                    let bf = fragment(&ws, b_off, cmma::MatrixIdent::B, fmt);
                    let c = &acc[comptime![(i * cfg.frags_n + j) as usize]];
                    cmma::execute::<half::f16, half::f16, f32, f32>(&af, &bf, c, c);
                }
            }
        }
        sync_cube();
    }

    // Each plane writes its fragments through its own 16x16 stage, edges masked.
    let mine = (plane * 256) as usize;
    #[unroll]
    for i in 0..comptime![cfg.frags_m] {
        #[unroll]
        for j in 0..comptime![cfg.frags_n] {
            cmma::store(
                &mut stage.slice_mut(mine, mine + 256),
                &acc[comptime![(i * cfg.frags_n + j) as usize]],
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_cube();
            let t_base = tok0 + (pm * comptime![cfg.frags_m] + i) * 16;
            let r_base = row0 + (pn * comptime![cfg.frags_n] + j) * 16;
            #[unroll]
            for e in 0..comptime![256 / cfg.plane] {
                let idx = e * comptime![cfg.plane] + UNIT_POS_X;
                let t = t_base + idx / 16;
                let r = r_base + idx % 16;
                if t < m {
                    if r < rows {
                        y[(t * rows + r) as usize] = stage[mine + idx as usize];
                    }
                }
            }
            sync_cube();
        }
    }
}

/// `stage[i] = v` (one staged half).
#[cube]
fn xs_w(stage: &mut SharedMemory<half::f16>, i: u32, v: half::f16) {
    stage[i as usize] = v;
}

/// The 16x16 `f16` fragment at `off` of a staged tile (rows `stage_stride` apart): the tokens'
/// rows as `A` (row-major), the weight rows as the columns of `B` (column-major).
#[cube]
fn fragment(
    stage: &SharedMemory<half::f16>,
    off: usize,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] fmt: KernelFormat,
) -> cmma::Matrix<half::f16> {
    let layout = comptime![match ident {
        cmma::MatrixIdent::A => cmma::MatrixLayout::RowMajor,
        _ => cmma::MatrixLayout::ColMajor,
    }];
    cmma::Matrix::<half::f16>::from_slice(
        ident,
        16usize,
        16usize,
        16usize,
        layout,
        &stage.slice(off, off + comptime![(15 * stage_stride(fmt) + 16) as usize]),
        comptime![stage_stride(fmt)],
    )
}
