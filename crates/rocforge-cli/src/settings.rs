//! Raw flags as clap reads them, and the settings they become once checked. Every range check
//! happens here, with the flag's name in the message, or in the runtime's validators
//! ([`SamplerConfig::validate`], [`limits::check_sizes`]) whose field names map to flags.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use rocforge_runtime::{
    limits, BackendKind, BackendOptions, Error, GenerateOptions, LoadOptions, SamplerConfig,
};

/// The raw command line.
#[derive(Parser, Debug)]
#[command(
    name = "rocforge",
    version,
    about = "ROCforge: LLM inference on ROCm, CUDA, wgpu and the CPU"
)]
pub struct RawCli {
    #[command(subcommand)]
    command: RawCommand,
}

#[derive(Subcommand, Debug)]
enum RawCommand {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Perplexity of a text file (llama.cpp's method: non-overlapping chunks, second halves scored).
    Perplexity(PerplexityArgs),
    /// Show a GGUF file's architecture, hyperparameters, quant format and tensors.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Path of a GGUF model.
    #[arg(long, short)]
    model: PathBuf,
    /// auto, cpu, hip, cuda or wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// KV-cache size in tokens, 1 to 1048576 (default: the model's training context, at most 4096).
    #[arg(long, allow_negative_numbers = true)]
    ctx: Option<usize>,
    /// Most tokens per forward call during prefill, 1 to 65536.
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    batch: usize,
    /// Print one JSON object on stdout at the end instead of text (with --prompts, one per
    /// prompt: JSON Lines).
    #[arg(long)]
    json: bool,
    /// Read the model into memory instead of mapping it (a mapped file that is replaced or
    /// truncated while rocforge runs kills it with SIGBUS).
    #[arg(long)]
    no_mmap: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The prompt.
    #[arg(
        long,
        short,
        required_unless_present = "prompts",
        conflicts_with = "prompts"
    )]
    prompt: Option<String>,
    /// A file of prompts, one per line, run through the multi-sequence engine; the outputs
    /// come in input order (with --json, one object per line, each with its `index`).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// With --prompts: most prompts evaluated together, 1 to 4096.
    #[arg(long, allow_negative_numbers = true)]
    parallel: Option<usize>,
    /// Most tokens to generate (generation also stops when the context is full).
    #[arg(
        long,
        short = 'n',
        default_value_t = 128,
        allow_negative_numbers = true
    )]
    max_tokens: usize,
    /// Sampling temperature, finite and >= 0; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    top_k: usize,
    /// Nucleus sampling threshold, 0 to 1 (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    /// Repetition penalty over the last 64 tokens, finite and > 0 (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0x5eed, allow_negative_numbers = true)]
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

#[derive(Args, Debug)]
struct PerplexityArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Text file to score.
    #[arg(long, short)]
    file: PathBuf,
    /// Score at most this many chunks.
    #[arg(long, allow_negative_numbers = true)]
    chunks: Option<usize>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Path of a GGUF file.
    #[arg(long, short)]
    model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Most prompts `--parallel` runs together.
pub const MAX_PARALLEL: usize = 4096;

/// What to run, every value checked.
#[derive(Debug, Clone)]
pub enum Settings {
    Generate(Generate),
    Perplexity(Perplexity),
    Inspect(Inspect),
}

/// Settings shared by the commands that run a model.
#[derive(Debug, Clone)]
pub struct Run {
    pub model: PathBuf,
    pub backend: BackendKind,
    /// In 1..=MAX_CTX when given.
    pub ctx: Option<usize>,
    /// In 1..=MAX_BATCH.
    pub batch: usize,
    pub json: bool,
    pub load: LoadOptions,
}

impl Run {
    /// Backend options, with `default_ctx` when `--ctx` is absent.
    pub fn backend_options(&self, default_ctx: usize) -> BackendOptions {
        BackendOptions {
            ctx: self.ctx.unwrap_or(default_ctx),
            max_batch: self.batch,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generate {
    pub run: Run,
    /// The prompt; empty with `prompts`.
    pub prompt: String,
    /// `--prompts FILE`: one prompt per line.
    pub prompts: Option<PathBuf>,
    /// `--parallel`, in 1..=[`MAX_PARALLEL`] (1 without it).
    pub parallel: usize,
    /// Sampler settings already validated.
    pub options: GenerateOptions,
    pub chat: bool,
    pub system: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Perplexity {
    pub run: Run,
    pub file: PathBuf,
    /// Chunk size in tokens: `--ctx`, default 512, at least 4.
    pub ctx: usize,
    pub chunks: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Inspect {
    pub model: PathBuf,
    pub json: bool,
}

/// Why the command line was refused.
#[derive(Debug)]
pub enum ParseError {
    /// clap's own outcome: a syntax error, or `--help` / `--version` (not errors: exit 0).
    Clap(clap::Error),
    /// A value out of its range, naming the flag and what it allows.
    Usage(String),
}

impl ParseError {
    /// The process exit code: 0 for help and version, 2 for usage errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            ParseError::Clap(e) => e.exit_code(),
            ParseError::Usage(_) => 2,
        }
    }

    /// Whether this is help or version text for stdout rather than an error.
    pub fn is_help(&self) -> bool {
        matches!(self, ParseError::Clap(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion))
    }

    /// The full text clap would print (help, version), or the one-line error.
    pub fn render(&self) -> String {
        match self {
            ParseError::Clap(e) if self.is_help() => e.render().to_string(),
            _ => self.to_string(),
        }
    }
}

impl std::fmt::Display for ParseError {
    /// One line: clap's first line (`error: ...`) without its prefix, or the range message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Clap(e) => {
                let text = e.render().to_string();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments");
                f.write_str(first.strip_prefix("error: ").unwrap_or(first))
            }
            ParseError::Usage(m) => f.write_str(&one_line(m)),
        }
    }
}

impl std::error::Error for ParseError {}

/// `text` with control characters (a newline in a flag's value, echoed by its error) escaped,
/// so that an error stays one line.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The flag a runtime setting comes from.
fn flag_of(name: &str) -> String {
    match name {
        "top_p" => "--top-p".into(),
        "repeat_penalty" => "--repeat-penalty".into(),
        other => format!("--{other}"),
    }
}

/// Turns a runtime range error into a usage error naming the flag.
fn usage(e: Error) -> ParseError {
    match e {
        Error::OutOfRange {
            name,
            value,
            allowed,
        } => ParseError::Usage(format!(
            "{} {value} is out of range (allowed: {allowed})",
            flag_of(&name)
        )),
        other => ParseError::Usage(other.to_string()),
    }
}

fn run_settings(a: RunArgs, ctx_floor: usize) -> Result<Run, ParseError> {
    let backend: BackendKind = a
        .backend
        .parse()
        .map_err(|e: Error| ParseError::Usage(format!("--backend: {e}")))?;
    let check = BackendOptions {
        ctx: a.ctx.unwrap_or(limits::MAX_CTX),
        max_batch: a.batch,
    };
    limits::check_sizes(&check).map_err(usage)?;
    if let Some(ctx) = a.ctx.filter(|&c| c < ctx_floor) {
        return Err(ParseError::Usage(format!(
            "--ctx {ctx} is out of range (allowed: {ctx_floor} to {})",
            limits::MAX_CTX
        )));
    }
    Ok(Run {
        model: a.model,
        backend,
        ctx: a.ctx,
        batch: a.batch,
        json: a.json,
        load: LoadOptions { mmap: !a.no_mmap },
    })
}

/// Parses and validates a command line (`args[0]` is the program name).
pub fn parse<I, T>(args: I) -> Result<Settings, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let raw = RawCli::try_parse_from(args).map_err(ParseError::Clap)?;
    Ok(match raw.command {
        RawCommand::Generate(a) => {
            let sampler = SamplerConfig {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                repeat_penalty: a.repeat_penalty,
                repeat_last_n: 64,
                seed: a.seed,
            };
            sampler.validate().map_err(usage)?;
            if a.parallel.is_some() && a.prompts.is_none() {
                return Err(ParseError::Usage(
                    "--parallel runs the prompts of --prompts FILE; give --prompts".into(),
                ));
            }
            let parallel = a.parallel.unwrap_or(1);
            if !(1..=MAX_PARALLEL).contains(&parallel) {
                return Err(ParseError::Usage(format!(
                    "--parallel {parallel} is out of range (allowed: 1 to {MAX_PARALLEL})"
                )));
            }
            Settings::Generate(Generate {
                run: run_settings(a.run, 1)?,
                prompt: a.prompt.unwrap_or_default(),
                prompts: a.prompts,
                parallel,
                options: GenerateOptions {
                    max_tokens: a.max_tokens,
                    sampler,
                    stop_at_eog: !a.ignore_eos,
                },
                chat: a.chat,
                system: a.system,
            })
        }
        RawCommand::Perplexity(a) => {
            let run = run_settings(a.run, 4)?;
            Settings::Perplexity(Perplexity {
                ctx: run.ctx.unwrap_or(512),
                run,
                file: a.file,
                chunks: a.chunks,
            })
        }
        RawCommand::Inspect(a) => Settings::Inspect(Inspect {
            model: a.model,
            json: a.json,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(extra: &[&str]) -> Result<Settings, ParseError> {
        let mut args = vec!["rocforge", "generate", "-m", "m.gguf", "-p", "hi"];
        args.extend_from_slice(extra);
        parse(args)
    }

    #[track_caller]
    fn refused(extra: &[&str], flag: &str) {
        let e = gen(extra).expect_err("must be refused");
        assert_eq!(e.exit_code(), 2, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(flag) && !msg.contains('\n'),
            "{extra:?}: {msg}"
        );
    }

    #[test]
    fn out_of_range_values_name_their_flag() {
        refused(
            &["--temperature", "nan"],
            "--temperature NaN is out of range (allowed: a finite number >= 0",
        );
        refused(&["--temperature", "inf"], "--temperature");
        refused(&["--temperature", "-1"], "--temperature -1");
        refused(
            &["--top-p", "1.5"],
            "--top-p 1.5 is out of range (allowed: 0 to 1",
        );
        refused(&["--top-p", "-0.1"], "--top-p");
        refused(&["--top-p", "nan"], "--top-p");
        refused(
            &["--repeat-penalty", "0"],
            "--repeat-penalty 0 is out of range (allowed: a finite number > 0",
        );
        refused(&["--repeat-penalty", "-2"], "--repeat-penalty");
        refused(&["--repeat-penalty", "inf"], "--repeat-penalty");
        refused(
            &["--ctx", "0"],
            "--ctx 0 is out of range (allowed: 1 to 1048576)",
        );
        refused(&["--ctx", "8000000"], "--ctx 8000000");
        refused(
            &["--batch", "0"],
            "--batch 0 is out of range (allowed: 1 to 65536)",
        );
        refused(&["--batch", "65537"], "--batch 65537");
        refused(
            &["--backend", "tpu"],
            "--backend: invalid argument: unknown backend `tpu`",
        );
        // Found by the cli_parse fuzz target: the value's newline was echoed into the message.
        refused(
            &["--backend", "cp\ns"],
            "--backend: invalid argument: unknown backend `cp\\ns`",
        );
        refused(&["--max-tokens", "-1"], "--max-tokens");
        refused(&["--max-tokens", "18446744073709551616"], "--max-tokens");
        refused(&["--top-k", "x"], "--top-k");
        refused(&["--seed", "-1"], "--seed");
    }

    #[test]
    fn edge_values_are_accepted() {
        let Settings::Generate(g) = gen(&[
            "--temperature",
            "0",
            "--top-p",
            "0",
            "--top-k",
            "0",
            "--repeat-penalty",
            "1e-30",
            "-n",
            "18446744073709551615",
            "--ctx",
            "1048576",
            "--batch",
            "65536",
            "--seed",
            "18446744073709551615",
            "--no-mmap",
        ])
        .unwrap() else {
            panic!("not generate")
        };
        assert_eq!(g.options.max_tokens, usize::MAX);
        assert!(g.options.sampler.is_greedy());
        assert_eq!(g.run.backend_options(7).ctx, 1 << 20);
        assert!(!g.run.load.mmap);
    }

    #[test]
    fn perplexity_needs_a_context_of_4() {
        let p = |ctx: &str| {
            parse([
                "rocforge",
                "perplexity",
                "-m",
                "m",
                "-f",
                "t.txt",
                "--ctx",
                ctx,
            ])
        };
        assert!(p("3")
            .unwrap_err()
            .to_string()
            .contains("--ctx 3 is out of range (allowed: 4 to"));
        let Settings::Perplexity(s) = p("4").unwrap() else {
            panic!()
        };
        assert_eq!(s.ctx, 4);
    }

    #[test]
    fn prompts_and_parallel() {
        let p = |extra: &[&str]| {
            let mut args = vec!["rocforge", "generate", "-m", "m.gguf"];
            args.extend_from_slice(extra);
            parse(args)
        };
        let Settings::Generate(g) = p(&["--prompts", "f.txt", "--parallel", "8"]).unwrap() else {
            panic!("not generate")
        };
        assert_eq!(
            (g.prompts.as_deref(), g.parallel),
            (Some("f.txt".as_ref()), 8)
        );
        for (extra, flag) in [
            (
                &["--prompts", "f", "--parallel", "0"][..],
                "--parallel 0 is out of range",
            ),
            (
                &["--prompts", "f", "--parallel", "4097"][..],
                "--parallel 4097",
            ),
            (&["--prompts", "f", "--parallel", "-1"][..], "--parallel"),
            (&["-p", "hi", "--parallel", "2"][..], "--prompts"),
            (&["-p", "hi", "--prompts", "f"][..], "--prompts"),
            (&[][..], "required arguments"),
        ] {
            let e = p(extra).expect_err("must be refused");
            assert_eq!(e.exit_code(), 2, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(flag) && !msg.contains('\n'),
                "{extra:?}: {msg}"
            );
        }
    }

    #[test]
    fn help_is_not_an_error() {
        let e = parse(["rocforge", "--help"]).unwrap_err();
        assert!(e.is_help() && e.exit_code() == 0 && e.render().contains("Usage"));
    }
}
