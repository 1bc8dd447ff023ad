//! Quantized matrix-vector (decode) and matrix-matrix (prefill) products, `y = W·x`, on the
//! GGUF weight formats F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.
//!
//! # Files
//! - [`format`]: the formats as a comptime kernel parameter, with their layout constants.
//! - [`layout`]: the upload layout (GGUF blocks split into a word plane and an `f16` plane).
//! - [`decode`]: device code unpacking one slot of weights into registers (the only one).
//! - [`kernels`]: the `#[cube(launch_unchecked)]` kernels: the mat-vec family, the embedding
//!   lookup and the dequantize pass.
//! - [`api`]: [`QWeight`] and the validated entry points the backend calls.
//! - [`catalog`]: every kernel variant by name, for offline compilation checks.
//!
//! # Decode (mat-vec)
//! Memory-bound: each weight byte is read once, there is no dequantized copy. One kernel,
//! [`kernels::matvec_kernel`], with its fusions as comptime parameters ([`Fusion`]) and one
//! launcher ([`launch_matvec`]). A row belongs to one row of lanes (one plane where the
//! runtime has plane ops); neighbouring lanes share a block, each unpacking a few slots
//! (`decode::decode_slot`) into small integers and a scale per run of 4 weights, and the
//! lanes stride over the row's blocks several at a time; partial sums meet in `plane_sum` or,
//! where plane ops are missing (lavapipe), a shared-memory tree. Fusions save launches per
//! token (~5 µs of host time each): `y += W·x` for the residual after
//! `attn_output`/`ffn_down`, the RMSNorm before a projection, and `ffn_gate`/`ffn_up` with
//! their activation (SiLU or GELU) in one launch. `f16` values are decoded from `u32` words with integer ops so the
//! kernels need no `shader-f16`, which Mesa lavapipe does not offer to wgpu.
//!
//! # Prefill (mat-mat)
//! Two paths, chosen by batch size:
//! - up to [`MAX_MATVEC_TOKENS`] tokens: the mat-vec kernel with a comptime token count, so
//!   each weight unit is decoded once for all tokens (still memory-bound at this size);
//! - above: a dequantize pass into a reused `f32` scratch, then cubek's matmul (`Strategy::Auto`).
//!
//! Why dequantize + cubek instead of a tiled kernel decoding tiles on the fly: prefill at
//! pp512 is compute-bound. cubek's tiled matmul reaches the tensor cores (cmma/mma) on CUDA
//! and HIP; a hand-written on-the-fly tile kernel would have to do the same to compete, and
//! a plain-FMA one tops out at a small fraction of the H200's tensor throughput. The extra
//! traffic of the pass is one write and one read of the `f32` matrix (4096x4096: 64 MiB each,
//! ~28 µs at 4.8 TB/s), small beside the matmul on 512 tokens and amortised across all of
//! them. Measuring on lavapipe cannot settle this (CPU, no tensor cores), so the choice rests
//! on the roofline above. Left for the GPU: an `f16` scratch (halves the pass, enables f16
//! tensor cores) where the runtime has `f16`, and an on-the-fly kernel if profiles show the
//! pass matters.
//!
//! # Kernel definitions
//! Each kernel is a plain `#[cube(launch_unchecked)]` fn whose only comptime parameters are a
//! [`KernelFormat`] and small config values; [`catalog::variants`] generates every combination
//! the API launches (format x fusion) and [`catalog::launch_variant`] launches one on tiny inputs, so a check can
//! compile each (e.g. through a HIP client) without reaching into this module's internals.
//!
//! Tests: `kernels/tests/matmul_kernels.rs` (per runtime, every format against
//! `quant::dequantize_row`, tolerances in one table).

pub mod api;
pub mod catalog;
pub mod decode;
pub mod format;
pub mod kernels;
pub mod layout;

pub use api::{
    dequantize, embed, embed_rows, fuses_norm, launch_matvec, matmul, matvec, matvec_config,
    matvec_gated, matvec_gated_norm, matvec_norm, prefill_precision, DequantScratch, Epilogue,
    HalfActs, MatmulError, Matvec, PrefillPrecision, QWeight, MAX_MATVEC_TOKENS,
};
pub use format::KernelFormat;
pub use kernels::{Fusion, MatvecConfig};
