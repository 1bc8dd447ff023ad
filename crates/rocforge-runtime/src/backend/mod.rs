//! Backends run the forward pass. The CPU reference backend is always present; GPU backends
//! (`CubeBackend<R>` over CubeCL runtimes) come with the `hip`, `cuda` and `wgpu` features.
//!
//! One enum ([`BackendKind`]) chooses at run time; below it everything is generic.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::Model;

pub mod cpu;
#[cfg(any(feature = "cuda", feature = "hip", feature = "wgpu"))]
pub mod cube;

pub use cpu::CpuBackend;

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The first GPU backend that is really present, else the CPU.
    Auto,
    Cpu,
    Hip,
    Cuda,
    Wgpu,
}

impl BackendKind {
    pub const ALL: [BackendKind; 5] = [Self::Auto, Self::Cpu, Self::Hip, Self::Cuda, Self::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Hip => "hip",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
        }
    }

    /// Whether this build includes the backend (cargo features).
    pub fn compiled(self) -> bool {
        match self {
            Self::Auto | Self::Cpu => true,
            Self::Hip => cfg!(feature = "hip"),
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Wgpu => cfg!(feature = "wgpu"),
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown backend `{s}` (choose auto, cpu, hip, cuda or wgpu)"
                ))
            })
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Memory a backend holds, as measured (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUsage {
    /// Weight bytes the backend reads (mapped file for the CPU, device buffers on a GPU).
    pub weights_bytes: u64,
    /// Bytes allocated for the KV cache.
    pub kv_cache_bytes: u64,
    /// Activations, logits and other scratch buffers.
    pub scratch_bytes: u64,
    /// Device memory in use, as the device allocator reports it (0 on the CPU).
    pub device_bytes_in_use: u64,
    /// Device memory reserved by the allocator (0 on the CPU).
    pub device_bytes_reserved: u64,
}

/// Options for creating a backend.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// KV-cache capacity in tokens.
    pub ctx: usize,
    /// Most tokens evaluated in one forward call (prefill chunk).
    pub max_batch: usize,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            ctx: 2048,
            max_batch: 512,
        }
    }
}

/// What every backend does: evaluate tokens into its KV cache and produce logits.
pub trait Backend: Send {
    /// Backend name (`cpu`, `cuda`, ...).
    fn kind(&self) -> BackendKind;
    /// The device, in words (CPU model or GPU name).
    fn device_name(&self) -> String;
    /// KV-cache capacity in tokens.
    fn capacity(&self) -> usize;
    /// Most tokens one [`Backend::forward`] call takes.
    fn max_batch(&self) -> usize;
    /// Evaluates `tokens` at positions `pos..pos + tokens.len()`, writing their keys and values
    /// into the cache, and computes the logits of the last token (or of every token when
    /// `all_logits`).
    fn forward(&mut self, tokens: &[u32], pos: usize, all_logits: bool) -> Result<()>;
    /// The logits of the last forward call: `n_vocab` values, or `tokens.len() * n_vocab`.
    fn logits(&mut self) -> Result<&[f32]>;
    /// Index of the largest logit of the last token. GPU backends compute it on the device so
    /// only one id crosses to the host.
    fn argmax(&mut self) -> Result<u32>;
    /// Index of the largest logit of every row of the last call's logits (rows of `n_vocab`;
    /// one per sequence of a [`Backend::forward_seqs`] that asked): the greedy tokens of a
    /// batch. GPU backends compute them on the device, so only the ids cross to the host.
    fn argmax_rows(&mut self, n_vocab: usize) -> Result<Vec<u32>> {
        Ok(self
            .logits()?
            .chunks_exact(n_vocab.max(1))
            .map(|row| crate::sampler::argmax(row) as u32)
            .collect())
    }
    /// Memory held, as measured.
    fn memory(&self) -> MemoryUsage;
    /// Kernel launches (or parallel regions, on the CPU) issued by the last forward call.
    fn launches_last_forward(&self) -> u64 {
        0
    }
    /// Allows or forbids graph replay of single-token steps (CUDA and HIP; on by default unless
    /// `ROCFORGE_GRAPH=0`). Other backends ignore it.
    fn set_replay(&mut self, _on: bool) {}
    /// Whether the last forward call ran as a graph replay.
    fn last_forward_replayed(&self) -> bool {
        false
    }
    /// Turns per-op timing on (and clears it) or off. Off by default: on a GPU it
    /// synchronizes after every op, which slows the forward pass.
    fn set_profiling(&mut self, _on: bool) {}
    /// Time per op family accumulated since profiling was turned on.
    fn op_profile(&self) -> Vec<OpTiming> {
        Vec::new()
    }
    /// Tokens per KV page when the backend evaluates several sequences in one call
    /// ([`Backend::forward_seqs`]); `None` when it holds one sequence at a time.
    /// Its [`Backend::capacity`] is then the page pool, in tokens.
    fn kv_page_size(&self) -> Option<usize> {
        None
    }
    /// Evaluates the new tokens of several sequences in one pass: each at its own positions,
    /// its keys and values stored in the pages its table names; the weights are read once for
    /// all of them. Afterwards [`Backend::logits`] holds one row per sequence whose `logits`
    /// is set, in order.
    fn forward_seqs(&mut self, _seqs: &[SeqBatch<'_>]) -> Result<()> {
        Err(Error::Backend {
            backend: self.kind().name().into(),
            problem: "this backend evaluates one sequence at a time".into(),
        })
    }
}

/// One sequence's share of a [`Backend::forward_seqs`] call.
#[derive(Debug, Clone, Copy)]
pub struct SeqBatch<'a> {
    /// The tokens to evaluate, at positions `pos..pos + tokens.len()`.
    pub tokens: &'a [u32],
    pub pos: usize,
    /// Page table: position `p` lives in slot `p % page_size` of page `pages[p / page_size]`.
    pub pages: &'a [u32],
    /// Whether to compute the logits of the last token.
    pub logits: bool,
}

/// Time spent in one op family (`matmul`, `attention`, `rms_norm`, ...).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTiming {
    pub op: String,
    /// Launches (GPU) or calls (CPU).
    pub calls: u64,
    pub total_ms: f64,
}

/// Attributes wall time to op families: `lap(op)` charges the time since the previous lap to
/// `op`. Costs one branch per lap when off.
#[derive(Debug, Default)]
pub struct Profiler {
    on: bool,
    last: Option<std::time::Instant>,
    ops: Vec<OpTiming>,
}

impl Profiler {
    pub fn set(&mut self, on: bool) {
        self.on = on;
        self.ops.clear();
        self.last = None;
    }
    pub fn enabled(&self) -> bool {
        self.on
    }
    /// Starts timing (call at the top of a forward pass).
    pub fn start(&mut self) {
        if self.on {
            self.last = Some(std::time::Instant::now());
        }
    }
    /// Charges the time since the last lap to `op`.
    pub fn lap(&mut self, op: &str) {
        if !self.on {
            return;
        }
        let now = std::time::Instant::now();
        let ms = self.last.map_or(0.0, |t| (now - t).as_secs_f64() * 1000.0);
        self.last = Some(now);
        match self.ops.iter_mut().find(|o| o.op == op) {
            Some(o) => {
                o.calls += 1;
                o.total_ms += ms;
            }
            None => self.ops.push(OpTiming {
                op: op.to_string(),
                calls: 1,
                total_ms: ms,
            }),
        }
    }
    pub fn report(&self) -> Vec<OpTiming> {
        self.ops.clone()
    }
}

/// Creates a backend of `kind` for `model`. `Auto` picks the first GPU backend whose device is
/// really present (HIP, CUDA, then wgpu on a real GPU adapter) and falls back to the CPU.
pub fn create(
    kind: BackendKind,
    model: Arc<Model>,
    opts: &BackendOptions,
) -> Result<Box<dyn Backend>> {
    if opts.ctx == 0 || opts.max_batch == 0 {
        return Err(Error::InvalidArgument(
            "context and batch sizes must be at least 1".into(),
        ));
    }
    match kind {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::new(model, opts)?)),
        BackendKind::Auto => {
            #[cfg(any(feature = "cuda", feature = "hip", feature = "wgpu"))]
            if let Some(b) = cube::create_auto(model.clone(), opts)? {
                return Ok(b);
            }
            Ok(Box::new(CpuBackend::new(model, opts)?))
        }
        #[cfg(any(feature = "cuda", feature = "hip", feature = "wgpu"))]
        k => cube::create(k, model, opts),
        #[cfg(not(any(feature = "cuda", feature = "hip", feature = "wgpu")))]
        k => Err(Error::Backend {
            backend: k.name().into(),
            problem: format!("this build has no `{k}` backend; rebuild with `--features {k}`"),
        }),
    }
}
