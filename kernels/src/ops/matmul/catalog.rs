//! Every kernel variant the matmul API can launch, by name, with a way to launch each on tiny
//! inputs: what an offline compile check (HIP, CUDA) walks to get every `KernelDefinition`
//! compiled once, and what a test walks to see each variant run.

use cubecl::prelude::*;

use super::api::{self, DequantScratch, MatmulError, Matvec, QWeight, MAX_MATVEC_TOKENS};
use super::format::KernelFormat;
use super::kernels::{self, Fusion, MatvecConfig};
use super::mma::{self, MmaConfig};
use crate::ops::activation::GateAct;
use crate::ops::launch::settings;

/// Which kernel, with its comptime choices other than the format and the launch config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// `matvec_kernel` with these fusions; `long_rows`: the wide K-quant launch over long rows
    /// (`api::long_rows`), a row group split over planes.
    Matvec { fusion: Fusion, long_rows: bool },
    /// `dequantize_kernel` (the prefill pass; cubek's matmul follows it), into f32 or f16.
    Dequantize { f16: bool },
    /// `embed_kernel`: one token as an argument, or ids on the device; `ranged` for a row
    /// block of a split table (device ids).
    Embed { from_scalar: bool, ranged: bool },
    /// `half_x_kernel`, the activations as halves for the `half_x` mat-vec, with or without
    /// the RMSNorm, in the order its format's wide launch reads them (`MatvecConfig::x_layout`:
    /// listed under Q4_0 for 32-column chunks, Q4_K for 64 and Q6_K for its own).
    HalfX { norm: bool },
}

/// One compiled variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelVariant {
    /// `matvec_q4_K_t1_acc`, `matvec_q8_0_t1_norm_swiglu`, `dequantize_f16`, ...
    pub name: String,
    pub format: KernelFormat,
    pub kind: KernelKind,
}

/// The fusions the runtime launches: 1..=[`MAX_MATVEC_TOKENS`] tokens, the accumulating
/// single token, and the single token with the norm and/or a gated pair (SiLU or GELU); then
/// the single token on half activations (plain, accumulating, gated), which only the formats
/// with `KernelFormat::half_x` take.
pub fn fusions() -> Vec<Fusion> {
    let mut out: Vec<Fusion> = (1..=MAX_MATVEC_TOKENS as u32).map(Fusion::plain).collect();
    let one = Fusion::plain(1);
    out.push(Fusion {
        accumulate: true,
        ..one
    });
    for norm in [false, true] {
        if norm {
            out.push(Fusion { norm, ..one });
        }
        for gelu in [false, true] {
            out.push(Fusion {
                norm,
                gated: true,
                gelu,
                ..one
            });
        }
    }
    let half = Fusion {
        half_x: true,
        ..one
    };
    out.push(half);
    out.push(Fusion {
        accumulate: true,
        ..half
    });
    for gelu in [false, true] {
        out.push(Fusion {
            gated: true,
            gelu,
            ..half
        });
    }
    out
}

/// The single token on half activations (what a conversion precedes).
fn half_fusion() -> Fusion {
    Fusion {
        half_x: true,
        ..Fusion::plain(1)
    }
}

/// `t1`, `t1_acc`, `t1_norm_geglu`, ...
pub fn fusion_tag(f: Fusion) -> String {
    let mut tag = format!("t{}", f.tokens);
    if f.accumulate {
        tag.push_str("_acc");
    }
    if f.norm {
        tag.push_str("_norm");
    }
    if f.gated {
        tag.push_str(if f.gelu { "_geglu" } else { "_swiglu" });
    }
    if f.half_x {
        tag.push_str("_hx");
    }
    tag
}

/// All variants: every format times every fusion of [`fusions`] (the K-quants' half fusions
/// also over long rows, `_long`), the dequantize pass and the embedding lookups.
pub fn variants() -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for format in KernelFormat::ALL {
        let mut push = |name: String, kind| out.push(KernelVariant { name, format, kind });
        for f in fusions() {
            if f.half_x && !format.matvec_half() {
                continue;
            }
            push(
                format!("matvec_{format}_{}", fusion_tag(f)),
                KernelKind::Matvec {
                    fusion: f,
                    long_rows: false,
                },
            );
            if f.half_x && format.wide_cols() > 32 {
                push(
                    format!("matvec_{format}_{}_long", fusion_tag(f)),
                    KernelKind::Matvec {
                        fusion: f,
                        long_rows: true,
                    },
                );
            }
        }
        if let Some(layout) = match format {
            KernelFormat::Q4_0 => Some("c32"),
            KernelFormat::Q4K => Some("c64"),
            KernelFormat::Q6K => Some("q6k"),
            _ => None,
        } {
            for norm in [false, true] {
                let tag = if norm { "_norm" } else { "" };
                push(format!("half_x_{layout}{tag}"), KernelKind::HalfX { norm });
            }
        }
        push(
            format!("dequantize_{format}"),
            KernelKind::Dequantize { f16: false },
        );
        push(
            format!("dequantize_{format}_to_f16"),
            KernelKind::Dequantize { f16: true },
        );
        for (tag, from_scalar, ranged) in [
            ("one", true, false),
            ("batch", false, false),
            ("rows", false, true),
        ] {
            push(
                format!("embed_{format}_{tag}"),
                KernelKind::Embed {
                    from_scalar,
                    ranged,
                },
            );
        }
    }
    out
}

/// Launches `v` on a one-row weight of zeros (compiling it on first use): one block, or for a
/// long-row variant `api::long_row_cols` columns on `client`.
pub fn launch_variant<R: Runtime>(
    client: &ComputeClient<R>,
    v: &KernelVariant,
) -> Result<(), MatmulError> {
    let ty = v.format.ggml();
    let cols = match v.kind {
        KernelKind::Matvec {
            long_rows: true, ..
        } => api::long_row_cols(api::matvec_config(client), v.format),
        _ => ty.block_size().max(4),
    };
    let bytes = vec![0u8; cols / ty.block_size() * ty.type_size()];
    let w = QWeight::<R>::upload(client, ty, 1, cols, &bytes)?;
    let tokens = match v.kind {
        KernelKind::Matvec { fusion, .. } => fusion.tokens as usize,
        _ => 1,
    };
    let x = client.create_from_slice(f32::as_bytes(&vec![0.0; tokens * cols]));
    let y = client.empty(tokens * cols * 4);
    let precision = match v.kind {
        KernelKind::Dequantize { f16: true } => api::PrefillPrecision::F16 { tma: false },
        _ => api::PrefillPrecision::F32,
    };
    let scratch = DequantScratch::with_precision(client, cols, precision);
    let half = api::HalfActs::forced(client, cols);
    match v.kind {
        KernelKind::HalfX { norm } => {
            let op = Matvec {
                norm: norm.then_some((&x, 1e-5)),
                half: half.as_ref(),
                ..Matvec::new(&w, &x, &y)
            };
            api::launch_matvec(client, &op)
        }
        KernelKind::Matvec {
            fusion: f,
            long_rows,
        } => {
            debug_assert_eq!(
                api::long_rows(api::matvec_config(client), v.format, cols),
                long_rows
            );
            let act = if f.gelu {
                GateAct::GeluTanh
            } else {
                GateAct::Silu
            };
            let op = Matvec {
                up: f.gated.then_some((&w, act)),
                norm: f.norm.then_some((&x, 1e-5)),
                tokens: f.tokens as usize,
                epilogue: if f.accumulate {
                    api::Epilogue::Accumulate
                } else {
                    api::Epilogue::Store
                },
                half: half.as_ref().filter(|_| f.half_x),
                ..Matvec::new(&w, &x, &y)
            };
            debug_assert_eq!(op.fusion(), f);
            api::launch_matvec(client, &op)
        }
        KernelKind::Dequantize { .. } => api::dequantize(client, &w, &scratch),
        KernelKind::Embed { ranged: true, .. } => {
            let ids = client.create_from_slice(u32::as_bytes(&[0u32]));
            api::embed_rows(client, &w, 0, &ids, 1, &y)
        }
        KernelKind::Embed { from_scalar, .. } => {
            let ids = client.create_from_slice(u32::as_bytes(&[0u32]));
            api::embed(client, &w, &ids, 1, from_scalar.then_some(0), &y)
        }
    }
}

/// Lanes per cube of the dequantize pass and the embedding lookup.
const DEQUANT_THREADS: u32 = api::ROW_THREADS;

/// Mat-vec configs a compile check should cover for `client`: the one `client` itself would
/// launch ([`api::matvec_config`]) plus one plane per row at 64 lanes (CDNA, wave64) and at 32
/// lanes (NVIDIA, RDNA in wave32), which is what the HIP and CUDA runtimes launch. Deduplicated.
pub fn check_configs<R: Runtime>(client: &ComputeClient<R>) -> Vec<MatvecConfig> {
    let plane = |lanes: u32| MatvecConfig {
        lanes,
        planes_per_cube: (128 / lanes).max(1),
        rows_per_plane: api::ROWS_PER_PLANE,
        planes_per_row: api::PLANES_PER_ROW,
        plane_reduce: true,
        unroll: 1,
        wide: false,
        interleave_x: false,
    };
    let mut out = vec![plane(64), plane(32)];
    let own = api::matvec_config(client);
    if !out.contains(&own) {
        out.push(own);
    }
    out
}

/// Short tag of a config for kernel names: `l64p_r2` (plane reduce, 2 rows per plane), `l32s_r2`
/// (shared memory).
pub fn config_tag(cfg: MatvecConfig) -> String {
    let r = if cfg.plane_reduce { 'p' } else { 's' };
    let split = if cfg.planes_per_row > 1 {
        format!("_s{}", cfg.planes_per_row)
    } else {
        String::new()
    };
    format!("l{}{r}_r{}{split}", cfg.lanes, cfg.rows_per_plane)
}

/// `v`'s kernel definition as the API launches it with mat-vec config `cfg` (ignored by the
/// dequantize pass): same cube dim, same comptime arguments.
pub fn definition<R: Runtime>(
    client: &ComputeClient<R>,
    v: &KernelVariant,
    cfg: MatvecConfig,
) -> KernelDefinition {
    let a = crate::ops::launch::array_arg;
    let c = || client.clone();
    let mv = match v.kind {
        // No `whole_rows` variant: it needs the SM count, which CubeCL 0.10's HIP runtime does
        // not report, so HIP never launches one (`api::whole_rows`).
        KernelKind::Matvec { fusion, long_rows } => {
            api::cfg_for(cfg, fusion, v.format, false, long_rows)
        }
        // The conversion's layout is its mat-vec's (the same on long rows).
        KernelKind::HalfX { .. } => api::cfg_for(cfg, half_fusion(), v.format, false, false),
        _ => cfg,
    };
    match v.kind {
        KernelKind::Matvec { fusion, .. } => kernels::matvec_kernel::MatvecKernel::<R>::new(
            settings(CubeDim::new_2d(mv.lanes, mv.planes_per_cube)),
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
            a(),
            a(),
            (),
            (),
            (),
            (),
            v.format,
            mv,
            fusion,
        )
        .define(),
        KernelKind::Dequantize { f16 } => {
            macro_rules! def {
                ($f:ty) => {
                    kernels::dequantize_kernel::DequantizeKernel::<$f, R>::new(
                        settings(CubeDim::new_1d(DEQUANT_THREADS)),
                        c(),
                        a(),
                        a(),
                        a(),
                        (),
                        (),
                        (),
                        v.format,
                    )
                    .define()
                };
            }
            if f16 {
                def!(half::f16)
            } else {
                def!(f32)
            }
        }
        KernelKind::HalfX { norm } => kernels::half_x_kernel::HalfXKernel::<R>::new(
            settings(CubeDim::new_1d(kernels::HALF_X_THREADS)),
            c(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            norm,
            mv.x_layout(v.format),
        )
        .define(),
        KernelKind::Embed {
            from_scalar,
            ranged,
        } => kernels::embed_kernel::EmbedKernel::<R>::new(
            settings(CubeDim::new_1d(DEQUANT_THREADS)),
            c(),
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
            v.format,
            from_scalar,
            ranged,
        )
        .define(),
    }
}

/// The quantized mat-mat's tiles [`api::prefill_kernel`] launches, for plane width `plane`.
pub fn mma_configs(plane: u32) -> Vec<MmaConfig> {
    api::MMA_TILES
        .into_iter()
        .map(|t| MmaConfig::from_tile(plane, t))
        .collect()
}

/// A tile's name: `block_m x block_n`, planes along tokens and rows, `_w` when it stages wide.
pub fn mma_tag(cfg: MmaConfig) -> String {
    format!(
        "{}x{}_p{}x{}_k{}{}",
        cfg.block_m(),
        cfg.block_n(),
        cfg.planes_m,
        cfg.planes_n,
        cfg.k_step,
        if cfg.wide { "_w" } else { "" }
    )
}

/// `(name, definition)` of the quantized mat-mat for every format and tile of [`mma_configs`]:
/// only devices whose `cmma` multiplies f16 tiles launch it.
pub fn mma_definitions<R: Runtime>(
    client: &ComputeClient<R>,
    plane: u32,
) -> Vec<(String, KernelDefinition)> {
    let a = crate::ops::launch::array_arg;
    let mut out = vec![(
        "mma_split_sum".to_string(),
        mma::split_sum_kernel::SplitSumKernel::<R>::new(
            settings(CubeDim::new_1d(DEQUANT_THREADS)),
            client.clone(),
            a(),
            a(),
            (),
            (),
        )
        .define(),
    )];
    // Its activations in f16, written by the norm and the gated activation before it.
    out.extend(crate::ops::catalog::activation_definitions::<half::f16, R>(
        client, true,
    ));
    for fmt in KernelFormat::ALL {
        // Both stagings where the format has a wide one (the runtime picks by batch size).
        let widths: &[bool] = if fmt.mma_quad() > 1 {
            &[false, true]
        } else {
            &[false]
        };
        let cfgs = mma_configs(plane)
            .into_iter()
            .flat_map(|c| widths.iter().map(move |&wide| MmaConfig { wide, ..c }));
        for cfg in cfgs {
            {
                let name = format!("mma_{}_{}", fmt.ggml().name().to_lowercase(), mma_tag(cfg));
                let def = mma::mma_kernel::MmaKernel::<R>::new(
                    settings(CubeDim::new_2d(cfg.plane, cfg.planes_m * cfg.planes_n)),
                    client.clone(),
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
                    fmt,
                    cfg,
                )
                .define();
                out.push((name, def));
            }
        }
    }
    out
}

/// `(name, definition)` of every variant of [`variants`] under every config of
/// [`check_configs`] (the dequantize pass once, it has no mat-vec config).
pub fn kernel_definitions<R: Runtime>(
    client: &ComputeClient<R>,
) -> Vec<(String, KernelDefinition)> {
    let cfgs = check_configs(client);
    let mut out: Vec<_> = [false, true]
        .into_iter()
        .map(|pairs| {
            (
                format!("to_f16{}", if pairs { "_pairs" } else { "" }),
                kernels::to_f16_kernel::ToF16Kernel::<R>::new(
                    settings(CubeDim::new_1d(DEQUANT_THREADS)),
                    client.clone(),
                    crate::ops::launch::array_arg(),
                    crate::ops::launch::array_arg(),
                    (),
                    pairs,
                )
                .define(),
            )
        })
        .collect();
    for v in variants() {
        if matches!(
            v.kind,
            KernelKind::Dequantize { .. } | KernelKind::Embed { .. }
        ) {
            out.push((v.name.clone(), definition(client, &v, cfgs[0])));
            continue;
        }
        for &cfg in &cfgs {
            out.push((
                format!("{}_{}", v.name, config_tag(cfg)),
                definition(client, &v, cfg),
            ));
        }
    }
    out
}
