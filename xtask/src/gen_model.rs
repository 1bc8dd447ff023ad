//! `cargo xtask gen-model --shape smollm2-135m|tinyllama-1.1b|llama2-7b|llama3-8b|gemma3-270m
//! --quant q4_0|q4_1|q8_0|q4_k|q6_k|f16 --out FILE [--seed N]`: a valid GGUF with
//! deterministic random quantized weights (the suite binary's `gen-model`).
use anyhow::Result;

pub fn run(args: &[String]) -> Result<()> {
    super::bench::delegate("gen-model", args)
}
