//! Throughput of the fast CPU matvec/matmul on SmolLM2-135M's shapes (synthetic weights).
//! Ignored by default; run in release:
//!
//! ```text
//! cargo test --release -p rocforge-kernels --test quant_bench -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use rocforge_kernels::quant::{matmul, matvec, quantize_row, PreparedActs};
use rocforge_kernels::GgmlType;

/// Random weights of `rows x cols` quantized to `ty` (xorshift normals through the quantizer).
fn weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut x = vec![0f32; cols];
    let row_bytes = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut out = vec![0u8; rows * row_bytes];
    for row in out.chunks_exact_mut(row_bytes) {
        for v in x.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        }
        quantize_row(ty, &x, row).unwrap();
    }
    out
}

fn acts(ty: GgmlType, cols: usize, seed: usize) -> PreparedActs {
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 31 + seed * 17) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let mut a = PreparedActs::new();
    a.prepare(ty, &x).unwrap();
    a
}

/// Median time of `f` over enough repetitions to fill ~0.3 s.
fn time(mut f: impl FnMut()) -> Duration {
    f();
    let t0 = Instant::now();
    f();
    let one = t0.elapsed().max(Duration::from_micros(1));
    let reps = (0.3 / one.as_secs_f64()).clamp(5.0, 2000.0) as usize;
    let mut samples: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples[reps / 2]
}

#[test]
#[ignore = "benchmark; run with --ignored --nocapture in release"]
fn matvec_throughput() {
    println!("rayon threads: {}", rayon::current_num_threads());
    for (ty, rows, cols, what) in [
        (GgmlType::Q4_1, 1536, 576, "ffn_gate/up"),
        (GgmlType::Q4_1, 576, 1536, "ffn_down"),
        (GgmlType::Q4_1, 576, 576, "attn_q/o"),
        (GgmlType::Q8_0, 49152, 576, "output (token_embd)"),
    ] {
        let w = weights(ty, rows, cols, 7);
        let a = acts(ty, cols, 1);
        let mut out = vec![0f32; rows];
        let t = time(|| matvec(ty, &w, rows, cols, &a, &mut out).unwrap());
        println!(
            "matvec {ty} {rows}x{cols} ({what}): {:8.1} us  {:6.2} GB/s",
            t.as_secs_f64() * 1e6,
            w.len() as f64 / t.as_secs_f64() / 1e9
        );
    }
}

/// Every matrix product of one SmolLM2-135M token (30 layers + output), weights larger than
/// cache as in a real decode: an upper bound on CPU decode speed from matvec alone.
#[test]
#[ignore = "benchmark; run with --ignored --nocapture in release"]
fn smollm2_decode_and_prefill_estimate() {
    let (d, kv, ffn, vocab, layers) = (576, 192, 1536, 49152, 30);
    let shapes = [
        (d, d),
        (kv, d),
        (kv, d),
        (d, d),
        (ffn, d),
        (ffn, d),
        (d, ffn),
    ];
    let layer_w: Vec<Vec<Vec<u8>>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| weights(GgmlType::Q4_1, r, c, (l * 8 + i) as u64))
                .collect()
        })
        .collect();
    let output = weights(GgmlType::Q8_0, vocab, d, 99);
    let (a_d, a_f) = (acts(GgmlType::Q4_1, d, 1), acts(GgmlType::Q4_1, ffn, 2));
    let a_o = acts(GgmlType::Q8_0, d, 3);
    let mut out = vec![0f32; vocab];
    let bytes: usize = layer_w.iter().flatten().map(Vec::len).sum::<usize>() + output.len();
    let t = time(|| {
        for lw in &layer_w {
            for (w, &(r, c)) in lw.iter().zip(&shapes) {
                let a = if c == d { &a_d } else { &a_f };
                matvec(GgmlType::Q4_1, w, r, c, a, &mut out[..r]).unwrap();
            }
        }
        matvec(GgmlType::Q8_0, &output, vocab, d, &a_o, &mut out).unwrap();
    });
    println!(
        "decode, matvecs only: {:.2} ms/token = {:.0} tokens/s, {:.2} GB/s over {:.1} MB (llama.cpp tg: 86 t/s)",
        t.as_secs_f64() * 1e3,
        1.0 / t.as_secs_f64(),
        bytes as f64 / t.as_secs_f64() / 1e9,
        bytes as f64 / 1e6
    );
    // The same products issued from a pool thread: each parallel region is then a local fork
    // that a spinning worker steals, not a job injected from outside that wakes the pool and
    // blocks the caller on a latch.
    let t_in = time(|| {
        rayon::scope(|_| {
            for lw in &layer_w {
                for (w, &(r, c)) in lw.iter().zip(&shapes) {
                    let a = if c == d { &a_d } else { &a_f };
                    matvec(GgmlType::Q4_1, w, r, c, a, &mut out[..r]).unwrap();
                }
            }
            matvec(GgmlType::Q8_0, &output, vocab, d, &a_o, &mut out).unwrap();
        })
    });
    println!(
        "decode, matvecs only, from inside the pool: {:.2} ms/token = {:.0} tokens/s",
        t_in.as_secs_f64() * 1e3,
        1.0 / t_in.as_secs_f64()
    );

    // Prefill: the layer products for a batch of tokens (logits for the last token only).
    let n = 128;
    let acts_d: Vec<PreparedActs> = (0..n).map(|t| acts(GgmlType::Q4_1, d, t)).collect();
    let acts_f: Vec<PreparedActs> = (0..n).map(|t| acts(GgmlType::Q4_1, ffn, t)).collect();
    let mut out = vec![0f32; n * ffn];
    let t = time(|| {
        for lw in &layer_w {
            for (w, &(r, c)) in lw.iter().zip(&shapes) {
                let a = if c == d { &acts_d } else { &acts_f };
                matmul(GgmlType::Q4_1, w, r, c, a, &mut out[..n * r]).unwrap();
            }
        }
    });
    let macs = layers as f64 * shapes.iter().map(|&(r, c)| (r * c) as f64).sum::<f64>() * n as f64;
    println!(
        "prefill {n} tokens, matmuls only: {:.1} ms = {:.0} tokens/s, {:.1} GMAC/s (llama.cpp pp512: 248 t/s)",
        t.as_secs_f64() * 1e3,
        n as f64 / t.as_secs_f64(),
        macs / t.as_secs_f64() / 1e9
    );
}

/// A `rows x cols` matrix of `ty` made of the golden fixtures' real blocks (the quantizers do
/// not write k-quants), repeated.
fn fixture_weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let name = format!("dequant_{}.bin", ty.name().to_lowercase());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let bin = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bsize = ty.type_size();
    let n = rows * cols / ty.block_size();
    let blocks = bin.len() / bsize;
    (0..n)
        .flat_map(|i| {
            let b = (i * 7 + 3) % blocks;
            bin[b * bsize..(b + 1) * bsize].iter().copied()
        })
        .collect()
}

/// Per-format kernel throughput of each instruction set on one thread: a 1536 x 1536 matrix
/// (2.4 M weights, cache-resident for the 4-bit formats) times 1 token (decode) and 16 tokens
/// (a prefill tile).
#[test]
#[ignore = "benchmark; run with --ignored --nocapture in release"]
fn dot_throughput_per_format_and_isa() {
    use rocforge_kernels::quant::fast::{matmul_with, Isa};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (rows, cols) = (1536, 1536);
    println!("one thread, {rows}x{cols}; Gweights/s (weights x tokens per second)");
    println!("| format | isa | 1 token | 16 tokens |");
    println!("| --- | --- | ---: | ---: |");
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let w = fixture_weights(ty, rows, cols);
        let tokens: Vec<PreparedActs> = (0..16).map(|t| acts(ty, cols, t)).collect();
        let mut out = vec![0f32; rows * 16];
        for isa in Isa::available() {
            let rate = |n: usize, out: &mut [f32]| {
                let t = pool.install(|| {
                    time(|| {
                        matmul_with(isa, ty, &w, rows, cols, &tokens[..n], &mut out[..rows * n])
                            .unwrap()
                    })
                });
                (rows * cols * n) as f64 / t.as_secs_f64() / 1e9
            };
            let (one, tile) = (rate(1, &mut out), rate(16, &mut out));
            println!("| {ty} | {} | {one:.2} | {tile:.2} |", isa.name());
        }
    }
}
