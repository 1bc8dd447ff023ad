//! The gated feed-forward activation (`ffn_gate`, `ffn_up`): h = act(gate) * up, with act
//! SiLU (SwiGLU: Llama) or GELU's tanh approximation (GeGLU: Gemma); the residual add; a
//! scale. The CubeCL kernels beside the references are element-wise, one unit per element;
//! the activation is a compile-time parameter of one kernel.

/// The activation of a gated feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as `ggml_gelu`.
    GeluTanh,
}

impl GateAct {
    pub fn name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_tanh",
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// sqrt(2 / pi).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh approximation.
const GELU_COEF_A: f32 = 0.044_715;

/// GELU, tanh approximation (ggml's `ggml_gelu`, computed in f32 rather than from its f16 table).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// Reference gated activation in place: `gate[i] = act(gate[i]) * up[i]`.
pub fn gated(act: GateAct, gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    let f = match act {
        GateAct::Silu => silu,
        GateAct::GeluTanh => gelu_tanh,
    };
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = f(*g) * u;
    }
}

/// `exp(x)` without a libm call, so a loop of it vectorizes: Cephes' `expf` (range reduction
/// by `ln 2` in two parts, a degree-6 polynomial), within 2 ulp of `f32::exp` over
/// `[-87.3, 88.3]`; arguments outside are clamped there (`exp` of -87.3 is ~1e-38, of 88.3
/// ~2e38), so it never returns 0, inf or NaN for finite input.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // The low 9 bits of t's mantissa are n (two's complement): shift them into the exponent.
    let scale = f32::from_bits((t.to_bits() << 23).wrapping_add(127 << 23));
    y * scale
}

/// SiLU through [`exp_approx`].
#[inline(always)]
fn silu_fast(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// GELU (tanh approximation) through [`exp_approx`]: `0.5 x (1 + tanh(z)) = x / (1 + e^(-2z))`,
/// which also keeps its relative precision for negative `x`, where `1 + tanh(z)` cancels.
#[inline(always)]
fn gelu_tanh_fast(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x);
    x / (1.0 + exp_approx(-2.0 * z))
}

#[inline(always)]
fn gated_fast_body(act: GateAct, gate: &mut [f32], up: &[f32]) {
    match act {
        GateAct::Silu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = silu_fast(*g) * u;
            }
        }
        GateAct::GeluTanh => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = gelu_tanh_fast(*g) * u;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn gated_avx512(act: GateAct, gate: &mut [f32], up: &[f32]) {
    gated_fast_body(act, gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gated_avx2(act: GateAct, gate: &mut [f32], up: &[f32]) {
    gated_fast_body(act, gate, up)
}

/// [`gated`] for the CPU backend: the same formulas with [`exp_approx`] for `exp`/`tanh`, the
/// loop compiled for AVX-512 or AVX2 when the CPU has them (16 or 8 elements per step instead
/// of a libm call each). Within 1e-6 relative of [`gated`] plus ~1e-7 absolute near zero
/// (`gated_fast_matches_reference`).
pub fn gated_fast(act: GateAct, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gated: gate and up differ in length");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { gated_avx512(act, gate, up) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { gated_avx2(act, gate, up) };
        }
    }
    gated_fast_body(act, gate, up)
}

/// Reference SwiGLU in place: `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gated(GateAct::Silu, gate, up)
}

/// Reference residual add in place: `x[i] += y[i]`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::gpu::{elementwise, Buf, Gpu};
use super::matmul::kernels::pair_slot;

/// `act(g)` on the device; `gelu` picks GELU (tanh) over SiLU at compile time.
#[cube]
pub fn gate_act(g: f32, #[comptime] gelu: bool) -> f32 {
    if comptime!(gelu) {
        // tanh(z) = 1 - 2 / (exp(2z) + 1): finite for every z (exp overflows to inf, giving 1).
        let z = 0.797_884_6f32 * g * (1.0 + 0.044_715f32 * g * g);
        let t = 1.0 - 2.0 / (f32::exp(2.0 * z) + 1.0);
        0.5 * g * (1.0 + t)
    } else {
        g / (1.0 + f32::exp(-g))
    }
}

/// `gate[i] = act(gate[i]) * up[i]` for `i < n`; with `pairs`, written to `out` instead, as
/// f16 in the quantized mat-mat's pair order (`matmul::kernels::pair_slot`: its activations),
/// and `gate` is left as it was.
#[cube(launch_unchecked)]
pub fn gated_act_kernel<O: Float>(
    gate: &mut Array<f32>,
    up: &Array<f32>,
    out: &mut Array<O>,
    n: u32,
    #[comptime] gelu: bool,
    #[comptime] pairs: bool,
) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        let h = gate_act(gate[pair_slot(i, pairs)], gelu) * up[pair_slot(i, pairs)];
        if comptime!(pairs) {
            out[i] = O::cast_from(h);
        } else {
            gate[i] = h;
        }
    }
}

/// `x[i] *= s` for `i < n` (Gemma's embedding scale).
#[cube(launch_unchecked)]
pub fn scale_kernel(x: &mut Array<f32>, s: f32, n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        x[i] *= s;
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

/// The gated activation in place over the first `n` elements of `gate`.
pub fn launch_gated<R: Runtime>(gpu: &Gpu<R>, act: GateAct, gate: &Buf, up: &Buf, n: usize) {
    launch_gated_to(gpu, act, gate, up, None, n)
}

/// The gated activation of the first `n` elements of `gate` and `up` into `out`, a buffer of
/// 2-byte elements, as f16 in the quantized mat-mat's pair order (its activations,
/// `matmul::launch_mma_half`; `n` a multiple of 4). `gate` is left as it was.
pub fn launch_gated_half<R: Runtime>(
    gpu: &Gpu<R>,
    act: GateAct,
    gate: &Buf,
    up: &Buf,
    out: &Buf,
    n: usize,
) {
    assert!(
        out.elem_bytes() == 2,
        "{}: the f16 result needs a buffer of f16",
        act.name()
    );
    launch_gated_to(gpu, act, gate, up, Some(out), n)
}

/// [`launch_gated`] in place, or into `half` ([`launch_gated_half`]).
fn launch_gated_to<R: Runtime>(
    gpu: &Gpu<R>,
    act: GateAct,
    gate: &Buf,
    up: &Buf,
    half: Option<&Buf>,
    n: usize,
) {
    let pairs = half.is_some();
    let out = half.unwrap_or(gate);
    assert!(
        n <= gate.len() && n <= up.len() && n <= out.len(),
        "{}: {n} elements out of range",
        act.name()
    );
    assert!(
        !pairs || n.is_multiple_of(4),
        "{}: f16 pairs need a multiple of 4 elements, not {n}",
        act.name()
    );
    let (count, dim) = elementwise(n);
    gpu.count();
    macro_rules! launch {
        ($o:ty) => {
            // SAFETY: the kernel guards `i < n`, and n is within the three buffers; pair
            // order permutes within runs of 4 below n.
            unsafe {
                launch::launch(
                    gpu.client(),
                    gated_act_kernel::GatedActKernel::<$o, R>::new(
                        launch::settings(dim),
                        gpu.client().clone(),
                        array_arg(),
                        array_arg(),
                        array_arg(),
                        (),
                        act == GateAct::GeluTanh,
                        pairs,
                    ),
                    count,
                    &[
                        Arg::buf::<f32>(&gate),
                        Arg::buf::<f32>(&up),
                        Arg::buf::<$o>(&out),
                        Arg::U32(n as u32),
                    ],
                )
            }
        };
    }
    if pairs {
        launch!(half::f16)
    } else {
        launch!(f32)
    }
}

/// SwiGLU in place over the first `n` elements of `gate`.
pub fn launch_swiglu<R: Runtime>(gpu: &Gpu<R>, gate: &Buf, up: &Buf, n: usize) {
    launch_gated(gpu, GateAct::Silu, gate, up, n)
}

/// `x[i] *= s` over the first `n` elements of `x`.
pub fn launch_scale<R: Runtime>(gpu: &Gpu<R>, x: &Buf, s: f32, n: usize) {
    assert!(n <= x.len(), "scale: {n} elements out of range");
    let (count, dim) = elementwise(n);
    gpu.count();
    // SAFETY: the kernel guards `i < n`, and n is within the buffer.
    unsafe {
        launch::launch(
            gpu.client(),
            scale_kernel::ScaleKernel::<R>::new(
                launch::settings(dim),
                gpu.client().clone(),
                array_arg(),
                (),
                (),
            ),
            count,
            &[Arg::buf::<f32>(x), Arg::F32(s), Arg::U32(n as u32)],
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
        launch::launch(
            gpu.client(),
            add_assign_kernel::AddAssignKernel::<R>::new(
                launch::settings(dim),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                (),
            ),
            count,
            &[Arg::buf::<f32>(&x), Arg::buf::<f32>(&y), Arg::U32(n as u32)],
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

    #[test]
    fn exp_approx_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp_approx(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.013;
        }
        assert!(super::exp_approx(-1e30) > 0.0 && super::exp_approx(1e30).is_finite());
    }

    #[test]
    fn gated_fast_matches_reference() {
        use super::GateAct;
        // Odd length: the vector loop's tail runs too.
        let n = 4099;
        let gate0: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * 12.0 - 1.0)
            .collect();
        let up: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 3.0).collect();
        for act in [GateAct::Silu, GateAct::GeluTanh] {
            let mut want = gate0.clone();
            super::gated(act, &mut want, &up);
            // The dispatched path, and the AVX2 and portable instantiations of the same body.
            let mut runs = Vec::new();
            let mut got = gate0.clone();
            super::gated_fast(act, &mut got, &up);
            runs.push(("dispatched", got));
            let mut got = gate0.clone();
            super::gated_fast_body(act, &mut got, &up);
            runs.push(("portable", got));
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let mut got = gate0.clone();
                // SAFETY: the CPU has the features.
                unsafe { super::gated_avx2(act, &mut got, &up) };
                runs.push(("avx2", got));
            }
            for (path, got) in &runs {
                for i in 0..n {
                    let tol = 1e-6 * want[i].abs() + 2e-7 * up[i].abs();
                    assert!(
                        (got[i] - want[i]).abs() <= tol,
                        "{path} {} at x = {}: {} vs {}",
                        act.name(),
                        gate0[i],
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn gelu_tanh_values() {
        // Values of 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) computed in f64.
        for (x, want) in [
            (0.0f32, 0.0f32),
            (1.0, 0.841_192),
            (-1.0, -0.158_808),
            (3.0, 2.996_363),
            (-6.0, -0.0),
        ] {
            assert!(
                (super::gelu_tanh(x) - want).abs() < 1e-5,
                "gelu({x}) = {}",
                super::gelu_tanh(x)
            );
        }
    }
}
