//! Every kernel variant the GPU backend can launch, as CubeCL kernel definitions: what
//! `cargo xtask hip-check` compiles to HIP C++ and hands to hipcc, without an AMD GPU.
//!
//! Keep in step with the launchers: a new kernel or comptime variant belongs here too.

use cubecl::prelude::*;

use super::dequant::DEVICE_FORMATS;
use super::{activation, argmax, attention, dequant, embedding, norm, rope};

/// Head dims the catalog instantiates attention for (SmolLM2 and Llama use 64 and 128,
/// Gemma 3 256).
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// `(name, definition)` of every kernel variant, built with `client`'s device properties; the
/// attention's for a device of fixed plane width `plane` (the HIP target's wave size).
pub fn kernel_definitions<R: Runtime>(
    client: &ComputeClient<R>,
    plane: usize,
) -> Vec<(String, KernelDefinition)> {
    let settings = |threads: usize| super::launch::settings(CubeDim::new_1d(threads as u32));
    let c = || client.clone();
    // Compilation arguments: one per array (none in place) and `()` per scalar, in order.
    let a = crate::ops::launch::array_arg;
    let mut out: Vec<(String, KernelDefinition)> = Vec::new();
    let row = norm::ROW_CUBE;
    out.extend(activation_definitions::<f32, R>(client, false));
    out.push((
        "add_rms_normed".into(),
        norm::add_rms_normed_kernel::AddRmsNormedKernel::<R>::new(
            settings(row),
            c(),
            a(),
            a(),
            a(),
            (),
            row,
        )
        .define(),
    ));
    out.push((
        "rms_norm_heads".into(),
        norm::rms_norm_heads_kernel::RmsNormHeadsKernel::<R>::new(
            settings(row),
            c(),
            a(),
            a(),
            (),
            (),
            (),
            (),
            row,
        )
        .define(),
    ));
    out.push((
        "scale".into(),
        activation::scale_kernel::ScaleKernel::<R>::new(settings(256), c(), a(), (), ()).define(),
    ));
    out.push((
        "zero".into(),
        super::gpu::zero_kernel::ZeroKernel::<R>::new(settings(256), c(), a(), ()).define(),
    ));
    out.push((
        "add_assign".into(),
        activation::add_assign_kernel::AddAssignKernel::<R>::new(settings(256), c(), a(), a(), ())
            .define(),
    ));
    let rope_scalars = || ((), (), (), (), (), (), (), (), (), (), ());
    macro_rules! rope_def {
        ($k:ty, $neox:expr, $paged:expr) => {{
            let s = rope_scalars();
            rope::rope_store_kernel::RopeStoreKernel::<$k, R>::new(
                settings(256),
                c(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                s.0,
                s.1,
                s.2,
                s.3,
                s.4,
                s.5,
                s.6,
                s.7,
                s.8,
                s.9,
                s.10,
                $neox,
                $paged,
            )
            .define()
        }};
    }
    for (neox, paged) in [(false, false), (true, false), (false, true), (true, true)] {
        let mode = if neox { "_neox" } else { "" };
        let paging = if paged { "_paged" } else { "" };
        out.push((
            format!("rope_store{mode}_f32{paging}"),
            rope_def!(f32, neox, paged),
        ));
        out.push((
            format!("rope_store{mode}_f16{paging}"),
            rope_def!(half::f16, neox, paged),
        ));
    }
    macro_rules! attention_def {
        ($k:ty, $hd:expr, $hpc:expr, $finalize:expr, $paged:expr) => {
            attention::attention_kernel::AttentionKernel::<$k, R>::new(
                settings($hd),
                c(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
                (),
                (),
                (),
                (),
                (),
                attention::key_width($hd),
                $hd,
                $hpc,
                $finalize,
                $paged,
                attention::plane_for(plane, $hd),
            )
            .define()
        };
    }
    for hd in HEAD_DIMS {
        for (finalize, paged) in [(true, false), (false, false), (true, true), (false, true)] {
            let tag = if finalize { "single" } else { "split" };
            let paging = if paged { "_paged" } else { "" };
            // A paged batch's cube takes 1 to 4 heads of a query group (`heads_per_cube`).
            let hpcs: &[usize] = if paged { &[1, 2, 3, 4] } else { &[1] };
            for &hpc in hpcs {
                let heads = if hpc > 1 {
                    format!("_x{hpc}")
                } else {
                    String::new()
                };
                out.push((
                    format!("attention_f32_hd{hd}_{tag}{paging}{heads}"),
                    attention_def!(f32, hd, hpc, finalize, paged),
                ));
                out.push((
                    format!("attention_f16_hd{hd}_{tag}{paging}{heads}"),
                    attention_def!(half::f16, hd, hpc, finalize, paged),
                ));
            }
        }
        out.push((
            format!("attention_combine_hd{hd}"),
            attention::attention_combine_kernel::AttentionCombineKernel::<R>::new(
                settings(hd),
                c(),
                a(),
                a(),
                a(),
                (),
                hd,
            )
            .define(),
        ));
    }
    for ty in DEVICE_FORMATS {
        for (tag, from_scalar, ranged) in [
            ("one", true, false),
            ("batch", false, false),
            ("rows", false, true),
        ] {
            out.push((
                format!("embedding_{ty}_{tag}"),
                embedding::embedding_kernel::EmbeddingKernel::<R>::new(
                    settings(256),
                    c(),
                    a(),
                    a(),
                    a(),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    ty.id(),
                    from_scalar,
                    ranged,
                )
                .define(),
            ));
        }
        out.push((
            format!("linear_plain_{ty}"),
            dequant::linear_plain_kernel::LinearPlainKernel::<R>::new(
                settings(dequant::LINEAR_CUBE),
                c(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
                (),
                ty.id(),
                dequant::LINEAR_CUBE,
            )
            .define(),
        ));
    }
    for width in [1, 4] {
        out.push((
            format!("argmax_v{width}"),
            argmax::argmax_kernel::ArgmaxKernel::<R>::new(
                settings(argmax::ARGMAX_CUBE),
                c(),
                a(),
                a(),
                (),
                (),
                width,
                argmax::ARGMAX_CUBE,
            )
            .define(),
        ));
    }
    // The quantized mat-vec / fused SwiGLU / dequantize kernels: every (format, variant) the
    // matmul API launches, under each mat-vec config HIP (wave64, wave32) or `client` uses.
    out.extend(super::matmul::catalog::kernel_definitions(client));
    out
}

/// The RMSNorm and gated-activation variants whose output is `O`: f32 for every device, or
/// (with `pairs`) f16 in the quantized mat-mat's pair order, which devices running the mat-mat
/// launch before it (`matmul::catalog::mma_definitions`); the gathered norms only in f32 (the
/// logits' rows).
pub fn activation_definitions<O: Float, R: Runtime>(
    client: &ComputeClient<R>,
    pairs: bool,
) -> Vec<(String, KernelDefinition)> {
    let settings = |threads: usize| super::launch::settings(CubeDim::new_1d(threads as u32));
    let (c, a) = (|| client.clone(), crate::ops::launch::array_arg);
    let suffix = if pairs { "_f16_pairs" } else { "" };
    let row = norm::ROW_CUBE;
    let mut out = Vec::new();
    let gathers: &[bool] = if pairs { &[false] } else { &[false, true] };
    for &gather in gathers {
        let tag = if gather { "_gather" } else { "" };
        out.push((
            format!("rms_norm{tag}{suffix}"),
            norm::rms_norm_kernel::RmsNormKernel::<O, R>::new(
                settings(row),
                c(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                row,
                gather,
                pairs,
                norm::NORM_UNROLL,
            )
            .define(),
        ));
        out.push((
            format!("add_rms_norm{tag}{suffix}"),
            norm::add_rms_norm_kernel::AddRmsNormKernel::<O, R>::new(
                settings(row),
                c(),
                a(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                row,
                gather,
                pairs,
                norm::NORM_UNROLL,
            )
            .define(),
        ));
    }
    for gelu in [false, true] {
        let name = if gelu { "geglu" } else { "swiglu" };
        out.push((
            format!("{name}{suffix}"),
            activation::gated_act_kernel::GatedActKernel::<O, R>::new(
                settings(256),
                c(),
                a(),
                a(),
                a(),
                (),
                gelu,
                pairs,
            )
            .define(),
        ));
    }
    out
}
