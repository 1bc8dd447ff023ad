//! Many sequences over one loaded model: requests come in, are scheduled step by step, stream
//! their tokens out as events, and leave when they finish or are cancelled.
//!
//! ```no_run
//! use rocforge_runtime::engine::{Engine, EngineOptions, Event, Request};
//! use rocforge_runtime::{BackendKind, GenerateOptions, Model};
//!
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let mut engine = Engine::new(model.clone(), BackendKind::Cpu, EngineOptions::default())?;
//! for text in ["The capital of France is", "Water boils at"] {
//!     let prompt = model.tokenizer.encode(text, true, true)?;
//!     engine.add(Request::new(prompt, GenerateOptions::default()))?;
//! }
//! engine.run(|event| {
//!     if let Event::Finished { id, generation } = event {
//!         println!("{id}: {}", generation.text);
//!     }
//! })?;
//! # Ok::<(), rocforge_runtime::Error>(())
//! ```
//!
//! **Scheduling** is continuous: before each step, waiting requests join (first come, first
//! served) while there is a free sequence slot and KV pages for them; each step then evaluates
//! one token of every sequence that is decoding, and spends what is left of the step's token
//! budget ([`EngineOptions::step_tokens`]) on prompt chunks of the sequences still in
//! prefill, so a long prompt joins over several steps without stalling the others' decode.
//! Finished sequences leave at once and give their pages back.
//!
//! **KV pages**: on a backend that evaluates several sequences in one call
//! ([`Backend::kv_page_size`]: the CPU and the GPU backends), the cache is one pool of fixed-size pages, sized at
//! start ([`EngineOptions::pool_tokens`]). A request is given all the pages it can need
//! (prompt plus `max_tokens`, at most [`EngineOptions::seq_ctx`]) when it joins, so a running
//! sequence never runs out of cache: a request that does not fit now waits in the queue, and
//! one that could never fit (more pages than the whole pool) is refused by [`Engine::add`]
//! with a one-line error. On a backend without pages (a library user's own) the engine runs
//! the requests one at a time, in order, through the single-sequence forward pass.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{self, Backend, BackendKind, BackendOptions, MemoryUsage, SeqBatch};
use crate::error::{Error, Result};
use crate::kv_pages::PagePool;
use crate::limits;
use crate::model::Model;
use crate::sampler::{self, Sampler};
use crate::session::{GenerateOptions, Generation, StopReason, Timings};

/// Names a request for its whole life, from [`Engine::add`] to its [`Event::Finished`].
pub type RequestId = u64;

/// A generation request: prompt ids, sampling options, stop conditions.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Most tokens to generate, sampling, and whether end-of-generation tokens stop it.
    pub options: GenerateOptions,
    /// More ids that end the request when generated (like an end-of-generation token).
    pub stop_tokens: Vec<u32>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, options: GenerateOptions) -> Self {
        Self {
            prompt,
            options,
            stop_tokens: Vec::new(),
        }
    }
}

/// Sizes of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences evaluated together.
    pub max_seqs: usize,
    /// Most positions one sequence holds (prompt and generated tokens).
    pub seq_ctx: usize,
    /// The KV page pool of all sequences, in tokens; `None`: `max_seqs * seq_ctx`.
    pub pool_tokens: Option<usize>,
    /// Most tokens evaluated in one step (one per decoding sequence, the rest prompt chunks);
    /// at least `max_seqs`.
    pub step_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seqs: 8,
            seq_ctx: 2048,
            pool_tokens: None,
            step_tokens: 512,
        }
    }
}

/// What a step reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token of request `id` and the text it completes (often empty while a UTF-8
    /// character is incomplete). Tokens that end the request (end-of-generation, stop tokens)
    /// give no `Token` event; they are in the finished generation's ids.
    Token {
        id: RequestId,
        token: u32,
        text: String,
    },
    /// Request `id` is done: every id and the whole text, why it stopped, and its timings.
    /// `timings.ttft_ms` counts from [`Engine::add`] (time waiting in the queue included);
    /// `prefill_ms` from the step it joined to its first token.
    Finished {
        id: RequestId,
        generation: Generation,
    },
}

struct Seq {
    id: RequestId,
    req: Request,
    sampler: Sampler,
    pages: Vec<u32>,
    /// Positions evaluated into the cache.
    fed: usize,
    generated: Vec<u32>,
    /// The last sampled token, to be evaluated by the next step.
    next: Option<u32>,
    text: String,
    /// UTF-8 bytes of the text stream not yet complete.
    pending: Vec<u8>,
    timings: Timings,
    submitted: Instant,
    admitted: Instant,
    last_token: Instant,
}

/// One sequence's share of a step.
struct Share {
    seq: usize,
    start: usize,
    len: usize,
    logits: bool,
}

/// Many sequences over one model and one backend (see the module docs).
pub struct Engine {
    model: Arc<Model>,
    backend: Box<dyn Backend>,
    opts: EngineOptions,
    /// `None`: the backend holds one sequence at a time.
    pool: Option<PagePool>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Events produced between steps (cancellations), handed out by the next step.
    queued_events: Vec<Event>,
    next_id: RequestId,
}

impl Engine {
    /// An engine on `kind`, its KV cache a pool of `opts.pool_tokens` tokens in pages.
    pub fn new(model: Arc<Model>, kind: BackendKind, opts: EngineOptions) -> Result<Self> {
        check_options(&opts)?;
        let pool = pool_tokens(&opts)?;
        let sized = |ctx| BackendOptions {
            ctx,
            max_batch: opts.step_tokens,
        };
        // Every backend of the project pages its cache: its context is the whole pool.
        limits::check_backend_options(&model.config, kind, &sized(pool))?;
        let backend = backend::create(kind, model.clone(), &sized(pool))?;
        Self::with_backend(model, backend, opts)
    }

    /// An engine over an existing backend: paged when the backend says so
    /// ([`Backend::kv_page_size`]), its capacity the pool; else one sequence at a time.
    pub fn with_backend(
        model: Arc<Model>,
        backend: Box<dyn Backend>,
        mut opts: EngineOptions,
    ) -> Result<Self> {
        check_options(&opts)?;
        let pool = match backend.kv_page_size() {
            Some(page) => Some(PagePool::new(backend.capacity() / page, page)),
            None => {
                opts.max_seqs = 1;
                opts.seq_ctx = opts.seq_ctx.min(backend.capacity());
                None
            }
        };
        opts.step_tokens = opts.step_tokens.min(backend.max_batch());
        if opts.step_tokens < opts.max_seqs {
            return Err(limits::out_of_range(
                "step tokens",
                opts.step_tokens,
                &format!(
                    "at least the {} sequences evaluated together (the backend's batch is {})",
                    opts.max_seqs,
                    backend.max_batch()
                ),
            ));
        }
        Ok(Self {
            model,
            backend,
            opts,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            queued_events: Vec::new(),
            next_id: 0,
        })
    }

    /// Queues a request; it joins at a later step. Refused with a one-line error when it is
    /// malformed (empty prompt, id outside the vocabulary, bad sampling settings) or could
    /// never run (its prompt is longer than [`EngineOptions::seq_ctx`], or it needs more KV
    /// pages than the whole pool holds).
    pub fn add(&mut self, req: Request) -> Result<RequestId> {
        if req.prompt.is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to evaluate: the prompt has no tokens".into(),
            ));
        }
        let n_vocab = self.model.config.n_vocab;
        if let Some(&tok) = req.prompt.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {tok} is outside the vocabulary of {n_vocab}"
            )));
        }
        if req.prompt.len() > self.opts.seq_ctx {
            return Err(Error::ContextFull {
                needed: req.prompt.len(),
                capacity: self.opts.seq_ctx,
            });
        }
        if let Some(pool) = &self.pool {
            let tokens = self.reserved_tokens(&req);
            if pool.pages_for(tokens) > pool.total_pages() {
                return Err(Error::ContextFull {
                    needed: tokens,
                    capacity: pool.total_pages() * pool.page_size(),
                });
            }
        }
        let sampler = Sampler::new(req.options.sampler.clone())?;
        let id = self.next_id;
        self.next_id += 1;
        let now = Instant::now();
        self.waiting.push_back(Seq {
            id,
            timings: Timings {
                prompt_tokens: req.prompt.len(),
                ..Default::default()
            },
            req,
            sampler,
            pages: Vec::new(),
            fed: 0,
            generated: Vec::new(),
            next: None,
            text: String::new(),
            pending: Vec::new(),
            submitted: now,
            admitted: now,
            last_token: now,
        });
        Ok(id)
    }

    /// Queues `text` with `options`: tokenized by the model's tokenizer as `rocforge generate`
    /// does (BOS and other special tokens the model adds, special-token text parsed), then as
    /// [`Engine::add`].
    pub fn add_text(&mut self, text: &str, options: GenerateOptions) -> Result<RequestId> {
        let prompt = self.model.tokenizer.encode(text, true, true)?;
        self.add(Request::new(prompt, options))
    }

    /// Positions a request may fill: its prompt, then every generated token but the last
    /// (which is never evaluated), within the per-sequence context.
    fn reserved_tokens(&self, req: &Request) -> usize {
        let generated = req.options.max_tokens.saturating_sub(1);
        req.prompt
            .len()
            .saturating_add(generated)
            .min(self.opts.seq_ctx)
            .max(req.prompt.len())
    }

    /// Ends request `id` (waiting or running); its [`Event::Finished`], with
    /// [`StopReason::Cancelled`], comes with the next step. False if no such request is live.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(i).expect("index from position");
            let event = self.finish(seq, StopReason::Cancelled);
            self.queued_events.push(event);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            let event = self.finish(seq, StopReason::Cancelled);
            self.queued_events.push(event);
            return true;
        }
        false
    }

    /// True when no request is waiting or running and no event is left to hand out.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.queued_events.is_empty()
    }

    /// Requests running (holding KV pages) and waiting.
    pub fn running(&self) -> usize {
        self.running.len()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Most sequences evaluated together: 1 on a backend without paged KV.
    pub fn parallel(&self) -> usize {
        self.opts.max_seqs
    }
    /// Free and total KV pages (`None` on a backend without paged KV).
    pub fn pages(&self) -> Option<(usize, usize)> {
        self.pool
            .as_ref()
            .map(|p| (p.free_pages(), p.total_pages()))
    }
    pub fn model(&self) -> &Arc<Model> {
        &self.model
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
    /// KV-cache capacity in tokens: the page pool, or one sequence's context.
    pub fn capacity(&self) -> usize {
        self.backend.capacity()
    }

    /// Turns the backend's per-op timing on (and clears it) or off: see
    /// [`Backend::set_profiling`] (on a GPU it synchronizes after every op).
    pub fn set_profiling(&mut self, on: bool) {
        self.backend.set_profiling(on);
    }
    /// Time per op family since profiling was turned on.
    pub fn op_profile(&self) -> Vec<crate::backend::OpTiming> {
        self.backend.op_profile()
    }
    /// Kernel launches of the last step's forward pass.
    pub fn launches_last_step(&self) -> u64 {
        self.backend.launches_last_forward()
    }

    /// Steps until every request has finished, handing each event to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<()> {
        while !self.is_idle() {
            for e in self.step()? {
                on_event(&e);
            }
        }
        Ok(())
    }

    /// Lets waiting requests join, evaluates one step (a token of every decoding sequence,
    /// prompt chunks with the rest of the budget) and returns what happened.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = std::mem::take(&mut self.queued_events);
        self.admit();
        if self.running.is_empty() {
            return Ok(events);
        }
        let shares = self.plan();
        self.evaluate(&shares)?;
        let model = self.model.clone();
        let n_vocab = model.config.n_vocab;
        let mut picks = Vec::with_capacity(shares.len());
        let mut row = 0;
        let plain_greedy = |seq: &Seq| !seq.sampler.penalizes() && seq.sampler.config().is_greedy();
        // Every row greedy: the backend's argmax per row (on the device for a GPU), so the
        // logits never cross to the host.
        let greedy_ids = if self.pool.is_some()
            && shares
                .iter()
                .filter(|sh| sh.logits)
                .all(|sh| plain_greedy(&self.running[sh.seq]))
        {
            Some(self.backend.argmax_rows(n_vocab)?)
        } else {
            None
        };
        for sh in &shares {
            if !sh.logits {
                picks.push(None);
                continue;
            }
            let seq = &mut self.running[sh.seq];
            let cfg = seq.sampler.config();
            let tok = if let Some(id) = greedy_ids.as_ref().and_then(|ids| ids.get(row)) {
                *id
            } else if !seq.sampler.penalizes() && cfg.is_greedy() && self.pool.is_none() {
                // One sequence: the backend's argmax (on the device for a GPU).
                self.backend.argmax()?
            } else {
                let logits = self.backend.logits()?;
                let at = if self.pool.is_some() { row } else { 0 };
                let last = logits.len() / n_vocab - 1;
                let logits = &logits[at.min(last) * n_vocab..(at.min(last) + 1) * n_vocab];
                if !seq.sampler.penalizes() && cfg.is_greedy() {
                    sampler::argmax(logits) as u32
                } else {
                    let history: Vec<u32> = seq
                        .req
                        .prompt
                        .iter()
                        .chain(&seq.generated)
                        .copied()
                        .collect();
                    seq.sampler.sample(logits, &history)
                }
            };
            row += 1;
            picks.push(Some(tok));
        }
        let now = Instant::now();
        let mut done = Vec::new();
        for (sh, pick) in shares.iter().zip(picks) {
            let seq = &mut self.running[sh.seq];
            seq.fed += sh.len;
            seq.next = None;
            let stop = match pick {
                Some(tok) => on_token(&model, self.opts.seq_ctx, seq, tok, now, &mut events),
                // A prompt fully evaluated with nothing to generate.
                None if seq.fed == seq.req.prompt.len() && seq.req.options.max_tokens == 0 => {
                    Some(StopReason::MaxTokens)
                }
                None => None,
            };
            if let Some(reason) = stop {
                done.push((sh.seq, reason));
            }
        }
        done.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in done {
            let seq = self.running.remove(i);
            events.push(self.finish(seq, reason));
        }
        events.sort_by_key(|e| matches!(e, Event::Finished { .. }));
        Ok(events)
    }

    /// Moves waiting requests into the running set, first come first served, while a slot and
    /// their pages are free.
    fn admit(&mut self) {
        while self.running.len() < self.opts.max_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let tokens = self.reserved_tokens(&seq.req);
            if let Some(pool) = &mut self.pool {
                let need = pool.pages_for(tokens);
                let seq = self.waiting.front_mut().expect("checked above");
                if !pool.alloc(need, &mut seq.pages) {
                    break;
                }
            }
            let mut seq = self.waiting.pop_front().expect("checked above");
            seq.admitted = Instant::now();
            self.running.push(seq);
        }
    }

    /// This step's shares: one token of every decoding sequence first, then prompt chunks in
    /// the order the sequences joined, while the token budget lasts.
    fn plan(&self) -> Vec<Share> {
        let mut budget = self.opts.step_tokens;
        let mut shares = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            if s.next.is_some() && budget > 0 {
                shares.push(Share {
                    seq: i,
                    start: s.fed,
                    len: 1,
                    logits: true,
                });
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = s.req.prompt.len() - s.fed.min(s.req.prompt.len());
            if s.next.is_some() || left == 0 || budget == 0 {
                continue;
            }
            let len = left.min(budget);
            budget -= len;
            shares.push(Share {
                seq: i,
                start: s.fed,
                len,
                logits: len == left && s.req.options.max_tokens > 0,
            });
        }
        // The backend lays sequences out in call order; keep the running order.
        shares.sort_by_key(|s| s.seq);
        shares
    }

    fn evaluate(&mut self, shares: &[Share]) -> Result<()> {
        let tokens = |sh: &Share| -> &[u32] {
            let s = &self.running[sh.seq];
            match &s.next {
                Some(t) => std::slice::from_ref(t),
                None => &s.req.prompt[sh.start..sh.start + sh.len],
            }
        };
        if self.pool.is_none() {
            let sh = &shares[0];
            let toks: Vec<u32> = tokens(sh).to_vec();
            return self.backend.forward(&toks, sh.start, false);
        }
        let batch: Vec<SeqBatch<'_>> = shares
            .iter()
            .map(|sh| SeqBatch {
                tokens: tokens(sh),
                pos: sh.start,
                pages: &self.running[sh.seq].pages,
                logits: sh.logits,
            })
            .collect();
        let backend = &mut self.backend;
        backend.forward_seqs(&batch)
    }

    /// Gives `seq`'s pages back and makes its final event.
    fn finish(&mut self, mut seq: Seq, reason: StopReason) -> Event {
        if let Some(pool) = &mut self.pool {
            pool.release(&mut seq.pages);
        }
        let mut stream = self
            .model
            .tokenizer
            .resume_stream(std::mem::take(&mut seq.pending));
        seq.text.push_str(&stream.finish());
        let mut timings = seq.timings;
        timings.decode_tokens = timings.inter_token_ms.len();
        timings.decode_ms = timings.inter_token_ms.iter().sum();
        Event::Finished {
            id: seq.id,
            generation: Generation {
                prompt_tokens: seq.req.prompt,
                generated_tokens: seq.generated,
                text: seq.text,
                stop_reason: reason,
                timings,
            },
        }
    }
}

/// Records `tok`, generated by `seq` at `now`; returns why the sequence stops, if it does.
fn on_token(
    model: &Model,
    seq_ctx: usize,
    seq: &mut Seq,
    tok: u32,
    now: Instant,
    events: &mut Vec<Event>,
) -> Option<StopReason> {
    let ms = |a: Instant| (now - a).as_secs_f64() * 1000.0;
    if seq.generated.is_empty() {
        seq.timings.ttft_ms = ms(seq.submitted);
        seq.timings.prefill_ms = ms(seq.admitted);
    } else {
        seq.timings.inter_token_ms.push(ms(seq.last_token));
    }
    seq.last_token = now;
    seq.generated.push(tok);
    let opts = &seq.req.options;
    if (opts.stop_at_eog && model.tokenizer.is_eog(tok)) || seq.req.stop_tokens.contains(&tok) {
        return Some(StopReason::EndOfGeneration);
    }
    let mut stream = model
        .tokenizer
        .resume_stream(std::mem::take(&mut seq.pending));
    let text = stream.push(tok);
    seq.pending = stream.into_pending();
    seq.text.push_str(&text);
    events.push(Event::Token {
        id: seq.id,
        token: tok,
        text,
    });
    if seq.generated.len() >= opts.max_tokens {
        return Some(StopReason::MaxTokens);
    }
    if seq.fed >= seq_ctx {
        return Some(StopReason::ContextFull);
    }
    seq.next = Some(tok);
    None
}

fn check_options(opts: &EngineOptions) -> Result<()> {
    if opts.max_seqs == 0 {
        return Err(limits::out_of_range("parallel", 0, "at least 1"));
    }
    if opts.seq_ctx == 0 {
        return Err(limits::out_of_range("ctx", 0, "at least 1"));
    }
    if opts.step_tokens == 0 {
        return Err(limits::out_of_range("step tokens", 0, "at least 1"));
    }
    Ok(())
}

fn pool_tokens(opts: &EngineOptions) -> Result<usize> {
    let tokens = match opts.pool_tokens {
        Some(t) => t,
        None => opts.max_seqs.checked_mul(opts.seq_ctx).ok_or_else(|| {
            limits::out_of_range(
                "parallel x ctx",
                format!("{} x {}", opts.max_seqs, opts.seq_ctx),
                "a KV pool that fits in memory",
            )
        })?,
    };
    // Whole pages of the CPU backend, the one that pages its cache.
    Ok(tokens.next_multiple_of(backend::cpu::PAGE_SIZE))
}
