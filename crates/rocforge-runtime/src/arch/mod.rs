//! One model definition, many executors.
//!
//! An architecture is written once, as the sequence of [`Step`]s its forward pass takes
//! (`llama.rs` reads like the paper). Every backend executes that sequence through the
//! [`Executor`] trait, whose steps are cut where a GPU fuses kernels (norm + projection, RoPE +
//! KV store, projection + residual add, norm + gated feed-forward): the CPU runs each step
//! plainly, the GPU picks its fused kernels inside a step. [`forward`] checks the arguments
//! once, runs the steps and calls the executor's probe after each, the one place where
//! profiling and debugging hook in.
//!
//! Weights are named by layer and GGUF role (`attn_q`, `ffn_down`, ...): the definition says
//! which step runs on which layer, the executor holds the tensors.

use crate::backend::SeqBatch;
use crate::error::{Error, Result};
use crate::model::{Architecture, ModelConfig};

pub mod gemma3;
pub mod llama;

/// The gated feed-forward's activation: `h = act(W_gate · xn) * (W_up · xn)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU: Llama).
    Silu,
    /// GELU, tanh approximation (GeGLU: Gemma).
    GeluTanh,
}

/// Which RoPE table a layer rotates with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// The model's `rope.freq_base` (every layer of Llama; the global layers of Gemma 3).
    Global,
    /// The sliding-window layers' base (Gemma 3: 10 000).
    Local,
}

/// One step of a forward pass over a batch of tokens. `layer` picks the block's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// `x[t] = token_embd[tokens[t]] * scale`
    Embed { scale: f32 },
    /// `xn = rmsnorm(x) * attn_norm`; `q, k, v = W_q · xn, W_k · xn, W_v · xn`
    AttnIn { layer: usize },
    /// Per-head RMSNorm of q and k when `qk_norm` (`attn_q_norm`, `attn_k_norm`), RoPE from
    /// table `rope`, then k and v stored in the cache at the batch's positions.
    RopeStore {
        layer: usize,
        qk_norm: bool,
        rope: RopeKind,
    },
    /// `att = softmax(q · kᵀ / √head_dim) · v` over the cache: causal, grouped-query; with a
    /// `window` of n keys, query p1 sees key p0 only when `p1 - p0 < n`.
    Attention { layer: usize, window: Option<usize> },
    /// `x += post_attention_norm?(W_o · att)`
    AttnOut { layer: usize, post_norm: bool },
    /// `h = act(W_gate · xn) * (W_up · xn)`, `xn = rmsnorm(x) * ffn_norm`
    FfnIn { layer: usize, act: Activation },
    /// `x += post_ffw_norm?(W_down · h)`
    FfnOut { layer: usize, post_norm: bool },
    /// `logits = W_out · (rmsnorm(x) * output_norm)`, for the last token or every token.
    Logits,
}

impl Step {
    /// The step's name, as profiles and probes report it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Embed { .. } => "embed",
            Self::AttnIn { .. } => "attn_in",
            Self::RopeStore { .. } => "rope_store",
            Self::Attention { .. } => "attention",
            Self::AttnOut { .. } => "attn_out",
            Self::FfnIn { .. } => "ffn_in",
            Self::FfnOut { .. } => "ffn_out",
            Self::Logits => "logits",
        }
    }

    /// The block the step belongs to (`None` for the embedding and the logits).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Self::Embed { .. } | Self::Logits => None,
            Self::AttnIn { layer }
            | Self::RopeStore { layer, .. }
            | Self::Attention { layer, .. }
            | Self::AttnOut { layer, .. }
            | Self::FfnIn { layer, .. }
            | Self::FfnOut { layer, .. } => Some(layer),
        }
    }
}

/// The forward pass of `config`'s architecture, as steps. Computed once per backend.
pub fn plan(config: &ModelConfig) -> Result<Vec<Step>> {
    Ok(match config.architecture {
        Architecture::Llama => llama::plan(config),
        Architecture::Gemma3 => gemma3::plan(config),
    })
}

/// What [`forward`] checks a call against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// KV-cache capacity in tokens.
    pub ctx: usize,
    /// Most tokens one call takes.
    pub max_batch: usize,
    pub n_vocab: usize,
}

/// A backend's implementation of the steps. Each step reads and writes the executor's own
/// activations (the residual stream `x`, the normalised input, q/k/v, the attention output,
/// the feed-forward hidden state, the logits) for the batch announced by `begin`.
pub trait Executor {
    fn limits(&self) -> Limits;
    /// A batch of `n` tokens at positions `pos..pos + n`; logits for every token when `all_logits`.
    fn begin(&mut self, n: usize, pos: usize, all_logits: bool) -> Result<()>;
    /// A batch made of the new tokens of several sequences, in order (see [`forward_seqs`]).
    fn begin_seqs(&mut self, _seqs: &[SeqBatch<'_>]) -> Result<()> {
        Err(unsupported("this", "a multi-sequence forward"))
    }
    fn embed(&mut self, tokens: &[u32], scale: f32) -> Result<()>;
    fn attn_in(&mut self, layer: usize) -> Result<()>;
    fn rope_store(&mut self, layer: usize, qk_norm: bool, rope: RopeKind) -> Result<()>;
    fn attention(&mut self, layer: usize, window: Option<usize>) -> Result<()>;
    fn attn_out(&mut self, layer: usize, post_norm: bool) -> Result<()>;
    fn ffn_in(&mut self, layer: usize, act: Activation) -> Result<()>;
    fn ffn_out(&mut self, layer: usize, post_norm: bool) -> Result<()>;
    fn logits(&mut self) -> Result<()>;
    /// Called after every step: profiling (time charged to the step) and debugging hooks.
    fn probe(&mut self, _step: &Step) {}
    /// Called once the last step is issued.
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Runs `plan` on `exec` for `tokens` at positions `pos..`, after checking the call once.
pub fn forward<E: Executor + ?Sized>(
    exec: &mut E,
    plan: &[Step],
    tokens: &[u32],
    pos: usize,
    all_logits: bool,
) -> Result<()> {
    let Limits {
        ctx,
        max_batch,
        n_vocab,
    } = exec.limits();
    let n = tokens.len();
    if n == 0 || n > max_batch {
        return Err(Error::InvalidArgument(format!(
            "forward takes 1 to {max_batch} tokens, got {n}"
        )));
    }
    if pos.checked_add(n).is_none_or(|end| end > ctx) {
        return Err(Error::ContextFull {
            needed: pos.saturating_add(n),
            capacity: ctx,
        });
    }
    if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(Error::InvalidArgument(format!(
            "token id {tok} is outside the vocabulary of {n_vocab}"
        )));
    }
    exec.begin(n, pos, all_logits)?;
    run_steps(exec, plan, tokens)
}

/// Runs `plan` on `exec` for the new tokens of several sequences at once (a batched decode
/// step, or decode mixed with prefill chunks): each sequence at its own positions, over its
/// own KV pages. The steps are the same as [`forward`]'s; the executor's
/// [`Executor::begin_seqs`] records where each sequence's rows are.
pub fn forward_seqs<E: Executor + ?Sized>(
    exec: &mut E,
    plan: &[Step],
    seqs: &[SeqBatch<'_>],
    tokens: &mut Vec<u32>,
    page_size: usize,
) -> Result<()> {
    let Limits {
        ctx,
        max_batch,
        n_vocab,
    } = exec.limits();
    let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    if seqs.is_empty() || n > max_batch || seqs.iter().any(|s| s.tokens.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "a multi-sequence forward takes 1 to {max_batch} tokens in all, at least one per \
             sequence; got {n} over {} sequences",
            seqs.len()
        )));
    }
    let n_pages = ctx / page_size.max(1);
    for s in seqs {
        let end = s.pos.saturating_add(s.tokens.len());
        if end.div_ceil(page_size) > s.pages.len() {
            return Err(Error::ContextFull {
                needed: end,
                capacity: s.pages.len() * page_size,
            });
        }
        if let Some(&p) = s.pages.iter().find(|&&p| p as usize >= n_pages) {
            return Err(Error::InvalidArgument(format!(
                "KV page {p} is outside the pool of {n_pages} pages"
            )));
        }
        if let Some(&tok) = s.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {tok} is outside the vocabulary of {n_vocab}"
            )));
        }
    }
    tokens.clear();
    seqs.iter().for_each(|s| tokens.extend_from_slice(s.tokens));
    exec.begin_seqs(seqs)?;
    run_steps(exec, plan, tokens)
}

fn run_steps<E: Executor + ?Sized>(exec: &mut E, plan: &[Step], tokens: &[u32]) -> Result<()> {
    for step in plan {
        match *step {
            Step::Embed { scale } => exec.embed(tokens, scale)?,
            Step::AttnIn { layer } => exec.attn_in(layer)?,
            Step::RopeStore {
                layer,
                qk_norm,
                rope,
            } => exec.rope_store(layer, qk_norm, rope)?,
            Step::Attention { layer, window } => exec.attention(layer, window)?,
            Step::AttnOut { layer, post_norm } => exec.attn_out(layer, post_norm)?,
            Step::FfnIn { layer, act } => exec.ffn_in(layer, act)?,
            Step::FfnOut { layer, post_norm } => exec.ffn_out(layer, post_norm)?,
            Step::Logits => exec.logits()?,
        }
        exec.probe(step);
    }
    exec.end()
}

/// The error an executor gives for a step option it does not implement.
pub(crate) fn unsupported(backend: &str, what: &str) -> Error {
    Error::Backend {
        backend: backend.into(),
        problem: format!("{what} is not implemented on this backend"),
    }
}
