//! The quantized mat-mat on the matrix units: `Y[t, r] = W[r, :] · X[t, :]` for batches above
//! `MAX_MATVEC_TOKENS` tokens (prefill, and batched decode of many sequences), reading the
//! weights in their uploaded (quantized) layout.
//!
//! A cube computes a `block_m x block_n` tile of `Y` (tokens x weight rows). Per step of
//! `cfg.k_step` columns it stages that slice of `X` (already `f16`, 16-byte loads) and of `W`
//! (each slot decoded once, as packed half pairs by `decode::decode_slots_h2` for the formats
//! with `KernelFormat::half_x`, else by `decode_slot`) in shared memory; then each plane
//! multiplies its `frags_m x frags_n` 16x16 fragments with CubeCL's `cmma` (f16 x f16 -> f32).
//! A weight is read once per tile row of tokens and never written back dequantized: no
//! scratch, no dequantize launch. A launch with few tiles splits each tile's columns over
//! several cubes (grid `z`) and [`split_sum_kernel`] adds their partial products.
//!
//! What bounds it (ncu on the H200, docs/performance.md): the staging, not bytes or the matrix
//! units: its instructions where each weight is decoded for several token tiles (prefill), its
//! loads' latency where it is decoded once (a 64-sequence decode step). Hence the `f16`
//! activations converted once per launch (in pair order, so no decoded run is shuffled), the
//! half-pair decode, loads that no branch separates and no `select` per half (CubeCL 0.10
//! lowers a vector of halves to scalar halves: a select or shuffle costs instructions per
//! half), vector shared stores, and the wide staging (`MmaConfig::wide`).

use cubecl::prelude::*;

use super::decode::{decode_slot, decode_slots_h2, slot_col};
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
    /// Columns staged per step: 128 or 256 (a K-quant's 256-weight super-block then spans
    /// one or two steps; a `Q6_K` slot's runs stay within one 128-column half).
    pub k_step: u32,
    /// Whether a unit decodes `fmt.mma_quad()` slots from one 16-byte load (one scale decode,
    /// a quarter of the address work) rather than one slot per load.
    pub wide: bool,
}

impl MmaConfig {
    /// The config of plane width `plane` and tile `[planes_m, planes_n, frags_m, frags_n,
    /// k_step]` (the form of `api::MMA_TILES` and of `ROCFORGE_MMA_TILE`).
    pub const fn from_tile(plane: u32, t: [u32; 5]) -> Self {
        Self {
            plane,
            planes_m: t[0],
            planes_n: t[1],
            frags_m: t[2],
            frags_n: t[3],
            k_step: t[4],
            wide: true,
        }
    }
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
    /// Row stride of the staged tiles, in halves: 8 past `k_step` so the 16 rows a fragment
    /// load reads start in different shared-memory banks (a multiple of 8 halves keeps each
    /// fragment's start 16-byte aligned, as `cmma` loads require).
    pub const fn stage_stride(&self) -> u32 {
        self.k_step + 8
    }
    /// Shared memory a cube holds: the two staged tiles and the planes' output stages.
    pub const fn shared_bytes(&self) -> usize {
        ((self.block_m() + self.block_n()) * self.stage_stride() * 2
            + 256 * 4 * self.planes_m * self.planes_n) as usize
    }
}

/// `y[t * rows + r] = Σ_c W[r, c] · x[t * cols + c]` for `t < m`, `r < rows`: `x` and `y`
/// row-major, `x` in `f16` read as 16-byte vectors (`cols` a multiple of 8), `y` in `f32`, `W` in
/// the layout of `layout::pack`. Grid: `(rows / block_n, m / block_m, splits)` cubes, rounded
/// up (edges masked). Cube `z` sums steps `z * split_steps ..` of `cfg.k_step` columns and writes
/// its partial product to `y[z * m * rows ..]` ([`split_sum_kernel`] adds the partials when
/// there is more than one split).
#[cube(launch_unchecked)]
pub fn mma_kernel(
    w: &Array<u32>,
    w4: &Array<Vector<u32, Const<4>>>,
    scales: &Array<u32>,
    x: &Array<Vector<half::f16, Const<8>>>,
    y: &mut Array<f32>,
    m: u32,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    split_steps: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MmaConfig,
) {
    let bk = comptime![cfg.k_step];
    let ld = comptime![cfg.stage_stride()];
    let bm = comptime![cfg.block_m()];
    let bn = comptime![cfg.block_n()];
    let units = comptime![cfg.units()];
    let groups = comptime![fmt.groups_per_slot()];
    let slots = comptime![cfg.k_step / (4 * fmt.groups_per_slot())];
    let spb = comptime![fmt.slots_per_block()];
    let epb = comptime![fmt.elems_per_block()];
    let x_trips = comptime![(cfg.block_m() * cfg.k_step / 8).div_ceil(cfg.units())];
    // Slots a unit decodes together, and such runs per staged row.
    let quad = comptime![if cfg.wide { fmt.mma_quad() } else { 1 }];
    let quads = comptime![cfg.k_step / (4 * fmt.groups_per_slot() * quad)];
    let w_trips = comptime![(cfg.block_n() * quads).div_ceil(cfg.units())];

    let unit = UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X;
    let plane = UNIT_POS_Y;
    let pm = plane / comptime![cfg.planes_n];
    let pn = plane % comptime![cfg.planes_n];
    let row0 = CUBE_POS_X * bn;
    let tok0 = CUBE_POS_Y * bm;

    // The stages hold vectors so that each staged run is one 16-byte (activations) or 8-byte
    // (a run of 4 decoded weights) shared-memory store rather than 8 or 4 of one half each.
    let mut xs = SharedMemory::<Vector<half::f16, Const<8>>>::new(comptime![
        (cfg.block_m() * cfg.stage_stride() / 8) as usize
    ]);
    let mut ws = SharedMemory::<Vector<half::f16, Const<4>>>::new(comptime![
        (cfg.block_n() * cfg.stage_stride() / 4) as usize
    ]);
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

    let zero4 = Vector::<half::f16, Const<4>>::cast_from(0.0f32);
    let x_full = comptime![(cfg.block_m() * cfg.k_step / 8) % cfg.units() == 0];
    let w_full = comptime![(cfg.block_n() * quads) % cfg.units() == 0];
    // Where the cube's units cover whole staged rows of slots, a unit keeps one slot position
    // and steps down the rows: its row and slot come from two constants, not a division per
    // trip.
    let aligned = comptime![cfg.units() % quads == 0];
    let r_first = unit / quads;
    let s_first = unit % quads;
    let float = comptime![matches!(fmt, KernelFormat::F32 | KernelFormat::F16)];

    let steps = (blocks_per_row * epb).div_ceil(bk);
    let first = CUBE_POS_Z * split_steps;
    let end = first + split_steps;
    let last = select(end < steps, end, steps);
    for step in first..last {
        let k0 = step * bk;
        // Activations: `bm` tokens x `bk` columns in 16-byte loads. No value is selected: a
        // token past the batch reads the last token's row (it feeds only output rows that are
        // never written) and a column past the row reads the row's last 8 columns (they meet
        // zero weights), so no load sits behind a branch and nothing is shuffled per half.
        #[unroll]
        for i in 0..x_trips {
            let e = unit + i * units;
            if x_full || e < comptime![cfg.block_m() * cfg.k_step / 8] {
                let r = e / comptime![cfg.k_step / 8];
                let c8 = e % comptime![cfg.k_step / 8];
                let t = min(tok0 + r, m - 1);
                let col = min(k0 + 8 * c8, cols - 8);
                xs[(r * comptime![cfg.stage_stride() / 8] + c8) as usize] =
                    x[((t * cols + col) / 8) as usize];
            }
        }
        // Weights: `bn` rows x `slots` slots, each decoded once (clamped into the matrix, its
        // scales zeroed past it, again without a branch around the loads). A slot's runs of 4
        // columns start at multiples of 4 and are staged in pair order, (0, 2, 1, 3), as
        // `decode_slots_h2` makes them and as `x` arrives (`to_f16_kernel` with `pairs`).
        #[unroll]
        for i in 0..w_trips {
            let u = unit + i * units;
            if w_full || u < comptime![cfg.block_n() * quads] {
                let mut r = u / quads;
                let mut sl = u % quads;
                if comptime![aligned] {
                    r = r_first + i * comptime![cfg.units() / quads];
                    sl = s_first;
                }
                let s = step * slots + sl * quad;
                let blk = s / spb;
                let slot = s % spb;
                let row = row0 + r;
                let live = row < rows && blk < blocks_per_row;
                let blk_w = select(live, row * blocks_per_row + blk, 0u32);
                let base = r * ld + blk * epb - k0;
                if comptime![fmt.half_x()] {
                    let mut p =
                        Array::<Vector<half::f16, Const<2>>>::new(comptime![(4 * quad) as usize]);
                    decode_slots_h2(w, w4, scales, blk_w, slot, live, &mut p, quad, fmt);
                    #[unroll]
                    for k in 0..quad {
                        #[unroll]
                        for g in 0..2u32 {
                            let lo = p[(4 * k + 2 * g) as usize];
                            let hi = p[(4 * k + 2 * g + 1) as usize];
                            let mut v = Vector::<half::f16, Const<4>>::empty();
                            v[0] = lo[0];
                            v[1] = lo[1];
                            v[2] = hi[0];
                            v[3] = hi[1];
                            ws[((base + slot_col(slot + k, g, fmt)) / 4) as usize] = v;
                        }
                    }
                } else {
                    let mut q = Array::<f32>::new(comptime![(4 * fmt.groups_per_slot()) as usize]);
                    let mut a = Array::<f32>::new(comptime![fmt.groups_per_slot() as usize]);
                    let mut mn = Array::<f32>::new(comptime![fmt.groups_per_slot() as usize]);
                    decode_slot(w, scales, blk_w, slot, &mut q, &mut a, &mut mn, fmt);
                    #[unroll]
                    for g in 0..groups {
                        let sc = select(live, a[g as usize], 0.0);
                        let mut v = Vector::<half::f16, Const<4>>::empty();
                        #[unroll]
                        for k in 0..4u32 {
                            // Pair order: columns 0, 2, 1, 3 of the run.
                            let c = (k % 2) * 2 + k / 2;
                            let mut f = sc * q[(4 * g + c) as usize];
                            if comptime![fmt.has_min()] {
                                f += select(live, mn[g as usize], 0.0);
                            }
                            v[k as usize] = half::f16::cast_from(f);
                        }
                        let at = ((base + slot_col(slot, g, fmt)) / 4) as usize;
                        if comptime![float] {
                            // A float weight is its own value: an infinity clamped in from
                            // row 0 would make 0 * inf, so these formats zero the value.
                            ws[at] = select(live, v, zero4);
                        } else {
                            ws[at] = v;
                        }
                    }
                }
            }
        }
        sync_cube();
        #[unroll]
        for kk in 0..comptime![cfg.k_step / 16] {
            // A plane's weight fragments of this slice, loaded once for all its token rows.
            let mut bf = Sequence::<cmma::Matrix<half::f16>>::new();
            #[unroll]
            for j in 0..comptime![cfg.frags_n] {
                let b_row = (pn * comptime![cfg.frags_n] + j) * 16;
                bf.push(fragment(
                    &ws,
                    ((b_row * ld + 16 * kk) / 4) as usize,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::ColMajor,
                    4usize,
                    ld,
                ));
            }
            #[unroll]
            for i in 0..comptime![cfg.frags_m] {
                let a_row = (pm * comptime![cfg.frags_m] + i) * 16;
                let af = fragment(
                    &xs,
                    ((a_row * ld + 16 * kk) / 8) as usize,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                    8usize,
                    ld,
                );
                #[unroll]
                for j in 0..comptime![cfg.frags_n] {
                    let c = &acc[comptime![(i * cfg.frags_n + j) as usize]];
                    cmma::execute::<half::f16, half::f16, f32, f32>(
                        &af,
                        &bf[comptime![j as usize]],
                        c,
                        c,
                    );
                }
            }
        }
        sync_cube();
    }

    // Each plane writes its fragments through its own 16x16 stage, edges masked.
    let out0 = CUBE_POS_Z * m * rows;
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
                        y[(out0 + t * rows + r) as usize] = stage[mine + idx as usize];
                    }
                }
            }
            sync_cube();
        }
    }
}

/// `y[i] = Σ_z part[z * n + i]` for `i < n`: the split partial products of [`mma_kernel`],
/// added in split order (so a result does not depend on which cube finished first).
#[cube(launch_unchecked)]
pub fn split_sum_kernel(part: &Array<f32>, y: &mut Array<f32>, n: u32, splits: u32) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if i < n {
        let mut s = 0.0f32;
        for z in 0..splits {
            s += part[(z * n + i) as usize];
        }
        y[i as usize] = s;
    }
}

/// The 16x16 `f16` fragment at vector `off` of a staged tile of `n`-half vectors (rows `ld`
/// halves apart), read in `layout`: the mat-mat's tokens as `A` (row-major) and its weight rows
/// as the columns of `B` (column-major); attention's keys likewise, its values as a row-major
/// `B`.
#[cube]
pub(crate) fn fragment<N: Size>(
    stage: &SharedMemory<Vector<half::f16, N>>,
    off: usize,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] layout: cmma::MatrixLayout,
    #[comptime] n: usize,
    #[comptime] ld: u32,
) -> cmma::Matrix<half::f16> {
    let mat = unsafe {
        cmma::Matrix::<half::f16>::uninitialized(ident, 16usize, 16usize, 16usize, layout)
    };
    cmma::load(
        &mat,
        &stage.slice(off, off + comptime![(15 * ld as usize + 16) / n]),
        ld,
    );
    mat
}
