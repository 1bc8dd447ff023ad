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
use rocforge_kernels::ops::matmul::{
    self as mm, DequantScratch, Epilogue, KernelFormat, QWeight, MAX_MATVEC_TOKENS,
};
use rocforge_kernels::ops::rope::{self, RopeShape, RopeSrc};
use rocforge_kernels::ops::{activation, argmax, norm};

use super::{Backend, BackendKind, BackendOptions, MemoryUsage, OpTiming, Profiler};
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
    fn upload(
        gpu: &Gpu<R>,
        ty: rocforge_kernels::GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, String> {
        match QWeight::upload(gpu.client(), ty, rows, cols, bytes) {
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
    token_embd: Matrix<R>, // (n_vocab, n_embd), for the lookup
    output: Matrix<R>,     // (n_vocab, n_embd), the same device buffers as token_embd when tied
    layers: Vec<DeviceLayer<R>>,
    dequant: Option<DequantScratch<R>>, // (largest matrix) f32, for prefill mat-mats
    output_norm: Buf,                   // (n_embd)
    cos: Buf,                           // (ctx, rope_dim/2)
    sin: Buf,                           // (ctx, rope_dim/2)
    // Activations, one row per token in the batch.
    x: Buf,      // (batch, n_embd) residual stream
    xn: Buf,     // (batch, n_embd) normalised input of a block
    qkv: Buf,    // (batch, q_dim + 2*kv_dim) fused projection output (1 element when unused)
    q: Buf,      // (batch, n_head*head_dim) rotated Q, the attention's input
    k: Buf,      // (batch, n_head_kv*head_dim)
    v: Buf,      // (batch, n_head_kv*head_dim)
    att: Buf,    // (batch, n_head*head_dim) attention output; un-rotated Q before rope
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
    /// Per-op timing (`set_profiling`): a sync after every op, charged to its family.
    profiler: std::sync::Mutex<Profiler>,
    /// Whether `profiler` is on: checked before any lock, so an unprofiled step takes none.
    profiling: bool,
    /// Every projection takes the coalesced kernels, so a decode step folds the RMSNorms into
    /// the projections after them and the residual adds into the ones before (see `decode_fused`).
    fused_decode: bool,
}

impl<R: Runtime> CubeBackend<R> {
    /// Uploads `model` to `gpu` and allocates every buffer.
    pub fn new(
        gpu: Gpu<R>,
        kind: BackendKind,
        device_name: String,
        model: Arc<Model>,
        opts: &BackendOptions,
    ) -> Result<Self> {
        let c = &model.config;
        let w = &model.weights;
        let (ctx, b) = (opts.ctx, opts.max_batch.min(opts.ctx));
        let upload = |wt: &Weight| -> Result<Matrix<R>> {
            Matrix::upload(&gpu, wt.ty, model.bytes(wt), wt.rows, wt.cols).map_err(|e| {
                Error::Backend {
                    backend: kind.name().into(),
                    problem: format!("tensor `{}`: {e}", wt.name),
                }
            })
        };
        let token_embd = upload(&w.token_embd)?;
        let qkv = |l: &crate::model::LayerWeights| -> Result<Qkv<R>> {
            let (q, k, v) = (&l.attn_q, &l.attn_k, &l.attn_v);
            if q.ty == k.ty
                && k.ty == v.ty
                && q.cols == k.cols
                && k.cols == v.cols
                && KernelFormat::from_ggml(q.ty).is_some()
            {
                let bytes = [model.bytes(q), model.bytes(k), model.bytes(v)].concat();
                let fused =
                    QWeight::upload(gpu.client(), q.ty, q.rows + k.rows + v.rows, q.cols, &bytes)
                        .map_err(|e| Error::Backend {
                        backend: kind.name().into(),
                        problem: format!("tensors `{}`+k+v: {e}", q.name),
                    })?;
                return Ok(Qkv::Fused(fused));
            }
            Ok(Qkv::Separate([upload(q)?, upload(k)?, upload(v)?]))
        };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    attn_norm: gpu.f32s(&l.attn_norm),
                    attn_qkv: qkv(l)?,
                    attn_output: upload(&l.attn_output)?,
                    ffn_norm: gpu.f32s(&l.ffn_norm),
                    ffn_gate: upload(&l.ffn_gate)?,
                    ffn_up: upload(&l.ffn_up)?,
                    ffn_down: upload(&l.ffn_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Tied embeddings: one upload serves the lookup and the output projection.
        let output = match (&token_embd, w.tied_output) {
            (Matrix::Tuned(t), true) => Matrix::Tuned(t.clone()),
            _ => upload(&w.output)?,
        };
        // Batches above MAX_MATVEC_TOKENS dequantize a matrix into this scratch and multiply.
        let largest = layers
            .iter()
            .flat_map(|l| {
                let others = [&l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down]
                    .map(|m| m.shape().0 * m.shape().1);
                l.attn_qkv
                    .matrices()
                    .into_iter()
                    .map(|(r, c, _)| r * c)
                    .chain(others)
            })
            .chain([output.shape().0 * output.shape().1])
            .max()
            .unwrap_or(0);
        let fused = layers.iter().any(|l| matches!(l.attn_qkv, Qkv::Fused(_)));
        let norm_fusable =
            |m: &Matrix<R>| matches!(m, Matrix::Tuned(w) if mm::fuses_norm(gpu.client(), w));
        let fused_decode = norm_fusable(&output)
            && layers.iter().all(|l| {
                let qkv = matches!(&l.attn_qkv, Qkv::Fused(w) if mm::fuses_norm(gpu.client(), w));
                let ffn = match (&l.ffn_gate, &l.ffn_up) {
                    (Matrix::Tuned(g), Matrix::Tuned(u)) => {
                        (g.ty, g.rows, g.cols) == (u.ty, u.rows, u.cols)
                            && mm::fuses_norm(gpu.client(), g)
                    }
                    _ => false,
                };
                qkv && ffn
                    && matches!(l.attn_output, Matrix::Tuned(_))
                    && matches!(l.ffn_down, Matrix::Tuned(_))
            });
        let dequant = (b > MAX_MATVEC_TOKENS).then(|| DequantScratch::new(gpu.client(), largest));
        let inv_freqs = rope::inv_freqs(c.rope_dim, c.rope_base, w.rope_freqs.as_deref());
        let (cos, sin) = rope::rope_tables(ctx, &inv_freqs);
        let kv_type = if gpu.supports_f16() {
            KvType::F16
        } else {
            KvType::F32
        };
        let shape = AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
        };
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
            logits: gpu.zeros(c.n_vocab),
            best: gpu.zeros(1),
            no_ids: gpu.zeros(1),
            cache: KvCache::new(&gpu, c.n_layer, ctx, c.kv_dim(), kv_type),
            scratch: AttnScratch::new(&gpu, b, shape),
            host_logits: vec![0.0; c.n_vocab],
            host_fresh: false,
            n_logit_rows: 1,
            launches_last: 0,
            profiler: Default::default(),
            profiling: false,
            fused_decode,
            ctx,
            max_batch: b,
            kind,
            device_name,
            model: model.clone(),
            gpu,
        })
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

    /// `x[t] = token_embd[tokens[t]]`; a single token travels as a kernel argument.
    fn embed(&self, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        let ids = (n > 1).then(|| self.gpu.u32s(tokens));
        match &self.token_embd {
            Matrix::Tuned(w) => {
                self.gpu.count_launches(1);
                let (ids, token0) = match &ids {
                    Some(b) => (b.handle(), None),
                    None => (self.no_ids.handle(), Some(tokens[0])),
                };
                mm::embed(self.gpu.client(), w, ids, n, token0, self.x.handle())
                    .map_err(|e| self.backend_err(e))
            }
            Matrix::Plain(w) => {
                let toks = match &ids {
                    Some(b) => Tokens::Device(b, n),
                    None => Tokens::One(tokens[0]),
                };
                embedding::launch_embedding(&self.gpu, w, toks, &self.no_ids, &self.x);
                Ok(())
            }
        }
    }

    /// `h = silu(W_gate · x) * (W_up · x)` for the first `n` rows of `x` (into `gate`): one
    /// fused launch for a single token where both weights take the tuned kernels.
    fn ffn_in(&self, gate: &Matrix<R>, up: &Matrix<R>, n: usize) -> Result<()> {
        if let (1, Matrix::Tuned(g), Matrix::Tuned(u)) = (n, gate, up) {
            if (g.ty, g.rows, g.cols) == (u.ty, u.rows, u.cols) {
                self.gpu.count_launches(1);
                return mm::matvec_swiglu(
                    self.gpu.client(),
                    g,
                    u,
                    self.xn.handle(),
                    self.gate.handle(),
                )
                .map_err(|e| self.backend_err(e));
            }
        }
        self.linear(gate, &self.xn, &self.gate, n)?;
        self.linear(up, &self.xn, &self.up, n)?;
        activation::launch_swiglu(&self.gpu, &self.gate, &self.up, n * self.model.config.n_ff);
        Ok(())
    }

    /// The tuned weight of `m` (the fused decode step is only taken when every matrix has one).
    fn tuned<'a>(&self, m: &'a Matrix<R>) -> Result<&'a QWeight<R>> {
        match m {
            Matrix::Tuned(w) => Ok(w),
            Matrix::Plain(_) => Err(self.backend_err("fused decode needs tuned weights")),
        }
    }

    /// One decode step with the fewest launches: per layer QKV with `attn_norm` folded in, RoPE,
    /// attention, `x += W_o · att`, gate/up/SwiGLU with `ffn_norm` folded in, `x += W_down · h`;
    /// then the logits with `output_norm` folded in. 6 launches per layer (7 when attention
    /// splits) + 2. Same math as the general path; only the order of the norm's sum differs.
    fn decode_fused(&self, token: u32, pos: usize) -> Result<()> {
        let model = self.model.clone();
        let c = &model.config;
        let (g, client) = (&self.gpu, self.gpu.client());
        let err = |e: mm::MatmulError| self.backend_err(e);
        let attn_shape = AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
        };
        let rope_shape = RopeShape {
            n_head: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            rot_pairs: c.rope_dim / 2,
        };
        if self.profiling {
            self.profiler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start();
        }
        self.embed(&[token])?;
        self.lap("embed");
        for (l, layer) in self.layers.iter().enumerate() {
            let Qkv::Fused(qkv) = &layer.attn_qkv else {
                return Err(self.backend_err("fused decode needs a fused QKV weight"));
            };
            g.count_launches(1);
            mm::matvec_norm(
                client,
                qkv,
                self.x.handle(),
                layer.attn_norm.handle(),
                c.rms_eps,
                self.qkv.handle(),
            )
            .map_err(err)?;
            self.lap("matmul_norm");
            rope::launch_rope_store(
                g,
                RopeSrc::Fused(&self.qkv),
                &self.q,
                &self.cos,
                &self.sin,
                &self.cache,
                l,
                pos,
                1,
                rope_shape,
            );
            self.lap("rope_kv_store");
            attention::launch_attention(
                g,
                &self.q,
                &self.cache,
                l,
                &self.scratch,
                &self.att,
                pos,
                1,
                attn_shape,
            );
            self.lap("attention");
            g.count_launches(1);
            mm::matvec(
                client,
                self.tuned(&layer.attn_output)?,
                self.att.handle(),
                self.x.handle(),
                Epilogue::Accumulate,
            )
            .map_err(err)?;
            self.lap("matmul");
            g.count_launches(1);
            let (gate, up) = (self.tuned(&layer.ffn_gate)?, self.tuned(&layer.ffn_up)?);
            mm::matvec_swiglu_norm(
                client,
                gate,
                up,
                self.x.handle(),
                layer.ffn_norm.handle(),
                c.rms_eps,
                self.gate.handle(),
            )
            .map_err(err)?;
            self.lap("matmul_swiglu_norm");
            g.count_launches(1);
            mm::matvec(
                client,
                self.tuned(&layer.ffn_down)?,
                self.gate.handle(),
                self.x.handle(),
                Epilogue::Accumulate,
            )
            .map_err(err)?;
            self.lap("matmul");
        }
        g.count_launches(1);
        mm::matvec_norm(
            client,
            self.tuned(&self.output)?,
            self.x.handle(),
            self.output_norm.handle(),
            c.rms_eps,
            self.logits.handle(),
        )
        .map_err(err)?;
        self.lap("output");
        Ok(())
    }

    /// `out[t] = W · x[t]` for the first `n` rows of `x`.
    fn linear(&self, w: &Matrix<R>, x: &Buf, out: &Buf, n: usize) -> Result<()> {
        match w {
            Matrix::Plain(w) => {
                dequant::launch_linear_plain(&self.gpu, w, x, out, n);
                Ok(())
            }
            Matrix::Tuned(w) => self.linear_tuned(w, x, out, n),
        }
    }

    /// [`Self::linear`] on the tuned kernels: one mat-vec up to `MAX_MATVEC_TOKENS` tokens,
    /// above that a dequantize pass and cubek's matmul.
    fn linear_tuned(&self, w: &QWeight<R>, x: &Buf, out: &Buf, n: usize) -> Result<()> {
        let client = self.gpu.client();
        let r = if n == 1 {
            self.gpu.count_launches(1);
            mm::matvec(client, w, x.handle(), out.handle(), Epilogue::Store)
        } else {
            self.gpu
                .count_launches(if n <= MAX_MATVEC_TOKENS { 1 } else { 2 });
            let scratch = self
                .dequant
                .as_ref()
                .expect("allocated when max_batch allows such batches");
            mm::matmul(client, w, x.handle(), out.handle(), n, scratch)
        };
        r.map_err(|e| self.backend_err(e))
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
            return Err(Error::InvalidArgument(format!(
                "forward takes 1 to {} tokens, got {n}",
                self.max_batch
            )));
        }
        if pos + n > self.ctx {
            return Err(Error::ContextFull {
                needed: pos + n,
                capacity: self.ctx,
            });
        }
        let model = self.model.clone();
        let c = &model.config;
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {tok} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        let g = &self.gpu;
        let start = g.launches();
        let attn_shape = AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
        };
        let rope_shape = RopeShape {
            n_head: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            rot_pairs: c.rope_dim / 2,
        };

        if n == 1 && !all_logits && self.fused_decode {
            self.decode_fused(tokens[0], pos)?;
            self.n_logit_rows = 1;
            self.host_fresh = false;
            self.launches_last = g.launches() - start;
            return Ok(());
        }
        if self.profiling {
            self.profiler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start();
        }
        self.embed(tokens)?;
        self.lap("embed");

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block: x += W_o · attention(rope(W_q·xn), rope(W_k·xn), W_v·xn). The
            // previous block's residual add is fused into this norm.
            if l == 0 {
                norm::launch_rms_norm(g, &self.x, &layer.attn_norm, &self.xn, 0, n, c.rms_eps);
            } else {
                norm::launch_add_rms_norm(
                    g,
                    &self.x,
                    &self.proj,
                    &layer.attn_norm,
                    &self.xn,
                    0,
                    n,
                    c.rms_eps,
                );
            }
            self.lap("rms_norm");
            let src = match &layer.attn_qkv {
                Qkv::Fused(w) => {
                    self.linear_tuned(w, &self.xn, &self.qkv, n)?;
                    RopeSrc::Fused(&self.qkv)
                }
                Qkv::Separate([wq, wk, wv]) => {
                    self.linear(wq, &self.xn, &self.att, n)?;
                    self.linear(wk, &self.xn, &self.k, n)?;
                    self.linear(wv, &self.xn, &self.v, n)?;
                    RopeSrc::Separate {
                        q: &self.att,
                        k: &self.k,
                        v: &self.v,
                    }
                }
            };
            self.lap("matmul");
            rope::launch_rope_store(
                g,
                src,
                &self.q,
                &self.cos,
                &self.sin,
                &self.cache,
                l,
                pos,
                n,
                rope_shape,
            );
            self.lap("rope_kv_store");
            attention::launch_attention(
                g,
                &self.q,
                &self.cache,
                l,
                &self.scratch,
                &self.att,
                pos,
                n,
                attn_shape,
            );
            self.lap("attention");
            self.linear(&layer.attn_output, &self.att, &self.proj, n)?;
            self.lap("matmul");

            // Feed-forward block: x += W_down · (silu(W_gate·xn) * (W_up·xn))
            norm::launch_add_rms_norm(
                g,
                &self.x,
                &self.proj,
                &layer.ffn_norm,
                &self.xn,
                0,
                n,
                c.rms_eps,
            );
            self.lap("rms_norm");
            self.ffn_in(&layer.ffn_gate, &layer.ffn_up, n)?;
            self.lap("matmul_swiglu");
            self.linear(&layer.ffn_down, &self.gate, &self.proj, n)?;
            self.lap("matmul");
        }

        // logits = W_out · rmsnorm(x + last residual), for the last token or all of them
        let first = if all_logits { 0 } else { n - 1 };
        let rows = n - first;
        norm::launch_add_rms_norm(
            g,
            &self.x,
            &self.proj,
            &self.output_norm,
            &self.xn,
            first,
            rows,
            c.rms_eps,
        );
        self.lap("rms_norm");
        if self.logits.len() < rows * c.n_vocab {
            // Only perplexity asks for all-token logits; decode never reaches this.
            self.logits = g.zeros(rows * c.n_vocab);
            self.host_logits.resize(rows * c.n_vocab, 0.0);
        }
        self.linear(&self.output, &self.xn, &self.logits, rows)?;
        self.lap("output");
        self.n_logit_rows = rows;
        self.host_fresh = false;
        self.launches_last = g.launches() - start;
        Ok(())
    }

    fn logits(&mut self) -> Result<&[f32]> {
        let n = self.n_logit_rows * self.model.config.n_vocab;
        if !self.host_fresh {
            self.gpu
                .read_f32_into(&self.logits, n, &mut self.host_logits)
                .map_err(|e| self.err(e))?;
            self.host_fresh = true;
        }
        Ok(&self.host_logits[..n])
    }

    fn argmax(&mut self) -> Result<u32> {
        let nv = self.model.config.n_vocab;
        argmax::launch_argmax(
            &self.gpu,
            &self.logits,
            (self.n_logit_rows - 1) * nv,
            nv,
            &self.best,
        );
        let id = self.gpu.read_u32(&self.best).map_err(|e| self.err(e))?;
        Ok(id[0])
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
        let tied = self.model.weights.tied_output && matches!(self.token_embd, Matrix::Tuned(_));
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
    match kind {
        #[cfg(feature = "hip")]
        BackendKind::Hip => {
            let found = probe::hip_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Hip::new(gpu, kind, found.name, model, opts)?))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let found = probe::cuda_devices().map_err(|p| no_backend(kind, p))?;
            let gpu = Gpu::on(&Default::default());
            Ok(Box::new(Cuda::new(gpu, kind, found.name, model, opts)?))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            let device = probe::wgpu_gpu().unwrap_or_default();
            let gpu = std::panic::catch_unwind(|| Gpu::on(&device))
                .map_err(|_| no_backend(kind, "no wgpu adapter could be opened (is a Vulkan, Metal or DX12 driver installed?)"))?;
            let name = format!("{device:?} via {}", Runtime::name(gpu.client()));
            Ok(Box::new(Wgpu::new(gpu, kind, name, model, opts)?))
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
                // Keep the library loaded: the runtime will use it.
                std::mem::forget(lib);
                return Ok(Found { name });
            }
        }
        Err(format!(
            "the {what} runtime library is not installed (tried {})",
            tried.join("; ")
        ))
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
