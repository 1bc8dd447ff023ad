//! ROCforge kernels: GGUF quant formats with their CPU reference, the reference ops of the
//! forward pass, and (beside each) the CubeCL kernels that run them on ROCm, CUDA and wgpu.
pub mod ops;
pub mod quant;
pub use quant::GgmlType;
