//! Quantized matrix-vector (decode) and matrix-matrix (prefill) products, `y = W·x`, on the
//! GGUF weight formats F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.
//!
//! # Files
//! - [`format`]: the formats as a comptime kernel parameter, with their layout constants.
//! - [`layout`]: the upload layout (GGUF blocks split into a word plane and an `f16` plane).
//! - [`decode`]: device code unpacking one slot of weights into registers (the only one).
//! - [`kernels`]: the `#[cube(launch_unchecked)]` kernels: the mat-vec family, the embedding
//!   lookup and the dequantize pass.
//! - [`mma`]: the quantized mat-mat on the matrix units (batches above `MAX_MATVEC_TOKENS`).
//! - [`api`]: [`QWeight`] and the validated entry points the backend calls.
//! - [`catalog`]: every kernel variant by name, for offline compilation checks.
//!
//! # Decode (mat-vec)
//! Memory-bound: each weight byte is read once, there is no dequantized copy. One kernel,
//! [`kernels::matvec_kernel`], with its fusions as comptime parameters ([`Fusion`]) and one
//! launcher ([`launch_matvec`]). A row belongs to one row of lanes (one plane where the
//! runtime has plane ops); neighbouring lanes share a block, each unpacking a few slots
//! (`decode::decode_slot`) into small integers and a scale per run of 4 weights, and the
//! lanes stride over the row's blocks several at a time; partial sums meet in plane shuffles,
//! every row and token of a row group at once (`kernels::write_outputs`), or, where plane ops
//! are missing (lavapipe), a shared-memory tree. Fusions save launches per
//! token (~5 µs of host time each): `y += W·x` for the residual after
//! `attn_output`/`ffn_down`, the RMSNorm before a projection, and `ffn_gate`/`ffn_up` with
//! their activation (SiLU or GELU) in one launch. `f16` values are decoded from `u32` words with integer ops so the
//! kernels need no `shader-f16`, which Mesa lavapipe does not offer to wgpu.
//!
//! # Prefill and batched decode (mat-mat)
//! Chosen by batch size:
//! - up to [`MAX_MATVEC_TOKENS`] tokens: the mat-vec kernel with a comptime token count, so
//!   each weight unit is decoded once for all tokens (still memory-bound at this size);
//! - above, where the device's `cmma` multiplies f16 tiles ([`prefill_kernel`]): [`mma`], a
//!   tiled mat-mat on the matrix units that decodes each weight tile into shared memory as it
//!   goes (no dequantized copy);
//! - above, elsewhere: a dequantize pass into a reused scratch, then cubek's matmul.
//!
//! The on-the-fly kernel replaced dequantize + cubek where both run because batched decode
//! (tens of rows) is bound by the pass and by cubek's per-launch cost, not by FLOPs: on the
//! H200 a 4096x4096 Q4_0 weight at 64 rows takes 0.042 ms against 0.147, and the 8B shape's
//! 64-sequence decode went from 1,007 to 2,085 t/s; at 512 rows the two are level
//! (docs/performance.md, "quantized mat-mat").
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
pub mod mma;

pub use api::{
    dequantize, embed, embed_rows, fuses_norm, launch_matvec, launch_mma, launch_mma_half,
    launch_mma_split, matmul, matmul_dequantized, matvec, matvec_config, matvec_gated,
    matvec_gated_norm, matvec_norm, mma_splits, mma_tile, mma_wide, prefill_kernel,
    prefill_precision, DequantScratch, Epilogue, HalfActs, MatmulError, Matvec, PrefillKernel,
    PrefillPrecision, QWeight, MAX_MATVEC_TOKENS,
};
pub use format::KernelFormat;
pub use kernels::{Fusion, MatvecConfig, XLayout};
pub use mma::MmaConfig;
