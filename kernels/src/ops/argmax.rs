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

/// Threads of the single argmax cube.
pub(crate) const ARGMAX_CUBE: usize = 256;

/// One cube: unit `u` scans `x[row0 + u], x[row0 + u + block], ...`, then a shared-memory
/// reduction keeps the larger value, or the lower index on a tie.
#[cube(launch_unchecked)]
pub fn argmax_kernel(
    x: &Array<f32>,
    out: &mut Array<u32>,
    row0: u32,
    n: u32,
    #[comptime] block: usize,
) {
    let u = UNIT_POS as usize;
    // Cube r takes row r of a launch over several rows of `n` values.
    let base = row0 as usize + CUBE_POS * n as usize;
    let mut best_v = f32::new(-3.0e38);
    let mut best_i = 0u32;
    let mut first = true;
    let mut i = u;
    while i < n as usize {
        let v = x[base + i];
        if first || v > best_v {
            best_v = v;
            best_i = i as u32;
            first = false;
        }
        i += block;
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
    // SAFETY: units read x[row0 + i] for i < n, asserted above.
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
                ARGMAX_CUBE,
            ),
            row_grid(rows),
            &[
                Arg::buf::<f32>(&x),
                Arg::buf::<u32>(&out),
                Arg::U32(row0 as u32),
                Arg::U32(n as u32),
            ],
        )
    }
}
