//! The CPU reference backend: executes the model definition's steps ([`crate::arch`]) in plain Rust, rows in parallel with
//! rayon, weights dotted in their quantized layout (activations quantized once per matrix
//! input, as llama.cpp does). Every buffer, the KV cache included, is allocated in `new`;
//! a decode step allocates nothing.

use std::sync::Arc;

use rayon::prelude::*;
use rocforge_kernels::ops::{activation, attention, norm, rope};
use rocforge_kernels::quant::{self, PreparedActs};
use rocforge_kernels::GgmlType;

use super::{Backend, BackendKind, BackendOptions, MemoryUsage, OpTiming, Profiler, SeqBatch};
use crate::arch::{self, unsupported, Activation, Executor, Limits, RopeKind, Step};
use crate::error::{Error, Result};
use crate::model::{Architecture, Model, RopeStyle, Weight};

/// Tokens per KV page in a multi-sequence forward ([`Backend::forward_seqs`]). The cache is
/// one pool: a single sequence ([`Backend::forward`]) uses it as one contiguous run of slots,
/// several sequences use it as `ctx / PAGE_SIZE` pages named by their page tables.
pub const PAGE_SIZE: usize = rocforge_kernels::ops::attention::KV_PAGE_SIZE;

/// The run state: activations for up to `max_batch` tokens and the KV cache.
pub struct CpuBackend {
    model: Arc<Model>,
    ctx: usize,
    max_batch: usize,
    inv_freqs: Vec<f32>,
    /// The sliding-window layers' table (Gemma 3); empty when every layer is global.
    inv_freqs_local: Vec<f32>,
    // Activations, one row per token in the batch.
    x: Vec<f32>,         // (batch, n_embd) residual stream
    xn: Vec<f32>,        // (batch, n_embd) normalised input of a block
    q: Vec<f32>,         // (batch, n_head*head_dim)
    k: Vec<f32>,         // (batch, n_head_kv*head_dim)
    v: Vec<f32>,         // (batch, n_head_kv*head_dim)
    att: Vec<f32>,       // (batch, n_head*head_dim) attention output
    proj: Vec<f32>,      // (batch, n_embd) output of attn_output / ffn_down
    gate: Vec<f32>,      // (batch, n_ff)
    up: Vec<f32>,        // (batch, n_ff)
    cos: Vec<f32>,       // (batch, rope_dim/2)
    sin: Vec<f32>,       // (batch, rope_dim/2)
    cos_local: Vec<f32>, // (batch, rope_dim/2), or empty
    sin_local: Vec<f32>, // (batch, rope_dim/2), or empty
    logits: Vec<f32>,    // (n_vocab) or (batch, n_vocab) for all-token logits
    n_logit_rows: usize,
    acts: Acts,
    k_cache: Vec<Vec<f32>>, // (n_layer) x (ctx, n_head_kv*head_dim)
    v_cache: Vec<Vec<f32>>, // (n_layer) x (ctx, n_head_kv*head_dim)
    /// K and V are stored rounded to f16 (the cache stays f32): Gemma 3 only. llama.cpp's
    /// reference keeps an f16 cache, and Gemma 3's greedy continuations are sensitive enough to
    /// it that an exact f32 cache parts from llama.cpp at a three-way near-tie (step 10 of the
    /// third prompt of `gemma3-greedy.json`) where the f16 one agrees. Llama stays exact f32.
    kv_f16: bool,
    /// Decode attention's tasks, (token, KV head, split), and their partial results.
    split_tasks: Vec<(u32, u32, u32)>,
    split_parts: Vec<f32>,
    regions: u64,
    profiler: Profiler,
    /// The architecture's forward pass, run by [`arch::forward`].
    plan: Arc<[Step]>,
    // The batch of the forward call under way.
    n: usize,
    pos: usize,
    all_logits: bool,
    /// Set by a multi-sequence forward: rows are placed by `paged` instead of `pos + t`.
    paged_on: bool,
    paged: PagedRows,
}

/// Where each row of a multi-sequence batch lives: its position, its cache slot, the page
/// table of its sequence, and which rows give logits.
#[derive(Default)]
struct PagedRows {
    pos: Vec<usize>,        // (batch) position of each row in its sequence
    slot: Vec<usize>,       // (batch) cache slot the row's key and value go to
    table: Vec<(u32, u32)>, // (batch) the row's page table, as a range of `pages`
    pages: Vec<u32>,        // every sequence's page table, one after another
    logit_rows: Vec<usize>, // the rows whose logits are asked for, in order
    tokens: Vec<u32>,       // the batch's tokens, one sequence after another
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, opts: &BackendOptions) -> Result<Self> {
        let c = &model.config;
        let (ctx, b) = (opts.ctx, opts.max_batch.min(opts.ctx));
        let inv_freqs = scaled(
            rope::inv_freqs(c.rope_dim, c.rope_base, model.weights.rope_freqs.as_deref()),
            c.rope_freq_scale,
        );
        let inv_freqs_local = match c.sliding_window {
            Some(_) => rope::inv_freqs(c.rope_dim, c.rope_base_local, None),
            None => Vec::new(),
        };
        let local_half = inv_freqs_local.len();
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
            inv_freqs_local,
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
            cos_local: zeros(b * local_half),
            sin_local: zeros(b * local_half),
            logits: zeros(c.n_vocab),
            n_logit_rows: 1,
            acts: Acts {
                rows: (0..b).map(|_| PreparedActs::new()).collect(),
                prepared: None,
            },
            k_cache: (0..c.n_layer).map(|_| zeros(ctx * c.kv_dim())).collect(),
            v_cache: (0..c.n_layer).map(|_| zeros(ctx * c.kv_dim())).collect(),
            kv_f16: c.architecture == Architecture::Gemma3,
            split_tasks: Vec::new(),
            split_parts: Vec::new(),
            regions: 0,
            profiler: Profiler::default(),
            plan: arch::plan(c)?.into(),
            n: 0,
            pos: 0,
            all_logits: false,
            paged_on: false,
            paged: PagedRows::default(),
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

/// The inverse frequencies times a linear RoPE scale (positions scaled by `scale`).
pub(crate) fn scaled(mut inv_freqs: Vec<f32>, scale: f32) -> Vec<f32> {
    if scale != 1.0 {
        inv_freqs.iter_mut().for_each(|f| *f *= scale);
    }
    inv_freqs
}

/// A Gemma weight the architecture's step asks for, or a one-line error if the file has none.
pub(crate) fn required<'a>(w: &'a Option<Vec<f32>>, name: &str, layer: usize) -> Result<&'a [f32]> {
    w.as_deref()
        .ok_or_else(|| Error::InvalidArgument(format!("blk.{layer}.{name}.weight is missing")))
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
        self.paged_on = false;
        self.rope_tables(|t| pos + t);
        Ok(())
    }

    fn begin_seqs(&mut self, seqs: &[SeqBatch<'_>]) -> Result<()> {
        let mut p = std::mem::take(&mut self.paged);
        for v in [&mut p.pos, &mut p.slot, &mut p.logit_rows] {
            v.clear();
        }
        p.table.clear();
        p.pages.clear();
        let mut row = 0;
        for s in seqs {
            let start = p.pages.len() as u32;
            p.pages.extend_from_slice(s.pages);
            let range = (start, p.pages.len() as u32);
            for i in 0..s.tokens.len() {
                let at = s.pos + i;
                p.pos.push(at);
                p.slot
                    .push(s.pages[at / PAGE_SIZE] as usize * PAGE_SIZE + at % PAGE_SIZE);
                p.table.push(range);
            }
            row += s.tokens.len();
            if s.logits {
                p.logit_rows.push(row - 1);
            }
        }
        (self.n, self.pos, self.all_logits) = (row, 0, false);
        let positions = std::mem::take(&mut p.pos);
        self.rope_tables(|t| positions[t]);
        p.pos = positions;
        self.paged = p;
        self.paged_on = true;
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
        let model = self.model.clone();
        let c = &model.config;
        if rope == RopeKind::Local && self.inv_freqs_local.is_empty() {
            return Err(unsupported(
                "cpu",
                "a local RoPE table without a sliding window",
            ));
        }
        let norms = match qk_norm {
            true => {
                let layer = &model.weights.layers[l];
                Some((
                    required(&layer.attn_q_norm, "attn_q_norm", l)?,
                    required(&layer.attn_k_norm, "attn_k_norm", l)?,
                ))
            }
            false => None,
        };
        let (table_cos, table_sin) = match rope {
            RopeKind::Global => (&self.cos, &self.sin),
            RopeKind::Local => (&self.cos_local, &self.sin_local),
        };
        let rotate = match c.rope_style {
            RopeStyle::Normal => rope::rope,
            RopeStyle::Neox => rope::rope_neox,
        };
        let (n, pos, hd, kv_dim, q_dim, half) = (
            self.n,
            self.pos,
            c.head_dim,
            c.kv_dim(),
            c.q_dim(),
            c.rope_dim / 2,
        );
        let eps = c.rms_eps;
        // One token's q and k: head norms (Gemma 3), then RoPE.
        let token = |t: usize, q: &mut [f32], k: &mut [f32]| {
            if let Some((qn, kn)) = norms {
                norm::rms_norm_heads(q, qn, eps);
                norm::rms_norm_heads(k, kn, eps);
            }
            let (cos, sin) = (
                &table_cos[t * half..(t + 1) * half],
                &table_sin[t * half..(t + 1) * half],
            );
            rotate(q, hd, cos, sin);
            rotate(k, hd, cos, sin);
        };
        let (q, k) = (&mut self.q[..n * q_dim], &mut self.k[..n * kv_dim]);
        if n == 1 {
            token(0, q, k);
        } else {
            q.par_chunks_mut(q_dim)
                .zip(k.par_chunks_mut(kv_dim))
                .enumerate()
                .for_each(|(t, (q, k))| token(t, q, k));
        }
        let (kc, vc) = (&mut self.k_cache[l], &mut self.v_cache[l]);
        let round = |vals: &mut [f32]| round_to_f16(vals);
        if self.paged_on {
            for (t, &slot) in self.paged.slot.iter().enumerate() {
                let at = slot * kv_dim..(slot + 1) * kv_dim;
                kc[at.clone()].copy_from_slice(&self.k[t * kv_dim..(t + 1) * kv_dim]);
                vc[at.clone()].copy_from_slice(&self.v[t * kv_dim..(t + 1) * kv_dim]);
                if self.kv_f16 {
                    round(&mut kc[at.clone()]);
                    round(&mut vc[at]);
                }
            }
            return Ok(());
        }
        kc[pos * kv_dim..(pos + n) * kv_dim].copy_from_slice(&self.k[..n * kv_dim]);
        vc[pos * kv_dim..(pos + n) * kv_dim].copy_from_slice(&self.v[..n * kv_dim]);
        if self.kv_f16 {
            let at = pos * kv_dim..(pos + n) * kv_dim;
            round(&mut kc[at.clone()]);
            round(&mut vc[at]);
        }
        Ok(())
    }

    fn attention(&mut self, l: usize, window: Option<usize>) -> Result<()> {
        let c = &self.model.config;
        let (n, pos, hd, q_dim, n_kv, group) = (
            self.n,
            self.pos,
            c.head_dim,
            c.q_dim(),
            c.n_head_kv,
            c.gqa_group(),
        );
        let shape = attention::AttnShape {
            n_heads: c.n_head,
            n_kv_heads: c.n_head_kv,
            head_dim: hd,
        };
        let (q, kc, vc) = (&self.q, &self.k_cache[l], &self.v_cache[l]);
        if n > 1 && !self.paged_on && attention::tiled_supported(shape) {
            // Prefill: tiles of tokens whose query heads walk the keys together; at least two
            // tiles per thread so short prompts still use every thread.
            let per_task = attention::TILE_TOKENS
                .min(n.div_ceil(2 * rayon::current_num_threads()))
                .max(1);
            self.att[..n * q_dim]
                .par_chunks_mut(per_task * q_dim)
                .zip(q[..n * q_dim].par_chunks(per_task * q_dim))
                .enumerate()
                .for_each(|(i, (out, qs))| {
                    attention::attend_tokens(qs, kc, vc, pos + i * per_task, window, shape, out);
                });
            self.regions += 1;
            return Ok(());
        }
        // Decode (and batches of several sequences): one task per (token, KV head, split of the
        // keys), then the splits' partial softmaxes are merged per (token, KV head).
        let (paged_on, p) = (self.paged_on, &self.paged);
        let pos_of = |t: usize| if paged_on { p.pos[t] } else { pos + t };
        let tasks = &mut self.split_tasks;
        tasks.clear();
        for t in 0..n {
            for g in 0..n_kv {
                for s in 0..attention::decode_splits(pos_of(t), window) {
                    tasks.push((t as u32, g as u32, s as u32));
                }
            }
        }
        let len = attention::split_len(shape);
        self.split_parts.resize(tasks.len() * len, 0.0);
        self.split_parts
            .par_chunks_mut(len)
            .zip(tasks.par_iter())
            .for_each(|(part, &(t, g, s))| {
                let (t, g, s) = (t as usize, g as usize, s as usize);
                let qt = &q[t * q_dim..(t + 1) * q_dim];
                let at = pos_of(t);
                if paged_on {
                    let (a, b) = p.table[t];
                    let pages = &p.pages[a as usize..b as usize];
                    let row = |x: usize| pages[x / PAGE_SIZE] as usize * PAGE_SIZE + x % PAGE_SIZE;
                    attention::attend_split(qt, kc, vc, g, at, window, s, shape, part, row);
                } else {
                    attention::attend_split(qt, kc, vc, g, at, window, s, shape, part, |x| x);
                }
            });
        // Tasks are in (token, KV head) order: each output's splits are consecutive.
        let parts = &self.split_parts;
        let mut first = 0;
        for (i, out) in self.att[..n * q_dim].chunks_mut(group * hd).enumerate() {
            let splits = attention::decode_splits(pos_of(i / n_kv), window);
            attention::combine_splits(&parts[first * len..(first + splits) * len], shape, out);
            first += splits;
        }
        self.regions += 1;
        Ok(())
    }

    fn attn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let model = self.model.clone();
        let layer = &model.weights.layers[l];
        let post = match post_norm {
            true => Some(required(
                &layer.post_attention_norm,
                "post_attention_norm",
                l,
            )?),
            false => None,
        };
        self.project_add(&layer.attn_output, Hidden::Attention, post)
    }

    fn ffn_in(&mut self, l: usize, act: Activation) -> Result<()> {
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
        let act = match act {
            Activation::Silu => activation::GateAct::Silu,
            Activation::GeluTanh => activation::GateAct::GeluTanh,
        };
        // Rows in parallel, a few thousand elements per task.
        let chunk = model.config.n_ff.max(4096);
        self.gate[..n * model.config.n_ff]
            .par_chunks_mut(chunk)
            .zip(self.up[..n * model.config.n_ff].par_chunks(chunk))
            .for_each(|(g, u)| activation::gated_fast(act, g, u));
        self.regions += 4;
        Ok(())
    }

    fn ffn_out(&mut self, l: usize, post_norm: bool) -> Result<()> {
        let model = self.model.clone();
        let layer = &model.weights.layers[l];
        let post = match post_norm {
            true => Some(required(&layer.post_ffw_norm, "post_ffw_norm", l)?),
            false => None,
        };
        self.project_add(&layer.ffn_down, Hidden::FeedForward, post)
    }

    fn logits(&mut self) -> Result<()> {
        let (model, n) = (&*self.model, self.n);
        let (c, d) = (&model.config, model.config.n_embd);
        let rows = if self.paged_on {
            // Only the last new token of each sequence that asked.
            let w = &model.weights.output_norm;
            for (i, &r) in self.paged.logit_rows.iter().enumerate() {
                let (x, out) = (
                    &self.x[r * d..(r + 1) * d],
                    &mut self.xn[i * d..(i + 1) * d],
                );
                norm::rms_norm(x, w, c.rms_eps, out);
            }
            self.paged.logit_rows.len()
        } else {
            let first = if self.all_logits { 0 } else { n - 1 };
            rms_norm_rows(
                &self.x[first * d..],
                &model.weights.output_norm,
                c.rms_eps,
                n - first,
                &mut self.xn,
            );
            n - first
        };
        if rows == 0 {
            self.n_logit_rows = 0;
            return Ok(());
        }
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

impl CpuBackend {
    /// Fills the RoPE tables of the batch's rows, row `t` at position `pos_of(t)`, and starts
    /// the profiler's clock.
    fn rope_tables(&mut self, pos_of: impl Fn(usize) -> usize) {
        self.regions = 0;
        let half = self.model.config.rope_dim / 2;
        for t in 0..self.n {
            let (cos, sin) = (
                &mut self.cos[t * half..(t + 1) * half],
                &mut self.sin[t * half..(t + 1) * half],
            );
            rope::rope_cache(pos_of(t), &self.inv_freqs, cos, sin);
            if !self.inv_freqs_local.is_empty() {
                let (cos, sin) = (
                    &mut self.cos_local[t * half..(t + 1) * half],
                    &mut self.sin_local[t * half..(t + 1) * half],
                );
                rope::rope_cache(pos_of(t), &self.inv_freqs_local, cos, sin);
            }
        }
        self.profiler.start();
    }
}

/// Rounds every value to the nearest f16 (in f32), through `half`'s slice conversions (F16C
/// where the CPU has it).
fn round_to_f16(vals: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut tmp = [half::f16::ZERO; 256];
    for chunk in vals.chunks_mut(256) {
        let tmp = &mut tmp[..chunk.len()];
        tmp.convert_from_f32_slice(chunk);
        tmp.convert_to_f32_slice(chunk);
    }
}

/// Which hidden state a projection reads.
#[derive(Clone, Copy)]
enum Hidden {
    Attention,
    FeedForward,
}

impl CpuBackend {
    /// `x += W · h`, or with a post-norm weight `x += rmsnorm(W · h) * post`, for the batch's
    /// rows (`h`: the attention output or the feed-forward hidden state).
    fn project_add(&mut self, w: &Weight, from: Hidden, post: Option<&[f32]>) -> Result<()> {
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
        match post {
            None => activation::add_assign(&mut self.x[..n * d], &self.proj[..n * d]),
            Some(weight) => {
                let eps = model.config.rms_eps;
                self.x[..n * d]
                    .par_chunks_mut(d)
                    .zip(self.proj.par_chunks(d))
                    .for_each(|(x, p)| norm::add_rms_normed(x, p, weight, eps));
            }
        }
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
        // The whole pass runs on a pool thread: each of its ~360 parallel steps is then forked
        // from inside rayon's pool instead of being injected from outside and waited for on a
        // latch (measured on 2 threads: 211 decode products in 13.0 ms instead of 20.7 ms).
        rayon::scope(|_| arch::forward(self, &plan, tokens, pos, all_logits))
    }

    fn logits(&mut self) -> Result<&[f32]> {
        Ok(&self.logits[..self.n_logit_rows * self.model.config.n_vocab])
    }

    fn argmax(&mut self) -> Result<u32> {
        let n = self.model.config.n_vocab;
        if self.n_logit_rows == 0 {
            return Err(Error::InvalidArgument(
                "the last forward call computed no logits".into(),
            ));
        }
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

    fn kv_page_size(&self) -> Option<usize> {
        Some(PAGE_SIZE)
    }

    fn forward_seqs(&mut self, seqs: &[SeqBatch<'_>]) -> Result<()> {
        let plan = self.plan.clone();
        let mut tokens = std::mem::take(&mut self.paged.tokens);
        let out = rayon::scope(|_| arch::forward_seqs(self, &plan, seqs, &mut tokens, PAGE_SIZE));
        self.paged.tokens = tokens;
        out
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
