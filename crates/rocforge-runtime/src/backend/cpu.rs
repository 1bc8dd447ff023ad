//! The CPU reference backend: executes the model definition's steps ([`crate::arch`]) in plain Rust, rows in parallel with
//! rayon, weights dotted in their quantized layout (activations quantized once per matrix
//! input, as llama.cpp does). Every buffer, the KV cache included, is allocated in `new`;
//! a decode step allocates nothing.

use std::sync::Arc;

use rayon::prelude::*;
use rocforge_kernels::ops::{activation, attention, norm, rope};
use rocforge_kernels::quant::{self, PreparedActs};
use rocforge_kernels::GgmlType;

use super::{Backend, BackendKind, BackendOptions, MemoryUsage, OpTiming, Profiler};
use crate::arch::{self, unsupported, Activation, Executor, Limits, RopeKind, Step};
use crate::error::{Error, Result};
use crate::model::{Model, Weight};

/// The run state: activations for up to `max_batch` tokens and the KV cache.
pub struct CpuBackend {
    model: Arc<Model>,
    ctx: usize,
    max_batch: usize,
    inv_freqs: Vec<f32>,
    // Activations, one row per token in the batch.
    x: Vec<f32>,      // (batch, n_embd) residual stream
    xn: Vec<f32>,     // (batch, n_embd) normalised input of a block
    q: Vec<f32>,      // (batch, n_head*head_dim)
    k: Vec<f32>,      // (batch, n_head_kv*head_dim)
    v: Vec<f32>,      // (batch, n_head_kv*head_dim)
    att: Vec<f32>,    // (batch, n_head*head_dim) attention output
    proj: Vec<f32>,   // (batch, n_embd) output of attn_output / ffn_down
    gate: Vec<f32>,   // (batch, n_ff)
    up: Vec<f32>,     // (batch, n_ff)
    cos: Vec<f32>,    // (batch, rope_dim/2)
    sin: Vec<f32>,    // (batch, rope_dim/2)
    logits: Vec<f32>, // (n_vocab) or (batch, n_vocab) for all-token logits
    n_logit_rows: usize,
    acts: Acts,
    k_cache: Vec<Vec<f32>>, // (n_layer) x (ctx, n_head_kv*head_dim)
    v_cache: Vec<Vec<f32>>, // (n_layer) x (ctx, n_head_kv*head_dim)
    regions: u64,
    profiler: Profiler,
    /// The architecture's forward pass, run by [`arch::forward`].
    plan: Arc<[Step]>,
    // The batch of the forward call under way.
    n: usize,
    pos: usize,
    all_logits: bool,
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, opts: &BackendOptions) -> Result<Self> {
        let c = &model.config;
        let (ctx, b) = (opts.ctx, opts.max_batch.min(opts.ctx));
        let inv_freqs =
            rope::inv_freqs(c.rope_dim, c.rope_base, model.weights.rope_freqs.as_deref());
        let zeros = |n: usize| vec![0.0f32; n];
        let too_big = || {
            Error::InvalidArgument(format!(
                "a KV cache of {ctx} tokens of {} values per layer does not fit in memory",
                c.kv_dim()
            ))
        };
        let per_layer = ctx.checked_mul(c.kv_dim()).ok_or_else(too_big)?;
        // Both caches of every layer, in bytes: refuse what the allocator would abort on.
        per_layer
            .checked_mul(8 * c.n_layer)
            .filter(|&b| b < isize::MAX as usize)
            .ok_or_else(too_big)?;
        Ok(Self {
            ctx,
            max_batch: b,
            inv_freqs,
            x: zeros(b * c.n_embd),
            xn: zeros(b * c.n_embd),
            q: zeros(b * c.q_dim()),
            k: zeros(b * c.kv_dim()),
            v: zeros(b * c.kv_dim()),
            att: zeros(b * c.q_dim()),
            proj: zeros(b * c.n_embd),
            gate: zeros(b * c.n_ff),
            up: zeros(b * c.n_ff),
            cos: zeros(b * c.rope_dim / 2),
            sin: zeros(b * c.rope_dim / 2),
            logits: zeros(c.n_vocab),
            n_logit_rows: 1,
            acts: Acts {
                rows: (0..b).map(|_| PreparedActs::new()).collect(),
                prepared: None,
            },
            k_cache: (0..c.n_layer).map(|_| zeros(ctx * c.kv_dim())).collect(),
            v_cache: (0..c.n_layer).map(|_| zeros(ctx * c.kv_dim())).collect(),
            regions: 0,
            profiler: Profiler::default(),
            plan: arch::plan(c)?.into(),
            n: 0,
            pos: 0,
            all_logits: false,
            model,
        })
    }
}

/// Quantized copies of the current matrix input, one per token, remembering which weight type
/// they were prepared for so that projections of the same input (q/k/v, gate/up) share them.
struct Acts {
    rows: Vec<PreparedActs>, // (batch)
    prepared: Option<(GgmlType, usize)>,
}

/// Whether `x` is the same input as in the previous [`linear`] call.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    New,
    Same,
}

/// `out[t] = W · x[t]` for the first `n` rows of `x`: quantizes each input row for W's type
/// (unless the previous call already did, for the same input), then runs the batched product
/// (each weight row read once for many tokens).
fn linear(
    model: &Model,
    w: &Weight,
    acts: &mut Acts,
    x: &[f32],
    input: Input,
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let err = |e: quant::QuantError| Error::Backend {
        backend: "cpu".into(),
        problem: format!("{}: {e}", w.name),
    };
    let rows = &mut acts.rows[..n];
    if input == Input::New || acts.prepared != Some((w.ty, n)) {
        if n == 1 {
            rows[0].prepare(w.ty, &x[..w.cols]).map_err(err)?;
        } else {
            rows.par_iter_mut()
                .zip(x.par_chunks(w.cols))
                .try_for_each(|(a, row)| a.prepare(w.ty, row))
                .map_err(err)?;
        }
        acts.prepared = Some((w.ty, n));
    }
    quant::matmul(
        w.ty,
        model.bytes(w),
        w.rows,
        w.cols,
        rows,
        &mut out[..n * w.rows],
    )
    .map_err(err)
}

/// RMSNorm of each of the first `n` rows of `x` into `out`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, n: usize, out: &mut [f32]) {
    let d = weight.len();
    out[..n * d]
        .par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| norm::rms_norm(row, weight, eps, o));
}

impl Executor for CpuBackend {
    fn limits(&self) -> Limits {
        Limits {
            ctx: self.ctx,
            max_batch: self.max_batch,
            n_vocab: self.model.config.n_vocab,
        }
    }

    fn begin(&mut self, n: usize, pos: usize, all_logits: bool) -> Result<()> {
        (self.n, self.pos, self.all_logits) = (n, pos, all_logits);
        self.regions = 0;
        let half = self.model.config.rope_dim / 2;
        for t in 0..n {
            let (cos, sin) = (
                &mut self.cos[t * half..(t + 1) * half],
                &mut self.sin[t * half..(t + 1) * half],
            );
            rope::rope_cache(pos + t, &self.inv_freqs, cos, sin);
        }
        self.profiler.start();
        Ok(())
    }

    fn embed(&mut self, tokens: &[u32], scale: f32) -> Result<()> {
        let (c, w) = (&self.model.config, &self.model.weights);
        let d = c.n_embd;
        let embd = self.model.bytes(&w.token_embd);
        let row_bytes = embd.len() / c.n_vocab;
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &embd[tok as usize * row_bytes..(tok as usize + 1) * row_bytes];
            let x = &mut self.x[t * d..(t + 1) * d];
            quant::dequantize_row(w.token_embd.ty, row, x).map_err(|e| Error::Backend {
                backend: "cpu".into(),
                problem: e.to_string(),
            })?;
            if scale != 1.0 {
                x.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    fn attn_in(&mut self, l: usize) -> Result<()> {
        let (model, n) = (&*self.model, self.n);
        let layer = &model.weights.layers[l];
        rms_norm_rows(
            &self.x,
            &layer.attn_norm,
            model.config.rms_eps,
            n,
            &mut self.xn,
        );
        linear(
            model,
            &layer.attn_q,
            &mut self.acts,
            &self.xn,
            Input::New,
            n,
            &mut self.q,
        )?;
        linear(
            model,
            &layer.attn_k,
            &mut self.acts,
            &self.xn,
            Input::Same,
            n,
            &mut self.k,
        )?;
        linear(
            model,
            &layer.attn_v,
            &mut self.acts,
            &self.xn,
            Input::Same,
            n,
            &mut self.v,
        )?;
        self.regions += 4;
        Ok(())
    }

    fn rope_store(&mut self, l: usize, qk_norm: bool, rope: RopeKind) -> Result<()> {
        if qk_norm || rope != RopeKind::Global {
            return Err(unsupported(
                "cpu",
                "per-head q/k norm or a second RoPE table",
            ));
        }
        let c = &self.model.config;
        let (n, pos, hd, kv_dim, q_dim, half) = (
            self.n,
            self.pos,
            c.head_dim,
            c.kv_dim(),
            c.q_dim(),
            c.rope_dim / 2,
        );
        for t in 0..n {
            let (cos, sin) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            rope::rope(&mut self.q[t * q_dim..(t + 1) * q_dim], hd, cos, sin);
            rope::rope(&mut self.k[t * kv_dim..(t + 1) * kv_dim], hd, cos, sin);
        }
        let (kc, vc) = (&mut self.k_cache[l], &mut self.v_cache[l]);
        kc[pos * kv_dim..(pos + n) * kv_dim].copy_from_slice(&self.k[..n * kv_dim]);
        vc[pos * kv_dim..(pos + n) * kv_dim].copy_from_slice(&self.v[..n * kv_dim]);
        Ok(())
    }

    fn attention(&mut self, l: usize, window: Option<usize>) -> Result<()> {
        if window.is_some() {
            return Err(unsupported("cpu", "sliding-window attention"));
        }
        let c = &self.model.config;
        let (n, pos, hd, q_dim, n_head, group) = (
            self.n,
            self.pos,
            c.head_dim,
            c.q_dim(),
            c.n_head,
            c.gqa_group(),
        );
        let shape = attention::AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: hd,
        };
        let (q, kc, vc) = (&self.q, &self.k_cache[l], &self.v_cache[l]);
        self.att[..n * q_dim]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(i, out)| {
                let (t, h) = (i / n_head, i % n_head);
                let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                attention::attend_head(qh, kc, vc, h / group, pos + t, shape, out);
            });
        self.regions += 1;
        Ok(())
    }

    fn attn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let model = self.model.clone();
        self.project_add(
            &model.weights.layers[l].attn_output,
            Hidden::Attention,
            post_norm,
        )
    }

    fn ffn_in(&mut self, l: usize, act: Activation) -> Result<()> {
        if act != Activation::Silu {
            return Err(unsupported("cpu", "a GELU feed-forward"));
        }
        let (model, n) = (&*self.model, self.n);
        let layer = &model.weights.layers[l];
        rms_norm_rows(
            &self.x,
            &layer.ffn_norm,
            model.config.rms_eps,
            n,
            &mut self.xn,
        );
        linear(
            model,
            &layer.ffn_gate,
            &mut self.acts,
            &self.xn,
            Input::New,
            n,
            &mut self.gate,
        )?;
        linear(
            model,
            &layer.ffn_up,
            &mut self.acts,
            &self.xn,
            Input::Same,
            n,
            &mut self.up,
        )?;
        activation::swiglu(
            &mut self.gate[..n * model.config.n_ff],
            &self.up[..n * model.config.n_ff],
        );
        self.regions += 4;
        Ok(())
    }

    fn ffn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let model = self.model.clone();
        self.project_add(
            &model.weights.layers[l].ffn_down,
            Hidden::FeedForward,
            post_norm,
        )
    }

    fn logits(&mut self) -> Result<()> {
        let (model, n) = (&*self.model, self.n);
        let (c, d) = (&model.config, model.config.n_embd);
        let first = if self.all_logits { 0 } else { n - 1 };
        let rows = n - first;
        rms_norm_rows(
            &self.x[first * d..],
            &model.weights.output_norm,
            c.rms_eps,
            rows,
            &mut self.xn,
        );
        if self.logits.len() < rows * c.n_vocab {
            // Only perplexity asks for all-token logits; decode never reaches this.
            self.logits.resize(rows * c.n_vocab, 0.0);
        }
        linear(
            model,
            &model.weights.output,
            &mut self.acts,
            &self.xn,
            Input::New,
            rows,
            &mut self.logits,
        )?;
        self.n_logit_rows = rows;
        self.regions += 2;
        Ok(())
    }

    fn probe(&mut self, step: &Step) {
        self.profiler.lap(step.name());
    }
}

/// Which hidden state a projection reads.
#[derive(Clone, Copy)]
enum Hidden {
    Attention,
    FeedForward,
}

impl CpuBackend {
    /// `x += W · h` for the batch's rows (`h`: the attention output or the feed-forward hidden state).
    fn project_add(&mut self, w: &Weight, from: Hidden, post_norm: bool) -> Result<()> {
        if post_norm {
            return Err(unsupported("cpu", "a post-projection norm"));
        }
        let (model, n, d) = (&*self.model, self.n, self.model.config.n_embd);
        let input = match from {
            Hidden::Attention => &self.att,
            Hidden::FeedForward => &self.gate,
        };
        linear(
            model,
            w,
            &mut self.acts,
            input,
            Input::New,
            n,
            &mut self.proj,
        )?;
        activation::add_assign(&mut self.x[..n * d], &self.proj[..n * d]);
        self.regions += 2;
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device_name(&self) -> String {
        cpu_name()
    }

    fn capacity(&self) -> usize {
        self.ctx
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, all_logits: bool) -> Result<()> {
        let plan = self.plan.clone();
        arch::forward(self, &plan, tokens, pos, all_logits)
    }

    fn logits(&mut self) -> Result<&[f32]> {
        Ok(&self.logits[..self.n_logit_rows * self.model.config.n_vocab])
    }

    fn argmax(&mut self) -> Result<u32> {
        let n = self.model.config.n_vocab;
        let last = &self.logits[(self.n_logit_rows - 1) * n..self.n_logit_rows * n];
        Ok(crate::sampler::argmax(last) as u32)
    }

    fn memory(&self) -> MemoryUsage {
        let f = std::mem::size_of::<f32>() as u64;
        let kv = self
            .k_cache
            .iter()
            .chain(&self.v_cache)
            .map(|c| c.len() as u64 * f)
            .sum();
        let scratch = [
            &self.x,
            &self.xn,
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
        .map(|b| b.len() as u64 * f)
        .sum();
        MemoryUsage {
            weights_bytes: self.model.weights_bytes(),
            kv_cache_bytes: kv,
            scratch_bytes: scratch,
            ..Default::default()
        }
    }

    fn launches_last_forward(&self) -> u64 {
        self.regions
    }

    fn set_profiling(&mut self, on: bool) {
        self.profiler.set(on);
    }

    fn op_profile(&self) -> Vec<OpTiming> {
        self.profiler.report()
    }
}

/// The CPU's model name from /proc/cpuinfo, with the thread count.
pub fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model} ({} threads)", rayon::current_num_threads())
}
