//! `cargo xtask <task>`: ROCforge's project tasks. One module per task.
use anyhow::{bail, Result};

mod bench;
mod compare;
mod fetch_model;
mod fuzz;
mod gen_model;
mod test;

const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  hip-check               compile every kernel to HIP C++ and through hipcc (gfx90a, gfx1030); HIPCC overrides the compiler
  test [--skip SUITE,..] [-- TEST ARGS]
                          the whole test suite, as CI runs it: installs missing system packages (as root), fetches
                          the models, builds once (profile ci, features wgpu,hip), runs every suite (listed by
                          `cargo xtask test --help`; a suite that cannot run fails) and prints a summary table
  fetch-model [smollm2|gemma3]
                          download a real test model into the cache and print its path
  bench [--quick] [--backend auto|cpu|hip|cuda|wgpu[,..]] [--model PATH] [--save-baseline NAME] [--baseline NAME]
                          run the benchmark suite; results under target/rocforge-bench/<timestamp>/
  compare OLD.json NEW.json [--threshold PCT] | --llama-bench FILE.json [RESULTS.json]
                          change per metric; exits 1 on a regression
  fuzz [--seconds N] [--runs N] [--jobs J] [--target T]
                          run each cargo-fuzz target of fuzz/ (nightly) for N seconds (default 60) or N executions, in J processes
  gen-model --shape smollm2-135m|tinyllama-1.1b|llama2-7b|llama3-8b|gemma3-270m --quant q4_0|q4_1|q8_0|q4_k|q6_k|f16 --out FILE
                          write a GGUF with deterministic random (synthetic) weights";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some(task) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match task.as_str() {
        "fetch-model" => fetch_model::run(rest),
        "test" => test::run(rest),
        "hip-check" => test::hip_check(),
        "bench" => bench::run(rest),
        "compare" => compare::run(rest),
        "gen-model" => gen_model::run(rest),
        "fuzz" => fuzz::run(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}
