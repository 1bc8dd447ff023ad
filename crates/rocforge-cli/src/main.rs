//! `rocforge`: generate text, measure perplexity, inspect GGUF files.
//!
//! A thin layer over `rocforge-runtime`: flags are parsed once into typed settings, every
//! error is one line on stderr and a non-zero exit (1 for failures, 2 for bad usage).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use rocforge_cli::{Generate, Inspect, Perplexity, Run, Settings};
use rocforge_runtime::engine::{Engine, EngineOptions, Event, Request};
use rocforge_runtime::gguf::GgufFile;
use rocforge_runtime::tokenizer::{ChatMessage, TemplateAllocator};
use rocforge_runtime::{info, Generation, Model, Session};

/// Bounds the memory a model's chat template may take while rendering (minijinja has no
/// limit on value sizes): past the budget, one line on stderr and exit status 1.
#[global_allocator]
static ALLOC: TemplateAllocator = TemplateAllocator::exit_on_overrun("rocforge: ");

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    // A panic on CubeCL's device thread (an allocation failing after the memory check) is
    // reported by the backend as an error instead.
    std::panic::set_hook(rocforge_runtime::device_fault::hook("rocforge: "));
    let settings = match rocforge_cli::parse(std::env::args_os()) {
        Ok(s) => s,
        Err(e) if e.is_help() => {
            print!("{}", e.render());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rocforge: error: {e}");
            return ExitCode::from(e.exit_code().clamp(1, 255) as u8);
        }
    };
    let result = match settings {
        Settings::Generate(a) => generate(a),
        Settings::Perplexity(a) => perplexity(a),
        Settings::Inspect(a) => inspect(a),
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
            // A path or value with a newline in it must not split the line.
            eprintln!(
                "rocforge: error: {}",
                rocforge_cli::one_line(&format!("{e:#}"))
            );
            ExitCode::from(1)
        }
    }
}

/// Loads the model and prints the tokenizer's warnings (metadata llama.cpp also only warns about).
fn load(run: &Run) -> Result<std::sync::Arc<Model>> {
    let model = Model::load_with(&run.model, &run.load)?;
    for w in model.tokenizer.warnings() {
        eprintln!("rocforge: warning: {}: {w}", run.model.display());
    }
    Ok(model)
}

fn open_session(run: &Run, model: std::sync::Arc<Model>, default_ctx: usize) -> Result<Session> {
    let opts = run.backend_options(default_ctx);
    Ok(Session::new(model, run.backend, opts)?)
}

/// The chat prompt: the model's template, or ChatML with a warning when it fails (a template
/// that errors, runs out of fuel or writes too much), or ChatML when the model has none.
fn chat_prompt(model: &Model, a: &Generate, prompt: &str) -> String {
    let tok = &model.tokenizer;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    messages.push(ChatMessage::new("user", prompt.to_string()));
    match tok.render_chat_template(&messages, true) {
        Some(Ok(text)) => text,
        Some(Err(e)) => {
            let e = e.to_string().replace('\n', " ");
            eprintln!(
                "rocforge: warning: {}: the chat template failed ({e}); using ChatML",
                a.run.model.display()
            );
            tok.chatml(&messages, true)
        }
        None => tok.chatml(&messages, true),
    }
}

fn generate(a: Generate) -> Result<()> {
    if let Some(file) = &a.prompts {
        return generate_many(&a, file);
    }
    let model = load(&a.run)?;
    let text = if a.chat {
        chat_prompt(&model, &a, &a.prompt)
    } else {
        a.prompt.clone()
    };
    let prompt = model.tokenizer.encode(&text, true, true)?;
    let default_ctx = model.config.n_ctx_train.min(4096);
    let mut session = open_session(&a.run, model.clone(), default_ctx)?;
    let opts = a.options.clone();
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
        let v = generation_json(&a, session.backend_kind(), &session.device_name(), &out);
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

/// The `--json` object of one generation.
fn generation_json(
    a: &Generate,
    backend: rocforge_runtime::BackendKind,
    device: &str,
    out: &Generation,
) -> serde_json::Value {
    let t = &out.timings;
    serde_json::json!({
        "model": a.run.model,
        "backend": backend.name(),
        "device": device,
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
    })
}

/// The prompts of `--prompts FILE`, one per line (a final newline and `\r\n` endings are
/// fine); an empty file or an empty line is an error naming the line.
fn read_prompts(file: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("--prompts {}", file.display()))?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        anyhow::bail!("--prompts {}: the file has no prompts", file.display());
    }
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        anyhow::bail!(
            "--prompts {}: line {} is empty (one prompt per line)",
            file.display(),
            i + 1
        );
    }
    Ok(lines)
}

/// `--prompts FILE --parallel N`: every prompt through the engine, up to N at a time; the
/// outputs in input order, each printed once it and every earlier one are done.
fn generate_many(a: &Generate, file: &std::path::Path) -> Result<()> {
    let texts = read_prompts(file)?;
    let model = load(&a.run)?;
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let text = if a.chat {
            chat_prompt(&model, a, t)
        } else {
            t.clone()
        };
        let ids = model
            .tokenizer
            .encode(&text, true, true)
            .with_context(|| format!("--prompts {} line {}", file.display(), i + 1))?;
        prompts.push(ids);
    }
    // Without --ctx, each sequence gets what the longest prompt and --max-tokens can fill
    // (within the usual default), so the pool of --parallel sequences stays small.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let seq_ctx = a.run.ctx.unwrap_or_else(|| {
        model
            .config
            .n_ctx_train
            .min(4096)
            .min(longest.saturating_add(a.options.max_tokens))
            .max(longest)
    });
    let opts = EngineOptions {
        max_seqs: a.parallel,
        seq_ctx,
        pool_tokens: None,
        step_tokens: a.run.batch.max(a.parallel),
    };
    let mut engine = Engine::new(model.clone(), a.run.backend, opts).with_context(|| {
        format!(
            "a KV pool of --parallel {} x {seq_ctx} positions per prompt",
            a.parallel
        )
    })?;
    if engine.parallel() < a.parallel {
        eprintln!(
            "rocforge: warning: the {} backend evaluates one sequence at a time; the prompts run one after another",
            engine.backend_kind()
        );
    }
    let mut index_of = std::collections::HashMap::new();
    for (i, (ids, text)) in prompts.into_iter().zip(&texts).enumerate() {
        let id = engine
            .add(Request::new(ids, a.options.clone()))
            .with_context(|| format!("prompt {} ({:?})", i + 1, one_line_prefix(text)))?;
        index_of.insert(id, i);
    }
    let (backend, device) = (engine.backend_kind(), engine.device_name());
    let mut done: Vec<Option<Generation>> = vec![None; texts.len()];
    let mut next = 0;
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let mut generated = 0usize;
    while !engine.is_idle() {
        for e in engine.step()? {
            if let Event::Finished { id, generation } = e {
                generated += generation.generated_tokens.len();
                done[index_of[&id]] = Some(generation);
            }
        }
        while let Some(Some(g)) = done.get_mut(next).map(Option::take) {
            if a.run.json {
                let mut v = generation_json(a, backend, &device, &g);
                v["index"] = next.into();
                writeln!(stdout, "{v}")?;
            } else {
                writeln!(stdout, "[{next}] {}", g.text)?;
            }
            stdout.flush()?;
            next += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if !a.run.json {
        eprintln!(
            "[{backend} on {device}] {} prompts, {} at a time: {generated} tokens generated in {secs:.2} s ({:.1} t/s in all)",
            texts.len(),
            engine.parallel(),
            generated as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// The start of a prompt, for error messages.
fn one_line_prefix(text: &str) -> String {
    text.chars().take(40).collect()
}

fn perplexity(a: Perplexity) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("{}: cannot read", a.file.display()))?;
    let model = load(&a.run)?;
    let ctx = a.ctx;
    let mut tokens = model.tokenizer.encode(&text, true, false)?;
    if let Some(n) = a.chunks {
        tokens.truncate(n.saturating_mul(ctx));
    }
    let mut session = open_session(&a.run, model, ctx)?;
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

fn inspect(a: Inspect) -> Result<()> {
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
            for line in info::hyperparameter_lines(c) {
                writeln!(out, "  {line}")?;
            }
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
