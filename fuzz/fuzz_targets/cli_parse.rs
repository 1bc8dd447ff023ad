//! The CLI's flag parsing into settings, on arbitrary argument lists. Properties: no panic;
//! every accepted command line holds values inside their documented ranges; every refusal
//! is one line with exit code 2 (or 0 for help and version).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use rocforge_cli::Settings;
use rocforge_runtime::{MAX_BATCH, MAX_CTX};

/// Arguments are the input split at NUL bytes.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let lines: &[&[&str]] = &[
        &[
            "generate",
            "-m",
            "m.gguf",
            "-p",
            "hi",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--repeat-penalty",
            "1.1",
            "--seed",
            "7",
            "-n",
            "16",
        ],
        &[
            "generate",
            "--model",
            "m.gguf",
            "--prompt",
            "x",
            "--chat",
            "--system",
            "s",
            "--ctx",
            "64",
            "--batch",
            "8",
            "--json",
            "--ignore-eos",
            "--no-mmap",
        ],
        &[
            "generate",
            "-m",
            "m",
            "-p",
            "x",
            "--temperature",
            "nan",
            "--repeat-penalty",
            "0",
            "--max-tokens",
            "18446744073709551615",
        ],
        &[
            "perplexity",
            "-m",
            "m.gguf",
            "-f",
            "t.txt",
            "--ctx",
            "4",
            "--chunks",
            "3",
            "--backend",
            "cpu",
        ],
        &["inspect", "-m", "m.gguf", "--json"],
        // Found by this target: the newline was echoed into a two-line error.
        &["perplexity", "-m", "m.gg", "-f3", "--backend", "cp\ns"],
        &["--help"],
    ];
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("args-{i}"), l.join("\0").into_bytes()))
        .collect()
}

fuzz_target!(init: common::write_seeds(seeds()), |data: &[u8]| {
    let args = std::iter::once("rocforge".to_string())
        .chain(data.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()));
    match rocforge_cli::parse(args) {
        Ok(Settings::Generate(g)) => {
            g.options.sampler.validate().expect("accepted sampler settings are valid");
            check_run(&g.run);
        }
        Ok(Settings::Perplexity(p)) => {
            check_run(&p.run);
            assert!(p.ctx >= 4);
        }
        Ok(Settings::Inspect(_)) => {}
        Err(e) => {
            assert!(matches!(e.exit_code(), 0 | 2), "exit code {}", e.exit_code());
            if !e.is_help() {
                assert!(!e.to_string().contains('\n'), "not one line: {e}");
            }
        }
    }
});

fn check_run(run: &rocforge_cli::Run) {
    assert!(run.ctx.is_none_or(|c| (1..=MAX_CTX).contains(&c)));
    assert!((1..=MAX_BATCH).contains(&run.batch));
}
