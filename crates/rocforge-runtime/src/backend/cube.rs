//! The GPU backend: the forward pass of [`super::cpu`] (same math, same op order) as CubeCL
//! kernels, generic over the runtime. `Hip`, `Cuda` and `Wgpu` are aliases of one type.
//!
//! Weights go up once: matrices through `ops::matmul`'s `QWeight` (the tuned mat-vec and
//! prefill mat-mat), with the plain kernel of `ops::dequant` for formats it lacks; the embedding
//! table also in its GGUF layout for the lookup. Activations, the KV cache and the logits live on
//! the device. A decode step passes its token as a kernel argument, allocates nothing and
//! synchronises once: when the host reads the argmax (one `u32`) or the logits.
//!
//! On CUDA and HIP a single-token step is replayed ([`Replay`]): recorded once per attention
//! bucket with the token and position read from device buffers, captured into a graph, and
//! replayed with one driver call (docs/architecture.md, "Decode replay").

use std::sync::Arc;

use rocforge_kernels::ops::attention::{self, AttnScratch, AttnShape, KvCache, KvType};
use rocforge_kernels::ops::dequant::{self, DeviceWeight};
use rocforge_kernels::ops::embedding::{self, Tokens};
use rocforge_kernels::ops::gpu::{Buf, Gpu, GpuError, Pos, Runtime, MAX_GRID_X};
use rocforge_kernels::ops::matmul::{
    self as mm, DequantScratch, Epilogue, KernelFormat, QWeight, MAX_MATVEC_TOKENS,
};
use rocforge_kernels::ops::rope::{self, RopeShape, RopeSrc};
use rocforge_kernels::ops::{activation, argmax, norm};

use super::{Backend, BackendKind, BackendOptions, MemoryUsage, OpTiming, Profiler, SeqBatch};
use crate::arch::{self, unsupported, Activation, Executor, Limits, RopeKind, Step};
use crate::error::{Error, Result};
use crate::model::{Model, RopeStyle, Weight};

mod row_blocks;
use row_blocks::RowBlocks;

#[cfg(feature = "cuda")]
pub type Cuda = CubeBackend<rocforge_kernels::ops::gpu::cubecl::cuda::CudaRuntime>;
#[cfg(feature = "hip")]
pub type Hip = CubeBackend<rocforge_kernels::ops::gpu::cubecl::hip::HipRuntime>;
#[cfg(feature = "wgpu")]
pub type Wgpu = CubeBackend<rocforge_kernels::ops::gpu::cubecl::wgpu::WgpuRuntime>;

/// A weight matrix on the device: the tuned kernels' layout, or the GGUF layout for the plain
/// kernel when `ops::matmul` has no kernel for the format.
enum Matrix<R: Runtime> {
    Tuned(QWeight<R>),
    Plain(DeviceWeight),
}

impl<R: Runtime> Matrix<R> {
    fn upload(
        gpu: &Gpu<R>,
        ty: rocforge_kernels::GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, String> {
        // The tuned mat-vec reads `x` as vec4: a float matrix of odd width (never seen in a
        // real model) takes the plain kernel.
        let tuned = if cols % 4 == 0 {
            QWeight::upload(gpu.client(), ty, rows, cols, bytes)
        } else {
            Err(mm::MatmulError::UnsupportedType(ty))
        };
        match tuned {
            Ok(w) => Ok(Self::Tuned(w)),
            Err(mm::MatmulError::UnsupportedType(_)) => {
                DeviceWeight::upload(gpu, ty, bytes, rows, cols)
                    .map(Self::Plain)
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }
    /// (rows, cols)
    fn shape(&self) -> (usize, usize) {
        match self {
            Self::Tuned(w) => (w.rows, w.cols),
            Self::Plain(w) => (w.rows, w.cols),
        }
    }
    /// Bytes of the GGUF tensor it came from (the device layout differs by padding only).
    fn bytes(&self) -> u64 {
        match self {
            Self::Tuned(w) => w.ty.row_bytes(w.cols as u64).unwrap_or(0) * w.rows as u64,
            Self::Plain(w) => w.bytes(),
        }
    }
}

/// The attention's input projections: where Q, K and V share a format the tuned kernels read,
/// one weight with their rows stacked (one launch; each token's output row holds Q, K, V back
/// to back, which `rope_store` reads as `RopeSrc::Fused`), else three matrices.
enum Qkv<R: Runtime> {
    Fused(QWeight<R>),        // (n_head*head_dim + 2*n_head_kv*head_dim, n_embd)
    Separate([Matrix<R>; 3]), // attn_q, attn_k, attn_v
}

impl<R: Runtime> Qkv<R> {
    fn matrices(&self) -> Vec<(usize, usize, u64)> {
        match self {
            Self::Fused(w) => vec![(
                w.rows,
                w.cols,
                w.ty.row_bytes(w.cols as u64).unwrap_or(0) * w.rows as u64,
            )],
            Self::Separate(ms) => ms
                .iter()
                .map(|m| (m.shape().0, m.shape().1, m.bytes()))
                .collect(),
        }
    }
}

/// One block's weights on the device; shapes as in [`crate::model::LayerWeights`].
struct DeviceLayer<R: Runtime> {
    attn_norm: Buf,         // (n_embd)
    attn_qkv: Qkv<R>, // attn_q (n_head*head_dim, n_embd), attn_k/attn_v (n_head_kv*head_dim, n_embd)
    attn_output: Matrix<R>, // (n_embd, n_head*head_dim)
    ffn_norm: Buf,    // (n_embd)
    ffn_gate: Matrix<R>, // (n_ff, n_embd)
    ffn_up: Matrix<R>, // (n_ff, n_embd)
    ffn_down: Matrix<R>, // (n_embd, n_ff)
    /// A single token's QKV projection takes `attn_norm` folded in (fused QKV, coalesced format).
    qkv_folds_norm: bool,
    /// A single token's gate/up projection takes `ffn_norm` folded in.
    ffn_folds_norm: bool,
    // Gemma 3 only:
    attn_q_norm: Option<Buf>,         // (head_dim)
    attn_k_norm: Option<Buf>,         // (head_dim)
    post_attention_norm: Option<Buf>, // (n_embd)
    post_ffw_norm: Option<Buf>,       // (n_embd)
}

/// Device memory a session needs, estimated from the model before anything is uploaded, so
/// that a model or context too large for the device is refused with numbers instead of failing
/// inside the runtime's allocator.
struct DeviceNeeds {
    weights: u64,
    /// KV cache and RoPE tables, per token of context.
    per_token: u64,
    scratch: u64,
    /// Elements of the largest layer matrix (the prefill dequantize scratch).
    largest_layer_matrix: usize,
}

impl DeviceNeeds {
    /// `dequant_scratch`: batches above `MAX_MATVEC_TOKENS` take the dequantize + cubek path
    /// (`mm::prefill_kernel`), which needs a scratch for the largest layer matrix.
    /// `half_acts`: the batch's activations also in f16 for the quantized mat-mat (`acts16`).
    fn of(
        model: &Model,
        b: usize,
        kv: KvType,
        fused_qkv: bool,
        dequant_scratch: bool,
        half_acts: bool,
    ) -> Self {
        let (c, w) = (&model.config, &model.weights);
        let bytes = |m: &Weight| model.bytes(m).len() as u64;
        let tied_shared = w.tied_output && KernelFormat::from_ggml(w.token_embd.ty).is_some();
        let weights = w
            .layers
            .iter()
            .flat_map(|l| l.matrices())
            .map(bytes)
            .sum::<u64>()
            + bytes(&w.token_embd)
            + if tied_shared { 0 } else { bytes(&w.output) }
            + 4 * ((2 * c.n_layer + 1) * c.n_embd) as u64;
        let largest_layer_matrix = w
            .layers
            .iter()
            .flat_map(|l| l.matrices())
            .map(|m| m.rows * m.cols)
            .max()
            .unwrap_or(0)
            // A fused QKV matrix is larger than any single one where q_dim exceeds n_ff - n_embd
            // (Gemma 3: head dim 256).
            .max(if fused_qkv {
                (c.q_dim() + 2 * c.kv_dim()) * c.n_embd
            } else {
                0
            });
        // The RoPE tables: a second one for the sliding-window layers.
        let tables = if c.sliding_window.is_some() { 2 } else { 1 };
        let per_token = (2 * c.n_layer * c.kv_dim() * kv.bytes() + tables * 4 * c.rope_dim) as u64;
        let qkv = if fused_qkv {
            c.q_dim() + 2 * c.kv_dim()
        } else {
            0
        };
        // f16 activations count half an f32 each.
        let halves = if half_acts {
            b * c.n_embd.max(c.n_ff)
        } else {
            0
        };
        let activations = b * (3 * c.n_embd + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.n_ff + qkv)
            + c.n_vocab
            + 2
            + halves.div_ceil(2);
        let attn = c.n_head * b.max(attention::MAX_DECODE_SPLITS) * (c.head_dim + 2);
        let dequant = if dequant_scratch {
            largest_layer_matrix
        } else {
            0
        };
        Self {
            weights,
            per_token,
            scratch: 4 * (activations + attn + dequant) as u64,
            largest_layer_matrix,
        }
    }

    /// Refuses a session that would not fit in `free` bytes, naming the largest `--ctx` that would.
    fn check(&self, free: u64, ctx: usize) -> std::result::Result<(), String> {
        // The allocator rounds buffers up to its pages and the runtime keeps staging memory:
        // leave 5 % and 256 MiB of the free memory alone.
        let budget = (free as f64 / 1.05) as u64 - (256 << 20).min(free / 2);
        let kv = self.per_token.saturating_mul(ctx as u64);
        let total = self.weights.saturating_add(kv).saturating_add(self.scratch);
        if total <= budget {
            return Ok(());
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let fixed = self.weights + self.scratch;
        let hint = if fixed < budget {
            format!(
                "the largest --ctx that fits is {}",
                (budget - fixed) / self.per_token.max(1)
            )
        } else {
            "the weights alone do not fit".to_string()
        };
        Err(format!(
            "not enough device memory: the session needs {:.2} GiB (weights {:.2} GiB, KV cache {:.2} GiB for --ctx {ctx}, scratch {:.2} GiB) and the device has {:.2} GiB free; {hint}",
            gib(total),
            gib(self.weights),
            gib(kv),
            gib(self.scratch),
            gib(free),
        ))
    }
}

/// The run state on a CubeCL device.
pub struct CubeBackend<R: Runtime> {
    gpu: Gpu<R>,
    kind: BackendKind,
    device_name: String,
    model: Arc<Model>,
    ctx: usize,
    max_batch: usize,
    // Weights.
    token_embd: RowBlocks<R>, // (n_vocab, n_embd), for the lookup; row blocks where too large
    output: RowBlocks<R>,     // (n_vocab, n_embd), the same device buffers as token_embd when tied
    layers: Vec<DeviceLayer<R>>,
    dequant: Option<DequantScratch<R>>, // (largest matrix) f32, for prefill mat-mats
    /// A single token's activations as packed halves for the mat-vec (devices with f16).
    half: Option<mm::HalfActs<R>>,
    output_norm: Buf, // (n_embd)
    cos: Buf,         // (ctx, rope_dim/2)
    sin: Buf,         // (ctx, rope_dim/2)
    cos_local: Buf,   // (ctx, rope_dim/2) sliding-window layers' table, or (1)
    sin_local: Buf,   // (ctx, rope_dim/2), or (1)
    // Activations, one row per token in the batch.
    x: Buf,         // (batch, n_embd) residual stream
    xn: Buf,        // (batch, n_embd) normalised input of a block
    qkv: Buf,       // (batch, q_dim + 2*kv_dim) fused projection output (1 element when unused)
    q: Buf,         // (batch, n_head*head_dim) rotated Q, the attention's input
    k: Buf,         // (batch, n_head_kv*head_dim)
    v: Buf,         // (batch, n_head_kv*head_dim)
    att: Buf,       // (batch, n_head*head_dim) attention output; un-rotated Q before rope
    proj: Buf,      // (batch, n_embd) output of attn_output / ffn_down
    gate: Buf,      // (batch, n_ff)
    up: Buf,        // (batch, n_ff)
    logits: Buf,    // (n_vocab) or (batch, n_vocab) for all-token logits
    best: Buf,      // (1) argmax of the last logits row
    best_rows: Buf, // (batch) argmax of each logits row of a multi-sequence batch
    no_ids: Buf, // (1) unused device token buffer: single-token embedding passes the id as an argument
    cache: KvCache,
    scratch: AttnScratch,
    /// (batch, max(n_embd, n_ff)) f16, where the device runs the quantized mat-mat: a norm's or
    /// the gated activation's output in the mat-mat's staging order, written there instead of
    /// in f32 when every matrix that reads it takes the mat-mat (saves its conversion launch).
    acts16: Option<Buf>,
    /// The last `ffn_in` left its activation in `acts16` (for `ffn_out`'s projection).
    ffn_half: bool,
    host_logits: Vec<f32>,
    host_fresh: bool,
    n_logit_rows: usize,
    launches_last: u64,
    /// Per-op timing (`set_profiling`): a sync after every op, charged to its family.
    profiler: std::sync::Mutex<Profiler>,
    /// Whether `profiler` is on: checked before any lock, so an unprofiled step takes none.
    profiling: bool,
    /// The output projection takes the norm-folding mat-vec.
    output_folds_norm: bool,
    /// The vocabulary projection's dequantize scratch, made on first use where perplexity's
    /// all-token logits cannot run as aligned multi-token mat-vecs (see `logits`).
    dequant_logits: Option<DequantScratch<R>>,
    /// The architecture's forward pass, run by [`arch::forward`].
    plan: Arc<[Step]>,
    // The batch of the forward call under way.
    n: usize,
    pos: usize,
    all_logits: bool,
    /// `proj` holds a residual not yet added to `x` (the next norm adds it).
    pending_add: bool,
    launch_start: u64,
    /// Device inputs of a replayed step: the token id and the position (one `u32` each).
    token_dev: Buf,
    pos_dev: Buf,
    /// While a step is recorded for replay: the attention bucket (most keys) it serves; the
    /// step then reads its token and position from `token_dev` and `pos_dev`.
    device_step: Option<usize>,
    /// CubeCL's stream has work a replay must wait for.
    cube_dirty: bool,
    /// The argmax of the last forward call when it was replayed (read with the replay).
    replayed: Option<u32>,
    /// Graph replay allowed ([`Backend::set_replay`]).
    replay_on: bool,
    #[cfg(any(feature = "cuda", feature = "hip"))]
    replay: Option<Replay>,
    /// The multi-sequence batch under way ([`Backend::forward_seqs`]), `None` for one sequence.
    seqs: Option<SeqRows>,
    /// Host-side layout of the last multi-sequence batch (kept to reuse the allocations).
    seq_host: SeqHost,
}

/// What a multi-sequence step builds on the host before uploading it.
#[derive(Default)]
struct SeqHost {
    tokens: Vec<u32>,
    meta: Vec<u32>,
    picks: Vec<u32>,
}

/// Where the tokens of a multi-sequence batch live on the device.
struct SeqRows {
    /// `attention::paged_meta`: positions, cache rows and page tables.
    meta: Buf,
    /// One past the largest position in the batch.
    kv_len: usize,
    /// The rows whose logits were asked for (the last of their sequence), `n_logits` of them.
    logit_rows: Buf,
    n_logits: usize,
}

/// Graph replay of single-token steps: the replayer (our stream, compiled kernels, graphs) and
/// one graph per attention bucket.
#[cfg(any(feature = "cuda", feature = "hip"))]
struct Replay {
    replayer: Box<dyn rocforge_kernels::ops::graph::Replayer>,
    /// `(bucket, graph)`: a bucket is the most keys its graph's attention grid covers.
    graphs: Vec<(usize, usize)>,
    /// Launches of the graph replayed last.
    nodes: usize,
    /// Replays and the host time spent enqueuing them (inputs written, graph launched), for
    /// `ROCFORGE_GRAPH_STATS=1`, which prints them when the backend is dropped.
    steps: u64,
    enqueue: std::time::Duration,
}

#[cfg(any(feature = "cuda", feature = "hip"))]
impl Drop for Replay {
    fn drop(&mut self) {
        if self.steps > 0 && std::env::var_os("ROCFORGE_GRAPH_STATS").is_some() {
            eprintln!(
                "rocforge: {} replayed steps, {} graphs, {} nodes in the last; host enqueue {:.1} us per step",
                self.steps,
                self.graphs.len(),
                self.nodes,
                self.enqueue.as_secs_f64() * 1e6 / self.steps as f64
            );
        }
    }
}

/// The smallest attention bucket: below it a few empty splits cost less than more graphs.
pub const MIN_BUCKET: usize = 256;

/// I/O slots of the replayer: token in, position in, argmax out.
#[cfg(any(feature = "cuda", feature = "hip"))]
const IO_TOKEN: usize = 0;
#[cfg(any(feature = "cuda", feature = "hip"))]
const IO_POS: usize = 1;
#[cfg(any(feature = "cuda", feature = "hip"))]
const IO_BEST: usize = 2;

/// The attention bucket of a step whose keys number `kv_len`: a power of two of at least
/// [`MIN_BUCKET`], at most the context. Its graph plans the attention's splits for the bucket's
/// full length; splits past the real keys find none.
pub fn replay_bucket(kv_len: usize, ctx: usize) -> usize {
    kv_len
        .max(MIN_BUCKET)
        .next_power_of_two()
        .min(ctx)
        .max(kv_len)
}

impl<R: Runtime> CubeBackend<R> {
    /// Uploads `model` to `gpu` and allocates every buffer, after checking that the kernels
    /// take the model's shapes and that everything fits in `free_bytes` of device memory (when
    /// the driver reports it). The embedding and output matrices are split into row blocks of
    /// at most the device's largest buffer, or `max_block_bytes` where that is smaller (tests
    /// split a tiny model's with it).
    pub fn new(
        gpu: Gpu<R>,
        kind: BackendKind,
        device_name: String,
        free_bytes: Option<u64>,
        model: Arc<Model>,
        opts: &BackendOptions,
        max_block_bytes: Option<u64>,
    ) -> Result<Self> {
        let c = &model.config;
        let w = &model.weights;
        let fail = |problem: String| Error::Backend {
            backend: kind.name().into(),
            problem,
        };
        // The attention kernel runs a unit per head dimension and a cube per (token, head,
        // split); one grid axis holds 65 535 cubes, so the batch is cut to fit rather than
        // asserting in the launcher (the session runs prompts in chunks of max_batch).
        if c.head_dim > attention::MAX_HEAD_DIM || c.head_dim % 2 != 0 {
            return Err(fail(format!(
                "head dimension {} is not supported by the GPU kernels (even, at most {})",
                c.head_dim,
                attention::MAX_HEAD_DIM
            )));
        }
        let max_rows = MAX_GRID_X as usize;
        if c.n_head * attention::MAX_DECODE_SPLITS > max_rows {
            return Err(fail(format!(
                "{} attention heads exceed the GPU kernels' limit of {}",
                c.n_head,
                max_rows / attention::MAX_DECODE_SPLITS
            )));
        }
        let ctx = opts.ctx;
        let b = opts.max_batch.min(ctx).min(max_rows / c.n_head);
        let kv_type = if gpu.supports_f16() {
            KvType::F16
        } else {
            KvType::F32
        };
        // A layer weight is one device buffer: refuse what the device cannot bind, instead of
        // failing inside the runtime. The embedding and output matrices, the ones that exceed
        // a buffer in practice, are split into row blocks below (`row_blocks`).
        let max_buffer = gpu.max_buffer_bytes();
        let max_block = max_buffer.min(max_block_bytes.unwrap_or(u64::MAX));
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        for wt in w.layers.iter().flat_map(|l| l.matrices()) {
            let bytes = model.bytes(wt).len() as u64;
            if bytes > max_buffer {
                return Err(fail(format!(
                    "tensor `{}` needs a {:.0} MiB device buffer and this device binds at most {:.0} MiB per buffer",
                    wt.name,
                    mib(bytes),
                    mib(max_buffer)
                )));
            }
        }
        let kv_layer_bytes = (opts.ctx * c.kv_dim() * kv_type.bytes()) as u64;
        if kv_layer_bytes > max_buffer {
            return Err(fail(format!(
                "a KV cache layer of --ctx {} needs {:.0} MiB and this device binds at most {:.0} MiB per buffer; lower --ctx",
                opts.ctx,
                mib(kv_layer_bytes),
                mib(max_buffer)
            )));
        }
        let fits_qkv = |l: &crate::model::LayerWeights| {
            let (q, k, v) = (&l.attn_q, &l.attn_k, &l.attn_v);
            let stacked = [q, k, v]
                .iter()
                .map(|t| model.bytes(t).len() as u64)
                .sum::<u64>();
            stacked <= max_buffer
                && q.ty == k.ty
                && k.ty == v.ty
                && q.cols == k.cols
                && k.cols == v.cols
                && q.cols % 4 == 0
                && KernelFormat::from_ggml(q.ty).is_some()
        };
        let fused = w.layers.iter().any(fits_qkv);
        let dequant_scratch = b > MAX_MATVEC_TOKENS
            && mm::prefill_kernel(gpu.client(), b) == mm::PrefillKernel::Dequantize;
        let half_acts = b > MAX_MATVEC_TOKENS
            && matches!(
                mm::prefill_kernel(gpu.client(), MAX_MATVEC_TOKENS + 1),
                mm::PrefillKernel::Mma(_)
            );
        let need = DeviceNeeds::of(&model, b, kv_type, fused, dequant_scratch, half_acts);
        // `ROCFORGE_MEMORY_CHECK=0` skips the comparison, so that tests can reach the path
        // where an allocation fails after it (see `check_device_fault`).
        let check_memory = std::env::var("ROCFORGE_MEMORY_CHECK").map_or(true, |v| v != "0");
        if let (Some(free), true) = (free_bytes, check_memory) {
            need.check(free, ctx).map_err(fail)?;
        }
        // A fault noted for an earlier backend is not this one's.
        let _ = crate::device_fault::take();

        let upload = |wt: &Weight| -> Result<Matrix<R>> {
            Matrix::upload(&gpu, wt.ty, model.bytes(wt), wt.rows, wt.cols)
                .map_err(|e| fail(format!("tensor `{}`: {e}", wt.name)))
        };
        let upload_blocks = |wt: &Weight| -> Result<RowBlocks<R>> {
            RowBlocks::upload(&gpu, wt.ty, model.bytes(wt), wt.rows, wt.cols, max_block)
                .map_err(|e| fail(format!("tensor `{}`: {e}", wt.name)))
        };
        let token_embd = upload_blocks(&w.token_embd)?;
        let norm_fusable = |m: &QWeight<R>| mm::fuses_norm(gpu.client(), m);
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let attn_qkv = if fits_qkv(l) {
                    let (q, k, v) = (&l.attn_q, &l.attn_k, &l.attn_v);
                    let bytes = [model.bytes(q), model.bytes(k), model.bytes(v)].concat();
                    let fused = QWeight::upload(
                        gpu.client(),
                        q.ty,
                        q.rows + k.rows + v.rows,
                        q.cols,
                        &bytes,
                    )
                    .map_err(|e| fail(format!("tensors `{}`+k+v: {e}", q.name)))?;
                    Qkv::Fused(fused)
                } else {
                    Qkv::Separate([upload(&l.attn_q)?, upload(&l.attn_k)?, upload(&l.attn_v)?])
                };
                let (ffn_gate, ffn_up) = (upload(&l.ffn_gate)?, upload(&l.ffn_up)?);
                let ffn_folds_norm = match (&ffn_gate, &ffn_up) {
                    (Matrix::Tuned(g), Matrix::Tuned(u)) => {
                        (g.ty, g.rows, g.cols) == (u.ty, u.rows, u.cols) && norm_fusable(g)
                    }
                    _ => false,
                };
                let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|v| gpu.f32s(v));
                Ok(DeviceLayer {
                    attn_q_norm: opt(&l.attn_q_norm),
                    attn_k_norm: opt(&l.attn_k_norm),
                    post_attention_norm: opt(&l.post_attention_norm),
                    post_ffw_norm: opt(&l.post_ffw_norm),
                    attn_norm: gpu.f32s(&l.attn_norm),
                    qkv_folds_norm: matches!(&attn_qkv, Qkv::Fused(w) if norm_fusable(w)),
                    attn_qkv,
                    attn_output: upload(&l.attn_output)?,
                    ffn_norm: gpu.f32s(&l.ffn_norm),
                    ffn_gate,
                    ffn_up,
                    ffn_folds_norm,
                    ffn_down: upload(&l.ffn_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Tied embeddings: one upload serves the lookup and the output projection.
        let output = match token_embd.shared() {
            Some(shared) if w.tied_output => shared,
            _ => upload_blocks(&w.output)?,
        };
        let output_folds_norm = output
            .blocks()
            .iter()
            .all(|b| matches!(&b.m, Matrix::Tuned(w) if norm_fusable(w)));
        // Batches above MAX_MATVEC_TOKENS dequantize a layer matrix into this scratch and
        // multiply; the vocabulary projection gets its own only if perplexity asks for it.
        let dequant =
            dequant_scratch.then(|| DequantScratch::new(gpu.client(), need.largest_layer_matrix));
        let inv_freqs = super::cpu::scaled(
            rope::inv_freqs(c.rope_dim, c.rope_base, w.rope_freqs.as_deref()),
            c.rope_freq_scale,
        );
        let (cos, sin) = rope::rope_tables(ctx, &inv_freqs);
        let (cos_local, sin_local) = match c.sliding_window {
            Some(_) => {
                rope::rope_tables(ctx, &rope::inv_freqs(c.rope_dim, c.rope_base_local, None))
            }
            None => (vec![0.0], vec![0.0]),
        };
        let shape = AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
        };
        let half = mm::HalfActs::new(gpu.client(), c.n_embd.max(c.n_ff).max(c.q_dim()));
        let backend = Self {
            token_embd,
            output,
            layers,
            dequant,
            half,
            output_norm: gpu.f32s(&w.output_norm),
            cos: gpu.f32s(&cos),
            sin: gpu.f32s(&sin),
            cos_local: gpu.f32s(&cos_local),
            sin_local: gpu.f32s(&sin_local),
            x: gpu.zeros(b * c.n_embd),
            xn: gpu.zeros(b * c.n_embd),
            qkv: gpu.zeros(if fused {
                b * (c.q_dim() + 2 * c.kv_dim())
            } else {
                1
            }),
            q: gpu.zeros(b * c.q_dim()),
            k: gpu.zeros(b * c.kv_dim()),
            v: gpu.zeros(b * c.kv_dim()),
            att: gpu.zeros(b * c.q_dim()),
            proj: gpu.zeros(b * c.n_embd),
            gate: gpu.zeros(b * c.n_ff),
            up: gpu.zeros(b * c.n_ff),
            acts16: half_acts.then(|| gpu.zeros_of(b * c.n_embd.max(c.n_ff), 2)),
            ffn_half: false,
            logits: gpu.zeros(c.n_vocab),
            best: gpu.zeros(1),
            best_rows: gpu.zeros(b),
            no_ids: gpu.zeros(1),
            cache: KvCache::new(&gpu, c.n_layer, ctx, c.kv_dim(), kv_type),
            scratch: AttnScratch::new(&gpu, b, shape),
            host_logits: vec![0.0; c.n_vocab],
            host_fresh: false,
            n_logit_rows: 1,
            launches_last: 0,
            profiler: Default::default(),
            profiling: false,
            output_folds_norm,
            dequant_logits: None,
            plan: arch::plan(c)?.into(),
            n: 0,
            pos: 0,
            all_logits: false,
            pending_add: false,
            launch_start: 0,
            token_dev: gpu.zeros(1),
            pos_dev: gpu.zeros(1),
            device_step: None,
            cube_dirty: true,
            replayed: None,
            replay_on: true,
            #[cfg(any(feature = "cuda", feature = "hip"))]
            replay: None,
            seqs: None,
            seq_host: SeqHost::default(),
            ctx,
            max_batch: b,
            kind,
            device_name,
            model: model.clone(),
            gpu,
        };
        // Allocations run on CubeCL's device thread: wait for them, then ask whether one failed.
        backend.gpu.sync().map_err(|e| backend.err(e))?;
        backend.check_device_fault()?;
        Ok(backend)
    }

    /// The error for a panic on the device thread since the last check (see
    /// [`crate::device_fault`]): in practice a device allocation that failed because another
    /// process took the memory after the free-memory check.
    fn check_device_fault(&self) -> Result<()> {
        match crate::device_fault::take() {
            None => Ok(()),
            Some(panic) => Err(self.backend_err(format!(
                "a device operation failed, most likely an allocation because the device ran \
                 out of memory (another process may be using it): {panic}"
            ))),
        }
    }

    fn err(&self, e: GpuError) -> Error {
        Error::Backend {
            backend: self.kind.name().into(),
            problem: e.to_string(),
        }
    }

    /// The element type of the KV cache (f16 where the device has it).
    pub fn kv_type(&self) -> KvType {
        self.cache.ty()
    }

    /// Charges the time since the previous lap to `op` when profiling (after waiting for the
    /// device, so each op's kernels are timed to completion).
    fn lap(&self, op: &str) {
        if self.profiling {
            let _ = self.gpu.sync();
            self.profiler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lap(op);
        }
    }

    fn backend_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Backend {
            backend: self.kind.name().into(),
            problem: e.to_string(),
        }
    }

    /// Launches one single-token mat-vec, on half activations where the device, the weight's
    /// format and size take them (one more launch, which also applies a folded norm, unless
    /// `op.half_ready`). Returns whether `x` went through the half buffers.
    fn matvec(&self, op: mm::Matvec<'_, R>) -> Result<bool> {
        let op = mm::Matvec {
            half: self.half.as_ref(),
            ..op
        };
        let half = op.fusion().half_x;
        self.gpu
            .count_launches(if half && !op.half_ready { 2 } else { 1 });
        mm::launch_matvec(self.gpu.client(), &op).map_err(|e| self.backend_err(e))?;
        Ok(half)
    }

    /// `h = act(W_gate · xn) * (W_up · xn)` for the batch's rows (into `gate`): one fused
    /// launch for a single token where both weights take the tuned kernels alike. `xn16`: `xn`
    /// as the mat-mat's f16 activations (see `acts16`), the only copy. With `h16`, `h` goes
    /// there in f16 instead (for a mat-mat down projection). Returns whether it did.
    fn gated_ffn(
        &self,
        gate: &Matrix<R>,
        up: &Matrix<R>,
        n: usize,
        act: Activation,
        xn16: Option<&Buf>,
        h16: Option<&Buf>,
    ) -> Result<bool> {
        let act = match act {
            Activation::Silu => activation::GateAct::Silu,
            Activation::GeluTanh => activation::GateAct::GeluTanh,
        };
        if let (1, Matrix::Tuned(g), Matrix::Tuned(u)) = (n, gate, up) {
            if (g.ty, g.rows, g.cols) == (u.ty, u.rows, u.cols) {
                return self
                    .matvec(mm::Matvec {
                        up: Some((u, act)),
                        ..mm::Matvec::new(g, self.xn.handle(), self.gate.handle())
                    })
                    .map(|_| false);
            }
        }
        self.linear_x(gate, &self.xn, xn16, &self.gate, n)?;
        self.linear_x(up, &self.xn, xn16, &self.up, n)?;
        let len = n * self.model.config.n_ff;
        match h16 {
            Some(h16) => {
                activation::launch_gated_half(&self.gpu, act, &self.gate, &self.up, h16, len)
            }
            None => activation::launch_gated(&self.gpu, act, &self.gate, &self.up, len),
        }
        Ok(h16.is_some())
    }

    /// `acts16`'s first `self.n` rows of `cols`, where the batch's products of `cols` columns
    /// run on the quantized mat-mat (above `MAX_MATVEC_TOKENS` tokens, on a device that has it,
    /// `cols` a multiple of 8); `None` otherwise, or always with `ROCFORGE_MMA_HALF_ACTS=0`
    /// (A/B runs; read once).
    fn acts16_for(&self, cols: usize) -> Option<Buf> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off =
            *OFF.get_or_init(|| std::env::var("ROCFORGE_MMA_HALF_ACTS").is_ok_and(|v| v == "0"));
        let (buf, n) = (self.acts16.as_ref().filter(|_| !off)?, self.n);
        let mma = matches!(
            mm::prefill_kernel(self.gpu.client(), n),
            mm::PrefillKernel::Mma(_)
        );
        (n > MAX_MATVEC_TOKENS && mma && cols % 8 == 0 && n * cols <= buf.len())
            .then(|| buf.view(0, n * cols))
    }

    /// `xn = rmsnorm(x) * weight` for the batch's rows, adding a pending residual first. With
    /// `half` (every matrix reading `xn` is tuned), where the batch takes the mat-mat it goes
    /// to `acts16` in f16 instead, returned (`xn` is then not written).
    fn norm(&mut self, weight: &Buf, half: bool) -> Result<Option<Buf>> {
        let (n, eps) = (self.n, self.model.config.rms_eps);
        let rows = norm::Rows::Range { first: 0, count: n };
        let xn16 = if half {
            self.acts16_for(self.model.config.n_embd)
        } else {
            None
        };
        let out = xn16.as_ref().unwrap_or(&self.xn);
        if std::mem::take(&mut self.pending_add) {
            norm::launch_add_rms_norm(&self.gpu, &self.x, &self.proj, weight, out, rows, eps);
        } else {
            norm::launch_rms_norm(&self.gpu, &self.x, weight, out, rows, eps);
        }
        Ok(xn16)
    }

    /// Whether a step may fold its RMSNorm into the projection after it (one token, no residual
    /// add waiting in `proj`, and a weight the norm-folding kernels take).
    fn folds_norm(&self, fusable: bool) -> bool {
        self.n == 1 && !self.pending_add && fusable
    }

    /// `x += W · h`: for one token in the mat-vec's epilogue, otherwise into `proj`, left
    /// pending for the next norm to add (`add_rms_norm`), which saves a launch per projection.
    fn project_add(&mut self, w: &Matrix<R>, h: &Buf, h16: Option<&Buf>) -> Result<()> {
        if self.pending_add {
            activation::launch_add_assign(
                &self.gpu,
                &self.x,
                &self.proj,
                self.n * self.model.config.n_embd,
            );
            self.pending_add = false;
        }
        if let (1, Matrix::Tuned(w)) = (self.n, w) {
            return self
                .matvec(mm::Matvec {
                    epilogue: Epilogue::Accumulate,
                    ..mm::Matvec::new(w, h.handle(), self.x.handle())
                })
                .map(drop);
        }
        self.linear_x(w, h, h16, &self.proj, self.n)?;
        self.pending_add = true;
        Ok(())
    }

    /// `x[t] = token_embd[tokens[t]]`: a single token from the block that holds it, a batch
    /// by one launch per block (each writes the rows of its tokens).
    /// The position argument of this step's launches: the host's, or `pos_dev` while a step
    /// is recorded for replay (bounded by its bucket).
    fn pos_arg(&self) -> Pos<'_> {
        if let Some(s) = &self.seqs {
            return Pos::Paged {
                meta: &s.meta,
                kv_len: s.kv_len,
            };
        }
        match self.device_step {
            Some(bucket) => Pos::Device {
                buf: &self.pos_dev,
                max: bucket - self.n,
            },
            None => Pos::Host(self.pos),
        }
    }

    fn lookup(&mut self, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        if n == 1 && self.device_step.is_none() {
            let block = self.token_embd.block_of(tokens[0] as usize);
            let token0 = tokens[0] - block.first as u32;
            self.gpu
                .count_launches(matches!(block.m, Matrix::Tuned(_)) as u64);
            return match &block.m {
                Matrix::Tuned(w) => mm::embed(
                    self.gpu.client(),
                    w,
                    self.no_ids.handle(),
                    1,
                    Some(token0),
                    self.x.handle(),
                )
                .map_err(|e| self.backend_err(e)),
                Matrix::Plain(w) => {
                    let toks = Tokens::One(token0);
                    embedding::launch_embedding(&self.gpu, w, toks, &self.no_ids, &self.x);
                    Ok(())
                }
            };
        }
        let ids = match self.device_step {
            Some(_) => self.token_dev.clone(),
            None => self.gpu.u32s(tokens),
        };
        if let Some(table) = self.token_embd.single() {
            return match table {
                Matrix::Tuned(w) => {
                    self.gpu.count_launches(1);
                    mm::embed(self.gpu.client(), w, ids.handle(), n, None, self.x.handle())
                        .map_err(|e| self.backend_err(e))
                }
                Matrix::Plain(w) => {
                    let toks = Tokens::Device(&ids, n);
                    embedding::launch_embedding(&self.gpu, w, toks, &self.no_ids, &self.x);
                    Ok(())
                }
            };
        }
        for b in self.token_embd.blocks() {
            match &b.m {
                Matrix::Tuned(w) => {
                    self.gpu.count_launches(1);
                    let (client, x) = (self.gpu.client(), self.x.handle());
                    mm::embed_rows(client, w, b.first, ids.handle(), n, x)
                        .map_err(|e| self.backend_err(e))?;
                }
                Matrix::Plain(w) => {
                    embedding::launch_embedding_rows(&self.gpu, w, b.first, &ids, n, &self.x)
                }
            }
        }
        Ok(())
    }

    /// `x += rmsnorm(W · h) * post` (Gemma's post-norms): the projection into `proj`, then
    /// one launch that normalises it and adds it to `x`.
    fn project_add_normed(
        &mut self,
        w: &Matrix<R>,
        h: &Buf,
        h16: Option<&Buf>,
        post: Option<&Buf>,
        l: usize,
        name: &str,
    ) -> Result<()> {
        let post = post
            .ok_or_else(|| Error::InvalidArgument(format!("blk.{l}.{name}.weight is missing")))?;
        if std::mem::take(&mut self.pending_add) {
            activation::launch_add_assign(
                &self.gpu,
                &self.x,
                &self.proj,
                self.n * self.model.config.n_embd,
            );
        }
        self.linear_x(w, h, h16, &self.proj, self.n)?;
        norm::launch_add_rms_normed(
            &self.gpu,
            &self.x,
            &self.proj,
            post,
            self.n,
            self.model.config.rms_eps,
        );
        Ok(())
    }

    /// `out[t] = W · x[t]` for the first `n` rows of `x`.
    fn linear(&self, w: &Matrix<R>, x: &Buf, out: &Buf, n: usize) -> Result<()> {
        self.linear_x(w, x, None, out, n)
    }

    /// [`Self::linear`] where `x16`, if given, holds `x` as the mat-mat's f16 activations
    /// (`acts16`) and `x` itself was not written.
    fn linear_x(
        &self,
        w: &Matrix<R>,
        x: &Buf,
        x16: Option<&Buf>,
        out: &Buf,
        n: usize,
    ) -> Result<()> {
        match w {
            Matrix::Plain(w) if x16.is_none() => {
                dequant::launch_linear_plain(&self.gpu, w, x, out, n);
                Ok(())
            }
            Matrix::Plain(_) => {
                Err(self
                    .backend_err("f16 activations reached a matrix without the quantized mat-mat"))
            }
            Matrix::Tuned(w) => self.linear_tuned(w, x, x16, out, n),
        }
    }

    /// [`Self::linear`] on the tuned kernels: one mat-vec up to `MAX_MATVEC_TOKENS` tokens,
    /// above that the quantized mat-mat on the matrix units where the device has them
    /// (`mm::prefill_kernel`), else a dequantize pass into the scratch and cubek's matmul.
    fn linear_tuned(
        &self,
        w: &QWeight<R>,
        x: &Buf,
        x16: Option<&Buf>,
        out: &Buf,
        n: usize,
    ) -> Result<()> {
        let client = self.gpu.client();
        // Asked only above the mat-vec's batches: single-token decode launches here per matrix.
        let mma = (n > MAX_MATVEC_TOKENS).then(|| mm::prefill_kernel(client, n));
        if x16.is_some() && !matches!(mma, Some(mm::PrefillKernel::Mma(_))) {
            return Err(self.backend_err(format!(
                "f16 activations of {n} tokens reached a product without the quantized mat-mat"
            )));
        }
        let r = if n == 1 {
            return self
                .matvec(mm::Matvec::new(w, x.handle(), out.handle()))
                .map(drop);
        } else if n <= MAX_MATVEC_TOKENS {
            self.gpu.count_launches(1);
            mm::matmul(client, w, x.handle(), out.handle(), n, None)
        } else if let Some(mm::PrefillKernel::Mma(cfg)) = mma {
            let cfg = mm::mma_tile(client, w, n, cfg);
            match x16 {
                Some(x16) => mm::launch_mma_half(client, w, x16.handle(), out.handle(), n, cfg),
                None => mm::launch_mma(client, w, x.handle(), out.handle(), n, cfg),
            }
            .map(|launches| self.gpu.count_launches(launches))
        } else {
            self.gpu.count_launches(2);
            let scratch = [&self.dequant, &self.dequant_logits]
                .into_iter()
                .flatten()
                .find(|s| s.elems() >= w.rows * w.cols)
                .ok_or_else(|| {
                    self.backend_err(format!(
                        "no dequantize scratch for a {}x{} matrix",
                        w.rows, w.cols
                    ))
                })?;
            mm::matmul(client, w, x.handle(), out.handle(), n, Some(scratch))
        };
        r.map_err(|e| self.backend_err(e))
    }
}

impl<R: Runtime> CubeBackend<R> {
    /// `logits[t] = W_out · xn[t]` for `rows` rows, the output matrix in row blocks: a mat-vec
    /// per row and block, each writing its block's slice of the row in place. Views of row `t`
    /// start at 256-byte multiples (wgpu's binding offsets) when n_embd and n_vocab are
    /// multiples of 64; blocks start at multiples of 64 rows.
    fn logits_split(&self, rows: usize) -> Result<()> {
        let c = &self.model.config;
        let (n_embd, n_vocab) = (c.n_embd, c.n_vocab);
        if rows > 1 && (n_embd % row_blocks::ROW_ALIGN != 0 || n_vocab % row_blocks::ROW_ALIGN != 0)
        {
            return Err(self.backend_err(format!(
                "all-token logits with the output matrix in row blocks need n_embd and n_vocab multiples of {} (this model: {n_embd}, {n_vocab})",
                row_blocks::ROW_ALIGN
            )));
        }
        for t in 0..rows {
            let x = self.xn.view(t * n_embd, n_embd);
            for b in self.output.blocks() {
                let y = self.logits.view(t * n_vocab + b.first, b.rows);
                self.linear(&b.m, &x, &y, 1)?;
            }
        }
        Ok(())
    }
}

/// Which block output a residual step projects: the attention's or the feed-forward's.
#[derive(Clone, Copy)]
enum Hidden {
    Attention,
    FeedForward,
}

impl<R: Runtime> CubeBackend<R> {
    /// `x += post_norm?(W · h)` for layer `l`'s output projection of `which` block.
    /// `h16`: `h` as the mat-mat's f16 activations (`acts16`), the only copy.
    fn residual(
        &mut self,
        l: usize,
        which: Hidden,
        h: &Buf,
        h16: Option<&Buf>,
        post_norm: bool,
    ) -> Result<()> {
        // The layer list moves out while its weights are borrowed by a `&mut self` step (a
        // pointer swap, no allocation).
        let layers = std::mem::take(&mut self.layers);
        let layer = &layers[l];
        let (w, post, name) = match which {
            Hidden::Attention => (
                &layer.attn_output,
                &layer.post_attention_norm,
                "post_attention_norm",
            ),
            Hidden::FeedForward => (&layer.ffn_down, &layer.post_ffw_norm, "post_ffw_norm"),
        };
        let r = if post_norm {
            self.project_add_normed(w, h, h16, post.as_ref(), l, name)
        } else {
            self.project_add(w, h, h16)
        };
        self.layers = layers;
        r
    }
}

/// The GPU runs each step of the model definition with its fused kernels: a single token
/// folds every RMSNorm into the projection after it (`matvec_norm`, `matvec_gated_norm`) and
/// every residual add into the projection before it (the `Accumulate` epilogue), 6 launches
/// per layer (7 when attention splits) + 2; a batch adds each residual inside the next norm.
impl<R: Runtime> Executor for CubeBackend<R> {
    fn limits(&self) -> Limits {
        Limits {
            ctx: self.ctx,
            max_batch: self.max_batch,
            n_vocab: self.model.config.n_vocab,
        }
    }

    fn begin_seqs(&mut self, seqs: &[SeqBatch<'_>]) -> Result<()> {
        let n = seqs.iter().map(|s| s.tokens.len()).sum();
        // The RoPE tables hold `ctx` positions; page tables may name more.
        let kv_len = seqs
            .iter()
            .map(|s| s.pos + s.tokens.len())
            .max()
            .unwrap_or(0);
        if kv_len > self.ctx {
            return Err(Error::ContextFull {
                needed: kv_len,
                capacity: self.ctx,
            });
        }
        let host = &mut self.seq_host;
        let layout = seqs.iter().map(|s| (s.pos, s.tokens.len(), s.pages));
        attention::paged_meta(layout, &mut host.meta);
        host.picks.clear();
        let mut end = 0u32;
        for s in seqs {
            end += s.tokens.len() as u32;
            if s.logits {
                host.picks.push(end - 1);
            }
        }
        let n_logits = host.picks.len();
        host.picks.push(0); // never an empty buffer
        let (meta, logit_rows) = (self.gpu.u32s(&host.meta), self.gpu.u32s(&host.picks));
        self.begin(n, 0, false)?;
        self.seqs = Some(SeqRows {
            meta,
            kv_len,
            logit_rows,
            n_logits,
        });
        Ok(())
    }

    fn begin(&mut self, n: usize, pos: usize, all_logits: bool) -> Result<()> {
        (self.n, self.pos, self.all_logits, self.pending_add) = (n, pos, all_logits, false);
        self.seqs = None;
        self.launch_start = self.gpu.launches();
        if self.profiling {
            self.profiler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start();
        }
        Ok(())
    }

    fn embed(&mut self, tokens: &[u32], scale: f32) -> Result<()> {
        self.lookup(tokens)?;
        if scale != 1.0 {
            let n = tokens.len() * self.model.config.n_embd;
            activation::launch_scale(&self.gpu, &self.x, scale, n);
        }
        Ok(())
    }

    fn attn_in(&mut self, l: usize) -> Result<()> {
        let layer = &self.layers[l];
        if let (Qkv::Fused(w), true) = (&layer.attn_qkv, self.folds_norm(layer.qkv_folds_norm)) {
            let eps = self.model.config.rms_eps;
            return self
                .matvec(mm::Matvec {
                    norm: Some((layer.attn_norm.handle(), eps)),
                    ..mm::Matvec::new(w, self.x.handle(), self.qkv.handle())
                })
                .map(drop);
        }
        let norm_w = layer.attn_norm.clone();
        let tuned = match &layer.attn_qkv {
            Qkv::Fused(_) => true,
            Qkv::Separate(ws) => ws.iter().all(|w| matches!(w, Matrix::Tuned(_))),
        };
        let x16 = self.norm(&norm_w, tuned)?;
        let (layer, n, x16) = (&self.layers[l], self.n, x16.as_ref());
        match &layer.attn_qkv {
            Qkv::Fused(w) => self.linear_tuned(w, &self.xn, x16, &self.qkv, n),
            Qkv::Separate([wq, wk, wv]) => {
                self.linear_x(wq, &self.xn, x16, &self.att, n)?;
                self.linear_x(wk, &self.xn, x16, &self.k, n)?;
                self.linear_x(wv, &self.xn, x16, &self.v, n)
            }
        }
    }

    fn rope_store(&mut self, l: usize, qk_norm: bool, rope: RopeKind) -> Result<()> {
        let c = &self.model.config;
        if rope == RopeKind::Local && c.sliding_window.is_none() {
            return Err(unsupported(
                self.kind.name(),
                "a local RoPE table without a sliding window",
            ));
        }
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        if qk_norm {
            let layer = &self.layers[l];
            let missing =
                |what: &str| Error::InvalidArgument(format!("blk.{l}.{what}.weight is missing"));
            let qn = layer
                .attn_q_norm
                .as_ref()
                .ok_or_else(|| missing("attn_q_norm"))?;
            let kn = layer
                .attn_k_norm
                .as_ref()
                .ok_or_else(|| missing("attn_k_norm"))?;
            // Where q and k lie: parts of the fused QKV rows, or their own buffers.
            let (q_buf, k_buf, q_at, k_at) = match &layer.attn_qkv {
                Qkv::Fused(_) => {
                    let row = q_dim + 2 * kv_dim;
                    (&self.qkv, &self.qkv, (0, row), (q_dim, row))
                }
                Qkv::Separate(_) => (&self.att, &self.k, (0, q_dim), (0, kv_dim)),
            };
            let rows = |heads: usize, (off, stride): (usize, usize)| norm::HeadRows {
                tokens: self.n,
                heads,
                off,
                stride,
            };
            norm::launch_rms_norm_heads(&self.gpu, q_buf, qn, rows(c.n_head, q_at), c.rms_eps);
            norm::launch_rms_norm_heads(&self.gpu, k_buf, kn, rows(c.n_head_kv, k_at), c.rms_eps);
        }
        let shape = RopeShape {
            n_head: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: hd,
            rot_pairs: c.rope_dim / 2,
        };
        let src = match &self.layers[l].attn_qkv {
            Qkv::Fused(_) => RopeSrc::Fused(&self.qkv),
            Qkv::Separate(_) => RopeSrc::Separate {
                q: &self.att,
                k: &self.k,
                v: &self.v,
            },
        };
        let (cos, sin) = match rope {
            RopeKind::Global => (&self.cos, &self.sin),
            RopeKind::Local => (&self.cos_local, &self.sin_local),
        };
        rope::launch_rope_store_mode(
            &self.gpu,
            src,
            &self.q,
            cos,
            sin,
            &self.cache,
            l,
            self.pos_arg(),
            self.n,
            shape,
            c.rope_style == RopeStyle::Neox,
        );
        Ok(())
    }

    fn attention(&mut self, l: usize, window: Option<usize>) -> Result<()> {
        let c = &self.model.config;
        let shape = AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
        };
        attention::launch_attention_window(
            &self.gpu,
            &self.q,
            &self.cache,
            l,
            &self.scratch,
            &self.att,
            self.pos_arg(),
            self.n,
            shape,
            window,
        );
        Ok(())
    }

    fn attn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let att = self.att.clone();
        self.residual(l, Hidden::Attention, &att, None, post_norm)
    }

    fn ffn_in(&mut self, l: usize, act: Activation) -> Result<()> {
        self.ffn_half = false;
        let layer = &self.layers[l];
        if let (Matrix::Tuned(gate), Matrix::Tuned(up), true) = (
            &layer.ffn_gate,
            &layer.ffn_up,
            self.folds_norm(layer.ffn_folds_norm),
        ) {
            let eps = self.model.config.rms_eps;
            let act = match act {
                Activation::Silu => activation::GateAct::Silu,
                Activation::GeluTanh => activation::GateAct::GeluTanh,
            };
            return self
                .matvec(mm::Matvec {
                    up: Some((up, act)),
                    norm: Some((layer.ffn_norm.handle(), eps)),
                    ..mm::Matvec::new(gate, self.x.handle(), self.gate.handle())
                })
                .map(drop);
        }
        let norm_w = layer.ffn_norm.clone();
        let tuned = |w: &Matrix<R>| matches!(w, Matrix::Tuned(_));
        let x16 = self.norm(&norm_w, tuned(&layer.ffn_gate) && tuned(&layer.ffn_up))?;
        let layer = &self.layers[l];
        let h16 = if tuned(&layer.ffn_down) {
            self.acts16_for(self.model.config.n_ff)
        } else {
            None
        };
        self.ffn_half = self.gated_ffn(
            &layer.ffn_gate,
            &layer.ffn_up,
            self.n,
            act,
            x16.as_ref(),
            h16.as_ref(),
        )?;
        Ok(())
    }

    fn ffn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let h = self.gate.clone();
        let h16 = if std::mem::take(&mut self.ffn_half) {
            self.acts16_for(self.model.config.n_ff)
        } else {
            None
        };
        self.residual(l, Hidden::FeedForward, &h, h16.as_ref(), post_norm)
    }

    fn logits(&mut self) -> Result<()> {
        let (n, c) = (self.n, &self.model.config);
        let (n_vocab, eps) = (c.n_vocab, c.rms_eps);
        let first = if self.all_logits { 0 } else { n - 1 };
        // A multi-sequence batch asks for the last row of some sequences; else a run of rows.
        let (rows, picked) = match &self.seqs {
            Some(s) => (
                s.n_logits,
                Some(norm::Rows::Picked {
                    pick: &s.logit_rows,
                    count: s.n_logits,
                    end: n,
                }),
            ),
            None => (n - first, None),
        };
        self.n_logit_rows = rows;
        if rows == 0 {
            return Ok(());
        }
        let norm_rows = picked.unwrap_or(norm::Rows::Range { first, count: rows });
        if self.folds_norm(self.output_folds_norm) && picked.is_none() {
            // Each row block writes its slice of the logits (one block: the whole row); the
            // blocks share one conversion of `x` to halves where they take them.
            let mut half_ready = false;
            for b in self.output.blocks() {
                let Matrix::Tuned(w) = &b.m else {
                    unreachable!("output_folds_norm holds only for tuned blocks")
                };
                let out = self.logits.view(b.first, b.rows);
                let op = mm::Matvec {
                    norm: Some((self.output_norm.handle(), eps)),
                    half_ready,
                    ..mm::Matvec::new(w, self.x.handle(), out.handle())
                };
                half_ready = self.matvec(op)?;
            }
            return Ok(());
        }
        if std::mem::take(&mut self.pending_add) {
            norm::launch_add_rms_norm(
                &self.gpu,
                &self.x,
                &self.proj,
                &self.output_norm,
                &self.xn,
                norm_rows,
                eps,
            );
        } else {
            norm::launch_rms_norm(
                &self.gpu,
                &self.x,
                &self.output_norm,
                &self.xn,
                norm_rows,
                eps,
            );
        }
        if self.logits.len() < rows * n_vocab {
            // Perplexity's all-token logits and multi-sequence batches reach this.
            self.logits = self.gpu.zeros(rows * n_vocab);
            self.host_logits.resize(rows * n_vocab, 0.0);
            // Recorded graphs write the old buffer: record them again.
            #[cfg(any(feature = "cuda", feature = "hip"))]
            {
                self.replay = None;
            }
        }
        let Some(output) = self.output.single() else {
            return self.logits_split(rows);
        };
        let mma = matches!(
            mm::prefill_kernel(self.gpu.client(), rows),
            mm::PrefillKernel::Mma(_)
        );
        // The quantized mat-mat reads the weight as it is: no scratch to size.
        if let (Matrix::Tuned(w), false) = (output, mma) {
            let elems = w.rows * w.cols;
            let fits =
                |s: &Option<DequantScratch<R>>| s.as_ref().is_some_and(|s| s.elems() >= elems);
            // Buffer views start at multiples of 256 bytes everywhere (wgpu's binding offsets).
            let aligned = (MAX_MATVEC_TOKENS * 4 * w.cols) % 256 == 0
                && (MAX_MATVEC_TOKENS * 4 * n_vocab) % 256 == 0;
            if rows > MAX_MATVEC_TOKENS
                && !fits(&self.dequant)
                && !aligned
                && !fits(&self.dequant_logits)
            {
                self.dequant_logits = Some(DequantScratch::new(self.gpu.client(), elems));
            }
            if rows > MAX_MATVEC_TOKENS && !fits(&self.dequant) && aligned {
                // Only perplexity multiplies the vocabulary projection by a batch. Rather than a
                // vocabulary-sized scratch (2 GiB on an 8B model), it runs as multi-token
                // mat-vecs, each reading the weight once for up to MAX_MATVEC_TOKENS rows.
                let (client, cols) = (self.gpu.client(), w.cols);
                for first in (0..rows).step_by(MAX_MATVEC_TOKENS) {
                    let k = MAX_MATVEC_TOKENS.min(rows - first);
                    let x = self
                        .xn
                        .handle()
                        .clone()
                        .offset_start((first * cols * 4) as u64);
                    let y = self
                        .logits
                        .handle()
                        .clone()
                        .offset_start((first * n_vocab * 4) as u64);
                    self.gpu.count_launches(1);
                    mm::matmul(client, w, &x, &y, k, None).map_err(|e| self.backend_err(e))?;
                }
                return Ok(());
            }
        }
        self.linear(output, &self.xn, &self.logits, rows)
    }

    fn probe(&mut self, step: &Step) {
        self.lap(step.name());
    }

    fn end(&mut self) -> Result<()> {
        self.host_fresh = false;
        self.launches_last = self.gpu.launches() - self.launch_start;
        Ok(())
    }
}

#[cfg(any(feature = "cuda", feature = "hip"))]
impl<R: Runtime> CubeBackend<R> {
    /// Runs a single-token step as a graph replay; `None` where replay is off (wgpu, profiling,
    /// `ROCFORGE_GRAPH=0`, or a capture that failed, which turns it off for this backend and
    /// leaves the plain launches to run the step). Returns the step's argmax.
    fn replay_step(&mut self, token: u32, pos: usize) -> Result<Option<u32>> {
        if self.profiling || !self.replay_on || !graphs_enabled() {
            return Ok(None);
        }
        if self.replay.is_none() {
            let io = [
                self.token_dev.handle(),
                self.pos_dev.handle(),
                self.best.handle(),
            ];
            match rocforge_kernels::ops::graph::replayer(self.gpu.client(), &io) {
                Ok(replayer) => {
                    self.replay = Some(Replay {
                        replayer,
                        graphs: Vec::new(),
                        nodes: 0,
                        steps: 0,
                        enqueue: Default::default(),
                    })
                }
                // No graphs on this runtime (wgpu): plain launches from now on, without asking
                // again every step.
                Err(_) => {
                    self.replay_on = false;
                    return Ok(None);
                }
            }
        }
        if pos >= self.ctx {
            return Ok(None);
        }
        let bucket = replay_bucket(pos + 1, self.ctx);
        let known = self
            .replay
            .as_ref()
            .and_then(|r| r.graphs.iter().find(|(b, _)| *b == bucket).map(|&(_, g)| g));
        if self.cube_dirty {
            self.gpu.sync().map_err(|e| self.err(e))?;
            self.cube_dirty = false;
        }
        let graph = match known {
            Some(g) => g,
            None => match self.record_step(token, pos, bucket)? {
                Some(g) => g,
                None => return Ok(None),
            },
        };
        let Some(r) = self.replay.as_mut() else {
            return Ok(None);
        };
        let start = std::time::Instant::now();
        let replayed = r
            .replayer
            .write_u32(IO_TOKEN, token)
            .and_then(|_| r.replayer.write_u32(IO_POS, pos as u32))
            .and_then(|_| r.replayer.replay(graph))
            .map(|_| {
                r.enqueue += start.elapsed();
                r.steps += 1;
            })
            .and_then(|_| r.replayer.read_u32(IO_BEST));
        r.nodes = r.replayer.nodes(graph);
        self.launches_last = r.nodes as u64;
        replayed
            .map(Some)
            .map_err(|e| self.backend_err(format!("graph replay: {e}")))
    }

    /// Records the step for `bucket` (launching nothing) and captures it; `None` (and replay off
    /// for this backend) when the recording or the capture fails.
    fn record_step(&mut self, token: u32, pos: usize, bucket: usize) -> Result<Option<usize>> {
        let plan = self.plan.clone();
        self.device_step = Some(bucket);
        let (out, rec) = rocforge_kernels::ops::launch::record(|| -> Result<u64> {
            arch::forward(self, &plan, &[token], pos, false)?;
            let nv = self.model.config.n_vocab;
            argmax::launch_argmax(&self.gpu, &self.logits, 0, nv, &self.best);
            Ok(self.launches_last + 1)
        });
        self.device_step = None;
        let counted = out?;
        let Some(r) = self.replay.as_mut() else {
            return Ok(None);
        };
        // Every launch of the step must have gone through the recorder (a launch that reached
        // CubeCL directly would be missing from the graph).
        let captured = if rec.nodes.len() as u64 != counted {
            Err(format!(
                "the step counted {counted} launches but recorded {}",
                rec.nodes.len()
            ))
        } else {
            r.replayer.capture(rec)
        };
        match captured {
            Ok(g) => {
                r.graphs.push((bucket, g));
                Ok(Some(g))
            }
            Err(why) => {
                eprintln!("rocforge: graph replay off for this backend ({why}); decoding with plain launches");
                self.replay = None;
                REPLAY_OFF.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(None)
            }
        }
    }
}

/// Set when a capture failed: later backends in this process launch plainly from the start.
#[cfg(any(feature = "cuda", feature = "hip"))]
static REPLAY_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether decode steps may be replayed: not after a failed capture, nor with
/// `ROCFORGE_GRAPH=0` (for A/B measurements and as an escape hatch).
#[cfg(any(feature = "cuda", feature = "hip"))]
fn graphs_enabled() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !REPLAY_OFF.load(std::sync::atomic::Ordering::Relaxed)
        && *ENV.get_or_init(|| std::env::var("ROCFORGE_GRAPH").map_or(true, |v| v != "0"))
}

impl<R: Runtime> Backend for CubeBackend<R> {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn device_name(&self) -> String {
        self.device_name.clone()
    }

    fn capacity(&self) -> usize {
        self.ctx
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, all_logits: bool) -> Result<()> {
        self.replayed = None;
        #[cfg(any(feature = "cuda", feature = "hip"))]
        if let ([token], false) = (tokens, all_logits) {
            if let Some(best) = self.replay_step(*token, pos)? {
                self.replayed = Some(best);
                self.host_fresh = false;
                self.n_logit_rows = 1;
                return Ok(());
            }
        }
        self.cube_dirty = true;
        let plan = self.plan.clone();
        arch::forward(self, &plan, tokens, pos, all_logits)
    }

    fn kv_page_size(&self) -> Option<usize> {
        Some(attention::KV_PAGE_SIZE)
    }

    fn forward_seqs(&mut self, seqs: &[SeqBatch<'_>]) -> Result<()> {
        self.replayed = None;
        self.cube_dirty = true;
        let plan = self.plan.clone();
        let mut tokens = std::mem::take(&mut self.seq_host.tokens);
        let out = arch::forward_seqs(self, &plan, seqs, &mut tokens, attention::KV_PAGE_SIZE);
        self.seq_host.tokens = tokens;
        out
    }

    fn logits(&mut self) -> Result<&[f32]> {
        let n = self.n_logit_rows * self.model.config.n_vocab;
        if !self.host_fresh {
            self.gpu
                .read_f32_into(&self.logits, n, &mut self.host_logits)
                .map_err(|e| self.err(e))?;
            self.check_device_fault()?;
            self.host_fresh = true;
        }
        Ok(&self.host_logits[..n])
    }

    fn set_replay(&mut self, on: bool) {
        self.replay_on = on;
    }

    fn last_forward_replayed(&self) -> bool {
        self.replayed.is_some()
    }

    fn argmax(&mut self) -> Result<u32> {
        if let Some(best) = self.replayed {
            self.check_device_fault()?;
            return Ok(best);
        }
        let nv = self.model.config.n_vocab;
        argmax::launch_argmax(
            &self.gpu,
            &self.logits,
            (self.n_logit_rows - 1) * nv,
            nv,
            &self.best,
        );
        let id = self.gpu.read_u32(&self.best).map_err(|e| self.err(e))?;
        self.check_device_fault()?;
        Ok(id[0])
    }

    fn argmax_rows(&mut self, n_vocab: usize) -> Result<Vec<u32>> {
        let rows = self.n_logit_rows;
        if let Some(best) = self.replayed {
            self.check_device_fault()?;
            return Ok(vec![best]);
        }
        if rows == 0 || n_vocab != self.model.config.n_vocab {
            return Ok(Vec::new());
        }
        argmax::launch_argmax_rows(&self.gpu, &self.logits, 0, n_vocab, rows, &self.best_rows);
        let ids = self
            .gpu
            .read_u32(&self.best_rows)
            .map_err(|e| self.err(e))?;
        self.check_device_fault()?;
        Ok(ids[..rows].to_vec())
    }

    fn memory(&self) -> MemoryUsage {
        let layer_bytes = |l: &DeviceLayer<R>| -> u64 {
            [&l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down]
                .iter()
                .map(|w| w.bytes())
                .sum::<u64>()
                + l.attn_qkv.matrices().iter().map(|m| m.2).sum::<u64>()
                + l.attn_norm.bytes()
                + l.ffn_norm.bytes()
        };
        let tied = self.model.weights.tied_output && self.token_embd.is_tuned();
        let weights = self.layers.iter().map(layer_bytes).sum::<u64>()
            + self.token_embd.bytes()
            + if tied { 0 } else { self.output.bytes() }
            + self.output_norm.bytes()
            + self.cos.bytes()
            + self.sin.bytes();
        let scratch = [
            &self.x,
            &self.xn,
            &self.qkv,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.proj,
            &self.gate,
            &self.up,
            &self.logits,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum::<u64>()
            + self.scratch.bytes();
        let (in_use, reserved) = self.gpu.memory_usage().unwrap_or((0, 0));
        MemoryUsage {
            weights_bytes: weights,
            kv_cache_bytes: self.cache.bytes(),
            scratch_bytes: scratch,
            device_bytes_in_use: in_use,
            device_bytes_reserved: reserved,
        }
    }

    fn launches_last_forward(&self) -> u64 {
        #[cfg(any(feature = "cuda", feature = "hip"))]
        if let (Some(_), Some(r)) = (self.replayed, &self.replay) {
            return r.nodes as u64;
        }
        self.launches_last
    }

    fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profiler
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .set(on);
    }

    fn op_profile(&self) -> Vec<OpTiming> {
        self.profiler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report()
    }
}

fn no_backend(kind: BackendKind, problem: impl Into<String>) -> Error {
    Error::Backend {
        backend: kind.name().into(),
        problem: problem.into(),
    }
}

/// Creates the GPU backend `kind`, after checking its device is really there (a HIP client on
/// a machine without an AMD GPU aborts the process, so it is never created blind).
pub fn create(
    kind: BackendKind,
    model: Arc<Model>,
    opts: &BackendOptions,
) -> Result<Box<dyn Backend>> {
    create_with_max_block(kind, model, opts, None)
}

/// [`create`], with the row blocks of a split embedding or output matrix at most
/// `max_block_bytes` where that is below the device's largest buffer: tests split a tiny
/// model's matrices with it as a device with small buffers splits a large model's.
pub fn create_with_max_block(
    kind: BackendKind,
    model: Arc<Model>,
    opts: &BackendOptions,
    max_block_bytes: Option<u64>,
) -> Result<Box<dyn Backend>> {
    match kind {
        #[cfg(feature = "hip")]
        BackendKind::Hip => {
            let found = probe::hip_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Hip::new(
                gpu,
                kind,
                found.name,
                found.free_bytes,
                model,
                opts,
                max_block_bytes,
            )?))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let found = probe::cuda_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Cuda::new(
                gpu,
                kind,
                found.name,
                found.free_bytes,
                model,
                opts,
                max_block_bytes,
            )?))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let device = probe::wgpu_gpu().unwrap_or_default();
            let gpu = std::panic::catch_unwind(|| Gpu::on(&device))
                .map_err(|_| no_backend(kind, "no wgpu adapter could be opened (is a Vulkan, Metal or DX12 driver installed?)"))?;
            let name = format!("{device:?} via {}", Runtime::name(gpu.client()));
            Ok(Box::new(Wgpu::new(
                gpu,
                kind,
                name,
                None,
                model,
                opts,
                max_block_bytes,
            )?))
        }
        k => Err(no_backend(
            k,
            format!("this build has no `{k}` backend; rebuild with `--features {k}`"),
        )),
    }
}

/// The first GPU backend whose device is really present: HIP, CUDA, then wgpu on a real GPU
/// adapter (never a CPU adapter such as lavapipe, which the CPU backend outruns).
pub fn create_auto(model: Arc<Model>, opts: &BackendOptions) -> Result<Option<Box<dyn Backend>>> {
    #[cfg(feature = "hip")]
    if probe::hip_devices().is_ok() {
        return create(BackendKind::Hip, model, opts).map(Some);
    }
    #[cfg(feature = "cuda")]
    if probe::cuda_devices().is_ok() {
        return create(BackendKind::Cuda, model, opts).map(Some);
    }
    #[cfg(feature = "wgpu")]
    if probe::wgpu_gpu().is_some() {
        return create(BackendKind::Wgpu, model, opts).map(Some);
    }
    let _ = (model, opts);
    Ok(None)
}

/// Device probes that never create a client: driver libraries are opened by hand and asked for
/// a device count.
mod probe {
    /// What a driver says of its first device, without creating a client.
    #[cfg(any(feature = "hip", feature = "cuda"))]
    pub struct Found {
        /// Device 0's name and the driver version, e.g. `NVIDIA H200 (CUDA driver 13.0)`.
        pub name: String,
        /// Device 0's free memory in bytes, where the driver says.
        pub free_bytes: Option<u64>,
    }

    /// Driver entry points probed, by symbol name.
    #[cfg(any(feature = "hip", feature = "cuda"))]
    struct Symbols {
        what: &'static str,
        init: Option<&'static [u8]>,
        count: &'static [u8],
        get: &'static [u8],
        name: &'static [u8],
        version: &'static [u8],
    }

    #[cfg(any(feature = "hip", feature = "cuda"))]
    fn probe(libs: &[String], sym: &Symbols) -> Result<Found, String> {
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Count = unsafe extern "C" fn(*mut i32) -> i32;
        type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
        type Name = unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> i32;
        let what = sym.what;
        let mut tried = Vec::new();
        for lib_name in libs {
            // SAFETY: loading a driver library runs its initialisers, which is what creating a
            // client would do anyway; the symbols are called with their C signatures.
            let lib = match unsafe { libloading::Library::new(lib_name) } {
                Ok(l) => l,
                Err(e) => {
                    tried.push(format!("{lib_name}: {e}"));
                    continue;
                }
            };
            unsafe {
                if let Some(init) = sym.init {
                    let f: libloading::Symbol<Init> =
                        lib.get(init).map_err(|e| format!("{lib_name}: {e}"))?;
                    let rc = f(0);
                    if rc != 0 {
                        return Err(format!("{what} driver initialisation failed (error {rc}): no usable {what} GPU"));
                    }
                }
                let f: libloading::Symbol<Count> =
                    lib.get(sym.count).map_err(|e| format!("{lib_name}: {e}"))?;
                let mut n = 0i32;
                let rc = f(&mut n);
                if rc != 0 || n <= 0 {
                    return Err(format!(
                        "no {what} GPU found (device count {n}, error {rc})"
                    ));
                }
                // The name is a nicety: any failure leaves a generic one.
                let mut name = format!("{what} GPU 0 of {n}");
                if let (Ok(get), Ok(get_name)) =
                    (lib.get::<Get>(sym.get), lib.get::<Name>(sym.name))
                {
                    let (mut dev, mut buf) = (0i32, [0 as std::ffi::c_char; 256]);
                    if get(&mut dev, 0) == 0
                        && get_name(buf.as_mut_ptr(), buf.len() as i32 - 1, dev) == 0
                    {
                        let s = std::ffi::CStr::from_ptr(buf.as_ptr())
                            .to_string_lossy()
                            .trim()
                            .to_string();
                        if !s.is_empty() {
                            name = if n > 1 {
                                format!("{s} (device 0 of {n})")
                            } else {
                                s
                            };
                        }
                    }
                }
                if let Ok(version) = lib.get::<Count>(sym.version) {
                    let mut v = 0i32;
                    if version(&mut v) == 0 && v > 0 {
                        name = format!("{name}, {what} driver {}.{}", v / 1000, (v % 1000) / 10);
                    }
                }
                let free_bytes = free_memory(&lib, what);
                // Keep the library loaded: the runtime will use it.
                std::mem::forget(lib);
                return Ok(Found { name, free_bytes });
            }
        }
        Err(format!(
            "the {what} runtime library is not installed (tried {})",
            tried.join("; ")
        ))
    }

    /// Free memory of device 0. CUDA needs a current context for `cuMemGetInfo`: the
    /// device's primary context, which the CubeCL runtime retains too, is retained and made
    /// current on this thread for the query (and kept retained, so it is not torn down
    /// between this query and the runtime's own retain).
    #[cfg(any(feature = "hip", feature = "cuda"))]
    unsafe fn free_memory(lib: &libloading::Library, what: &str) -> Option<u64> {
        type MemInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
        let (mut free, mut total) = (0usize, 0usize);
        if what == "HIP" {
            let info: libloading::Symbol<MemInfo> = lib.get(b"hipMemGetInfo\0").ok()?;
            return (info(&mut free, &mut total) == 0).then_some(free as u64);
        }
        type Ctx = *mut std::ffi::c_void;
        type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
        type Retain = unsafe extern "C" fn(*mut Ctx, i32) -> i32;
        type Push = unsafe extern "C" fn(Ctx) -> i32;
        type Pop = unsafe extern "C" fn(*mut Ctx) -> i32;
        let get: libloading::Symbol<Get> = lib.get(b"cuDeviceGet\0").ok()?;
        let retain: libloading::Symbol<Retain> = lib.get(b"cuDevicePrimaryCtxRetain\0").ok()?;
        let push: libloading::Symbol<Push> = lib.get(b"cuCtxPushCurrent_v2\0").ok()?;
        let pop: libloading::Symbol<Pop> = lib.get(b"cuCtxPopCurrent_v2\0").ok()?;
        let info: libloading::Symbol<MemInfo> = lib.get(b"cuMemGetInfo_v2\0").ok()?;
        let (mut dev, mut ctx): (i32, Ctx) = (0, std::ptr::null_mut());
        if get(&mut dev, 0) != 0 || retain(&mut ctx, dev) != 0 || push(ctx) != 0 {
            return None;
        }
        let rc = info(&mut free, &mut total);
        let mut popped: Ctx = std::ptr::null_mut();
        pop(&mut popped);
        (rc == 0).then_some(free as u64)
    }

    /// Number of AMD GPUs HIP sees.
    #[cfg(feature = "hip")]
    pub fn hip_devices() -> Result<Found, String> {
        if !std::path::Path::new("/dev/kfd").exists() && cfg!(target_os = "linux") {
            return Err(
                "no AMD GPU: /dev/kfd is missing (ROCm driver not loaded or no device)".into(),
            );
        }
        let mut libs: Vec<String> = ["ROCM_PATH", "HIP_PATH"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .chain(["/opt/rocm".to_string()])
            .map(|p| format!("{p}/lib/libamdhip64.so"))
            .collect();
        libs.push("libamdhip64.so".into());
        let sym = Symbols {
            what: "HIP",
            init: None,
            count: b"hipGetDeviceCount\0",
            get: b"hipDeviceGet\0",
            name: b"hipDeviceGetName\0",
            version: b"hipDriverGetVersion\0",
        };
        probe(&libs, &sym)
    }

    /// Number of NVIDIA GPUs the CUDA driver sees.
    #[cfg(feature = "cuda")]
    pub fn cuda_devices() -> Result<Found, String> {
        let libs = ["libcuda.so.1".to_string(), "libcuda.so".to_string()];
        let sym = Symbols {
            what: "CUDA",
            init: Some(b"cuInit\0"),
            count: b"cuDeviceGetCount\0",
            get: b"cuDeviceGet\0",
            name: b"cuDeviceGetName\0",
            version: b"cuDriverGetVersion\0",
        };
        probe(&libs, &sym)
    }

    /// A real GPU adapter for wgpu (discrete first, then integrated), if any.
    #[cfg(feature = "wgpu")]
    pub fn wgpu_gpu() -> Option<rocforge_kernels::ops::gpu::cubecl::wgpu::WgpuDevice> {
        use rocforge_kernels::ops::gpu::cubecl::wgpu::{
            AutoGraphicsApi, GraphicsApi, WgpuDevice, WgpuRuntime,
        };
        use rocforge_kernels::ops::gpu::Runtime;
        let backend = AutoGraphicsApi::backend();
        let found = std::panic::catch_unwind(|| {
            (
                !WgpuRuntime::enumerate_devices(0, &backend).is_empty(),
                !WgpuRuntime::enumerate_devices(1, &backend).is_empty(),
            )
        });
        match found {
            Ok((true, _)) => Some(WgpuDevice::DiscreteGpu(0)),
            Ok((false, true)) => Some(WgpuDevice::IntegratedGpu(0)),
            _ => None,
        }
    }
}
