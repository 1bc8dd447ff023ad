//! `rocforge`: generate text, measure perplexity, inspect GGUF files.
//!
//! A thin layer over `rocforge-runtime`: flags are parsed once into typed settings, every
//! error is one line on stderr and a non-zero exit (1 for failures, 2 for bad usage).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use rocforge_runtime::gguf::GgufFile;
use rocforge_runtime::tokenizer::ChatMessage;
use rocforge_runtime::{
    info, BackendKind, BackendOptions, GenerateOptions, Model, SamplerConfig, Session,
};

#[derive(Parser)]
#[command(
    name = "rocforge",
    version,
    about = "ROCforge: LLM inference on ROCm, CUDA, wgpu and the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Perplexity of a text file (llama.cpp's method: non-overlapping chunks, second halves scored).
    Perplexity(PerplexityArgs),
    /// Show a GGUF file's architecture, hyperparameters, quant format and tensors.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Path of a GGUF model.
    #[arg(long, short)]
    model: PathBuf,
    /// auto, cpu, hip, cuda or wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// KV-cache size in tokens (default: the model's training context, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// Most tokens per forward call during prefill.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Print one JSON object on stdout at the end instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The prompt.
    #[arg(long, short)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty over the last 64 tokens (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Text file to score.
    #[arg(long, short)]
    file: PathBuf,
    /// Score at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
}

#[derive(Args)]
struct InspectArgs {
    /// Path of a GGUF file.
    #[arg(long, short)]
    model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("rocforge: internal error: {info}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Inspect(a) => inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `rocforge inspect ... | head` closes the pipe early: not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rocforge: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn open_session(run: &RunArgs, model: std::sync::Arc<Model>) -> Result<Session> {
    let kind: BackendKind = run.backend.parse()?;
    let ctx = run.ctx.unwrap_or(model.config.n_ctx_train.min(4096));
    let opts = BackendOptions {
        ctx,
        max_batch: run.batch,
    };
    Ok(Session::new(model, kind, opts)?)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let model = Model::load(&a.run.model)?;
    let tok = &model.tokenizer;
    let text = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        tok.apply_chat_template(&messages, true)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, true, true)?;
    let mut session = open_session(&a.run, model.clone())?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repeat_penalty: a.repeat_penalty,
            repeat_last_n: 64,
            seed: a.seed,
        },
        stop_at_eog: !a.ignore_eos,
    };
    let json = a.run.json;
    let mut stdout = std::io::stdout().lock();
    let out = session.generate(&prompt, &opts, |piece| {
        if !json {
            // A closed pipe (`| head`) ends generation quietly.
            return stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .is_ok();
        }
        true
    })?;
    let t = &out.timings;
    if json {
        let v = serde_json::json!({
            "model": a.run.model,
            "backend": session.backend_kind().name(),
            "device": session.device_name(),
            "prompt_tokens": out.prompt_tokens,
            "generated_tokens": out.generated_tokens,
            "text": out.text,
            "stop_reason": out.stop_reason,
            "prefill_ms": t.prefill_ms,
            "prefill_tokens_per_s": t.prefill_tokens_per_s(),
            "ttft_ms": t.ttft_ms,
            "decode_tokens": t.decode_tokens,
            "decode_ms": t.decode_ms,
            "decode_tokens_per_s": t.decode_tokens_per_s(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} on {}] prompt {} tokens in {:.1} ms ({:.1} t/s), generated {} tokens, decode {:.1} t/s, stop: {:?}",
            session.backend_kind(),
            session.device_name(),
            t.prompt_tokens,
            t.prefill_ms,
            t.prefill_tokens_per_s(),
            out.generated_tokens.len(),
            t.decode_tokens_per_s(),
            out.stop_reason
        );
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("{}: cannot read", a.file.display()))?;
    let model = Model::load(&a.run.model)?;
    let ctx = a.run.ctx.unwrap_or(512);
    let mut tokens = model.tokenizer.encode(&text, true, false)?;
    if let Some(n) = a.chunks {
        tokens.truncate(n.saturating_mul(ctx));
    }
    let run = RunArgs {
        ctx: Some(ctx),
        backend: a.run.backend.clone(),
        model: a.run.model.clone(),
        batch: a.run.batch,
        json: a.run.json,
    };
    let mut session = open_session(&run, model)?;
    let start = Instant::now();
    let json = a.run.json;
    let p = rocforge_runtime::perplexity(&mut session, &tokens, ctx, |i, ppl| {
        if !json {
            eprint!("[{}]{ppl:.4} ", i + 1);
        }
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "ppl": p.ppl, "chunks": p.chunks, "ctx": p.ctx, "scored_tokens": p.scored })
        );
    } else {
        eprintln!();
        println!(
            "perplexity: {:.4} ({} chunks of {} tokens, {} scored, {:.1} s)",
            p.ppl,
            p.chunks,
            p.ctx,
            p.scored,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&a.model)?;
    let quant = info::quant_summary(&file);
    let tensors = info::tensor_table(&file);
    let metadata: Vec<(String, String)> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.summary()))
        .collect();
    let arch = file
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string();
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    let bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    // The model view adds validated hyperparameters when the architecture is supported.
    let config = Model::from_gguf(GgufFile::open(&a.model)?).map(|m| m.config.clone());
    if a.json {
        let v = serde_json::json!({
            "path": a.model,
            "gguf_version": file.version(),
            "architecture": arch,
            "parameters": n_params,
            "tensor_bytes": bytes,
            "config": config.as_ref().ok(),
            "config_error": config.as_ref().err().map(|e| e.to_string()),
            "quant": quant,
            "metadata": metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return not_runnable(config);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "file:          {}", a.model.display())?;
    writeln!(out, "GGUF version:  {}", file.version())?;
    writeln!(out, "architecture:  {arch}")?;
    writeln!(
        out,
        "parameters:    {n_params} ({:.1} M)",
        n_params as f64 / 1e6
    )?;
    writeln!(
        out,
        "tensor bytes:  {bytes} ({:.1} MiB)",
        bytes as f64 / (1u64 << 20) as f64
    )?;
    writeln!(
        out,
        "quant format:  {} (from {})",
        quant.format, quant.source
    )?;
    let hist: Vec<String> = quant
        .tensor_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    writeln!(out, "tensor types:  {}", hist.join(", "))?;
    match &config {
        Ok(c) => {
            writeln!(out, "hyperparameters:")?;
            writeln!(
                out,
                "  layers {}, embedding {}, heads {} (KV {}), head dim {}, FFN {}",
                c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff
            )?;
            writeln!(
                out,
                "  vocab {}, context {}, RoPE base {} over {} dims, RMS eps {:e}",
                c.n_vocab, c.n_ctx_train, c.rope_base, c.rope_dim, c.rms_eps
            )?;
        }
        Err(e) => writeln!(out, "hyperparameters: not runnable: {e}")?,
    }
    writeln!(out, "metadata ({}):", metadata.len())?;
    for (k, v) in &metadata {
        writeln!(out, "  {k} = {v}")?;
    }
    writeln!(out, "tensors ({}):", tensors.len())?;
    writeln!(
        out,
        "  {:<32} {:<6} {:<20} {:>12}",
        "name", "type", "shape", "bytes"
    )?;
    for t in &tensors {
        writeln!(
            out,
            "  {:<32} {:<6} {:<20} {:>12}",
            t.name,
            t.ty,
            format!("{:?}", t.shape),
            t.bytes
        )?;
    }
    not_runnable(config)
}

/// `inspect` shows any readable GGUF file, then fails (exit 1) if ROCforge cannot run it.
fn not_runnable(config: rocforge_runtime::Result<rocforge_runtime::ModelConfig>) -> Result<()> {
    config
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("not runnable: {e}"))
}
