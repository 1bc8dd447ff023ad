//! `cargo xtask compare OLD.json NEW.json [--threshold PCT]`: the change per metric, exit 1 on
//! a regression past the threshold (default 5 % on medians, with a noise check).
//! `cargo xtask compare --llama-bench FILE.json [RESULTS.json]`: a llama-bench result beside
//! ROCforge's (default: the latest run). Both run the suite binary's `compare`.
use anyhow::Result;

pub fn run(args: &[String]) -> Result<()> {
    let mut args = args.to_vec();
    args.push("--out-dir".into());
    args.push(super::bench::out_dir().display().to_string());
    super::bench::delegate("compare", &args)
}
