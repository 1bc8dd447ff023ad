//! SwiGLU (`ffn_gate`, `ffn_up`): h = silu(gate) * up, and the residual add. The CubeCL
//! kernels beside the references are element-wise, one unit per element.

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Reference SwiGLU in place: `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// Reference residual add in place: `x[i] += y[i]`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

use cubecl::prelude::*;

use super::gpu::{elementwise, Buf, Gpu};

/// `gate[i] = silu(gate[i]) * up[i]` for `i < n`.
#[cube(launch_unchecked)]
pub fn swiglu_kernel(gate: &mut Array<f32>, up: &Array<f32>, n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        let g = gate[i];
        gate[i] = g / (1.0 + f32::exp(-g)) * up[i];
    }
}

/// `x[i] += y[i]` for `i < n`.
#[cube(launch_unchecked)]
pub fn add_assign_kernel(x: &mut Array<f32>, y: &Array<f32>, n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        x[i] += y[i];
    }
}

/// SwiGLU in place over the first `n` elements of `gate`.
pub fn launch_swiglu<R: Runtime>(gpu: &Gpu<R>, gate: &Buf, up: &Buf, n: usize) {
    assert!(
        n <= gate.len() && n <= up.len(),
        "swiglu: {n} elements out of range"
    );
    let (count, dim) = elementwise(n);
    gpu.count();
    // SAFETY: the kernel guards `i < n`, and n is within both buffers.
    unsafe {
        swiglu_kernel::launch_unchecked::<R>(
            gpu.client(),
            count,
            dim,
            gate.arg(),
            up.arg(),
            n as u32,
        )
    }
}

/// Residual add in place over the first `n` elements of `x`.
pub fn launch_add_assign<R: Runtime>(gpu: &Gpu<R>, x: &Buf, y: &Buf, n: usize) {
    assert!(
        n <= x.len() && n <= y.len(),
        "add_assign: {n} elements out of range"
    );
    let (count, dim) = elementwise(n);
    gpu.count();
    // SAFETY: the kernel guards `i < n`, and n is within both buffers.
    unsafe {
        add_assign_kernel::launch_unchecked::<R>(
            gpu.client(),
            count,
            dim,
            x.arg(),
            y.arg(),
            n as u32,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn silu_values() {
        assert_eq!(super::silu(0.0), 0.0);
        assert!((super::silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!(super::silu(-20.0).abs() < 1e-7);
    }
}
