//! Host API: upload a weight once, then mat-vec (decode; one launcher, [`launch_matvec`], for
//! every fusion) and mat-mat (prefill) on any `R: Runtime`. Every entry validates shapes and buffer sizes and
//! returns [`MatmulError`]; past that point nothing panics.

use std::marker::PhantomData;

use cubecl::features::Plane;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek::matmul::definition::MatmulElems;
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::std::InputBinding;

use super::format::KernelFormat;
use super::kernels::{self, Fusion, MatvecConfig, XLayout};
use super::layout;
use super::mma::{self, MmaConfig};
use crate::ops::activation::GateAct;
use crate::ops::launch::{self, array_arg, Arg};
use crate::quant::GgmlType;

/// Batches up to this many tokens run as a multi-token mat-vec (one weight read, no scratch);
/// larger ones dequantize into scratch and run cubek's matmul.
pub const MAX_MATVEC_TOKENS: usize = 8;

/// Why a matmul entry refused its arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatmulError {
    /// No kernel reads this tensor type.
    #[error("no matmul kernel for tensor type {0}")]
    UnsupportedType(GgmlType),
    /// The column count is not a whole number of blocks, or a dimension is zero.
    #[error("a {ty} weight cannot have {rows} rows of {cols} columns")]
    BadShape {
        ty: GgmlType,
        rows: usize,
        cols: usize,
    },
    /// The weight bytes do not match the shape.
    #[error("a {ty} weight of {rows}x{cols} takes {expected} bytes, got {got}")]
    ByteLength {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    /// A device buffer is smaller than the shape needs (`what` names the argument).
    #[error("{what}: needs {needed} bytes, the buffer has {got}")]
    BufferTooSmall {
        what: &'static str,
        needed: u64,
        got: u64,
    },
    /// The mat-vec's fusions do not combine so (`what` says which were asked).
    #[error("no mat-vec kernel fuses {0}")]
    Fusion(String),
    /// Two weights that must agree (gate and up) do not.
    #[error("gate and up weights differ: {0}")]
    Mismatch(String),
    /// A dimension does not fit the kernels' 32-bit indexing.
    #[error("{0} elements exceed the kernels' 32-bit indexing")]
    TooLarge(u64),
    /// cubek refused the prefill matmul.
    #[error("cubek matmul: {0}")]
    Matmul(String),
    /// A half-activation conversion whose columns do not tile its layout.
    #[error("half activations: {0}")]
    HalfLayout(String),
}

/// What the mat-vec does with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = W·x`.
    Store,
    /// `y += W·x` (residual add fused into the output projection).
    Accumulate,
}

/// A weight matrix on the device in the split-plane layout of [`layout`]: `rows` output
/// features of `cols` inputs (GGUF `ne[1]` x `ne[0]`).
#[derive(Debug, Clone)]
pub struct QWeight<R: Runtime> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    format: KernelFormat,
    blocks_per_row: u32,
    quants: Handle,
    scales: Handle,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> QWeight<R> {
    /// Uploads `rows` GGUF rows of `cols` weights of type `ty` (the tensor's raw bytes).
    pub fn upload(
        client: &ComputeClient<R>,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, MatmulError> {
        let format = KernelFormat::from_ggml(ty).ok_or(MatmulError::UnsupportedType(ty))?;
        if rows == 0 || cols == 0 || cols % ty.block_size() != 0 {
            return Err(MatmulError::BadShape { ty, rows, cols });
        }
        let expected = rows * (cols / ty.block_size()) * ty.type_size();
        if bytes.len() != expected {
            return Err(MatmulError::ByteLength {
                ty,
                rows,
                cols,
                expected,
                got: bytes.len(),
            });
        }
        let packed = layout::pack(format, rows, cols, bytes);
        check_u32(packed.quants.len().max(rows * cols.next_multiple_of(4)) as u64)?;
        Ok(Self {
            ty,
            rows,
            cols,
            format,
            blocks_per_row: packed.blocks_per_row,
            quants: client.create_from_slice(u32::as_bytes(&packed.quants)),
            scales: client.create_from_slice(u32::as_bytes(&packed.scales)),
            _runtime: PhantomData,
        })
    }

    /// The kernel format (the comptime parameter its kernels are compiled for).
    pub fn format(&self) -> KernelFormat {
        self.format
    }

    /// The quants and scales as launch arguments (words).
    fn args(&self) -> [Arg<'_>; 2] {
        let words = |h: &Handle| h.size_in_used() as usize / 4;
        [
            Arg::of::<u32>(&self.quants, words(&self.quants)),
            Arg::of::<u32>(&self.scales, words(&self.scales)),
        ]
    }

    /// The quant plane as vectors of 4 words (the wide mat-vec's 16-byte loads; the plane is
    /// its own allocation, so its start is aligned).
    fn quads(&self) -> Arg<'_> {
        Arg::vec::<u32>(&self.quants, self.quants.size_in_used() as usize / 16, 4)
    }
}

/// How prefill multiplies a batch by a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPrecision {
    /// `f32` operands (TF32 on NVIDIA's matrix units), cubek's default strategy: devices
    /// without f16 matrix units (lavapipe, gfx1030).
    F32,
    /// `f16` operands, `f32` accumulation and output, on the matrix units; `tma` selects cubek's
    /// TMA-fed warp-specialized strategy (Hopper), else cubek's default.
    F16 { tma: bool },
}

impl PrefillPrecision {
    /// Bytes of one scratch element.
    pub fn elem_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 { .. } => 2,
        }
    }
}

/// The prefill precision of `client`'s device: f16 where its matrix units multiply f16 into
/// f32 (cmma or mma), else f32. `ROCFORGE_PREFILL=f32` forces f32 (A/B runs).
pub fn prefill_precision<R: Runtime>(client: &ComputeClient<R>) -> PrefillPrecision {
    static FORCE_F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *FORCE_F32.get_or_init(|| std::env::var("ROCFORGE_PREFILL").is_ok_and(|v| v == "f32")) {
        return PrefillPrecision::F32;
    }
    let props = client.properties();
    let (f16, f32) = (
        half::f16::as_type_native_unchecked().storage_type(),
        f32::as_type_native_unchecked().storage_type(),
    );
    let mm = &props.features.matmul;
    let units = mm
        .cmma
        .iter()
        .chain(mm.mma.iter())
        .any(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32);
    if units && props.supports_type(half::f16::as_type_native_unchecked()) {
        PrefillPrecision::F16 {
            tma: !props.features.tma.is_empty(),
        }
    } else {
        PrefillPrecision::F32
    }
}

/// A reusable buffer for the prefill dequantize pass: size it once for the largest weight
/// (`rows * cols` elements) and pass it to every [`matmul`]. Its elements are `f16` where the
/// device multiplies f16 on its matrix units ([`prefill_precision`]), else `f32`; with f16 it
/// also holds the batch's activations as f16, grown to the largest batch seen.
pub struct DequantScratch<R: Runtime> {
    handle: Handle,
    elems: usize,
    precision: PrefillPrecision,
    activations: std::sync::Mutex<Option<(Handle, usize)>>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> DequantScratch<R> {
    pub fn new(client: &ComputeClient<R>, elems: usize) -> Self {
        Self::with_precision(client, elems, prefill_precision(client))
    }

    /// A scratch of `precision`'s element type whatever the device prefers (tests).
    pub fn with_precision(
        client: &ComputeClient<R>,
        elems: usize,
        precision: PrefillPrecision,
    ) -> Self {
        Self {
            handle: client.empty(elems.max(1) * precision.elem_bytes()),
            elems,
            precision,
            activations: std::sync::Mutex::new(None),
            _runtime: PhantomData,
        }
    }

    /// Elements the buffer holds.
    pub fn elems(&self) -> usize {
        self.elems
    }

    /// The element type of the scratch (and of the matmul's operands).
    pub fn precision(&self) -> PrefillPrecision {
        self.precision
    }

    /// The buffer: after [`dequantize`], the weight as row-major `[rows, cols]` of
    /// [`Self::precision`]'s element type.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// An f16 buffer of at least `elems` elements for the activations.
    fn activations(&self, client: &ComputeClient<R>, elems: usize) -> Handle {
        let mut a = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        match &*a {
            Some((h, n)) if *n >= elems => h.clone(),
            _ => {
                let h = client.empty(elems.max(1) * 2);
                *a = Some((h.clone(), elems));
                h
            }
        }
    }
}

/// `y[r] (+)= W[r, :] · x` for one token: `x` holds `cols` `f32`, `y` `rows` `f32`.
pub fn matvec<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    y: &Handle,
    epilogue: Epilogue,
) -> Result<(), MatmulError> {
    launch_matvec(
        client,
        &Matvec {
            epilogue,
            ..Matvec::new(w, x, y)
        },
    )
}

/// `h[r] = act(gate[r, :] · x) * (up[r, :] · x)` for one token, in one launch.
pub fn matvec_gated<R: Runtime>(
    client: &ComputeClient<R>,
    gate: &QWeight<R>,
    up: &QWeight<R>,
    act: GateAct,
    x: &Handle,
    h: &Handle,
) -> Result<(), MatmulError> {
    launch_matvec(
        client,
        &Matvec {
            up: Some((up, act)),
            ..Matvec::new(gate, x, h)
        },
    )
}

/// Whether [`matvec_norm`] and [`matvec_gated_norm`] take `w`: its columns must read as vec4,
/// as every mat-vec's do (true for every quantized format, whose blocks are 32 or 256 wide).
pub fn fuses_norm<R: Runtime>(_client: &ComputeClient<R>, w: &QWeight<R>) -> bool {
    w.cols % 4 == 0
}

/// `y[r] = W[r, :] · rmsnorm(x, norm_w, eps)` for one token: `x` and `norm_w` hold `cols`
/// `f32`. The RMSNorm (llama.cpp's: `x / sqrt(mean(x^2) + eps) * norm_w`) folded into the
/// projection saves its launch.
pub fn matvec_norm<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    norm_w: &Handle,
    eps: f32,
    y: &Handle,
) -> Result<(), MatmulError> {
    launch_matvec(
        client,
        &Matvec {
            norm: Some((norm_w, eps)),
            ..Matvec::new(w, x, y)
        },
    )
}

/// `h[r] = act(gate[r, :] · n) * (up[r, :] · n)`, `n = rmsnorm(x, norm_w, eps)`, for one
/// token in one launch (the feed-forward's norm, input projections and activation).
#[allow(clippy::too_many_arguments)]
pub fn matvec_gated_norm<R: Runtime>(
    client: &ComputeClient<R>,
    gate: &QWeight<R>,
    up: &QWeight<R>,
    act: GateAct,
    x: &Handle,
    norm_w: &Handle,
    eps: f32,
    h: &Handle,
) -> Result<(), MatmulError> {
    launch_matvec(
        client,
        &Matvec {
            up: Some((up, act)),
            norm: Some((norm_w, eps)),
            ..Matvec::new(gate, x, h)
        },
    )
}

/// Device buffers for `x` as packed halves, for the single-token mat-vec of the formats with
/// `KernelFormat::half_x` (`Fusion::half_x`): `xh` holds `cols` halves, `xsc` one `f32` scale per 32 columns.
/// One per backend, sized for its widest matrix; the launches of a step reuse it in stream
/// order. Only where the device has `f16` ([`HalfActs::new`]).
pub struct HalfActs<R: Runtime> {
    xh: Handle,
    xsc: Handle,
    cols: usize,
    min_weights: usize,
    /// Columns and layout of the last conversion launched, so that `half_ready` never hands a
    /// launch `x` in another launch's order.
    written: std::sync::Mutex<Option<(usize, XLayout)>>,
    _runtime: PhantomData<fn() -> R>,
}

/// Smallest weight (rows x cols) that takes the half path by default: the conversion is one more
/// launch (about 2 µs of GPU time between kernels), which a matrix must win back. Measured on the
/// H200 (docs/performance.md, "half activations"): the 8B shape's 4096-14336-column matrices
/// gain 5-10 µs each, SmolLM2's (576 x 576 to 1536 x 576) lose.
pub const HALF_X_MIN_WEIGHTS: usize = 1 << 24;

impl<R: Runtime> HalfActs<R> {
    /// Buffers for rows of up to `max_cols` columns, or `None` where the device lacks `f16`
    /// arithmetic or `ROCFORGE_MATVEC_X=f32` asks for the `f32` path (A/B runs).
    /// `ROCFORGE_MATVEC_HALF_MIN=N` moves the size threshold ([`HALF_X_MIN_WEIGHTS`]; 0: every
    /// matrix of a half format).
    pub fn new(client: &ComputeClient<R>, max_cols: usize) -> Option<Self> {
        if std::env::var("ROCFORGE_MATVEC_X").is_ok_and(|v| v == "f32") {
            return None;
        }
        let min = std::env::var("ROCFORGE_MATVEC_HALF_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(HALF_X_MIN_WEIGHTS);
        Self::forced(client, max_cols).map(|h| Self {
            min_weights: min,
            ..h
        })
    }

    /// As [`Self::new`] whatever `ROCFORGE_MATVEC_X` says (tests). wgpu is left out: naga
    /// (its WGSL front end) mistypes a bitcast between `u32` and `vec2<f16>` and rejects the
    /// kernel, and the packed pairs are built by exactly that bitcast.
    pub fn forced(client: &ComputeClient<R>, max_cols: usize) -> Option<Self> {
        if R::name(client).starts_with("wgpu")
            || !client
                .properties()
                .supports_type(half::f16::as_type_native_unchecked())
        {
            return None;
        }
        Some(Self::conversion_only(client, max_cols))
    }

    /// Buffers for the conversion alone, on any device: [`kernels::half_x_kernel`] uses no
    /// `f16` type, so it runs (and is tested) where the half mat-vec cannot, wgpu included.
    pub fn conversion_only(client: &ComputeClient<R>, max_cols: usize) -> Self {
        let cols = max_cols.next_multiple_of(32).max(32);
        Self {
            xh: client.empty(cols * 2),
            xsc: client.empty(cols / 32 * 4),
            cols,
            min_weights: 0,
            written: std::sync::Mutex::new(None),
            _runtime: PhantomData,
        }
    }

    /// Converts `cols` values of `x` (with `norm`, `rmsnorm(x) * norm_w` first) into the
    /// buffers in column order, as a narrow half mat-vec does before its product. `cols` must
    /// be a multiple of 32 that fits the buffers.
    pub fn convert(
        &self,
        client: &ComputeClient<R>,
        x: &Handle,
        norm: Option<(&Handle, f32)>,
        cols: usize,
    ) -> Result<(), MatmulError> {
        self.convert_as(client, x, norm, cols, XLayout::COLUMNS)
    }

    /// [`Self::convert`] with the pieces in `layout`'s order (a wide launch's
    /// [`MatvecConfig::x_layout`]); `cols` must also be a multiple of `layout.chunk_cols`.
    pub fn convert_as(
        &self,
        client: &ComputeClient<R>,
        x: &Handle,
        norm: Option<(&Handle, f32)>,
        cols: usize,
        layout: XLayout,
    ) -> Result<(), MatmulError> {
        // Q6_K's chunks tile whole 256-column blocks.
        let chunk = if layout.q6k {
            256
        } else {
            (layout.chunk_cols as usize).max(32)
        };
        if cols > self.cols {
            return Err(MatmulError::BufferTooSmall {
                what: "half activations",
                needed: cols as u64 * 2,
                got: self.cols as u64 * 2,
            });
        }
        if cols == 0
            || cols % chunk != 0
            || (layout.chunk_cols > 0 && (layout.chunk_cols % 8 != 0 || layout.group == 0))
            || (layout.q6k && layout.chunk_cols != 64)
        {
            return Err(MatmulError::HalfLayout(format!(
                "{cols} columns do not tile {layout:?}"
            )));
        }
        check_buffer("x", x, cols)?;
        if let Some((n, _)) = norm {
            check_buffer("norm_w", n, cols)?;
        }
        half_x(client, x, norm, cols, self, layout)
    }

    /// The buffers read back: the halves' bits (in the kernel's pair order) and the scales
    /// of every 32 columns they hold.
    pub fn read(&self, client: &ComputeClient<R>) -> Result<(Vec<u16>, Vec<f32>), MatmulError> {
        let read = |h: &Handle| {
            client
                .read_one(h.clone())
                .map_err(|e| MatmulError::Matmul(format!("reading half activations: {e:?}")))
        };
        let (h, s) = (read(&self.xh)?, read(&self.xsc)?);
        Ok((
            h.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            f32::from_bytes(&s).to_vec(),
        ))
    }

    /// Columns and layout of the last conversion launched into the buffers.
    fn last_written(&self) -> Option<(usize, XLayout)> {
        *self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `op` runs on halves: one token, a format with a half path, a row that fits, a
    /// matrix large enough.
    fn takes(&self, op: &Matvec<'_, R>) -> bool {
        op.tokens == 1
            // Q6_K has only the wide layout's half path.
            && (op.w.format.half_x() || (op.w.format.matvec_half() && knobs().wide))
            && op.w.cols <= self.cols
            && op.w.rows * op.w.cols >= self.min_weights
    }
}

/// One mat-vec launch with its fusions: `y (+)= W·x` for `tokens` tokens, or with `up` the
/// gated pair `y = act(W·x) * (up·x)`, with `norm` on `x` first (`up` and `norm`: one token).
/// With `half`, a single token of a `KernelFormat::half_x` format converts `x` to packed halves
/// first (one more launch, which applies `norm`) and multiplies in half math.
pub struct Matvec<'a, R: Runtime> {
    pub w: &'a QWeight<R>,
    pub up: Option<(&'a QWeight<R>, GateAct)>,
    pub norm: Option<(&'a Handle, f32)>,
    pub x: &'a Handle,
    pub y: &'a Handle,
    pub tokens: usize,
    pub epilogue: Epilogue,
    pub half: Option<&'a HalfActs<R>>,
    /// `half` already holds this `x` (and norm), converted by the previous launch of the same
    /// input (the row blocks of a split output matrix): skip the conversion.
    pub half_ready: bool,
    /// A plane per row group (see [`whole_rows`]: several tokens, or one on half activations
    /// over a matrix that fills the device): `None` takes that rule; `Some` fixes it (tests
    /// run both layouts on every device).
    pub whole_rows: Option<bool>,
}

impl<'a, R: Runtime> Matvec<'a, R> {
    /// `y = W·x` for one token.
    pub fn new(w: &'a QWeight<R>, x: &'a Handle, y: &'a Handle) -> Self {
        Self {
            w,
            up: None,
            norm: None,
            x,
            y,
            tokens: 1,
            epilogue: Epilogue::Store,
            half: None,
            half_ready: false,
            whole_rows: None,
        }
    }

    /// The mat-vec kernel's comptime fusion for this call (with half activations the norm
    /// belongs to the preparing launch).
    pub fn fusion(&self) -> Fusion {
        let half_x = self.half.is_some_and(|h| h.takes(self));
        Fusion {
            tokens: self.tokens as u32,
            accumulate: self.epilogue == Epilogue::Accumulate,
            norm: self.norm.is_some() && !half_x,
            gated: self.up.is_some(),
            gelu: matches!(self.up, Some((_, GateAct::GeluTanh))),
            half_x,
        }
    }
}

/// The one mat-vec launcher: validates `op` and launches [`kernels::matvec_kernel`].
pub fn launch_matvec<R: Runtime>(
    client: &ComputeClient<R>,
    op: &Matvec<'_, R>,
) -> Result<(), MatmulError> {
    let w = op.w;
    if op.tokens == 0 {
        return Ok(());
    }
    if op.tokens > MAX_MATVEC_TOKENS
        || ((op.up.is_some() || op.norm.is_some()) && op.tokens != 1)
        || (op.up.is_some() && op.epilogue == Epilogue::Accumulate)
    {
        return Err(MatmulError::Fusion(format!(
            "{} tokens, gated {}, norm {}, {:?}",
            op.tokens,
            op.up.is_some(),
            op.norm.is_some(),
            op.epilogue
        )));
    }
    if w.cols % 4 != 0 {
        return Err(MatmulError::BadShape {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
        });
    }
    if let Some((up, _)) = op.up {
        if (w.ty, w.rows, w.cols) != (up.ty, up.rows, up.cols) {
            return Err(MatmulError::Mismatch(format!(
                "gate {} {}x{}, up {} {}x{}",
                w.ty, w.rows, w.cols, up.ty, up.rows, up.cols
            )));
        }
    }
    check_buffer("x", op.x, op.tokens * w.cols)?;
    check_buffer("y", op.y, op.tokens * w.rows)?;
    let norm_w = match op.norm {
        Some((h, _)) => {
            check_buffer("norm_w", h, w.cols)?;
            h
        }
        None => op.x,
    };
    let w2 = op.up.map_or(w, |(up, _)| up);
    let fusion = op.fusion();
    let base = matvec_config(client);
    let cfg = cfg_for(
        base,
        fusion,
        w.format,
        op.whole_rows
            .unwrap_or_else(|| whole_rows(client, op.tokens, w.rows, fusion.half_x)),
        long_rows(base, w.format, w.cols),
    );
    let (xh, xsc, xh4) = match op.half {
        Some(h) if fusion.half_x => {
            let layout = cfg.x_layout(w.format);
            if !op.half_ready || h.last_written() != Some((w.cols, layout)) {
                half_x(client, op.x, op.norm, w.cols, h, layout)?;
            }
            (
                Arg::vec::<u32>(&h.xh, h.cols / 4, 2),
                Arg::of::<f32>(&h.xsc, h.cols / 32),
                Arg::vec::<u32>(&h.xh, h.cols / 8, 4),
            )
        }
        // Unread: `x` stands in.
        _ => (
            Arg::vec::<u32>(op.x, op.tokens * w.cols / 2, 2),
            Arg::of::<f32>(op.x, op.tokens * w.cols),
            Arg::vec::<u32>(op.x, op.tokens * w.cols / 4, 4),
        ),
    };
    let kernel = kernels::matvec_kernel::MatvecKernel::<R>::new(
        launch::settings(CubeDim::new_2d(cfg.lanes, cfg.planes_per_cube)),
        client.clone(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        (),
        (),
        (),
        (),
        w.format,
        cfg,
        fusion,
    );
    let ([wq, ws], [uq, us]) = (w.args(), w2.args());
    // SAFETY: the buffers were checked against the shape above; the kernel guards its rows.
    unsafe {
        launch::launch(
            client,
            kernel,
            matvec_cube_count(w.rows, cfg),
            &[
                wq,
                ws,
                uq,
                us,
                Arg::vec::<f32>(op.x, op.tokens * w.cols / 4, 4),
                Arg::vec::<f32>(norm_w, w.cols / 4, 4),
                xh,
                xsc,
                w.quads(),
                w2.quads(),
                xh4,
                Arg::of::<f32>(op.y, op.tokens * w.rows),
                Arg::U32(w.rows as u32),
                Arg::U32(w.cols as u32),
                Arg::U32(w.blocks_per_row),
                Arg::F32(op.norm.map_or(0.0, |(_, eps)| eps)),
            ],
        )
    };
    Ok(())
}

/// `h.xh`, `h.xsc` = `x` (or `rmsnorm(x) * norm_w`) as packed halves scaled per 32 columns,
/// in `layout`'s order ([`kernels::half_x_kernel`]); `x` and `norm_w` were checked to hold
/// `cols` values, `cols` is a multiple of the layout's chunk.
fn half_x<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    norm: Option<(&Handle, f32)>,
    cols: usize,
    h: &HalfActs<R>,
    layout: XLayout,
) -> Result<(), MatmulError> {
    let kernel = kernels::half_x_kernel::HalfXKernel::<R>::new(
        launch::settings(CubeDim::new_1d(kernels::HALF_X_THREADS)),
        client.clone(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        (),
        (),
        norm.is_some(),
        layout,
    );
    let norm_w = norm.map_or(x, |(n, _)| n);
    let blocks = (cols / 32) as u32;
    // SAFETY: `x`/`norm_w` hold `cols` values (checked by the caller), `h` at least `cols`
    // halves and `cols / 32` scales (`HalfActs::takes`); the kernel guards its blocks.
    unsafe {
        launch::launch(
            client,
            kernel,
            grid(blocks.div_ceil(kernels::HALF_X_THREADS)),
            &[
                Arg::vec::<f32>(x, cols / 4, 4),
                Arg::vec::<f32>(norm_w, cols / 4, 4),
                Arg::vec::<u32>(&h.xh, h.cols / 4, 2),
                Arg::of::<f32>(&h.xsc, h.cols / 32),
                Arg::U32(cols as u32),
                Arg::F32(norm.map_or(0.0, |(_, eps)| eps)),
            ],
        )
    };
    *h.written.lock().unwrap_or_else(|e| e.into_inner()) = Some((cols, layout));
    Ok(())
}

/// `Y[t, r] = W[r, :] · X[t, :]` for `n_tokens` tokens: `x` is row-major `[n_tokens, cols]`,
/// `y` row-major `[n_tokens, rows]`, both `f32`. Batches up to [`MAX_MATVEC_TOKENS`] run as a
/// multi-token mat-vec and need no `scratch`; larger ones need one of at least `rows * cols`
/// elements.
pub fn matmul<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    y: &Handle,
    n_tokens: usize,
    scratch: Option<&DequantScratch<R>>,
) -> Result<(), MatmulError> {
    if n_tokens <= MAX_MATVEC_TOKENS {
        return launch_matvec(
            client,
            &Matvec {
                tokens: n_tokens,
                ..Matvec::new(w, x, y)
            },
        );
    }
    if let (PrefillKernel::Mma(cfg), 0) = (prefill_kernel(client, n_tokens), w.cols % 8) {
        let cfg = mma_tile(client, w, n_tokens, cfg);
        return launch_mma(client, w, x, y, n_tokens, cfg).map(drop);
    }
    matmul_dequantized(client, w, x, y, n_tokens, scratch)
}

/// [`matmul`] through the dequantize pass and cubek, whatever [`prefill_kernel`] says (tests and
/// A/B runs compare both paths).
pub fn matmul_dequantized<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    y: &Handle,
    n_tokens: usize,
    scratch: Option<&DequantScratch<R>>,
) -> Result<(), MatmulError> {
    let scratch = scratch.ok_or(MatmulError::BufferTooSmall {
        what: "scratch",
        needed: (w.rows * w.cols) as u64 * 4,
        got: 0,
    })?;
    check_buffer("x", x, n_tokens * w.cols)?;
    check_buffer("y", y, n_tokens * w.rows)?;
    dequantize(client, w, scratch)?;
    let f32_ty = f32::as_type_native_unchecked().storage_type();
    let binding = |h: &Handle, shape: [usize; 2], strides: [usize; 2]| TensorBinding::<R> {
        handle: h.clone().binding(),
        shape: shape.to_vec().into(),
        strides: strides.to_vec().into(),
        runtime: PhantomData,
    };
    let (k, n) = (w.cols, w.rows);
    let PrefillPrecision::F16 { tma } = scratch.precision else {
        let out = binding(y, [n_tokens, n], [n, 1]);
        let lhs = InputBinding::Normal(binding(x, [n_tokens, k], [k, 1]), f32_ty);
        // W is [n, k] row-major in scratch: read as the column-major [k, n] right operand.
        let rhs = InputBinding::Normal(binding(&scratch.handle, [k, n], [1, k]), f32_ty);
        let mut dtypes = MatmulElems::from_single_dtype(f32::as_type_native_unchecked());
        return launch_ref(&Strategy::Auto, client, lhs, rhs, out, &mut dtypes)
            .map_err(|e| MatmulError::Matmul(format!("{e:?}")));
    };
    let f16_ty = half::f16::as_type_native_unchecked().storage_type();
    let x16 = scratch.activations(client, n_tokens * k);
    to_f16(client, x, &x16, n_tokens * k, false)?;
    // f16 operands, f32 accumulation and output.
    let mut dtypes = MatmulElems {
        lhs_global: f16_ty,
        rhs_global: f16_ty,
        acc_global: f32_ty,
        lhs_stage: f16_ty,
        rhs_stage: f16_ty,
        acc_stage: f32_ty,
        lhs_register: f16_ty,
        rhs_register: f16_ty,
        acc_register: f32_ty,
    };
    let run = |strategy: &Strategy, dtypes: &mut MatmulElems| {
        let lhs = InputBinding::Normal(binding(&x16, [n_tokens, k], [k, 1]), f16_ty);
        let rhs = InputBinding::Normal(binding(&scratch.handle, [k, n], [1, k]), f16_ty);
        let out = binding(y, [n_tokens, n], [n, 1]);
        launch_ref(strategy, client, lhs, rhs, out, dtypes)
    };
    // Measured on the H200 (docs/performance.md, "prefill mat-mat by element type and
    // strategy"): the TMA-fed warp-specialized strategy ran the 8B shapes at 100-190 TFLOP/s
    // in f16, cubek's default 48-59. TMA needs 16-byte row strides (k a multiple of 8 halves, n
    // of 4 floats); other shapes, or a configuration cubek refuses, take the default strategy.
    if tma && k % 8 == 0 && n % 4 == 0 {
        let strategy = Strategy::SpecializedTmaMma(Default::default());
        if run(&strategy, &mut dtypes.clone()).is_ok() {
            return Ok(());
        }
    }
    run(&Strategy::Auto, &mut dtypes).map_err(|e| MatmulError::Matmul(format!("{e:?}")))
}

/// How a batch above [`MAX_MATVEC_TOKENS`] tokens is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The quantized mat-mat on the matrix units ([`mma::mma_kernel`]): weights read in their
    /// uploaded layout, no scratch.
    Mma(MmaConfig),
    /// The dequantize pass into a [`DequantScratch`], then cubek's matmul.
    Dequantize,
}

/// The quantized mat-mat's tiles, `[planes_m, planes_n, frags_m, frags_n, k_step]` (see
/// [`MmaConfig`]), for up to 32 tokens, up to 64, up to 256 and more: 32x32 (4 planes), 64x128
/// (16 planes, 256-column steps), 128x128 and 128x256 (16 planes, 128-column steps). Chosen on
/// the H200 from `quant_matmul`'s sweeps of the 8B shapes in Q4_0 (docs/performance.md): a
/// decode step of 64 sequences decodes each weight once in the 64x128 tile, with its column
/// splits ([`mma_splits`]) filling the SMs; from 128 tokens the taller tiles decode each
/// weight fewer times. One cube fills an SM's registers either way; 16 planes keep twice the
/// warps resident to hide the staging loads' latency (the 64x128 tile on 8 planes was 15-50 %
/// slower once its staging was lean).
pub const MMA_TILES: [[u32; 5]; 4] = [
    [2, 2, 1, 1, 256],
    [4, 4, 1, 2, 256],
    [4, 4, 2, 2, 128],
    [4, 4, 2, 4, 128],
];

/// The quantized mat-mat's tuning knobs, read once from the environment (see
/// [`prefill_kernel`]).
struct MmaKnobs {
    off: bool,
    wide: Option<bool>,
    tile: Option<[u32; 5]>,
    max: Option<usize>,
}

fn mma_knobs() -> &'static MmaKnobs {
    static KNOBS: std::sync::OnceLock<MmaKnobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(|| MmaKnobs {
        off: std::env::var("ROCFORGE_MMA").is_ok_and(|v| v == "0"),
        wide: std::env::var("ROCFORGE_MMA_WIDE").ok().map(|v| v != "0"),
        tile: std::env::var("ROCFORGE_MMA_TILE").ok().and_then(|v| {
            let p: Vec<u32> = v.split(',').filter_map(|t| t.trim().parse().ok()).collect();
            let k = p.get(4).copied().unwrap_or(256);
            let ok = matches!(p.len(), 4 | 5)
                && p[..4].iter().all(|&n| (1..=4).contains(&n))
                && p[0] * p[1] <= 16
                && matches!(k, 128 | 256);
            ok.then(|| [p[0], p[1], p[2], p[3], k])
        }),
        max: std::env::var("ROCFORGE_MMA_MAX")
            .ok()
            .and_then(|v| v.parse().ok()),
    })
}

/// The tile [`matmul`] launches for weight `w` and `n_tokens` tokens, from `cfg`
/// ([`prefill_kernel`]'s pick by batch size): above 32 tokens, the tallest tile of
/// [`MMA_TILES`] no taller than `cfg` (and as far as the device's shared memory holds it) that
/// still gives the device at least half as many cubes as it has SMs (tiles times the column
/// splits its steps allow), else the one with the most cubes. Measured on the H200 (docs/performance.md): SmolLM2's
/// 960x576 QKV at 512 tokens is 16 tiles of 128x256 that cannot be split (0.036 ms a call),
/// 480 tiles of 32x32 (0.023); its 1536x576 up/gate take 64x128 (96 tiles, 0.024 against
/// 0.036); at 64 tokens its weights are 5 to 12 tiles of 64x128, so they take 32x32. A
/// `ROCFORGE_MMA_TILE` override is kept as it is. The staging is [`mma_wide`]'s pick for the
/// weight's format and `n_tokens`.
pub fn mma_tile<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    n_tokens: usize,
    cfg: MmaConfig,
) -> MmaConfig {
    let cfg = MmaConfig {
        wide: mma_wide(n_tokens, w.format),
        ..cfg
    };
    let hw = &client.properties().hardware;
    let Some(sms) = hw.num_streaming_multiprocessors else {
        return cfg;
    };
    if mma_knobs().tile.is_some() || n_tokens <= 32 {
        return cfg;
    }
    let tile = |t: [u32; 5]| MmaConfig {
        wide: cfg.wide,
        ..MmaConfig::from_tile(cfg.plane, t)
    };
    let cubes = |c: &MmaConfig| {
        let tiles = w.rows.div_ceil(c.block_n() as usize) * n_tokens.div_ceil(c.block_m() as usize);
        let steps = w.cols.div_ceil(c.k_step as usize);
        tiles * (steps / 4).max(1)
    };
    let fits = |c: &MmaConfig| {
        c.block_m() <= cfg.block_m() && c.shared_bytes() <= hw.max_shared_memory_size
    };
    let candidates: Vec<MmaConfig> = [
        cfg,
        tile(MMA_TILES[2]),
        tile(MMA_TILES[1]),
        tile(MMA_TILES[0]),
    ]
    .into_iter()
    .filter(fits)
    .collect();
    candidates
        .iter()
        .find(|c| 2 * cubes(c) >= sms as usize)
        .or_else(|| candidates.iter().max_by_key(|c| cubes(c)))
        .copied()
        .unwrap_or(cfg)
}

/// The plane width of `client`'s device when its `cmma` multiplies 16x16x16 `f16` tiles into
/// `f32` and that width is fixed (16 to 256, dividing 256): what the kernels on the matrix
/// units (the quantized mat-mat, flash attention) need. `None` elsewhere (lavapipe).
pub fn f16_cmma_plane<R: Runtime>(client: &ComputeClient<R>) -> Option<u32> {
    let props = client.properties();
    let hw = &props.hardware;
    let (f16, f32) = (
        half::f16::as_type_native_unchecked().storage_type(),
        f32::as_type_native_unchecked().storage_type(),
    );
    let cmma = props.features.matmul.cmma.iter().any(|c| {
        c.a_type == f16 && c.b_type == f16 && c.cd_type == f32 && (c.m, c.n, c.k) == (16, 16, 16)
    });
    let plane = hw.plane_size_max;
    (cmma
        && props.supports_type(half::f16::as_type_native_unchecked())
        && hw.plane_size_min == plane
        && 256 % plane == 0
        && plane >= 16)
        .then_some(plane)
}

/// Batches of at least this many tokens stage a 32-weight format's weights wide
/// ([`MmaConfig::wide`]).
pub const MMA_WIDE_MIN_TOKENS: usize = 65;

/// Whether a mat-mat of `n_tokens` tokens by a weight of format `fmt` stages the weight wide,
/// 16-byte loads of several slots with their scales decoded once ([`MmaConfig::wide`]).
/// Measured on the H200 in one binary (`ROCFORGE_MMA_WIDE=0|1`, docs/performance.md):
/// - `Q4_K`/`Q5_K` always: a slot's 6-bit scales cost more to decode than its weights, so the
///   kernel is bound by the staging's instructions at every batch size (8B Q4_K_M pp512 10,370
///   t/s wide against 8,418, 64 sequences 3,806 decode-phase t/s against 3,277);
/// - the 32-weight formats from [`MMA_WIDE_MIN_TOKENS`] tokens (prefill), where each weight is
///   decoded by several token tiles (8B Q4_0 pp512 12,318-12,321 against 11,639-11,698); a
///   batched-decode step of up to 64 tokens decodes each weight once and waits on its loads,
///   and there a slot per load is faster (64 sequences: 4,459-4,478 against 4,144-4,160).
///
/// Formats without a wide staging (`Q5_0`, `Q5_1`, `Q6_K`, the float formats) answer false.
/// `ROCFORGE_MMA_WIDE=0|1` fixes it for the others (A/B runs).
pub fn mma_wide(n_tokens: usize, fmt: KernelFormat) -> bool {
    // A format without a wide staging has one kernel (its config says so, so that the
    // variants launched are the ones hip-check compiles).
    fmt.mma_quad() > 1
        && mma_knobs().wide.unwrap_or(
            n_tokens >= MMA_WIDE_MIN_TOKENS || matches!(fmt, KernelFormat::Q4K | KernelFormat::Q5K),
        )
}

/// The mat-mat for `n_tokens` tokens on `client`'s device: [`PrefillKernel::Mma`] where the
/// device's `cmma` multiplies 16x16x16 f16 tiles into f32 and its plane width is fixed,
/// otherwise [`PrefillKernel::Dequantize`].
///
/// Tile (tokens x weight rows per cube, [`MMA_TILES`]): 32x32 up to 32 tokens, 64x128 up to
/// 64, 128x128 up to 256, 128x256 above (a batched-decode step's few tiles are spread over the
/// SMs by [`mma_splits`]). Tuning runs
/// override it, read once: `ROCFORGE_MMA=0` (always dequantize), `ROCFORGE_MMA_TILE=pm,pn,fm,fn[,k]`
/// (planes and fragments along tokens and rows, `pm * pn` at most 16, fragments at most 4 each;
/// columns per step, 128 or 256, default 256),
/// `ROCFORGE_MMA_MAX=N` (dequantize above N tokens), `ROCFORGE_MMA_WIDE=0|1` (see
/// [`mma_wide`]).
pub fn prefill_kernel<R: Runtime>(client: &ComputeClient<R>, n_tokens: usize) -> PrefillKernel {
    let k = mma_knobs();
    if k.off || k.max.is_some_and(|max| n_tokens > max) {
        return PrefillKernel::Dequantize;
    }
    let hw = &client.properties().hardware;
    let Some(plane) = f16_cmma_plane(client) else {
        return PrefillKernel::Dequantize;
    };
    let tile = |t: [u32; 5]| MmaConfig::from_tile(plane, t);
    let cfg = tile(k.tile.unwrap_or(match n_tokens {
        0..=32 => MMA_TILES[0],
        33..=64 => MMA_TILES[1],
        65..=256 => MMA_TILES[2],
        _ => MMA_TILES[3],
    }));
    // A device whose cubes hold less shared memory (RDNA3: 64 KiB) takes the smallest tile
    // if that fits.
    let fits = |c: &MmaConfig| c.shared_bytes() <= hw.max_shared_memory_size;
    match [cfg, tile(MMA_TILES[0])].into_iter().find(fits) {
        Some(cfg) => PrefillKernel::Mma(cfg),
        None => PrefillKernel::Dequantize,
    }
}

/// `y = W·x` for `n_tokens` tokens with the quantized mat-mat (see [`prefill_kernel`]), its
/// columns split over [`mma_splits`] cubes per tile. Returns the kernel launches it made: the
/// `f16` conversion of `x`, the mat-mat and, when the columns are split, the sum of the partial
/// products.
pub fn launch_mma<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    y: &Handle,
    n_tokens: usize,
    cfg: MmaConfig,
) -> Result<u64, MatmulError> {
    let splits = mma_splits(client, w, n_tokens, cfg);
    launch_mma_split(client, w, x, y, n_tokens, cfg, splits)
}

/// [`launch_mma`] on activations already in `f16` in the kernel's staging order (`x16`:
/// `n_tokens` rows of `w.cols`, each run of 4 in pair order, as the RMSNorm and the gated
/// activation write them for it: `norm::launch_rms_norm`, `activation::launch_gated_half`),
/// which saves the conversion's launch. Returns its launches.
pub fn launch_mma_half<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x16: &Handle,
    y: &Handle,
    n_tokens: usize,
    cfg: MmaConfig,
) -> Result<u64, MatmulError> {
    let splits = mma_splits(client, w, n_tokens, cfg);
    mma_checked(w, y, n_tokens, cfg, splits)?;
    check_half_buffer("x16", x16, n_tokens * w.cols)?;
    Ok(mma_on_half(client, w, x16, y, n_tokens, cfg, splits))
}

/// How many cubes share a tile's columns ([`mma::mma_kernel`]'s grid `z`). A launch with few
/// tiles (a batched-decode step: 64 tokens of a 4096-row weight are 32 tiles of 64x128) leaves
/// most SMs idle; splitting its columns fills them. Measured on the H200 (`quant_matmul
/// --splits`, docs/performance.md): the best count is about `SMs x (cubes an SM holds / 2)
/// / tiles` (64x128 tiles, 2 per SM: one cube per SM; 32x32 tiles, 6 per SM: three), and each
/// split keeps at least 4 steps of `cfg.k_step` columns. 1 where the tiles fill the device
/// or its SM count is unknown. `ROCFORGE_MMA_SPLIT=N` fixes it (A/B runs).
pub fn mma_splits<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    n_tokens: usize,
    cfg: MmaConfig,
) -> u32 {
    static KNOB: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let steps = (w.cols as u32).div_ceil(cfg.k_step).max(1);
    let fixed = *KNOB.get_or_init(|| {
        std::env::var("ROCFORGE_MMA_SPLIT")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&n| n >= 1)
    });
    let hw = &client.properties().hardware;
    let want = match (fixed, hw.num_streaming_multiprocessors) {
        (Some(n), _) => n,
        (None, Some(sms)) => {
            let tiles = (w.rows.div_ceil(cfg.block_n() as usize)
                * n_tokens.div_ceil(cfg.block_m() as usize)) as u32;
            let resident = (hw.max_shared_memory_size / cfg.shared_bytes().max(1)) as u32;
            (sms * (resident / 2).max(1) / tiles.max(1)).min(steps / 4)
        }
        (None, None) => 1,
    };
    // Whole steps per split, no empty split.
    let per = steps.div_ceil(want.clamp(1, steps));
    steps.div_ceil(per)
}

/// [`launch_mma`] with `splits` cubes per tile along the columns (rounded to whole steps);
/// returns its launches.
pub fn launch_mma_split<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x: &Handle,
    y: &Handle,
    n_tokens: usize,
    cfg: MmaConfig,
    splits: u32,
) -> Result<u64, MatmulError> {
    mma_checked(w, y, n_tokens, cfg, splits)?;
    check_buffer("x", x, n_tokens * w.cols)?;
    // The kernel stages x as f16: converted once here rather than by every cube that reads it.
    let x16 = client.empty(n_tokens * w.cols * 2);
    to_f16(client, x, &x16, n_tokens * w.cols, true)?;
    Ok(1 + mma_on_half(client, w, &x16, y, n_tokens, cfg, splits))
}

/// The mat-mat's checks of everything but its activations: the shape, the staging step, `y`,
/// and sizes within u32.
fn mma_checked<R: Runtime>(
    w: &QWeight<R>,
    y: &Handle,
    n_tokens: usize,
    cfg: MmaConfig,
    splits: u32,
) -> Result<(), MatmulError> {
    if w.cols % 8 != 0 {
        // `x` is read as f16 in 16-byte vectors.
        return Err(MatmulError::BadShape {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
        });
    }
    if !matches!(cfg.k_step, 128 | 256) {
        return Err(MatmulError::Matmul(format!(
            "the quantized mat-mat stages 128 or 256 columns per step, not {}",
            cfg.k_step
        )));
    }
    check_buffer("y", y, n_tokens * w.rows)?;
    let steps = (w.cols as u32).div_ceil(cfg.k_step).max(1);
    let splits = steps.div_ceil(steps.div_ceil(splits.clamp(1, steps)));
    check_u32((n_tokens * w.cols).max(n_tokens * w.rows * splits as usize) as u64)
}

/// The mat-mat (and the sum of its split partial products) on checked arguments; returns its
/// launches.
fn mma_on_half<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    x16: &Handle,
    y: &Handle,
    n_tokens: usize,
    cfg: MmaConfig,
    splits: u32,
) -> u64 {
    let steps = (w.cols as u32).div_ceil(cfg.k_step).max(1);
    let per = steps.div_ceil(splits.clamp(1, steps));
    let splits = steps.div_ceil(per);
    let out_len = n_tokens * w.rows * splits as usize;
    let (bm, bn) = (cfg.block_m() as usize, cfg.block_n() as usize);
    let count = CubeCount::new_3d(
        w.rows.div_ceil(bn) as u32,
        n_tokens.div_ceil(bm) as u32,
        splits,
    );
    let kernel = mma::mma_kernel::MmaKernel::<R>::new(
        launch::settings(CubeDim::new_2d(cfg.plane, cfg.planes_m * cfg.planes_n)),
        client.clone(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        (),
        (),
        (),
        (),
        (),
        w.format,
        cfg,
    );
    let [wq, ws] = w.args();
    let wq4 = w.quads();
    // Split partial products go to a scratch of `splits` outputs, then are added into y.
    let part = (splits > 1).then(|| client.empty(out_len * 4));
    // SAFETY: x and y (or the partials) hold the batch (checked above); the kernel masks rows,
    // tokens and columns past the shape, and reads only whole blocks of the weight's planes.
    unsafe {
        launch::launch(
            client,
            kernel,
            count,
            &[
                wq,
                wq4,
                ws,
                Arg::vec::<half::f16>(x16, n_tokens * w.cols / 8, 8),
                Arg::of::<f32>(part.as_ref().unwrap_or(y), out_len),
                Arg::U32(n_tokens as u32),
                Arg::U32(w.rows as u32),
                Arg::U32(w.cols as u32),
                Arg::U32(w.blocks_per_row),
                Arg::U32(per),
            ],
        )
    };
    if let Some(part) = part {
        let n = n_tokens * w.rows;
        let kernel = mma::split_sum_kernel::SplitSumKernel::<R>::new(
            launch::settings(CubeDim::new_1d(ROW_THREADS)),
            client.clone(),
            array_arg(),
            array_arg(),
            (),
            (),
        );
        // SAFETY: `part` holds `splits` outputs of `n` values, `y` one; the kernel guards `i < n`.
        unsafe {
            launch::launch(
                client,
                kernel,
                grid((n as u32).div_ceil(ROW_THREADS)),
                &[
                    Arg::of::<f32>(&part, out_len),
                    Arg::of::<f32>(y, n),
                    Arg::U32(n as u32),
                    Arg::U32(splits),
                ],
            )
        };
    }
    1 + u64::from(splits > 1)
}

/// `out = x` as f16 for `n` values, each run of 4 in pair order with `pairs` (the quantized
/// mat-mat's staging order, see `kernels::to_f16_kernel`).
fn to_f16<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    out: &Handle,
    n: usize,
    pairs: bool,
) -> Result<(), MatmulError> {
    check_u32(n as u64)?;
    let kernel = kernels::to_f16_kernel::ToF16Kernel::<R>::new(
        launch::settings(CubeDim::new_1d(ROW_THREADS)),
        client.clone(),
        array_arg(),
        array_arg(),
        (),
        pairs,
    );
    // SAFETY: both buffers hold `n` values (checked by the caller); the kernel guards `i < n`;
    // in pair order each source index stays in its run of 4 (`n` is a multiple of 8 here).
    unsafe {
        launch::launch(
            client,
            kernel,
            grid((n as u32).div_ceil(ROW_THREADS)),
            &[
                Arg::of::<f32>(x, n),
                Arg::of::<half::f16>(out, n),
                Arg::U32(n as u32),
            ],
        )
    };
    Ok(())
}

/// Lanes per cube of the dequantize pass and the embedding lookup.
pub(crate) const ROW_THREADS: u32 = 256;

/// Embedding lookup: `out[t, :] = W[id_t, :]` for `n` tokens, as `f32`. With `token0` the
/// single token travels as a kernel argument (decode: nothing to upload, `ids` unused);
/// otherwise `ids` holds `n` token ids, which the caller has checked are below `w.rows`.
pub fn embed<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    ids: &Handle,
    n: usize,
    token0: Option<u32>,
    out: &Handle,
) -> Result<(), MatmulError> {
    if let Some(t) = token0 {
        if n != 1 || t as usize >= w.rows {
            return Err(MatmulError::BadShape {
                ty: w.ty,
                rows: t as usize,
                cols: w.cols,
            });
        }
    }
    launch_embed(client, w, ids, n, token0, None, out)
}

/// The embedding lookup of a table split into row blocks, for the block `w` that holds rows
/// `first_row..first_row + w.rows`: `out[t, :] = W[id_t - first_row, :]` for the tokens `t < n`
/// of `ids` inside the block; the other rows of `out` are left as they are. One launch per
/// block embeds a batch whatever blocks its ids fall in.
pub fn embed_rows<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    first_row: usize,
    ids: &Handle,
    n: usize,
    out: &Handle,
) -> Result<(), MatmulError> {
    check_u32((first_row + w.rows) as u64)?;
    launch_embed(client, w, ids, n, None, Some(first_row as u32), out)
}

fn launch_embed<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    ids: &Handle,
    n: usize,
    token0: Option<u32>,
    first_row: Option<u32>,
    out: &Handle,
) -> Result<(), MatmulError> {
    if token0.is_none() {
        let needed = n as u64 * 4;
        if ids.size_in_used() < needed {
            return Err(MatmulError::BufferTooSmall {
                what: "ids",
                needed,
                got: ids.size_in_used(),
            });
        }
    }
    check_buffer("out", out, n * w.cols)?;
    let units = n as u64 * (w.blocks_per_row * w.format.slots_per_block()) as u64;
    check_u32(units)?;
    let id_len = (ids.size_in_used() as usize / 4).max(1);
    let kernel = kernels::embed_kernel::EmbedKernel::<R>::new(
        launch::settings(CubeDim::new_1d(ROW_THREADS)),
        client.clone(),
        array_arg(),
        array_arg(),
        array_arg(),
        array_arg(),
        (),
        (),
        (),
        (),
        (),
        (),
        w.format,
        token0.is_some(),
        first_row.is_some(),
    );
    let [wq, ws] = w.args();
    // SAFETY: `ids` and `out` were checked above; the kernel guards its unit count.
    unsafe {
        launch::launch(
            client,
            kernel,
            grid(units.div_ceil(ROW_THREADS as u64) as u32),
            &[
                wq,
                ws,
                Arg::of::<u32>(ids, id_len),
                Arg::of::<f32>(out, n * w.cols),
                Arg::U32(token0.unwrap_or(0)),
                Arg::U32(n as u32),
                Arg::U32(w.cols as u32),
                Arg::U32(w.blocks_per_row),
                Arg::U32(first_row.unwrap_or(0)),
                Arg::U32(w.rows as u32),
            ],
        )
    };
    Ok(())
}

/// Dequantizes `w` into `scratch` as row-major `f32` `[rows, cols]`.
pub fn dequantize<R: Runtime>(
    client: &ComputeClient<R>,
    w: &QWeight<R>,
    scratch: &DequantScratch<R>,
) -> Result<(), MatmulError> {
    let elems = w.rows * w.cols;
    if scratch.elems < elems {
        return Err(MatmulError::BufferTooSmall {
            what: "scratch",
            needed: (elems * scratch.precision.elem_bytes()) as u64,
            got: (scratch.elems * scratch.precision.elem_bytes()) as u64,
        });
    }
    const THREADS: u32 = ROW_THREADS;
    let units = w.rows as u64 * (w.blocks_per_row * w.format.slots_per_block()) as u64;
    check_u32(units)?;
    let [wq, ws] = w.args();
    let count = grid(units.div_ceil(THREADS as u64) as u32);
    let dims = [
        Arg::U32(w.rows as u32),
        Arg::U32(w.cols as u32),
        Arg::U32(w.blocks_per_row),
    ];
    macro_rules! launch_as {
        ($f:ty) => {{
            let kernel = kernels::dequantize_kernel::DequantizeKernel::<$f, R>::new(
                launch::settings(CubeDim::new_1d(THREADS)),
                client.clone(),
                array_arg(),
                array_arg(),
                array_arg(),
                (),
                (),
                (),
                w.format,
            );
            let out = Arg::of::<$f>(&scratch.handle, scratch.elems.max(1));
            let [r, c, b] = dims;
            // SAFETY: the scratch holds the matrix (checked above); the kernel guards its units.
            unsafe { launch::launch(client, kernel, count, &[wq, ws, out, r, c, b]) }
        }};
    }
    match scratch.precision {
        PrefillPrecision::F32 => launch_as!(f32),
        PrefillPrecision::F16 { .. } => launch_as!(half::f16),
    }
    Ok(())
}

/// Rows a plane computes together for one token (see [`MatvecConfig::rows_per_plane`]);
/// `ROCFORGE_MATVEC_ROWS` (1, 2 or 4) overrides it for tuning runs. With [`PLANES_PER_ROW`] it
/// was chosen on the H200 with decode replayed (docs/performance.md, "decode replay"): of rows
/// 1-2 x split 1-4, 2 x 4 ran SmolLM2 tg128 at 1,046 t/s (1 x 1: 1,019) and the 8B shape's Q4_0
/// at 197.8 (188.1); alone, 2 rows per plane leave a decode matrix too few planes (8B: 188.5).
pub const ROWS_PER_PLANE: u32 = 2;

/// Planes that share a row group (see [`MatvecConfig::planes_per_row`]), at most the cube's
/// planes (2 on 64-wide waves); `ROCFORGE_MATVEC_SPLIT` (1, 2 or 4) overrides it.
pub const PLANES_PER_ROW: u32 = 4;

/// One plane per row group where the runtime has plane ops and one fixed plane width (NVIDIA
/// 32, CDNA 64); otherwise 32 lanes reduced through shared memory (lavapipe, wave32/64 RDNA).
/// Cubes of 128 units either way.
pub fn matvec_config<R: Runtime>(client: &ComputeClient<R>) -> MatvecConfig {
    let hw = &client.properties().hardware;
    let fixed_plane = hw.plane_size_min == hw.plane_size_max
        && hw.plane_size_min.is_power_of_two()
        && (8..=64).contains(&hw.plane_size_min);
    let plane_reduce = client.features().plane.contains(Plane::Ops) && fixed_plane;
    let lanes = if plane_reduce { hw.plane_size_min } else { 32 };
    // Read once: this runs on every launch.
    static ROWS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let rows_per_plane = *ROWS.get_or_init(|| {
        std::env::var("ROCFORGE_MATVEC_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|r| [1, 2, 4].contains(r))
            .unwrap_or(ROWS_PER_PLANE)
    });
    let planes_per_cube = (128 / lanes).max(1);
    // Without plane operations (lavapipe) a split row group's sums meet in shared memory a
    // second time: SmolLM2's decode step on lavapipe took 6.5 s split 4 ways, 3.0 s unsplit.
    let planes_per_row = split_knob().unwrap_or(if client.features().plane.contains(Plane::Ops) {
        PLANES_PER_ROW
    } else {
        1
    });
    MatvecConfig {
        lanes,
        planes_per_cube,
        rows_per_plane,
        planes_per_row: planes_per_row.min(planes_per_cube),
        plane_reduce,
        unroll: 1,
        wide: false,
        interleave_x: false,
    }
}

/// `ROCFORGE_MATVEC_SPLIT` (1, 2 or 4; must divide the cube's planes), read once: the planes a
/// row group takes, fixed for tuning runs ([`matvec_config`], [`whole_rows`]).
fn split_knob() -> Option<u32> {
    static SPLIT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| {
        std::env::var("ROCFORGE_MATVEC_SPLIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| [1, 2, 4].contains(s))
    })
}

fn matvec_cube_count(rows: usize, cfg: MatvecConfig) -> CubeCount {
    grid((rows as u32).div_ceil(cfg.rows_per_cube()))
}

/// `cfg` as launched for `fusion` on `fmt`:
/// - a single token on half activations takes the wide layout
///   ([`MatvecConfig::wide`]) with its `x` interleaved ([`XLayout`]), [`WIDE_ROWS_PER_PLANE`]
///   rows a plane and [`WIDE_UNROLL`] blocks a trip; the 32-weight formats split a row group
///   over [`WIDE_PLANES_PER_ROW`] planes, the 64-column chunks (`Q4_K`, `Q5_K`, `Q6_K`) take a
///   plane a row group, 2 where the rows are long (`long_rows`, [`long_rows`]), and one row a
///   plane ([`WIDE_KQUANT_ROWS_FEW`]) where the matrix does not fill the device (`whole_rows`,
///   [`whole_rows`]);
/// - otherwise several rows per plane share each load of `x`, batches at most 2 (each row's
///   slot is decoded once for all tokens and held while the tokens' runs of `x` stream past),
///   and a lane unrolls `KernelFormat::unroll` blocks only when its plane has the row to
///   itself: with the row split among planes, a 4096-column K-quant row's second block per trip
///   is always past the row's end (16 blocks, 4 per plane trip, 4 planes).
///
/// Tuning runs override these from the environment, read once: `ROCFORGE_MATVEC_WIDE=0` (the
/// narrow layout for halves too), `ROCFORGE_MATVEC_WIDE_ROWS`, `ROCFORGE_MATVEC_WIDE_SPLIT`
/// and `ROCFORGE_MATVEC_LONG_SPLIT` (the long-row split alone) (1, 2 or 4 each),
/// `ROCFORGE_MATVEC_WIDE_UNROLL` and `ROCFORGE_MATVEC_UNROLL` (1 or 2).
///
/// `whole_rows` ([`whole_rows`]): a batch of several tokens over a matrix with rows enough to
/// fill the device gives each row group a plane of its own (and its format's unroll), and above
/// [`BATCH_ROWS_4_ABOVE`] tokens 4 rows a plane.
pub fn cfg_for(
    cfg: MatvecConfig,
    fusion: Fusion,
    fmt: KernelFormat,
    whole_rows: bool,
    long_rows: bool,
) -> MatvecConfig {
    let k = knobs();
    let cfg = if whole_rows && fusion.tokens > 1 {
        MatvecConfig {
            planes_per_row: 1,
            ..cfg
        }
    } else {
        cfg
    };
    if fusion.half_x && k.wide {
        let kquant = fmt.wide_cols() > 32;
        return MatvecConfig {
            rows_per_plane: k.wide_rows.unwrap_or(if kquant && !whole_rows {
                WIDE_KQUANT_ROWS_FEW
            } else {
                WIDE_ROWS_PER_PLANE
            }),
            planes_per_row: k
                .wide_split
                .unwrap_or(match (kquant, long_rows) {
                    (true, false) => 1,
                    (true, true) => k.long_split.unwrap_or(long_split(fmt)),
                    (false, _) => WIDE_PLANES_PER_ROW,
                })
                .min(cfg.planes_per_cube),
            unroll: k.wide_unroll,
            wide: true,
            interleave_x: k.interleave_x,
            ..cfg
        };
    }
    let rows_per_plane = if fusion.tokens == 1 {
        cfg.rows_per_plane
    } else if whole_rows && fusion.tokens > BATCH_ROWS_4_ABOVE {
        k.batch_rows.unwrap_or(4)
    } else {
        k.batch_rows.unwrap_or(cfg.rows_per_plane.min(2))
    };
    let unroll = k.unroll.unwrap_or(if cfg.planes_per_row > 1 {
        1
    } else {
        fmt.unroll()
    });
    MatvecConfig {
        rows_per_plane,
        unroll,
        ..cfg
    }
}

/// Whether a mat-vec of `tokens` tokens over `rows` rows on `client`'s device runs a plane per
/// row group ([`cfg_for`]'s `whole_rows`): several tokens, and at least 2 cubes per SM that way.
/// Measured on the H200 with `ROCFORGE_MATVEC_SPLIT=1` against the default [`PLANES_PER_ROW`]
/// (docs/performance.md): the 8B shape (4,096 to 14,336 rows) at 8 sequences 609.5-611.9
/// decode-phase t/s against 567.2-568.7, at 4 442.6-443.2 against 429.1-430.5, level at 2;
/// SmolLM2's shape (576 to 1,536 rows: 72 to 192 such cubes) lost 8-10 % at 8. Not where
/// `ROCFORGE_MATVEC_SPLIT` is set, nor where the SM count is unknown (wgpu, and HIP under
/// CubeCL 0.10, whose runtimes report none: hip-check has no such variant to compile).
///
/// A single token asks only for the wide layout (`half`), where the bar is
/// [`WIDE_WHOLE_ROWS_CUBES_PER_SM`] cubes per SM.
pub fn whole_rows<R: Runtime>(
    client: &ComputeClient<R>,
    tokens: usize,
    rows: usize,
    half: bool,
) -> bool {
    // The single-token `f32` path asks on every launch: answered before any device query.
    if (tokens < 2 && !half) || split_knob().is_some() {
        return false;
    }
    let Some(sms) = client.properties().hardware.num_streaming_multiprocessors else {
        return false;
    };
    let per_cube = MatvecConfig {
        planes_per_row: 1,
        rows_per_plane: WIDE_ROWS_PER_PLANE,
        ..matvec_config(client)
    }
    .rows_per_cube() as usize;
    let bar = if tokens < 2 {
        WIDE_WHOLE_ROWS_CUBES_PER_SM
    } else {
        2
    };
    rows.div_ceil(per_cube) >= bar * sms as usize
}

/// Cubes per SM (of 128 units, a plane a row group, [`WIDE_ROWS_PER_PLANE`] rows a plane) from
/// which a single-token wide launch of the 64-column chunks keeps 2 rows a plane
/// ([`whole_rows`]): half the SM's warps. Measured on the H200, 8B Q4_K_M, `x` interleaved:
/// tg128 at one row a plane everywhere 288.7 t/s against 281.8 at 2 (the 4,096-row matrices
/// make 512 such cubes, 3.9 an SM), while the stacked `Q4_K` mat-vec (every matrix far above
/// the bar) ran 53-56 % of 4.23 TB/s at 2 and 47-50 % at 1. The 32-weight formats keep their
/// split instead: a plane a row group above the bar ran the stacked Q4_0 mat-vec at 62-70 %
/// (60-67 % split) but 8B Q4_0 tg128 at 354.4-355.4 t/s against 361-362.5 split.
pub const WIDE_WHOLE_ROWS_CUBES_PER_SM: usize = 8;

/// Tokens above which a batch in the whole-rows layout ([`whole_rows`]) takes 4 rows per plane
/// rather than 2: each token's `x` is read from L1 once per plane's rows, 4 bytes a weight per
/// token shared by the rows, and 4 rows keep that at 8 bytes a weight up to 8 tokens, as 2 rows
/// do up to 4. Measured on the H200 at 8 tokens, 8B Q4_0 at 8 sequences: 704.5 decode-phase t/s
/// against 623.3-624.3 with 2 rows (docs/performance.md); 5 to 7 tokens follow the rule
/// unmeasured. `ROCFORGE_MATVEC_BATCH_ROWS` (1, 2 or 4) fixes the rows of every batch.
pub const BATCH_ROWS_4_ABOVE: u32 = 4;

/// Whether a wide launch of `fmt` (`cfg`'s lanes) over rows of `cols` columns takes the long-row
/// split of the 64-column chunks ([`cfg_for`]): a `Q4_K`, `Q5_K` or `Q6_K` row whose chunks
/// would take one plane [`WIDE_KQUANT_LONG_TRIPS`] trips or more.
pub fn long_rows(cfg: MatvecConfig, fmt: KernelFormat, cols: usize) -> bool {
    let chunk = fmt.wide_cols() as usize;
    chunk > 32 && cols.div_ceil(chunk).div_ceil(cfg.lanes as usize) >= WIDE_KQUANT_LONG_TRIPS
}

/// Columns of a `fmt` row that take one plane of `cfg` exactly [`WIDE_KQUANT_LONG_TRIPS`] full
/// trips: a long row ([`long_rows`]) of whole blocks, what a test or a compile check launches to
/// reach the long-row kernel.
pub fn long_row_cols(cfg: MatvecConfig, fmt: KernelFormat) -> usize {
    fmt.wide_cols() as usize * cfg.lanes as usize * WIDE_KQUANT_LONG_TRIPS
}

/// Trips of a plane over its row (a trip: one 64-column chunk per lane) from which a wide
/// K-quant row group splits over [`long_split`] planes ([`long_rows`]). Measured on
/// the H200 (32 lanes, docs/performance.md, "long K-quant rows on two planes"): the 4096x14336
/// mat-vec (7 trips) split ran `Q4_K` / `Q5_K` / `Q6_K` stacked at 68-74 / 63-66 / 68-71 % of
/// 4.23 TB/s against 67-70 / 61-65 / 61-63 (four runs each, two leases), and replayed at its
/// own size (one row a plane) at 47 / 47 / 61 % against 46 / 45 / 55; on 4,096 columns (2
/// trips) the split lost 3-5 points, and the 8B `Q4_K_M` decode with every K-quant matrix
/// split ran tg128 at 342.4-342.9 t/s against 346.0-346.2.
pub const WIDE_KQUANT_LONG_TRIPS: usize = 4;

/// Planes that share a long K-quant row group ([`long_rows`]) of `fmt`, at most the cube's planes
/// (2 on 64-wide waves). Measured on the H200 (32 lanes, docs/performance.md, "Q5_K and Q6_K
/// long rows on four planes"), the 4096x14336 mat-vec (7 trips) split 2 / 4, stacked, three
/// runs each alternating in one lease: `Q4_K` 70-73 / 65-67 % of 4.23 TB/s, `Q5_K` 61-63 /
/// 65-67, `Q6_K` 69-71 / 70-73; replayed at its own size 47 / 49, 50 / 51, 60 / 63. The 8B
/// decode tg128 with every long K-quant row split 4: `Q4_K` 340.2-340.5 t/s against
/// 343.9, `Q5_K` 315.8 against 316.7-318.4 (within the run-to-run spread).
pub fn long_split(fmt: KernelFormat) -> u32 {
    match fmt {
        KernelFormat::Q5K | KernelFormat::Q6K => 4,
        _ => 2,
    }
}

/// Rows a plane computes together in the wide layout ([`cfg_for`]).
pub const WIDE_ROWS_PER_PLANE: u32 = 2;
/// Rows a plane computes in the wide layout for `Q4_K`, `Q5_K` and `Q6_K` below the
/// [`WIDE_WHOLE_ROWS_CUBES_PER_SM`] bar: twice the planes.
pub const WIDE_KQUANT_ROWS_FEW: u32 = 1;
/// Planes that share a row group in the wide layout, for the 32-weight formats. `Q4_K`, `Q5_K`
/// and `Q6_K` keep a plane a row group: their 64-column chunks already fill a plane's trip with
/// 8 blocks (8B Q4_K_M tg128 on the H200, `x` in column
/// order: 254.5 t/s with 1, 248.9 with 2, 218.2 with 4).
pub const WIDE_PLANES_PER_ROW: u32 = 2;
/// Blocks a lane loads per trip in the wide layout.
pub const WIDE_UNROLL: u32 = 1;

/// The layout overrides of [`cfg_for`], from the environment.
struct Knobs {
    wide: bool,
    interleave_x: bool,
    wide_rows: Option<u32>,
    wide_split: Option<u32>,
    long_split: Option<u32>,
    wide_unroll: u32,
    unroll: Option<u32>,
    batch_rows: Option<u32>,
}

fn knobs() -> &'static Knobs {
    static KNOBS: std::sync::OnceLock<Knobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(|| {
        let var = |name: &str, allowed: &[u32]| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|v| allowed.contains(v))
        };
        Knobs {
            wide: std::env::var("ROCFORGE_MATVEC_WIDE").map_or(true, |v| v != "0"),
            interleave_x: std::env::var("ROCFORGE_MATVEC_X_ORDER").map_or(true, |v| v != "columns"),
            wide_rows: var("ROCFORGE_MATVEC_WIDE_ROWS", &[1, 2, 4]),
            wide_split: var("ROCFORGE_MATVEC_WIDE_SPLIT", &[1, 2, 4]),
            long_split: var("ROCFORGE_MATVEC_LONG_SPLIT", &[1, 2, 4]),
            wide_unroll: var("ROCFORGE_MATVEC_WIDE_UNROLL", &[1, 2]).unwrap_or(WIDE_UNROLL),
            unroll: var("ROCFORGE_MATVEC_UNROLL", &[1, 2]),
            batch_rows: var("ROCFORGE_MATVEC_BATCH_ROWS", &[1, 2, 4]),
        }
    })
}

/// `n` cubes as a 2D grid (x at most 65535), for backends with 16-bit grid dimensions.
fn grid(n: u32) -> CubeCount {
    let x = n.clamp(1, 65535);
    CubeCount::new_2d(x, n.div_ceil(x).max(1))
}

fn check_buffer(what: &'static str, h: &Handle, elems: usize) -> Result<(), MatmulError> {
    check_bytes(what, h, elems as u64 * 4)
}

/// [`check_buffer`] for `elems` f16 values.
fn check_half_buffer(what: &'static str, h: &Handle, elems: usize) -> Result<(), MatmulError> {
    check_bytes(what, h, elems as u64 * 2)
}

fn check_bytes(what: &'static str, h: &Handle, needed: u64) -> Result<(), MatmulError> {
    // Runtimes may round allocations up, so this catches wrong shapes, not off-by-a-few.
    let got = h.size_in_used();
    if got < needed {
        return Err(MatmulError::BufferTooSmall { what, needed, got });
    }
    Ok(())
}

fn check_u32(n: u64) -> Result<(), MatmulError> {
    if n > u32::MAX as u64 {
        return Err(MatmulError::TooLarge(n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(lanes: u32) -> MatvecConfig {
        MatvecConfig {
            lanes,
            planes_per_cube: 128 / lanes,
            rows_per_plane: ROWS_PER_PLANE,
            planes_per_row: PLANES_PER_ROW.min(128 / lanes),
            plane_reduce: true,
            unroll: 1,
            wide: false,
            interleave_x: false,
        }
    }

    const HALF: Fusion = Fusion {
        half_x: true,
        ..Fusion::plain(1)
    };

    #[test]
    fn long_kquant_rows_split_over_planes() {
        // (format, planes on 32 lanes); 64-lane waves have 2 planes a cube, so 2 for all.
        for (fmt, split32) in [
            (KernelFormat::Q4K, 2),
            (KernelFormat::Q5K, 4),
            (KernelFormat::Q6K, 4),
        ] {
            // 32 lanes: 4,096 columns are 2 trips of 64-column chunks, 14,336 are 7.
            let b = base(32);
            assert!(!long_rows(b, fmt, 4096), "{fmt}");
            assert!(long_rows(b, fmt, 8192), "{fmt}");
            assert!(long_rows(b, fmt, 14336), "{fmt}");
            // 64 lanes: 14,336 columns are 3.5 trips, the last one partial.
            assert!(!long_rows(base(64), fmt, 8192), "{fmt}");
            assert!(long_rows(base(64), fmt, 14336), "{fmt}");
            for whole in [false, true] {
                let short = cfg_for(b, HALF, fmt, whole, false);
                let long = cfg_for(b, HALF, fmt, whole, true);
                assert!(short.wide && long.wide);
                assert_eq!(short.planes_per_row, 1, "{fmt}");
                assert_eq!(long.planes_per_row, split32, "{fmt}");
                let long64 = cfg_for(base(64), HALF, fmt, whole, true);
                assert_eq!(long64.planes_per_row, 2, "{fmt}");
                assert_eq!(long.rows_per_plane, short.rows_per_plane, "{fmt}");
                assert_eq!(long.x_layout(fmt), short.x_layout(fmt), "{fmt}");
            }
        }
    }

    #[test]
    fn block_formats_keep_their_split_on_long_rows() {
        for fmt in [KernelFormat::Q4_0, KernelFormat::Q8_0, KernelFormat::Q5_1] {
            assert!(!long_rows(base(32), fmt, 1 << 16), "{fmt}");
            let cfg = cfg_for(base(32), HALF, fmt, false, false);
            assert_eq!(cfg.planes_per_row, WIDE_PLANES_PER_ROW, "{fmt}");
        }
        // The narrow and batched layouts ignore it.
        let batch = cfg_for(base(32), Fusion::plain(4), KernelFormat::Q4K, false, true);
        assert_eq!(batch.planes_per_row, PLANES_PER_ROW);
    }
}
