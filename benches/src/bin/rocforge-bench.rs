//! `rocforge-bench`: ROCforge's end-to-end benchmark suite as one binary, so the same runs
//! work where no Rust toolchain is installed (copy it to the GPU machine). `cargo xtask bench`
//! builds and calls it.
//!
//! ```text
//! rocforge-bench [--model PATH] [--backend cpu,cuda] [--quick] [--scenario tg128@d2048]...
//! rocforge-bench --concurrency 1,8,32,64 [--sweep-scenario pp128+tg128] [--backend cpu]
//! rocforge-bench compare OLD.json NEW.json [--threshold 5]
//! rocforge-bench compare --llama-bench LLAMA.json [RESULTS.json]
//! rocforge-bench gen-model --shape llama3-8b --quant q4_k --out FILE
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rocforge_bench::compare::{self, Thresholds};
use rocforge_bench::config::{parse_backends, parse_concurrency, BenchConfig, Scenario};
use rocforge_bench::energy::EnergyMeter;
use rocforge_bench::host::{self, Host};
use rocforge_bench::model_info::{self, ModelOrigin};
use rocforge_bench::printers::{self, Format};
use rocforge_bench::record::{Report, Settings};
use rocforge_bench::{chart, llama_bench, runner, SCHEMA};
use rocforge_runtime::engine::{Engine, EngineOptions};
use rocforge_runtime::{BackendKind, BackendOptions, Model, Session};

#[derive(Parser)]
#[command(
    name = "rocforge-bench",
    about = "ROCforge's end-to-end benchmark suite",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the suite (the default).
    Run(RunArgs),
    /// Compare two results (exit 1 on a regression), or a llama-bench result with ours.
    Compare(CompareArgs),
    /// Write a synthetic GGUF model with deterministic random weights.
    GenModel(GenModelArgs),
}

#[derive(Args, Default)]
struct RunArgs {
    /// GGUF model (default: $ROCFORGE_TEST_MODEL, the cached SmolLM2, else a synthetic model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backends: auto, cpu, hip, cuda, wgpu (comma-separated or repeated).
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// A short run (a few minutes on a 2-core CPU).
    #[arg(long)]
    quick: bool,
    /// Scenarios instead of the defaults: chat, summarization, long-context, ppN, tgN, ppN+tgM, each optionally @dN.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long)]
    warmup: Option<usize>,
    /// Most prompt tokens per forward call.
    #[arg(long)]
    batch: Option<usize>,
    /// Concurrency sweep: levels of requests run together through the engine (`1,8,32,64`);
    /// replaces the default scenarios (give --scenario to run both).
    #[arg(long = "concurrency")]
    concurrency: Vec<String>,
    /// Each request of the sweep (ppN+tgM; default pp128+tg128, pp32+tg32 with --quick).
    #[arg(long)]
    sweep_scenario: Option<String>,
    /// Skip the per-op profile.
    #[arg(long)]
    no_profile: bool,
    /// Results go to DIR/<timestamp>/; DIR/LATEST names the newest.
    #[arg(long, default_value = "target/rocforge-bench")]
    out_dir: PathBuf,
    /// What to print: md, json or csv.
    #[arg(long, default_value = "md")]
    format: String,
}

#[derive(Args)]
struct CompareArgs {
    /// The baseline (OLD) and the new result; with --llama-bench, the ROCforge result (default: the latest run).
    files: Vec<PathBuf>,
    /// A llama-bench `-o json` result to show beside ROCforge's.
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Regression threshold on medians, in percent.
    #[arg(long, default_value_t = 5.0)]
    threshold: f64,
    /// Where runs are stored, for the latest result.
    #[arg(long, default_value = "target/rocforge-bench")]
    out_dir: PathBuf,
}

#[derive(Args)]
struct GenModelArgs {
    /// smollm2-135m, tinyllama-1.1b, llama2-7b, llama3-8b, gemma3-270m (or tiny, tiny-gemma3).
    #[arg(long)]
    shape: String,
    /// q4_0, q4_1, q8_0, q4_k, q6_k, f16.
    #[arg(long)]
    quant: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
}

fn main() {
    // One line per bug; a device-thread panic (an allocation failing after the memory check)
    // comes back from the backend as an error.
    std::panic::set_hook(rocforge_runtime::device_fault::hook("rocforge-bench: "));
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
        Some(Command::Compare(args)) => compare_cmd(args),
        Some(Command::GenModel(args)) => gen_model(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("rocforge-bench: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Settings from the flags, validated.
fn config(args: &RunArgs, model: PathBuf) -> Result<BenchConfig> {
    let backends = parse_backends(&args.backends)?;
    let mut cfg = if args.quick {
        BenchConfig::quick(model, backends)
    } else {
        BenchConfig::standard(model, backends)
    };
    cfg.concurrency = parse_concurrency(&args.concurrency)?;
    if let Some(sc) = &args.sweep_scenario {
        cfg.sweep = Scenario::parse(sc)?;
    }
    if !cfg.concurrency.is_empty() && args.scenarios.is_empty() {
        cfg.scenarios.clear();
    }
    if !args.scenarios.is_empty() {
        let items = args
            .scenarios
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.trim().is_empty());
        cfg.scenarios = items.map(Scenario::parse).collect::<Result<_, _>>()?;
    }
    cfg.iterations = args.iterations.unwrap_or(cfg.iterations);
    cfg.warmup = args.warmup.unwrap_or(cfg.warmup);
    cfg.batch = args.batch.unwrap_or(cfg.batch);
    cfg.profile = !args.no_profile;
    cfg.validate()?;
    Ok(cfg)
}

/// The concurrency sweep on `kind`: one engine sized for the largest level, then each level
/// in turn. A backend that runs one sequence at a time gets level 1 only (the others are
/// skipped with a note). Returns the backend actually used and its device.
fn sweep(
    cfg: &BenchConfig,
    model: &std::sync::Arc<Model>,
    kind: BackendKind,
    runs: &mut Vec<rocforge_bench::RunRecord>,
    batch_profiles: &mut Vec<rocforge_bench::record::BatchProfile>,
) -> Result<(BackendKind, String)> {
    let most = cfg.concurrency.iter().copied().max().unwrap_or(1);
    let opts = EngineOptions {
        max_seqs: most,
        seq_ctx: cfg.sweep.context_needed(),
        pool_tokens: None,
        step_tokens: cfg.batch.max(most),
    };
    let mut engine = Engine::new(model.clone(), kind, opts)
        .with_context(|| format!("creating the {kind} engine"))?;
    let actual = engine.backend_kind();
    let meter = EnergyMeter::for_backend(actual);
    eprintln!(
        "{actual}: {} (sweep of {}: up to {} requests at once; energy: {})",
        engine.device_name(),
        cfg.sweep.name,
        engine.parallel(),
        meter.source()
    );
    for &level in &cfg.concurrency {
        if level > engine.parallel() {
            eprintln!(
                "  concurrency {level} skipped: the {actual} backend evaluates one sequence at a time"
            );
            continue;
        }
        let total = cfg.warmup + cfg.iterations;
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template(
                "{prefix:>24} [{bar:30}] {pos}/{len} iterations {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let name = runner::sweep_run_name(&cfg.sweep, level);
        bar.set_prefix(format!("{actual} {name}"));
        let t = Instant::now();
        let record = runner::run_sweep_level(
            &mut engine,
            &cfg.sweep,
            level,
            cfg.iterations,
            cfg.warmup,
            &meter,
            |done| bar.set_position(done as u64),
        )
        .with_context(|| format!("{name} on {actual}"))?;
        bar.finish_and_clear();
        eprintln!(
            "  {:<16} done in {:.1} s: {:.1} generated tokens/s in all",
            name,
            t.elapsed().as_secs_f64(),
            record.aggregate_gen_tokens_per_s.unwrap_or(0.0)
        );
        runs.push(record);
    }
    let top = cfg
        .concurrency
        .iter()
        .copied()
        .filter(|&l| l <= engine.parallel())
        .max();
    if let (true, Some(level)) = (cfg.profile, top) {
        let p = runner::profile_sweep_step(&mut engine, &cfg.sweep, level)
            .with_context(|| format!("profiling a step of {level} sequences on {actual}"))?;
        batch_profiles.push(p);
    }
    Ok((actual, engine.device_name()))
}

fn run(args: RunArgs) -> Result<i32> {
    let format: Format = args.format.parse()?;
    parse_backends(&args.backends)?; // bad flags fail before a model is written
    parse_concurrency(&args.concurrency)?;
    let (model_path, origin) =
        model_info::resolve(args.model.as_deref(), &args.out_dir.join("models"))?;
    let cfg = config(&args, model_path)?;
    let (created, stamp) = host::utc_now();
    let model =
        Model::load(&cfg.model).with_context(|| format!("loading {}", cfg.model.display()))?;
    let model_info = model_info::describe(&model)?;
    if origin == ModelOrigin::Synthetic || model_info.synthetic {
        eprintln!(
            "note: {} has synthetic weights (speed is representative, text is not)",
            cfg.model.display()
        );
    }
    let ctx = cfg.ctx();
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut profiles = Vec::new();
    let mut batch_profiles = Vec::new();
    let mut gpu = None;
    let mut backend_names = Vec::new();
    for &kind in &cfg.backends {
        if !cfg.concurrency.is_empty() {
            let (actual, device) = sweep(&cfg, &model, kind, &mut runs, &mut batch_profiles)?;
            if actual != BackendKind::Cpu && gpu.is_none() {
                gpu = Some(device);
            }
            if !backend_names.contains(&actual.name().to_string()) {
                backend_names.push(actual.name().to_string());
            }
        }
        if cfg.scenarios.is_empty() {
            continue;
        }
        let opts = BackendOptions {
            ctx,
            max_batch: cfg.batch,
        };
        let mut session = Session::new(model.clone(), kind, opts)
            .with_context(|| format!("creating the {kind} backend"))?;
        let actual = session.backend_kind();
        if !backend_names.contains(&actual.name().to_string()) {
            backend_names.push(actual.name().to_string());
        }
        if actual != BackendKind::Cpu && gpu.is_none() {
            gpu = Some(session.device_name());
        }
        eprintln!(
            "{}: {} (ctx {ctx}, batch {})",
            actual,
            session.device_name(),
            cfg.batch
        );
        for sc in &cfg.scenarios {
            let total = cfg.warmup + cfg.iterations;
            let bar = ProgressBar::new(total as u64).with_style(
                ProgressStyle::with_template(
                    "{prefix:>24} [{bar:30}] {pos}/{len} iterations {elapsed}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{actual} {}", sc.name));
            let t = Instant::now();
            let record =
                runner::run_scenario(&mut session, sc, cfg.iterations, cfg.warmup, |done| {
                    bar.set_position(done as u64)
                })
                .with_context(|| format!("scenario {} on {actual}", sc.name))?;
            bar.finish_and_clear();
            eprintln!(
                "  {:<16} done in {:.1} s",
                sc.name,
                t.elapsed().as_secs_f64()
            );
            runs.push(record);
        }
        if cfg.profile {
            profiles.push(runner::profile(&mut session, cfg.profile_tokens())?);
        }
    }
    let report = Report {
        schema: SCHEMA.to_string(),
        created,
        git_commit: host::git_commit(),
        host: Host::detect(&backend_names.join(","), gpu),
        model: model_info,
        settings: Settings {
            iterations: cfg.iterations,
            warmup: cfg.warmup,
            batch: cfg.batch,
            ctx,
            quick: cfg.quick,
        },
        runs,
        profiles,
        batch_profiles,
    };
    let dir = args.out_dir.join(&stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    report.save(&dir.join("results.json"))?;
    let table = printers::render(&report, Format::Markdown);
    std::fs::write(dir.join("results.md"), &table)
        .with_context(|| format!("writing {}", dir.display()))?;
    chart::write_svg(&report, &dir.join("chart.svg"))?;
    if report
        .runs
        .iter()
        .any(|r| r.aggregate_gen_tokens_per_s.is_some())
    {
        chart::write_sweep_svg(&report, &dir.join("sweep.svg"))?;
    }
    std::fs::write(args.out_dir.join("LATEST"), format!("{}\n", dir.display()))?;
    print!("{}", printers::render(&report, format));
    eprintln!(
        "suite ran in {:.1} s; results in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(0)
}

/// The newest run under `out_dir` (its LATEST file).
fn latest_results(out_dir: &Path) -> Result<PathBuf> {
    let latest = out_dir.join("LATEST");
    let dir = std::fs::read_to_string(&latest).with_context(|| {
        format!(
            "no latest run ({} is missing; run the suite first)",
            latest.display()
        )
    })?;
    Ok(PathBuf::from(dir.trim()).join("results.json"))
}

fn compare_cmd(args: CompareArgs) -> Result<i32> {
    if let Some(lb) = &args.llama_bench {
        let ours = match args.files.as_slice() {
            [] => latest_results(&args.out_dir)?,
            [one] => one.clone(),
            _ => bail!("compare --llama-bench takes at most one ROCforge result"),
        };
        let records = llama_bench::load(lb)?;
        let report = Report::load(&ours)?;
        print!("{}", llama_bench::side_by_side(&records, &report));
        return Ok(0);
    }
    let [old, new] = args.files.as_slice() else {
        bail!("compare takes two results: OLD.json NEW.json (or --llama-bench FILE)");
    };
    if !(args.threshold > 0.0 && args.threshold < 100.0) {
        bail!(
            "--threshold {} must be a percentage between 0 and 100",
            args.threshold
        );
    }
    let (old_r, new_r) = (Report::load(old)?, Report::load(new)?);
    if old_r.model.sha256 != new_r.model.sha256 {
        eprintln!("warning: the two results are of different model files");
    }
    let th = Thresholds {
        regression: args.threshold / 100.0,
        ..Default::default()
    };
    let cmp = compare::compare(&old_r, &new_r, th);
    println!(
        "{} ({}) → {} ({})\n",
        old.display(),
        old_r.git_commit,
        new.display(),
        new_r.git_commit
    );
    print!("{}", cmp.markdown());
    Ok(if cmp.passed() { 0 } else { 1 })
}

fn gen_model(args: GenModelArgs) -> Result<i32> {
    let quant = model_info::parse_quant(&args.quant)?;
    let t = Instant::now();
    model_info::write_synthetic(&args.shape, quant, args.seed, &args.out)?;
    let size = std::fs::metadata(&args.out)?.len();
    eprintln!(
        "wrote {} ({}, synthetic weights) in {:.1} s",
        args.out.display(),
        printers::mib(size),
        t.elapsed().as_secs_f64()
    );
    println!("{}", args.out.display());
    Ok(0)
}
