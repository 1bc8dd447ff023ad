//! Greedy sampling on the device: the index of the largest logit, so one `u32` crosses to the
//! host per decode step. Ties go to the lowest index, as in the host sampler.

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::gpu::{row_grid, Buf, Gpu};

/// Reference: first index of the maximum (NaN never wins).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Threads of an argmax cube (one cube a row).
pub(crate) const ARGMAX_CUBE: usize = 512;
/// Vectors a unit loads per trip: the loads of a trip are independent, so a unit waits for
/// memory once per trip rather than once per value.
pub(crate) const ARGMAX_UNROLL: usize = 4;

/// One cube a row: each unit scans its share of the row, then a shared-memory reduction keeps
/// the larger value, or the lower index on a tie.
///
/// `x` is read as vectors of `N` values (4 where the rows start on a multiple of 4 values and
/// `n` is one, [`vector_width`]; otherwise 1). Unit `u` takes the vectors `u, u + block,
/// u + 2 * block, ...` of its row, [`ARGMAX_UNROLL`] a trip, so it visits its indices in
/// increasing order and a strict `>` keeps the first of equal values. A 128,256-logit row took
/// one 256-unit cube of scalar loads 56 µs on the H200 (ncu, in a 2.5 ms 8B decode step); 512
/// units of 4-vectors read it in 16 trips of 4 loads.
#[cube(launch_unchecked)]
pub fn argmax_kernel<N: Size>(
    x: &Array<Vector<f32, N>>,
    out: &mut Array<u32>,
    row0: u32,
    n: u32,
    #[comptime] block: usize,
) {
    let width = N::value();
    let u = UNIT_POS as usize;
    // Cube r takes row r of a launch over several rows of `n` values.
    let base = (row0 as usize + CUBE_POS * n as usize) / width;
    let nv = n as usize / width;
    let mut best_v = f32::new(-3.0e38);
    let mut best_i = 0u32;
    let mut first = true;
    let mut i = u;
    while i < nv {
        let mut v = Array::<Vector<f32, N>>::new(ARGMAX_UNROLL);
        #[unroll]
        for k in 0..ARGMAX_UNROLL {
            // Past the row's end a unit reloads its own first vector; the compare skips it.
            let j = i + k * block;
            v[k] = x[base + select(j < nv, j, i)];
        }
        #[unroll]
        for k in 0..ARGMAX_UNROLL {
            let j = i + k * block;
            if j < nv {
                #[unroll]
                for e in 0..width {
                    let val = v[k][e];
                    if first || val > best_v {
                        best_v = val;
                        best_i = (j * width + e) as u32;
                        first = false;
                    }
                }
            }
        }
        i += ARGMAX_UNROLL * block;
    }
    let mut vals = SharedMemory::<f32>::new(block);
    let mut idxs = SharedMemory::<u32>::new(block);
    let mut valid = SharedMemory::<u32>::new(block);
    vals[u] = best_v;
    idxs[u] = best_i;
    valid[u] = 0;
    if !first {
        valid[u] = 1;
    }
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        // Nested, not `u < stride && valid[u + stride] == 1`: CubeCL evaluates both sides of
        // `&&`, and units past `stride` would read past the shared arrays (seen on the H200 as
        // an intermittent CUDA_ERROR_ILLEGAL_ADDRESS, located by compute-sanitizer).
        if u < stride {
            if valid[u + stride] == 1 {
                let (v, j) = (vals[u + stride], idxs[u + stride]);
                let cur = vals[u];
                if valid[u] == 0 || v > cur || (v == cur && j < idxs[u]) {
                    vals[u] = v;
                    idxs[u] = j;
                    valid[u] = 1;
                }
            }
        }
        sync_cube();
        stride /= 2;
    }
    if u == 0 {
        out[CUBE_POS] = idxs[0];
    }
}

/// Values per vector of an argmax launch over rows of `n` values from `row0` on.
pub(crate) fn vector_width(row0: usize, n: usize) -> usize {
    if row0.is_multiple_of(4) && n.is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// Index of the largest of `x[row0 .. row0 + n]`, into `out[0]`.
pub fn launch_argmax<R: Runtime>(gpu: &Gpu<R>, x: &Buf, row0: usize, n: usize, out: &Buf) {
    launch_argmax_rows(gpu, x, row0, n, 1, out)
}

/// Per row `r < rows` of `n` values from `x[row0]` on, the index of its largest into `out[r]`
/// (the greedy tokens of a multi-sequence batch, one cube per row).
pub fn launch_argmax_rows<R: Runtime>(
    gpu: &Gpu<R>,
    x: &Buf,
    row0: usize,
    n: usize,
    rows: usize,
    out: &Buf,
) {
    assert!(
        n >= 1 && rows >= 1 && row0 + rows * n <= x.len() && rows <= out.len(),
        "argmax: range out of bounds"
    );
    gpu.count();
    let width = vector_width(row0, n);
    // SAFETY: units read x[row0 + i] for i < n, asserted above (as vectors of `width` values
    // where rows start on a vector and `n` is whole vectors).
    unsafe {
        launch::launch(
            gpu.client(),
            argmax_kernel::ArgmaxKernel::<R>::new(
                launch::settings(CubeDim::new_1d(ARGMAX_CUBE as u32)),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                (),
                (),
                width,
                ARGMAX_CUBE,
            ),
            row_grid(rows),
            &[
                Arg::vec::<f32>(x.handle(), x.len() / width, width),
                Arg::buf::<u32>(&out),
                Arg::U32(row0 as u32),
                Arg::U32(n as u32),
            ],
        )
    }
}
