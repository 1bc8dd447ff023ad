//! The GPU backend: the forward pass of [`super::cpu`] (same math, same op order) as CubeCL
//! kernels, generic over the runtime. `Hip`, `Cuda` and `Wgpu` are aliases of one type.
//!
//! Weights go up once: matrices through `ops::matmul`'s `QWeight` (the tuned mat-vec and
//! prefill mat-mat), with the plain kernel of `ops::dequant` for formats it lacks; the embedding
//! table also in its GGUF layout for the lookup. Activations, the KV cache and the logits live on
//! the device. A decode step passes its token as a kernel argument, allocates nothing and
//! synchronises once: when the host reads the argmax (one `u32`) or the logits.

use std::sync::Arc;

use rocforge_kernels::ops::attention::{self, AttnScratch, AttnShape, KvCache, KvType};
use rocforge_kernels::ops::dequant::{self, DeviceWeight};
use rocforge_kernels::ops::embedding::{self, Tokens};
use rocforge_kernels::ops::gpu::{Buf, Gpu, GpuError, Runtime};
use rocforge_kernels::ops::matmul::{self as mm, DequantScratch, Epilogue, QWeight, MAX_MATVEC_TOKENS};
use rocforge_kernels::ops::rope::{self, RopeShape};
use rocforge_kernels::ops::{activation, argmax, norm};

use super::{Backend, BackendKind, BackendOptions, MemoryUsage};
use crate::error::{Error, Result};
use crate::model::{Model, Weight};

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
    fn upload(gpu: &Gpu<R>, ty: rocforge_kernels::GgmlType, bytes: &[u8], rows: usize, cols: usize) -> std::result::Result<Self, String> {
        match QWeight::upload(gpu.client(), ty, rows, cols, bytes) {
            Ok(w) => Ok(Self::Tuned(w)),
            Err(mm::MatmulError::UnsupportedType(_)) => DeviceWeight::upload(gpu, ty, bytes, rows, cols).map(Self::Plain).map_err(|e| e.to_string()),
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

/// One block's weights on the device; shapes as in [`crate::model::LayerWeights`].
struct DeviceLayer<R: Runtime> {
    attn_norm: Buf,             // (n_embd)
    attn_q: Matrix<R>,          // (n_head*head_dim, n_embd)
    attn_k: Matrix<R>,          // (n_head_kv*head_dim, n_embd)
    attn_v: Matrix<R>,          // (n_head_kv*head_dim, n_embd)
    attn_output: Matrix<R>,     // (n_embd, n_head*head_dim)
    ffn_norm: Buf,              // (n_embd)
    ffn_gate: Matrix<R>,        // (n_ff, n_embd)
    ffn_up: Matrix<R>,          // (n_ff, n_embd)
    ffn_down: Matrix<R>,        // (n_embd, n_ff)
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
    token_embd: DeviceWeight, // (n_vocab, n_embd) GGUF layout, for the lookup
    output: Matrix<R>,        // (n_vocab, n_embd), token_embd's bytes when tied
    layers: Vec<DeviceLayer<R>>,
    dequant: Option<DequantScratch<R>>, // (largest matrix) f32, for prefill mat-mats
    output_norm: Buf, // (n_embd)
    cos: Buf,         // (ctx, rope_dim/2)
    sin: Buf,         // (ctx, rope_dim/2)
    // Activations, one row per token in the batch.
    x: Buf,      // (batch, n_embd) residual stream
    xn: Buf,     // (batch, n_embd) normalised input of a block
    q: Buf,      // (batch, n_head*head_dim)
    k: Buf,      // (batch, n_head_kv*head_dim)
    v: Buf,      // (batch, n_head_kv*head_dim)
    att: Buf,    // (batch, n_head*head_dim) attention output
    proj: Buf,   // (batch, n_embd) output of attn_output / ffn_down
    gate: Buf,   // (batch, n_ff)
    up: Buf,     // (batch, n_ff)
    logits: Buf, // (n_vocab) or (batch, n_vocab) for all-token logits
    best: Buf,   // (1) argmax of the last logits row
    no_ids: Buf, // (1) unused device token buffer: single-token embedding passes the id as an argument
    cache: KvCache,
    scratch: AttnScratch,
    host_logits: Vec<f32>,
    host_fresh: bool,
    n_logit_rows: usize,
    launches_last: u64,
}

impl<R: Runtime> CubeBackend<R> {
    /// Uploads `model` to `gpu` and allocates every buffer.
    pub fn new(gpu: Gpu<R>, kind: BackendKind, device_name: String, model: Arc<Model>, opts: &BackendOptions) -> Result<Self> {
        let c = &model.config;
        let w = &model.weights;
        let (ctx, b) = (opts.ctx, opts.max_batch.min(opts.ctx));
        let upload = |wt: &Weight| -> Result<Matrix<R>> {
            Matrix::upload(&gpu, wt.ty, model.bytes(wt), wt.rows, wt.cols)
                .map_err(|e| Error::Backend { backend: kind.name().into(), problem: format!("tensor `{}`: {e}", wt.name) })
        };
        let token_embd = DeviceWeight::upload(&gpu, w.token_embd.ty, model.bytes(&w.token_embd), c.n_vocab, c.n_embd)
            .map_err(|e| Error::Backend { backend: kind.name().into(), problem: format!("tensor `token_embd.weight`: {e}") })?;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    attn_norm: gpu.f32s(&l.attn_norm),
                    attn_q: upload(&l.attn_q)?,
                    attn_k: upload(&l.attn_k)?,
                    attn_v: upload(&l.attn_v)?,
                    attn_output: upload(&l.attn_output)?,
                    ffn_norm: gpu.f32s(&l.ffn_norm),
                    ffn_gate: upload(&l.ffn_gate)?,
                    ffn_up: upload(&l.ffn_up)?,
                    ffn_down: upload(&l.ffn_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = upload(&w.output)?;
        // Batches above MAX_MATVEC_TOKENS dequantize a matrix into this scratch and multiply.
        let largest = layers
            .iter()
            .flat_map(|l| [&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down])
            .chain([&output])
            .map(|m| m.shape().0 * m.shape().1)
            .max()
            .unwrap_or(0);
        let dequant = (b > MAX_MATVEC_TOKENS).then(|| DequantScratch::new(gpu.client(), largest));
        let inv_freqs = rope::inv_freqs(c.rope_dim, c.rope_base, w.rope_freqs.as_deref());
        let (cos, sin) = rope::rope_tables(ctx, &inv_freqs);
        let kv_type = if gpu.supports_f16() { KvType::F16 } else { KvType::F32 };
        let shape = AttnShape { n_heads: c.n_head, n_kv_heads: c.n_head_kv, head_dim: c.head_dim };
        Ok(Self {
            token_embd,
            output,
            layers,
            dequant,
            output_norm: gpu.f32s(&w.output_norm),
            cos: gpu.f32s(&cos),
            sin: gpu.f32s(&sin),
            x: gpu.zeros(b * c.n_embd),
            xn: gpu.zeros(b * c.n_embd),
            q: gpu.zeros(b * c.q_dim()),
            k: gpu.zeros(b * c.kv_dim()),
            v: gpu.zeros(b * c.kv_dim()),
            att: gpu.zeros(b * c.q_dim()),
            proj: gpu.zeros(b * c.n_embd),
            gate: gpu.zeros(b * c.n_ff),
            up: gpu.zeros(b * c.n_ff),
            logits: gpu.zeros(c.n_vocab),
            best: gpu.zeros(1),
            no_ids: gpu.zeros(1),
            cache: KvCache::new(&gpu, c.n_layer, ctx, c.kv_dim(), kv_type),
            scratch: AttnScratch::new(&gpu, b, shape),
            host_logits: vec![0.0; c.n_vocab],
            host_fresh: false,
            n_logit_rows: 1,
            launches_last: 0,
            ctx,
            max_batch: b,
            kind,
            device_name,
            model: model.clone(),
            gpu,
        })
    }

    fn err(&self, e: GpuError) -> Error {
        Error::Backend { backend: self.kind.name().into(), problem: e.to_string() }
    }

    /// The element type of the KV cache (f16 where the device has it).
    pub fn kv_type(&self) -> KvType {
        self.cache.ty()
    }

    /// `out[t] = W · x[t]` for the first `n` rows of `x`.
    fn linear(&self, w: &Matrix<R>, x: &Buf, out: &Buf, n: usize) -> Result<()> {
        let w = match w {
            Matrix::Plain(w) => {
                dequant::launch_linear_plain(&self.gpu, w, x, out, n);
                return Ok(());
            }
            Matrix::Tuned(w) => w,
        };
        let client = self.gpu.client();
        let r = if n == 1 {
            self.gpu.count_launches(1);
            mm::matvec(client, w, x.handle(), out.handle(), Epilogue::Store)
        } else {
            // Up to MAX_MATVEC_TOKENS: one multi-token mat-vec; above: dequantize + matmul.
            self.gpu.count_launches(if n <= MAX_MATVEC_TOKENS { 1 } else { 2 });
            let scratch = self.dequant.as_ref().expect("allocated when max_batch allows such batches");
            mm::matmul(client, w, x.handle(), out.handle(), n, scratch)
        };
        r.map_err(|e| Error::Backend { backend: self.kind.name().into(), problem: e.to_string() })
    }
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
        let n = tokens.len();
        if n == 0 || n > self.max_batch {
            return Err(Error::InvalidArgument(format!("forward takes 1 to {} tokens, got {n}", self.max_batch)));
        }
        if pos + n > self.ctx {
            return Err(Error::ContextFull { needed: pos + n, capacity: self.ctx });
        }
        let model = self.model.clone();
        let c = &model.config;
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::InvalidArgument(format!("token id {tok} is outside the vocabulary of {}", c.n_vocab)));
        }
        let g = &self.gpu;
        let start = g.launches();
        let attn_shape = AttnShape { n_heads: c.n_head, n_kv_heads: c.n_head_kv, head_dim: c.head_dim };
        let rope_shape = RopeShape { n_head: c.n_head, n_kv_heads: c.n_head_kv, head_dim: c.head_dim, rot_pairs: c.rope_dim / 2 };

        // x = token_embd[tokens]; a single token travels as a kernel argument.
        let ids;
        let toks = if n == 1 {
            Tokens::One(tokens[0])
        } else {
            ids = g.u32s(tokens);
            Tokens::Device(&ids, n)
        };
        embedding::launch_embedding(g, &self.token_embd, toks, &self.no_ids, &self.x);

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block: x += W_o · attention(rope(W_q·xn), rope(W_k·xn), W_v·xn). The
            // previous block's residual add is fused into this norm.
            if l == 0 {
                norm::launch_rms_norm(g, &self.x, &layer.attn_norm, &self.xn, 0, n, c.rms_eps);
            } else {
                norm::launch_add_rms_norm(g, &self.x, &self.proj, &layer.attn_norm, &self.xn, 0, n, c.rms_eps);
            }
            self.linear(&layer.attn_q, &self.xn, &self.q, n)?;
            self.linear(&layer.attn_k, &self.xn, &self.k, n)?;
            self.linear(&layer.attn_v, &self.xn, &self.v, n)?;
            rope::launch_rope_store(g, &self.q, &self.k, &self.v, &self.cos, &self.sin, &self.cache, l, pos, n, rope_shape);
            attention::launch_attention(g, &self.q, &self.cache, l, &self.scratch, &self.att, pos, n, attn_shape);
            self.linear(&layer.attn_output, &self.att, &self.proj, n)?;

            // Feed-forward block: x += W_down · (silu(W_gate·xn) * (W_up·xn))
            norm::launch_add_rms_norm(g, &self.x, &self.proj, &layer.ffn_norm, &self.xn, 0, n, c.rms_eps);
            self.linear(&layer.ffn_gate, &self.xn, &self.gate, n)?;
            self.linear(&layer.ffn_up, &self.xn, &self.up, n)?;
            activation::launch_swiglu(g, &self.gate, &self.up, n * c.n_ff);
            self.linear(&layer.ffn_down, &self.gate, &self.proj, n)?;
        }

        // logits = W_out · rmsnorm(x + last residual), for the last token or all of them
        let first = if all_logits { 0 } else { n - 1 };
        let rows = n - first;
        norm::launch_add_rms_norm(g, &self.x, &self.proj, &self.output_norm, &self.xn, first, rows, c.rms_eps);
        if self.logits.len() < rows * c.n_vocab {
            // Only perplexity asks for all-token logits; decode never reaches this.
            self.logits = g.zeros(rows * c.n_vocab);
            self.host_logits.resize(rows * c.n_vocab, 0.0);
        }
        self.linear(&self.output, &self.xn, &self.logits, rows)?;
        self.n_logit_rows = rows;
        self.host_fresh = false;
        self.launches_last = g.launches() - start;
        Ok(())
    }

    fn logits(&mut self) -> Result<&[f32]> {
        let n = self.n_logit_rows * self.model.config.n_vocab;
        if !self.host_fresh {
            self.gpu.read_f32_into(&self.logits, n, &mut self.host_logits).map_err(|e| self.err(e))?;
            self.host_fresh = true;
        }
        Ok(&self.host_logits[..n])
    }

    fn argmax(&mut self) -> Result<u32> {
        let nv = self.model.config.n_vocab;
        argmax::launch_argmax(&self.gpu, &self.logits, (self.n_logit_rows - 1) * nv, nv, &self.best);
        let id = self.gpu.read_u32(&self.best).map_err(|e| self.err(e))?;
        Ok(id[0])
    }

    fn memory(&self) -> MemoryUsage {
        let layer_bytes = |l: &DeviceLayer<R>| -> u64 {
            [&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down].iter().map(|w| w.bytes()).sum::<u64>()
                + l.attn_norm.bytes()
                + l.ffn_norm.bytes()
        };
        let weights = self.layers.iter().map(layer_bytes).sum::<u64>()
            + self.token_embd.bytes()
            + self.output.bytes()
            + self.output_norm.bytes()
            + self.cos.bytes()
            + self.sin.bytes();
        let scratch = [&self.x, &self.xn, &self.q, &self.k, &self.v, &self.att, &self.proj, &self.gate, &self.up, &self.logits]
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
        self.launches_last
    }
}

fn no_backend(kind: BackendKind, problem: impl Into<String>) -> Error {
    Error::Backend { backend: kind.name().into(), problem: problem.into() }
}

/// Creates the GPU backend `kind`, after checking its device is really there (a HIP client on
/// a machine without an AMD GPU aborts the process, so it is never created blind).
pub fn create(kind: BackendKind, model: Arc<Model>, opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match kind {
        #[cfg(feature = "hip")]
        BackendKind::Hip => {
            let n = probe::hip_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Hip::new(gpu, kind, format!("AMD GPU 0 of {n} (HIP)"), model, opts)?))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let n = probe::cuda_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Cuda::new(gpu, kind, format!("NVIDIA GPU 0 of {n} (CUDA)"), model, opts)?))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let device = probe::wgpu_gpu().unwrap_or_default();
            let gpu = std::panic::catch_unwind(|| Gpu::on(&device))
                .map_err(|_| no_backend(kind, "no wgpu adapter could be opened (is a Vulkan, Metal or DX12 driver installed?)"))?;
            let name = format!("{device:?} via {}", Runtime::name(gpu.client()));
            Ok(Box::new(Wgpu::new(gpu, kind, name, model, opts)?))
        }
        k => Err(no_backend(k, format!("this build has no `{k}` backend; rebuild with `--features {k}`"))),
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
    #[cfg(any(feature = "hip", feature = "cuda"))]
    fn device_count(libs: &[String], init: Option<&[u8]>, count: &[u8], what: &str) -> Result<usize, String> {
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Count = unsafe extern "C" fn(*mut i32) -> i32;
        let mut tried = Vec::new();
        for name in libs {
            // SAFETY: loading a driver library runs its initialisers, which is what creating a
            // client would do anyway; the symbols are called with their C signatures.
            let lib = match unsafe { libloading::Library::new(name) } {
                Ok(l) => l,
                Err(e) => {
                    tried.push(format!("{name}: {e}"));
                    continue;
                }
            };
            unsafe {
                if let Some(init) = init {
                    let f: libloading::Symbol<Init> = lib.get(init).map_err(|e| format!("{name}: {e}"))?;
                    let rc = f(0);
                    if rc != 0 {
                        return Err(format!("{what} driver initialisation failed (error {rc}): no usable {what} GPU"));
                    }
                }
                let f: libloading::Symbol<Count> = lib.get(count).map_err(|e| format!("{name}: {e}"))?;
                let mut n = 0i32;
                let rc = f(&mut n);
                if rc != 0 || n <= 0 {
                    return Err(format!("no {what} GPU found (device count {n}, error {rc})"));
                }
                // Keep the library loaded: the runtime will use it.
                std::mem::forget(lib);
                return Ok(n as usize);
            }
        }
        Err(format!("the {what} runtime library is not installed (tried {})", tried.join("; ")))
    }

    /// Number of AMD GPUs HIP sees.
    #[cfg(feature = "hip")]
    pub fn hip_devices() -> Result<usize, String> {
        if !std::path::Path::new("/dev/kfd").exists() && cfg!(target_os = "linux") {
            return Err("no AMD GPU: /dev/kfd is missing (ROCm driver not loaded or no device)".into());
        }
        let mut libs: Vec<String> = ["ROCM_PATH", "HIP_PATH"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .chain(["/opt/rocm".to_string()])
            .map(|p| format!("{p}/lib/libamdhip64.so"))
            .collect();
        libs.push("libamdhip64.so".into());
        device_count(&libs, None, b"hipGetDeviceCount\0", "HIP")
    }

    /// Number of NVIDIA GPUs the CUDA driver sees.
    #[cfg(feature = "cuda")]
    pub fn cuda_devices() -> Result<usize, String> {
        let libs = ["libcuda.so.1".to_string(), "libcuda.so".to_string()];
        device_count(&libs, Some(b"cuInit\0"), b"cuDeviceGetCount\0", "CUDA")
    }

    /// A real GPU adapter for wgpu (discrete first, then integrated), if any.
    #[cfg(feature = "wgpu")]
    pub fn wgpu_gpu() -> Option<rocforge_kernels::ops::gpu::cubecl::wgpu::WgpuDevice> {
        use rocforge_kernels::ops::gpu::cubecl::wgpu::{AutoGraphicsApi, GraphicsApi, WgpuDevice, WgpuRuntime};
        use rocforge_kernels::ops::gpu::Runtime;
        let backend = AutoGraphicsApi::backend();
        let found = std::panic::catch_unwind(|| {
            (!WgpuRuntime::enumerate_devices(0, &backend).is_empty(), !WgpuRuntime::enumerate_devices(1, &backend).is_empty())
        });
        match found {
            Ok((true, _)) => Some(WgpuDevice::DiscreteGpu(0)),
            Ok((false, true)) => Some(WgpuDevice::IntegratedGpu(0)),
            _ => None,
        }
    }
}
