//! Op families of the forward pass. Each file holds the plain-Rust reference (the oracle
//! every backend is tested against, and the CPU backend's implementation) and, beside it,
//! the CubeCL kernels of the same op.
pub mod activation;
pub mod attention;
pub mod norm;
pub mod rope;
pub mod gpu;
pub mod argmax;
pub mod dequant;
pub mod embedding;
pub mod matmul;
pub mod catalog;
