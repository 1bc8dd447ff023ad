//! ROCforge runtime: load a GGUF model, tokenize, run its forward pass (one model definition per architecture, [`arch`]) on a backend
//! (the CPU reference, or CubeCL on ROCm, CUDA and wgpu), and generate.
//!
//! ```no_run
//! use rocforge_runtime::{BackendKind, GenerateOptions, Model, Session};
//!
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let mut session = Session::new(model.clone(), BackendKind::Auto, Default::default())?;
//! let prompt = model.tokenizer.encode("The capital of France is", true, true)?;
//! let out = session.generate(&prompt, &GenerateOptions::default(), |piece| { print!("{piece}"); true })?;
//! assert_eq!(out.prompt_tokens, prompt);
//! # Ok::<(), rocforge_runtime::Error>(())
//! ```
pub mod arch;
pub mod backend;
pub mod device_fault;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod info;
pub mod kv_pages;
pub mod limits;
pub mod model;
pub mod sampler;
pub mod session;
pub mod synthetic;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;

pub use backend::{Backend, BackendKind, BackendOptions, MemoryUsage, OpTiming, SeqBatch};
pub use engine::{Engine, EngineOptions, Event, Request, RequestId};
pub use error::{Error, Result};
pub use limits::{MAX_BATCH, MAX_CTX};
pub use model::{LoadOptions, Model, ModelConfig};
pub use sampler::{Sampler, SamplerConfig};
pub use session::{
    perplexity, GenerateOptions, Generation, Perplexity, Session, StopReason, Timings,
};
pub use tokenizer::Tokenizer;
