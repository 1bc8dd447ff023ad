//! The CubeCL kernels of the matmul module: one mat-vec kernel whose fusions are comptime
//! parameters ([`Fusion`]: 1-8 tokens, a residual-accumulating epilogue, the RMSNorm before
//! the projection, a gated pair with SiLU or GELU), and the embedding lookup and prefill
//! dequantize pass, which unpack weights through the same [`decode_slot`].
//!
//! Mat-vec layout: a cube is `lanes x planes_per_cube` units; each row of units (a plane) owns
//! `rows_per_plane` weight rows and loads each run of `x` once for all of them.
//! `KernelFormat::lanes_per_block` neighbouring lanes share a block, each decoding
//! `slots_per_lane` consecutive slots, so a plane reads contiguous quant words and 16-byte runs
//! of `x`; a trip issues `unroll` blocks' loads before their arithmetic. Where `lanes` is the
//! plane width, a row group's partial sums (every row and token at once) meet in plane
//! shuffles and, for a row split over planes, one trip through shared memory
//! (`write_outputs`); elsewhere each sum takes a shared-memory tree.

use cubecl::prelude::*;

use super::decode::{decode_slot, dot_slot_h2, dot_wide_h2, slot_col, x_words_sum};
use super::format::KernelFormat;
use crate::ops::activation::gate_act;

/// Comptime shape of a mat-vec launch.
#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub struct MatvecConfig {
    /// Lanes per row group (`CUBE_DIM_X`), a power of two.
    pub lanes: u32,
    /// Row groups per cube (`CUBE_DIM_Y`).
    pub planes_per_cube: u32,
    /// Rows one row group computes together: each lane loads its runs of `x` once and uses
    /// them for every row (a single token; batches 1 or 2). `x` through L1 is what bounds the
    /// mat-vec at one row per plane: 4 bytes per weight, whatever the weight's format.
    pub rows_per_plane: u32,
    /// Planes that share one row group, each taking every `planes_per_row`-th trip of its
    /// blocks, their sums meeting in shared memory: more planes in flight for a matrix with few
    /// rows, fewer trips for a plane on a long row. Divides `planes_per_cube`.
    pub planes_per_row: u32,
    /// Reduce with plane shuffles (`lanes` equals the plane width) instead of shared memory.
    pub plane_reduce: bool,
    /// Blocks per lane whose loads one trip issues together (`api::cfg_for` picks it per
    /// format and split: a second block that is always past the row's end only costs).
    pub unroll: u32,
    /// Each lane takes `KernelFormat::wide_cols` columns of a block at once (a whole 32-weight
    /// block, a K-quant's 64-weight chunk), their quants and their half `x` in 16-byte loads
    /// (`Fusion::half_x`, every format that takes it: `decode::dot_wide_h2`), instead of
    /// `KernelFormat::lanes_per_block` lanes a block, a word each.
    pub wide: bool,
    /// With `wide`: the half `x` arrives interleaved for the plane's lanes ([`XLayout`]), so
    /// each of a lane's 16-byte loads of `x` is one contiguous run across the plane.
    pub interleave_x: bool,
}

impl MatvecConfig {
    /// Rows one cube computes.
    pub fn rows_per_cube(&self) -> u32 {
        self.planes_per_cube / self.planes_per_row * self.rows_per_plane
    }

    /// Where this launch reads its half `x` (`Fusion::half_x`): interleaved for a wide launch
    /// that asks for it, in column order otherwise.
    /// `Q6_K`'s wide lanes, whose columns are not one run, always read it interleaved.
    pub fn x_layout(&self, fmt: KernelFormat) -> XLayout {
        let q6k = fmt == KernelFormat::Q6K;
        if self.wide && (self.interleave_x || q6k) {
            XLayout {
                chunk_cols: fmt.wide_cols(),
                group: self.lanes,
                q6k,
            }
        } else {
            XLayout::COLUMNS
        }
    }
}

/// The order of the 16-byte pieces (8 columns each) of half `x` that [`half_x_kernel`] writes.
///
/// A wide mat-vec lane takes a chunk of `chunk_cols` columns, and in each trip the `lanes` lanes
/// of a row group take `lanes` consecutive chunks (lane `l` chunk `lanes * k + l`). In column
/// order a lane's pieces are contiguous, so one 16-byte load across the plane touches a
/// different 64- or 128-byte line per lane: on the H200 the L1's data pipe ran at 90-95 % of
/// its wavefronts while HBM moved under half of its rate (ncu, docs/performance.md).
/// Interleaved, piece `i` of the chunks of one group of `group` chunks sit side by side: chunk
/// `g0 + l` (`g0` the group's first chunk) has piece `i` at `g0 * P + i * n + l`, with `P =
/// chunk_cols / 8` pieces a chunk and `n` the group's chunks (`group`, fewer in a row's last
/// group), so the plane's `i`-th load is one contiguous run.
///
/// A chunk is one run of columns (piece `q` is piece `q % P` of chunk `q / P`), except with
/// `q6k`: a `Q6_K` lane takes positions `16h .. 16h + 16` of half-block `n` of its block in
/// each of the half-block's 4 sub-rows `k` (columns `128n + 32k + 16h ..`, where its quant
/// bytes sit together), as chunk `4 * block + 2n + h`, its piece `2k + j` the `j`-th 8 columns
/// of sub-row `k`.
#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub struct XLayout {
    /// Columns per chunk, a multiple of 8 dividing the row; 0 for column order.
    pub chunk_cols: u32,
    /// Chunks per interleaved group.
    pub group: u32,
    /// Chunks are `Q6_K` lanes' columns (`chunk_cols` 64) rather than runs.
    pub q6k: bool,
}

impl XLayout {
    /// Pieces in column order (the narrow half path, and the conversion's own tests).
    pub const COLUMNS: Self = Self {
        chunk_cols: 0,
        group: 1,
        q6k: false,
    };

    /// Where piece `q` (columns `8q .. 8q + 8`) of a row of `cols` columns sits, in pieces: the
    /// host's statement of [`x_piece`].
    pub fn piece(self, q: u32, cols: u32) -> u32 {
        if self.chunk_cols == 0 {
            return q;
        }
        let p = self.chunk_cols / 8;
        let (c, i) = if self.q6k {
            let r = q % 16;
            (q / 16 * 2 + r % 4 / 2, r / 4 * 2 + r % 2)
        } else {
            (q / p, q % p)
        };
        let g0 = c / self.group * self.group;
        let n = self.group.min(cols / self.chunk_cols - g0);
        g0 * p + i * n + (c - g0)
    }
}

/// [`XLayout::piece`] on the device.
#[cube]
pub fn x_piece(q: u32, cols: u32, #[comptime] layout: XLayout) -> u32 {
    let mut out = q;
    if comptime![layout.chunk_cols > 0] {
        let p = comptime![layout.chunk_cols / 8];
        let gsz = comptime![layout.group];
        let mut c = q / p;
        let mut i = q % p;
        if comptime![layout.q6k] {
            // 16 pieces a half-block: sub-row k = r / 4, half h = r % 4 / 2, piece j = r % 2.
            let r = q % 16;
            c = q / 16 * 2 + r % 4 / 2;
            i = r / 4 * 2 + r % 2;
        }
        let g0 = c / gsz * gsz;
        let n = u32::min(gsz, cols / comptime![layout.chunk_cols] - g0);
        out = g0 * p + i * n + (c - g0);
    }
    out
}

/// What the mat-vec computes around `W·x`; each combination is its own compiled kernel.
#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub struct Fusion {
    /// Tokens `t` with `y[t * rows + r] = W[r, :] · x[t * cols ..]`; each slot is decoded once
    /// for all of them.
    pub tokens: u32,
    /// `y += ...` (the residual add after `attn_output`/`ffn_down`) instead of `y = ...`.
    pub accumulate: bool,
    /// `x` is replaced by `rmsnorm(x) * norm_w` (one token): each cube recomputes the norm of
    /// `x`, which is cheap beside its weight rows, and saves the norm's launch.
    pub norm: bool,
    /// `y = act(W·x) * (W2·x)` (one token): the gated feed-forward's two input projections and
    /// its activation in one launch.
    pub gated: bool,
    /// The gate's activation is GELU (tanh approximation, Gemma) rather than SiLU (Llama).
    pub gelu: bool,
    /// `x` arrives as packed halves scaled per 32-column block (`half_x_kernel`), and each
    /// slot is multiplied in packed half math (`decode::dot_slot_h2`; one token, formats with
    /// `KernelFormat::half_x`, no `norm`: the preparing kernel applies it).
    pub half_x: bool,
}

impl Fusion {
    /// The plain product for `tokens` tokens.
    pub const fn plain(tokens: u32) -> Self {
        Self {
            tokens,
            accumulate: false,
            norm: false,
            gated: false,
            gelu: false,
            half_x: false,
        }
    }
}

/// First weight row of this unit's row group; cubes are numbered over a 2D grid so row counts
/// past 65535 cubes (output projections) fit every backend's grid limits.
#[cube]
fn cube_row(#[comptime] cfg: MatvecConfig) -> u32 {
    let groups = comptime![cfg.planes_per_cube / cfg.planes_per_row];
    ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * groups + UNIT_POS_Y / cfg.planes_per_row)
        * cfg.rows_per_plane
}

/// Sum of `v` (a plane's total, valid in every lane) over the `planes_per_row` planes of this
/// row group, valid in every unit; `v` itself when a row group is one plane. Every unit of the
/// cube must call it.
#[cube]
fn group_sum(v: f32, part: &mut SharedMemory<f32>, #[comptime] cfg: MatvecConfig) -> f32 {
    let mut out = v;
    if comptime![cfg.planes_per_row > 1] {
        if UNIT_POS_X == 0 {
            part[UNIT_POS_Y as usize] = v;
        }
        sync_cube();
        let first = UNIT_POS_Y - UNIT_POS_Y % cfg.planes_per_row;
        out = 0.0;
        #[unroll]
        for p in 0..cfg.planes_per_row {
            out += part[(first + p) as usize];
        }
        // The next call overwrites `part`; everyone must have read it first.
        sync_cube();
    }
    out
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

/// Vectors a unit of [`cube_rms_inv`] loads per trip.
const RMS_UNROLL: usize = 4;

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
    // RMS_UNROLL independent loads a trip: a unit waits for memory once per trip, not once per
    // vector (a 4,096-value row is 4 vectors a unit of a 256-unit cube: one trip).
    while i < n4 {
        let mut v = Array::<Vector<f32, Const<4>>>::new(RMS_UNROLL);
        #[unroll]
        for k in 0..RMS_UNROLL {
            // Past the end a unit reloads its own first vector, and adds nothing for it.
            let j = i + k as u32 * threads;
            v[k] = x4[select(j < n4, j, i) as usize];
        }
        #[unroll]
        for k in 0..RMS_UNROLL {
            let w = v[k];
            let sq = w[0] * w[0] + w[1] * w[1] + w[2] * w[2] + w[3] * w[3];
            ss += select(i + k as u32 * threads < n4, sq, 0.0);
        }
        i += comptime![RMS_UNROLL as u32] * threads;
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

/// Loads the runs of `x` that slot `slot` of the block at column `col` meets (of the token's
/// row of `x` starting at `base`) into `xs[4g + k]`, with `xsum[g]` their sums where the format
/// has a min; with `norm`, `x` is scaled by the norm weight `norm4` elementwise first.
#[cube]
fn load_x(
    xs: &mut Array<f32>,
    xsum: &mut Array<f32>,
    x4: &Array<Vector<f32, Const<4>>>,
    norm4: &Array<Vector<f32, Const<4>>>,
    base: u32,
    col: u32,
    slot: u32,
    #[comptime] fmt: KernelFormat,
    #[comptime] norm: bool,
) {
    #[unroll]
    for g in 0..comptime![fmt.groups_per_slot()] {
        let c = col + slot_col(slot, g, fmt);
        let mut xv = x4[((base + c) / 4) as usize];
        if comptime![norm] {
            xv = xv * norm4[(c / 4) as usize];
        }
        let o = (4 * g) as usize;
        xs[o] = xv[0];
        xs[o + 1] = xv[1];
        xs[o + 2] = xv[2];
        xs[o + 3] = xv[3];
        if comptime![fmt.has_min()] {
            xsum[g as usize] = xv[0] + xv[1] + xv[2] + xv[3];
        }
    }
}

/// `sum_g a[g] * (q[4g..4g+4] · xs[4g..4g+4]) (+ m[g] * xsum[g])`: one decoded slot against
/// its runs of `x`.
#[cube]
fn dot_slot(
    q: &Array<f32>,
    a: &Array<f32>,
    m: &Array<f32>,
    xs: &Array<f32>,
    xsum: &Array<f32>,
    #[comptime] fmt: KernelFormat,
) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for g in 0..comptime![fmt.groups_per_slot()] {
        let o = (4 * g) as usize;
        let p = q[o] * xs[o] + q[o + 1] * xs[o + 1] + q[o + 2] * xs[o + 2] + q[o + 3] * xs[o + 3];
        s += a[g as usize] * p;
        if comptime![fmt.has_min()] {
            s += m[g as usize] * xsum[g as usize];
        }
    }
    s
}

/// `y[t * rows + r] (+)= W[r, :] · x[t * cols ..]`, with the fusions of `fusion`: for a gated
/// pair `y[r] = act(W[r, :] · x) * (W2[r, :] · x)`; with `norm`, `x` is `rmsnorm(x) * norm_w`.
/// `x4` is `x` as vec4 (`cols % 4 == 0`); `w2`/`scales2` and `norm4` are read only when the
/// fusion needs them (the launcher passes `w` and `x` otherwise); with `half_x` the kernel
/// reads `xh` (8 bytes per run of 4 columns, see `half_x_kernel`) and `xsc` (a block's scale)
/// instead of `x4`. A row group computes
/// `cfg.rows_per_plane` rows from one load of `x` (1, 2 or 4).
#[cube(launch_unchecked)]
pub fn matvec_kernel(
    w: &Array<u32>,
    scales: &Array<u32>,
    w2: &Array<u32>,
    scales2: &Array<u32>,
    x4: &Array<Vector<f32, Const<4>>>,
    norm4: &Array<Vector<f32, Const<4>>>,
    xh: &Array<Vector<u32, Const<2>>>,
    xsc: &Array<f32>,
    w4: &Array<Vector<u32, Const<4>>>,
    w24: &Array<Vector<u32, Const<4>>>,
    xh4: &Array<Vector<u32, Const<4>>>,
    y: &mut Array<f32>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    eps: f32,
    #[comptime] fmt: KernelFormat,
    #[comptime] cfg: MatvecConfig,
    #[comptime] fusion: Fusion,
) {
    // A wide lane takes `wide_cols` columns of a block (all of a 32-weight block, a K-quant's
    // 64-weight chunk) as one "slot".
    let spl = comptime![if cfg.wide { 1 } else { fmt.slots_per_lane() }];
    let lpb = comptime![if cfg.wide {
        fmt.elems_per_block() / fmt.wide_cols()
    } else {
        fmt.lanes_per_block()
    }];
    let step = comptime![(cfg.lanes / lpb).max(1)];
    let unroll = comptime![cfg.unroll];
    let epb = comptime![fmt.elems_per_block()];
    let groups = comptime![fmt.groups_per_slot()];
    let rpp = comptime![cfg.rows_per_plane];
    // Blocks between one plane's consecutive blocks: the row group's planes interleave.
    let pstep = comptime![step * cfg.planes_per_row];
    let tokens = comptime![fusion.tokens];
    let lay = comptime![cfg.x_layout(fmt)];
    let row0 = cube_row(cfg);
    let mut smem = SharedMemory::<f32>::new(comptime![(cfg.lanes * cfg.planes_per_cube) as usize]);
    // A plane's sums for its row group's other planes: one per plane, or `write_outputs`'s.
    let mut part = SharedMemory::<f32>::new(comptime![
        (cfg.planes_per_cube * outputs(fusion, cfg.rows_per_plane).next_power_of_two()) as usize
    ]);
    let mut inv = 1.0f32;
    if comptime![fusion.norm] {
        inv = cube_rms_inv(x4, cols / 4, cols, eps, &mut smem);
    }
    let mut q = Array::<f32>::new(comptime![(4 * groups) as usize]);
    let mut a = Array::<f32>::new(comptime![groups as usize]);
    let mut m = Array::<f32>::new(comptime![groups as usize]);
    // Each row's decoded slot when several tokens share the plane's rows (row r at r * len).
    let mut qr = Array::<f32>::new(comptime![(4 * groups * rpp) as usize]);
    let mut ar = Array::<f32>::new(comptime![(groups * rpp) as usize]);
    let mut mr = Array::<f32>::new(comptime![(groups * rpp) as usize]);
    let mut xs = Array::<f32>::new(comptime![(4 * groups) as usize]);
    let mut xsum = Array::<f32>::new(comptime![groups as usize]);
    // A wide lane's columns of half `x`: 2 per word.
    let mut xr = Array::<u32>::new(comptime![(fmt.wide_cols() / 2) as usize]);
    // Its groups' activation scales and sums.
    let mut xsg = Array::<f32>::new(comptime![fmt.wide_groups() as usize]);
    let mut xtg = Array::<f32>::new(comptime![fmt.wide_groups() as usize]);
    // acc[t * rpp + r]: token t, row row0 + r; acc2[r]: the gated pair's second weight.
    let mut acc = Array::<f32>::new(comptime![(tokens * rpp) as usize]);
    let mut acc2 = Array::<f32>::new(comptime![rpp as usize]);
    #[unroll]
    for i in 0..comptime![tokens * rpp] {
        acc[i as usize] = 0.0;
    }
    #[unroll]
    for r in 0..rpp {
        acc2[r as usize] = 0.0;
    }
    if row0 < rows && UNIT_POS_X < comptime![step * lpb] {
        let slot0 = (UNIT_POS_X % lpb) * spl;
        let last = blocks_per_row - 1;
        let mut b = UNIT_POS_X / lpb + (UNIT_POS_Y % cfg.planes_per_row) * step;
        while b < blocks_per_row {
            // Blocks past the row's end are clamped to its last block and their sums dropped
            // (rows past the matrix's end likewise), so a trip is one straight run of loads the
            // compiler can issue together.
            #[unroll]
            for u in 0..unroll {
                let bb = b + u * pstep;
                let live = bb < blocks_per_row;
                let bc = select(live, bb, last);
                let col = bc * epb;
                #[unroll]
                for s in 0..spl {
                    let slot = slot0 + s;
                    if comptime![cfg.wide] {
                        // The lane's columns of `x` in 16-byte loads, their scales (one per 32
                        // columns) and sums, loaded once for every row. Interleaved (`XLayout`),
                        // its pieces sit `n` apart from `g0 * P + l`.
                        let c0 = col + slot * comptime![fmt.wide_cols()];
                        let mut xb = c0 / 8;
                        let mut xstride = 1u32;
                        if comptime![lay.chunk_cols > 0] {
                            let gsz = comptime![lay.group];
                            let c = c0 / comptime![fmt.wide_cols()];
                            let g0 = c / gsz * gsz;
                            xstride = u32::min(gsz, cols / comptime![fmt.wide_cols()] - g0);
                            xb = g0 * comptime![fmt.wide_cols() / 8] + (c - g0);
                        }
                        #[unroll]
                        for i in 0..comptime![fmt.wide_cols() / 8] {
                            let v = xh4[(xb + i * xstride) as usize];
                            #[unroll]
                            for k in 0..4u32 {
                                xr[(4 * i + k) as usize] = v[k as usize];
                            }
                        }
                        // A Q6_K lane's sub-rows are 32 columns apart from its half-block's.
                        let mut s0 = c0 / 32;
                        if comptime![fmt == KernelFormat::Q6K] {
                            s0 = bc * 8 + slot / 2 * 4;
                        }
                        #[unroll]
                        for g in 0..comptime![fmt.wide_groups()] {
                            xsg[g as usize] = xsc[(s0 + g) as usize];
                            xtg[g as usize] = 0.0;
                            if comptime![fmt.has_min()] {
                                xtg[g as usize] = x_words_sum(&xr, 16 * g, 16u32);
                            }
                        }
                        #[unroll]
                        for r in 0..rpp {
                            let wr = select(row0 + r < rows, row0 + r, rows - 1);
                            let block = wr * blocks_per_row + bc;
                            let v = dot_wide_h2(w, w4, scales, block, slot, &xr, &xsg, &xtg, fmt);
                            acc[r as usize] += select(live, v, 0.0);
                            if comptime![fusion.gated] {
                                let v = dot_wide_h2(
                                    w2, w24, scales2, block, slot, &xr, &xsg, &xtg, fmt,
                                );
                                acc2[r as usize] += select(live, v, 0.0);
                            }
                        }
                    } else if comptime![fusion.half_x] {
                        // The slot's two runs of `x` as halves and their 32-column scales,
                        // loaded once for every row.
                        let ca = col + slot_col(slot, 0, fmt);
                        let cb = col + slot_col(slot, 1, fmt);
                        let xa = xh[(ca / 4) as usize];
                        let xb = xh[(cb / 4) as usize];
                        let sa = xsc[(ca / 32) as usize];
                        // A 32-weight block is one 32-column scale: load it once.
                        let mut sb = sa;
                        if comptime![fmt.elems_per_block() > 32] {
                            sb = xsc[(cb / 32) as usize];
                        }
                        #[unroll]
                        for r in 0..rpp {
                            let wr = select(row0 + r < rows, row0 + r, rows - 1);
                            let block = wr * blocks_per_row + bc;
                            let v = dot_slot_h2(w, scales, block, slot, xa, xb, sa, sb, fmt);
                            acc[r as usize] += select(live, v, 0.0);
                            if comptime![fusion.gated] {
                                let v = dot_slot_h2(w2, scales2, block, slot, xa, xb, sa, sb, fmt);
                                acc2[r as usize] += select(live, v, 0.0);
                            }
                        }
                    } else if comptime![tokens == 1] {
                        load_x(
                            &mut xs,
                            &mut xsum,
                            x4,
                            norm4,
                            0,
                            col,
                            slot,
                            fmt,
                            fusion.norm,
                        );
                        #[unroll]
                        for r in 0..rpp {
                            let wr = select(row0 + r < rows, row0 + r, rows - 1);
                            let block = wr * blocks_per_row + bc;
                            decode_slot(w, scales, block, slot, &mut q, &mut a, &mut m, fmt);
                            let d = dot_slot(&q, &a, &m, &xs, &xsum, fmt);
                            acc[r as usize] += select(live, d, 0.0);
                            if comptime![fusion.gated] {
                                decode_slot(w2, scales2, block, slot, &mut q, &mut a, &mut m, fmt);
                                let d = dot_slot(&q, &a, &m, &xs, &xsum, fmt);
                                acc2[r as usize] += select(live, d, 0.0);
                            }
                        }
                    } else {
                        // Several tokens: each row's slot decoded once for all of them, each
                        // token's run of `x` loaded once for all the rows.
                        #[unroll]
                        for r in 0..rpp {
                            let wr = select(row0 + r < rows, row0 + r, rows - 1);
                            let block = wr * blocks_per_row + bc;
                            decode_slot(w, scales, block, slot, &mut q, &mut a, &mut m, fmt);
                            #[unroll]
                            for i in 0..comptime![4 * groups] {
                                qr[(r * 4 * groups + i) as usize] = q[i as usize];
                            }
                            #[unroll]
                            for g in 0..groups {
                                ar[(r * groups + g) as usize] = a[g as usize];
                                mr[(r * groups + g) as usize] = m[g as usize];
                            }
                        }
                        #[unroll]
                        for t in 0..tokens {
                            load_x(
                                &mut xs,
                                &mut xsum,
                                x4,
                                norm4,
                                t * cols,
                                col,
                                slot,
                                fmt,
                                false,
                            );
                            #[unroll]
                            for r in 0..rpp {
                                #[unroll]
                                for i in 0..comptime![4 * groups] {
                                    q[i as usize] = qr[(r * 4 * groups + i) as usize];
                                }
                                #[unroll]
                                for g in 0..groups {
                                    a[g as usize] = ar[(r * groups + g) as usize];
                                    m[g as usize] = mr[(r * groups + g) as usize];
                                }
                                let d = dot_slot(&q, &a, &m, &xs, &xsum, fmt);
                                acc[(t * rpp + r) as usize] += select(live, d, 0.0);
                            }
                        }
                    }
                }
            }
            b += comptime![unroll * pstep];
        }
    }
    if comptime![cfg.plane_reduce && outputs(fusion, rpp).next_power_of_two() <= cfg.lanes] {
        write_outputs(&acc, &acc2, y, row0, rows, inv, &mut part, cfg, fusion);
    } else {
        #[unroll]
        for r in 0..rpp {
            let row = row0 + r;
            if comptime![fusion.gated] {
                let g = group_sum(lane_sum(acc[r as usize], &mut smem, cfg), &mut part, cfg) * inv;
                let u = group_sum(lane_sum(acc2[r as usize], &mut smem, cfg), &mut part, cfg) * inv;
                if UNIT_POS_X == 0 && UNIT_POS_Y % cfg.planes_per_row == 0 && row < rows {
                    y[row as usize] = gate_act(g, fusion.gelu) * u;
                }
            } else {
                #[unroll]
                for t in 0..tokens {
                    let sum = lane_sum(acc[(t * rpp + r) as usize], &mut smem, cfg);
                    let sum = group_sum(sum, &mut part, cfg) * inv;
                    if UNIT_POS_X == 0 && UNIT_POS_Y % cfg.planes_per_row == 0 && row < rows {
                        let out = (t * rows + row) as usize;
                        if comptime![fusion.accumulate] {
                            y[out] += sum;
                        } else {
                            y[out] = sum;
                        }
                    }
                }
            }
        }
    }
}

/// Sums a row group reduces: one per token and row, and the gated pair's second per row.
fn outputs(fusion: Fusion, rows_per_plane: u32) -> u32 {
    fusion.tokens * rows_per_plane + if fusion.gated { rows_per_plane } else { 0 }
}

/// One butterfly step of [`write_outputs`]: the lanes with `mask` clear keep the sums of
/// `v[0..half]`, those with it set the sums of `v[half..2 * half]`, each adding its partner's
/// half (lane `l ^ mask`) into `v[0..half]`: `half` shuffles where summing each value over the
/// plane would take `2 * half`.
#[cube]
fn halve(v: &mut Array<f32>, #[comptime] mask: u32, #[comptime] half: u32) {
    let hi = (UNIT_POS_X & mask) != 0;
    #[unroll]
    for i in 0..half {
        let lo_v = v[i as usize];
        let hi_v = v[(i + half) as usize];
        let send = select(hi, lo_v, hi_v);
        let keep = select(hi, hi_v, lo_v);
        v[i as usize] = keep + plane_shuffle_xor(send, mask);
    }
}

/// The row group's epilogue on planes with shuffles: the `n` sums ([`outputs`]: `acc`, then
/// `acc2`) padded to `np`, a power of two at most the plane's lanes, are reduced together by
/// butterfly steps that halve the values a lane holds ([`halve`]) and a shuffle sum over the
/// rest, so lane `j * lanes / np` ends with sum `j`: `np - 1 + log2(lanes / np)` shuffles in
/// `log2(lanes)` rounds (2 values: 5) rather than `n * log2(lanes)` (10). A row group of
/// several planes then meets in shared memory once for all its sums (one barrier, where summing
/// one value at a time takes two each).
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    acc: &Array<f32>,
    acc2: &Array<f32>,
    y: &mut Array<f32>,
    row0: u32,
    rows: u32,
    inv: f32,
    part: &mut SharedMemory<f32>,
    #[comptime] cfg: MatvecConfig,
    #[comptime] fusion: Fusion,
) {
    let rpp = comptime![cfg.rows_per_plane];
    let n = comptime![outputs(fusion, rpp)];
    let np = comptime![n.next_power_of_two()];
    let spacing = comptime![cfg.lanes / np];
    let mut v = Array::<f32>::new(comptime![np as usize]);
    #[unroll]
    for i in 0..comptime![fusion.tokens * rpp] {
        v[i as usize] = acc[i as usize];
    }
    if comptime![fusion.gated] {
        #[unroll]
        for r in 0..rpp {
            v[(comptime![fusion.tokens * rpp] + r) as usize] = acc2[r as usize];
        }
    }
    #[unroll]
    for i in n..np {
        v[i as usize] = 0.0;
    }
    // Masks lanes / 2, lanes / 4, ..., spacing: the lane bits that pick the value.
    if comptime![np >= 32] {
        halve(&mut v, comptime![spacing * 16], 16u32);
    }
    if comptime![np >= 16] {
        halve(&mut v, comptime![spacing * 8], 8u32);
    }
    if comptime![np >= 8] {
        halve(&mut v, comptime![spacing * 4], 4u32);
    }
    if comptime![np >= 4] {
        halve(&mut v, comptime![spacing * 2], 2u32);
    }
    if comptime![np >= 2] {
        halve(&mut v, spacing, 1u32);
    }
    let mut s = v[0];
    // The lanes that hold the same value: masks spacing / 2 down to 1.
    #[unroll]
    for k in 0..comptime![spacing.trailing_zeros()] {
        s += plane_shuffle_xor(s, comptime![spacing / 2] >> k);
    }
    let j = UNIT_POS_X / spacing;
    if comptime![cfg.planes_per_row > 1] {
        if UNIT_POS_X % spacing == 0 {
            part[(UNIT_POS_Y * np + j) as usize] = s;
        }
        sync_cube();
        let first = UNIT_POS_Y - UNIT_POS_Y % cfg.planes_per_row;
        s = 0.0;
        #[unroll]
        for p in 0..cfg.planes_per_row {
            s += part[((first + p) * np + j) as usize];
        }
    }
    s *= inv;
    let lead = UNIT_POS_X % spacing == 0 && UNIT_POS_Y % cfg.planes_per_row == 0;
    if comptime![fusion.gated] {
        // Row r's second sum sits rpp values (rpp * spacing lanes) above its first.
        let u = plane_shuffle(
            s,
            (UNIT_POS_X + comptime![rpp * spacing]) % comptime![cfg.lanes],
        );
        let row = row0 + j;
        if lead && j < rpp {
            if row < rows {
                y[row as usize] = gate_act(s, fusion.gelu) * u;
            }
        }
    } else {
        let row = row0 + j % rpp;
        if lead && j < comptime![fusion.tokens * rpp] {
            if row < rows {
                let out = (j / rpp * rows + row) as usize;
                if comptime![fusion.accumulate] {
                    y[out] += s;
                } else {
                    y[out] = s;
                }
            }
        }
    }
}

/// `x` (or `rmsnorm(x) * norm_w` with `norm`) for the half-activation mat-vec: one unit per
/// 32-column block scales the block into [-1, 1] by its largest magnitude `s`, stores `s` in
/// `xsc[block]` and the scaled values as halves, each run of 4 columns as the pairs (0, 2) and
/// (1, 3) (`decode::dot_slot_h2`'s order), two runs a 16-byte piece, the pieces in `layout`'s
/// order (column order: run `r` of the block at `xh[8 * block + r]`). The per-block scale keeps
/// large activations (hundreds or thousands, as some feed-forward inputs reach) from
/// overflowing f16 in the products. `cols` is a multiple of 32 (and of `layout.chunk_cols`).
#[cube(launch_unchecked)]
pub fn half_x_kernel(
    x4: &Array<Vector<f32, Const<4>>>,
    norm4: &Array<Vector<f32, Const<4>>>,
    xh: &mut Array<Vector<u32, Const<2>>>,
    xsc: &mut Array<f32>,
    cols: u32,
    eps: f32,
    #[comptime] norm: bool,
    #[comptime] layout: XLayout,
) {
    let block = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let owns = block < cols / 32;
    // The block's values (and norm weights) are loaded before the row's RMS, so their loads
    // overlap its reduction instead of following it.
    let mut v = Array::<Vector<f32, Const<4>>>::new(8usize);
    let mut nw = Array::<Vector<f32, Const<4>>>::new(comptime![if norm { 8usize } else { 1usize }]);
    if owns {
        #[unroll]
        for r in 0..8u32 {
            let i = block * 8 + r;
            v[r as usize] = x4[i as usize];
            if comptime![norm] {
                nw[r as usize] = norm4[i as usize];
            }
        }
    }
    let mut inv = 1.0f32;
    if comptime![norm] {
        let mut smem = SharedMemory::<f32>::new(comptime![HALF_X_THREADS as usize]);
        inv = cube_rms_inv(x4, cols / 4, cols, eps, &mut smem);
    }
    if owns {
        let mut amax = 0.0f32;
        #[unroll]
        for r in 0..8u32 {
            let mut xv = v[r as usize];
            if comptime![norm] {
                xv = xv * nw[r as usize] * Vector::<f32, Const<4>>::cast_from(inv);
            }
            v[r as usize] = xv;
            amax = f32::max(
                amax,
                f32::max(
                    f32::max(f32::abs(xv[0]), f32::abs(xv[1])),
                    f32::max(f32::abs(xv[2]), f32::abs(xv[3])),
                ),
            );
        }
        let rs = select(amax > 0.0, 1.0 / amax, 0.0);
        xsc[block as usize] = amax;
        #[unroll]
        for r in 0..8u32 {
            let xv = v[r as usize];
            let mut out = Vector::<u32, Const<2>>::empty();
            out[0] = half_bits(xv[0] * rs) | (half_bits(xv[2] * rs) << 16);
            out[1] = half_bits(xv[1] * rs) | (half_bits(xv[3] * rs) << 16);
            let piece = x_piece(block * 4 + r / 2, cols, layout);
            xh[(2 * piece + r % 2) as usize] = out;
        }
    }
}

/// IEEE half bits of `v` (|v| <= 1 here; larger values saturate to the largest half), rounded
/// to nearest, in integer ops: the kernel that writes halves needs no f16 type, so it runs
/// where a backend cannot bitcast halves to words (naga, wgpu's WGSL front end).
#[cube]
fn half_bits(v: f32) -> u32 {
    let b = u32::reinterpret(v);
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    // Normal halves (|v| >= 2^-14): rebias the exponent, round the 13 dropped bits to even.
    let r = a - select(a >= 0x3880_0000, 0x3800_0000u32, 0u32);
    let normal = u32::min((r + 0xFFF + ((r >> 13) & 1)) >> 13, 0x7BFF);
    // Subnormal halves: multiples of 2^-24.
    let sub = u32::cast_from(f32::round(f32::abs(v) * 16_777_216.0));
    sign | select(a >= 0x3880_0000, normal, sub)
}

/// Units per cube of [`half_x_kernel`] (one per 32-column block).
pub const HALF_X_THREADS: u32 = 256;

/// Writes the weights of slot `slot` of block `blk` of weight row `wrow` to
/// `out[orow * cols + ..]` (columns past `cols`, the plain formats' row padding, skipped).
#[cube]
fn write_slot<F: Float>(
    w: &Array<u32>,
    scales: &Array<u32>,
    out: &mut Array<F>,
    wrow: u32,
    orow: u32,
    blk: u32,
    slot: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
) {
    let groups = comptime![fmt.groups_per_slot()];
    let mut q = Array::<f32>::new(comptime![(4 * groups) as usize]);
    let mut a = Array::<f32>::new(comptime![groups as usize]);
    let mut m = Array::<f32>::new(comptime![groups as usize]);
    decode_slot(
        w,
        scales,
        wrow * blocks_per_row + blk,
        slot,
        &mut q,
        &mut a,
        &mut m,
        fmt,
    );
    #[unroll]
    for g in 0..groups {
        let c0 = blk * comptime![fmt.elems_per_block()] + slot_col(slot, g, fmt);
        #[unroll]
        for k in 0..4u32 {
            let mut v = a[g as usize] * q[(4 * g + k) as usize];
            if comptime![fmt.has_min()] {
                v += m[g as usize];
            }
            if c0 + k < cols {
                out[(orow * cols + c0 + k) as usize] = F::cast_from(v);
            }
        }
    }
}

/// Dequantizes the whole matrix into row-major `F` (`f32` or `f16`) `out[rows, cols]`, one
/// unit per slot (the prefill path's scratch, fed to cubek's matmul).
#[cube(launch_unchecked)]
pub fn dequantize_kernel<F: Float>(
    w: &Array<u32>,
    scales: &Array<u32>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    blocks_per_row: u32,
    #[comptime] fmt: KernelFormat,
) {
    let spb = comptime![fmt.slots_per_block()];
    let per_row = blocks_per_row * spb;
    let id = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let row = id / per_row;
    let rem = id % per_row;
    if row < rows {
        write_slot::<F>(
            w,
            scales,
            out,
            row,
            row,
            rem / spb,
            rem % spb,
            cols,
            blocks_per_row,
            fmt,
        );
    }
}

/// `out[t * cols + c] = W[id_t, c]` with `id_t = tokens[t]` (or `token0` for one token passed
/// as an argument): the embedding lookup on a weight in the mat-vec layout, any format, one
/// unit per slot.
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
    let spb = comptime![fmt.slots_per_block()];
    let per_row = blocks_per_row * spb;
    let id = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let t = id / per_row;
    let rem = id % per_row;
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
            write_slot::<f32>(
                w,
                scales,
                out,
                tok,
                t,
                rem / spb,
                rem % spb,
                cols,
                blocks_per_row,
                fmt,
            );
        }
    }
}

/// `out[i] = x[i]` as `f16` for `i < n`: activations into the f16 operand of the prefill
/// matmul. With `pairs`, each run of 4 values is written in pair order (0, 2, 1, 3), the order
/// in which the quantized mat-mat stages a run of decoded weights (`decode::decode_slots_h2`'s
/// half pairs), so neither operand is shuffled in the kernel (`n` a multiple of 4).
#[cube(launch_unchecked)]
pub fn to_f16_kernel(x: &Array<f32>, out: &mut Array<half::f16>, n: u32, #[comptime] pairs: bool) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if i < n {
        out[i as usize] = half::f16::cast_from(x[pair_slot(i as usize, pairs)]);
    }
}

/// Where value `i` of a row goes in the mat-mat's pair order (0, 2, 1, 3 in each run of 4; an
/// involution, so it also names the value slot `i` holds), or `i` without `pairs`. The producers
/// of the mat-mat's activations (RMSNorm, the gated activation, [`to_f16_kernel`]) write in it.
#[cube]
pub fn pair_slot(i: usize, #[comptime] pairs: bool) -> usize {
    let mut slot = i;
    if comptime![pairs] {
        let j = i % 4;
        slot = select(j == 1 || j == 2, i ^ 3, i);
    }
    slot
}
