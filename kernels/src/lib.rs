//! ROCforge kernels: GGUF quant formats with their CPU reference, and CubeCL kernels.
pub mod quant;
pub use quant::GgmlType;
