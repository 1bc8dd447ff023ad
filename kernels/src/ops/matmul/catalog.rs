//! Every kernel variant the matmul API can launch, by name, with a way to launch each on tiny
//! inputs: what an offline compile check (HIP, CUDA) walks to get every `KernelDefinition`
//! compiled once, and what a test walks to see each variant run.

use cubecl::prelude::*;

use super::api::{self, DequantScratch, Epilogue, MatmulError, QWeight, MAX_MATVEC_TOKENS};
use super::format::KernelFormat;
use super::kernels::{self, MatvecConfig};

/// Which kernel, with its comptime choices other than the format and the launch config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// `matvec_kernel` with a comptime token count and epilogue.
    Matvec { tokens: u32, accumulate: bool },
    /// `matvec_swiglu_kernel`.
    MatvecSwiglu,
    /// `dequantize_kernel` (the prefill pass; cubek's matmul follows it).
    Dequantize,
    /// `embed_kernel`: one token as an argument, or ids on the device; `ranged` for a row
    /// block of a split table (device ids).
    Embed { from_scalar: bool, ranged: bool },
    /// `matvec_norm_q_kernel` (coalesced formats only).
    MatvecNorm,
    /// `matvec_swiglu_norm_q_kernel` (coalesced formats only).
    MatvecSwigluNorm,
}

/// One compiled variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelVariant {
    /// `matvec_q4_K_t1_acc`, `swiglu_q8_0`, `dequantize_f16`, ...
    pub name: String,
    pub format: KernelFormat,
    pub kind: KernelKind,
}

/// All variants: every format times single-token store/accumulate, the multi-token mat-vecs
/// `2..=MAX_MATVEC_TOKENS`, the fused SwiGLU and the dequantize pass.
pub fn variants() -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for format in KernelFormat::ALL {
        let mut push = |name: String, kind| out.push(KernelVariant { name, format, kind });
        push(
            format!("matvec_{format}_t1"),
            KernelKind::Matvec {
                tokens: 1,
                accumulate: false,
            },
        );
        push(
            format!("matvec_{format}_t1_acc"),
            KernelKind::Matvec {
                tokens: 1,
                accumulate: true,
            },
        );
        for tokens in 2..=MAX_MATVEC_TOKENS as u32 {
            push(
                format!("matvec_{format}_t{tokens}"),
                KernelKind::Matvec {
                    tokens,
                    accumulate: false,
                },
            );
        }
        push(format!("swiglu_{format}"), KernelKind::MatvecSwiglu);
        push(format!("dequantize_{format}"), KernelKind::Dequantize);
        if format.coalesced() {
            push(format!("matvec_norm_{format}"), KernelKind::MatvecNorm);
            push(
                format!("swiglu_norm_{format}"),
                KernelKind::MatvecSwigluNorm,
            );
        }
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

/// Launches `v` on a one-row, one-block weight of zeros (compiling it on first use).
pub fn launch_variant<R: Runtime>(
    client: &ComputeClient<R>,
    v: &KernelVariant,
) -> Result<(), MatmulError> {
    let ty = v.format.ggml();
    let cols = ty.block_size().max(4);
    let bytes = vec![0u8; cols / ty.block_size() * ty.type_size()];
    let w = QWeight::<R>::upload(client, ty, 1, cols, &bytes)?;
    let tokens = match v.kind {
        KernelKind::Matvec { tokens, .. } => tokens as usize,
        _ => 1,
    };
    let x = client.create_from_slice(f32::as_bytes(&vec![0.0; tokens * cols]));
    let y = client.empty(tokens * cols * 4);
    let scratch = DequantScratch::new(client, cols);
    match v.kind {
        KernelKind::Matvec {
            accumulate: true, ..
        } => api::matvec(client, &w, &x, &y, Epilogue::Accumulate),
        KernelKind::Matvec { tokens, .. } => {
            api::matmul(client, &w, &x, &y, tokens as usize, Some(&scratch))
        }
        KernelKind::MatvecSwiglu => api::matvec_swiglu(client, &w, &w, &x, &y),
        KernelKind::Dequantize => api::dequantize(client, &w, &scratch),
        KernelKind::Embed { ranged: true, .. } => {
            let ids = client.create_from_slice(u32::as_bytes(&[0u32]));
            api::embed_rows(client, &w, 0, &ids, 1, &y)
        }
        KernelKind::Embed { from_scalar, .. } => {
            let ids = client.create_from_slice(u32::as_bytes(&[0u32]));
            api::embed(client, &w, &ids, 1, from_scalar.then_some(0), &y)
        }
        KernelKind::MatvecNorm => api::matvec_norm(client, &w, &x, &x, 1e-5, &y),
        KernelKind::MatvecSwigluNorm => api::matvec_swiglu_norm(client, &w, &w, &x, &x, 1e-5, &y),
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
        rows_per_cube: (128 / lanes).max(1),
        plane_reduce: true,
    };
    let mut out = vec![plane(64), plane(32)];
    let own = api::matvec_config(client);
    if !out.contains(&own) {
        out.push(own);
    }
    out
}

/// Short tag of a config for kernel names: `l64p` (plane reduce), `l32s` (shared memory).
pub fn config_tag(cfg: MatvecConfig) -> String {
    let r = if cfg.plane_reduce { 'p' } else { 's' };
    format!("l{}{r}", cfg.lanes)
}

/// `v`'s kernel definition as the API launches it with mat-vec config `cfg` (ignored by the
/// dequantize pass): same cube dim, same comptime arguments.
pub fn definition<R: Runtime>(
    client: &ComputeClient<R>,
    v: &KernelVariant,
    cfg: MatvecConfig,
) -> KernelDefinition {
    let settings = |dim: CubeDim| {
        KernelSettings::default()
            .cube_dim(dim)
            .address_type(AddressType::U32)
    };
    let a = || ArrayCompilationArg { inplace: None };
    let c = || client.clone();
    let mv_dim = CubeDim::new_2d(cfg.lanes, cfg.rows_per_cube);
    let coalesced = api::uses_coalesced(v.format, cfg);
    match v.kind {
        KernelKind::Matvec { tokens, accumulate } if coalesced => {
            kernels::matvec_q_kernel::MatvecQKernel::<R>::new(
                settings(mv_dim),
                c(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
                v.format,
                cfg,
                tokens,
                accumulate,
            )
            .define()
        }
        KernelKind::MatvecSwiglu if coalesced => {
            kernels::matvec_swiglu_q_kernel::MatvecSwigluQKernel::<R>::new(
                settings(mv_dim),
                c(),
                a(),
                a(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                v.format,
                cfg,
            )
            .define()
        }
        KernelKind::Matvec { tokens, accumulate } => {
            kernels::matvec_kernel::MatvecKernel::<R>::new(
                settings(mv_dim),
                c(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
                v.format,
                cfg,
                tokens,
                accumulate,
            )
            .define()
        }
        KernelKind::MatvecSwiglu => kernels::matvec_swiglu_kernel::MatvecSwigluKernel::<R>::new(
            settings(mv_dim),
            c(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            (),
            v.format,
            cfg,
        )
        .define(),
        KernelKind::Dequantize => kernels::dequantize_kernel::DequantizeKernel::<R>::new(
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
        .define(),
        KernelKind::MatvecNorm => kernels::matvec_norm_q_kernel::MatvecNormQKernel::<R>::new(
            settings(mv_dim),
            c(),
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
            cfg,
        )
        .define(),
        KernelKind::MatvecSwigluNorm => {
            kernels::matvec_swiglu_norm_q_kernel::MatvecSwigluNormQKernel::<R>::new(
                settings(mv_dim),
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
                v.format,
                cfg,
            )
            .define()
        }
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

/// `(name, definition)` of every variant of [`variants`] under every config of
/// [`check_configs`] (the dequantize pass once, it has no mat-vec config).
pub fn kernel_definitions<R: Runtime>(
    client: &ComputeClient<R>,
) -> Vec<(String, KernelDefinition)> {
    let cfgs = check_configs(client);
    let mut out = Vec::new();
    for v in variants() {
        if matches!(v.kind, KernelKind::Dequantize | KernelKind::Embed { .. }) {
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
