//! A generation session: one backend with its own KV cache, the tokens it holds, and timings.
//!
//! ```no_run
//! use rocforge_runtime::{BackendKind, GenerateOptions, Model, Session};
//!
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let mut session = Session::new(model.clone(), BackendKind::Cpu, Default::default())?;
//! let prompt = model.tokenizer.encode("The capital of France is", true, true)?;
//! let out = session.generate(&prompt, &GenerateOptions { max_tokens: 16, ..Default::default() }, |piece| {
//!     print!("{piece}");
//!     true // keep going
//! })?;
//! println!("\n{:.1} tokens/s", out.timings.decode_tokens_per_s());
//! # Ok::<(), rocforge_runtime::Error>(())
//! ```

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{self, Backend, BackendKind, BackendOptions, MemoryUsage};
use crate::error::{Error, Result};
use crate::limits;
use crate::model::Model;
use crate::sampler::{Sampler, SamplerConfig};

/// Options of [`Session::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Stop at an end-of-generation token (EOS, EOT, `<|im_end|>`...).
    pub stop_at_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            stop_at_eog: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    EndOfGeneration,
    ContextFull,
    Cancelled,
}

/// Measured timings of one generation (host wall clock; every backend call returns only once
/// its result is on the host, so these are device-synchronized).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Time to run the prompt through the model.
    pub prefill_ms: f64,
    /// From submitting the prompt to the first generated token id on the host.
    pub ttft_ms: f64,
    /// Tokens produced by decode steps (the first token comes from the prefill).
    pub decode_tokens: usize,
    /// Time spent in decode steps.
    pub decode_ms: f64,
    /// Latency of each decode step (ms), in order.
    pub inter_token_ms: Vec<f64>,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_ms)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_ms)
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    /// The generated text only (not the prompt).
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// A model, a backend with its KV cache, and the tokens evaluated so far.
pub struct Session {
    model: Arc<Model>,
    backend: Box<dyn Backend>,
    tokens: Vec<u32>,
}

impl Session {
    /// Creates a session on `kind` with a KV cache of `opts.ctx` tokens. The sizes are checked
    /// first ([`limits::check_backend_options`]): in range, no overflow, and on the CPU within
    /// the available memory.
    pub fn new(model: Arc<Model>, kind: BackendKind, opts: BackendOptions) -> Result<Self> {
        limits::check_backend_options(&model.config, kind, &opts)?;
        let backend = backend::create(kind, model.clone(), &opts)?;
        Ok(Self {
            model,
            backend,
            tokens: Vec::new(),
        })
    }

    /// Wraps an existing backend.
    pub fn with_backend(model: Arc<Model>, backend: Box<dyn Backend>) -> Self {
        Self {
            model,
            backend,
            tokens: Vec::new(),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn backend(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }
    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }
    pub fn memory(&self) -> MemoryUsage {
        self.backend.memory()
    }
    /// Tokens held in the KV cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// KV-cache capacity.
    pub fn capacity(&self) -> usize {
        self.backend.capacity()
    }

    /// Forgets every token: the next prefill starts at position 0.
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Evaluates `tokens` after those already held, in chunks of the backend's batch size;
    /// afterwards [`Session::logits`] holds the last token's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.eval(tokens, false, |_, _| {})
    }

    /// Evaluates `tokens` and hands every token's logits row to `f(index, row)`.
    pub fn eval_all_logits(&mut self, tokens: &[u32], f: impl FnMut(usize, &[f32])) -> Result<()> {
        self.eval(tokens, true, f)
    }

    fn eval(&mut self, tokens: &[u32], all: bool, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to evaluate: the prompt has no tokens".into(),
            ));
        }
        let needed = self.tokens.len() + tokens.len();
        if needed > self.backend.capacity() {
            return Err(Error::ContextFull {
                needed,
                capacity: self.backend.capacity(),
            });
        }
        let n_vocab = self.model.config.n_vocab;
        let mut done = 0;
        for chunk in tokens.chunks(self.backend.max_batch()) {
            self.backend.forward(chunk, self.tokens.len(), all)?;
            self.tokens.extend_from_slice(chunk);
            if all {
                let logits = self.backend.logits()?;
                for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
                    f(done + i, row);
                }
            }
            done += chunk.len();
        }
        Ok(())
    }

    /// Evaluates one token (a decode step).
    pub fn decode(&mut self, token: u32) -> Result<()> {
        self.eval(&[token], false, |_, _| {})
    }

    /// The logits of the last evaluated token.
    pub fn logits(&mut self) -> Result<&[f32]> {
        let n = self.model.config.n_vocab;
        let l = self.backend.logits()?;
        Ok(&l[l.len() - n..])
    }

    /// Picks the next token: on the device for greedy decoding, else with `sampler`.
    pub fn sample(&mut self, sampler: &mut Sampler) -> Result<u32> {
        if !sampler.penalizes() && sampler.config().is_greedy() {
            return self.backend.argmax();
        }
        let n = self.model.config.n_vocab;
        let logits = self.backend.logits()?;
        let row = &logits[logits.len() - n..];
        Ok(sampler.sample(row, &self.tokens))
    }

    /// Runs `prompt` (after any tokens already held), then samples up to `opts.max_tokens`
    /// tokens (any value: generation also stops when the context is full), calling `on_text` with each new piece of text as soon as it is complete UTF-8;
    /// `on_text` returning false stops generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(opts.sampler.clone())?;
        let mut timings = Timings {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        // At most the free context can be generated, whatever `max_tokens` says.
        let mut generated = Vec::with_capacity(
            opts.max_tokens
                .min(self.capacity().saturating_sub(self.tokens.len()) + 1),
        );
        let model = self.model.clone();
        let mut stream = model.tokenizer.stream();
        let mut text = String::new();
        let mut stop = StopReason::MaxTokens;

        let start = Instant::now();
        self.prefill(prompt)?;
        timings.prefill_ms = ms(start);
        let mut emit = |tok: u32, text: &mut String| -> bool {
            let piece = stream.push(tok);
            text.push_str(&piece);
            piece.is_empty() || on_text(&piece)
        };
        if opts.max_tokens > 0 {
            let first = self.sample(&mut sampler)?;
            timings.ttft_ms = ms(start);
            generated.push(first);
            let mut last = first;
            loop {
                if opts.stop_at_eog && model.tokenizer.is_eog(last) {
                    stop = StopReason::EndOfGeneration;
                    break;
                }
                if !emit(last, &mut text) {
                    stop = StopReason::Cancelled;
                    break;
                }
                if generated.len() >= opts.max_tokens {
                    break;
                }
                if self.tokens.len() >= self.capacity() {
                    stop = StopReason::ContextFull;
                    break;
                }
                let t0 = Instant::now();
                self.decode(last)?;
                last = self.sample(&mut sampler)?;
                timings.inter_token_ms.push(ms(t0));
                generated.push(last);
            }
            timings.decode_tokens = timings.inter_token_ms.len();
            timings.decode_ms = timings.inter_token_ms.iter().sum();
        }
        let tail = stream.finish();
        if !tail.is_empty() {
            text.push_str(&tail);
            on_text(&tail);
        }
        Ok(Generation {
            prompt_tokens: prompt.to_vec(),
            generated_tokens: generated,
            text,
            stop_reason: stop,
            timings,
        })
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The result of [`perplexity`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub ctx: usize,
    /// Tokens scored.
    pub scored: usize,
}

/// Perplexity by llama.cpp's method: the text's tokens are cut into non-overlapping chunks of
/// `ctx` tokens; each chunk is evaluated from an empty cache and the second half of its
/// predictions is scored. `on_chunk(i, running_ppl)` reports progress.
pub fn perplexity(
    session: &mut Session,
    tokens: &[u32],
    ctx: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity> {
    if ctx < 4 {
        return Err(Error::InvalidArgument(format!(
            "perplexity context {ctx} is too small (at least 4)"
        )));
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for c in 0..chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        session.reset();
        session.eval_all_logits(chunk, |i, row| {
            if i >= first && i + 1 < ctx {
                nll -= log_softmax_at(row, chunk[i + 1] as usize);
                count += 1;
            }
        })?;
        on_chunk(c, (nll / count as f64).exp());
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunks,
        ctx,
        scored: count,
    })
}

/// log(softmax(row)[i]), computed stably in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
