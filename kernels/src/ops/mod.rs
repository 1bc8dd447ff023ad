//! Op families of the forward pass. Each file holds the plain-Rust reference (the oracle
//! every backend is tested against, and the CPU backend's implementation) and, beside it,
//! the CubeCL kernels of the same op.
pub mod activation;
pub mod argmax;
pub mod attention;
pub mod catalog;
pub mod dequant;
pub mod embedding;
pub mod gpu;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub mod graph;
pub mod launch;
pub mod matmul;
pub mod norm;
pub mod rope;

/// f32 dot product with eight independent partial sums, so the compiler can vectorize it (a
/// plain `.sum()` is a serial chain of adds, since float addition is not associative).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
