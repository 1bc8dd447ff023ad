//! Prints where a forward pass spends its time, per op family, for one prefill and for decode.
//!
//! `cargo run --release -p rocforge-runtime --example op_profile -- MODEL.gguf [cpu|wgpu|cuda|hip] [PROMPT_TOKENS] [DECODE_TOKENS]`
use rocforge_runtime::{BackendKind, BackendOptions, Model, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: op_profile MODEL.gguf [backend] [prompt tokens] [decode tokens]")?;
    let kind: BackendKind = args.get(2).map(String::as_str).unwrap_or("cpu").parse()?;
    let n_prompt: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let n_decode: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let model = Model::load(path)?;
    let mut s = Session::new(
        model.clone(),
        kind,
        BackendOptions {
            ctx: n_prompt + n_decode + 1,
            max_batch: 512,
        },
    )?;
    let prompt: Vec<u32> = (0..n_prompt as u32).map(|i| 100 + i % 1000).collect();
    for (name, profile) in [("prefill", true), ("decode", true)] {
        s.backend().set_profiling(profile);
        let t = std::time::Instant::now();
        let n = if name == "prefill" {
            s.reset();
            s.prefill(&prompt)?;
            n_prompt
        } else {
            for i in 0..n_decode {
                s.decode(200 + i as u32)?;
            }
            n_decode
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{name}: {n} tokens in {ms:.1} ms = {:.1} tokens/s on {}",
            n as f64 * 1000.0 / ms,
            s.device_name()
        );
        let ops = s.backend().op_profile();
        let total: f64 = ops.iter().map(|o| o.total_ms).sum();
        for o in ops {
            println!(
                "  {:<14} {:>6} calls {:>9.2} ms {:>5.1} %",
                o.op,
                o.calls,
                o.total_ms,
                100.0 * o.total_ms / total.max(1e-9)
            );
        }
        println!(
            "  launches (or parallel regions) in the last forward: {}",
            s.backend().launches_last_forward()
        );
    }
    Ok(())
}
