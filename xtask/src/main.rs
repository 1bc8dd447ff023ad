//! `cargo xtask <task>`: ROCforge's project tasks. One module per task.
use anyhow::{bail, Result};

mod fetch_model;

const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  fetch-model [smollm2]   download the real test model into the cache and print its path";

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
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}
