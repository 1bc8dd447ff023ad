//! Synthetic Llama models: valid GGUF files at any Llama shape and weight format, with
//! deterministic random quantized weights and a small byte-level vocabulary.
//!
//! Speed does not depend on weight values, so these stand in for models that cannot be
//! downloaded here (Llama-3-8B) in benchmarks, and tiny ones drive the unit tests. Quantized
//! blocks are generated directly (random quants, scales chosen so that each weight row has an
//! RMS near 1/sqrt(row length)), so even an 8B file is written in well under a minute.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rocforge_kernels::GgmlType;

use crate::gguf::{GgufWriter, MetaArray, MetaValue};

/// The shape of a Llama model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaShape {
    pub name: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: u32,
}

impl LlamaShape {
    /// Shapes of well-known models, and `tiny` for tests.
    pub const PRESETS: [LlamaShape; 5] = [
        LlamaShape {
            name: "tiny",
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 160,
            n_vocab: 320,
            n_ctx: 256,
            rope_base: 10000,
        },
        LlamaShape {
            name: "smollm2-135m",
            n_layer: 30,
            n_embd: 576,
            n_head: 9,
            n_head_kv: 3,
            n_ff: 1536,
            n_vocab: 49152,
            n_ctx: 8192,
            rope_base: 100000,
        },
        LlamaShape {
            name: "tinyllama-1.1b",
            n_layer: 22,
            n_embd: 2048,
            n_head: 32,
            n_head_kv: 4,
            n_ff: 5632,
            n_vocab: 32000,
            n_ctx: 2048,
            rope_base: 10000,
        },
        LlamaShape {
            name: "llama2-7b",
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 32,
            n_ff: 11008,
            n_vocab: 32000,
            n_ctx: 4096,
            rope_base: 10000,
        },
        LlamaShape {
            name: "llama3-8b",
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            n_ff: 14336,
            n_vocab: 128256,
            n_ctx: 8192,
            rope_base: 500000,
        },
    ];

    pub fn preset(name: &str) -> Option<LlamaShape> {
        Self::PRESETS.iter().find(|s| s.name == name).cloned()
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub shape: LlamaShape,
    /// Type of the projection matrices (and of `token_embd`).
    pub quant: GgmlType,
    /// Type of `output.weight`; `None` ties the output to `token_embd`.
    pub output: Option<GgmlType>,
    pub seed: u64,
}

/// `general.file_type` value for a weight format (llama.cpp's `llama_ftype`).
fn file_type_of(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
        _ => 0,
    }
}

/// The vocabulary: 256 byte-level tokens, three ChatML-style specials, then filler tokens up
/// to `n_vocab` (reachable only by id). Returns (tokens, token types).
fn vocab(n_vocab: usize) -> (Vec<String>, Vec<i32>) {
    // GPT-2's byte-to-unicode map: printable bytes stand for themselves, others shift to U+0100+.
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut shifted = 0;
    let mut map = vec![' '; 256];
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap();
        } else {
            map[b as usize] = char::from_u32(256 + shifted).unwrap();
            shifted += 1;
        }
    }
    printable.clear();
    let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; 256];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    let mut i = 0;
    while tokens.len() < n_vocab {
        tokens.push(format!("<filler_{i}>"));
        types.push(4);
        i += 1;
    }
    tokens.truncate(n_vocab);
    types.truncate(n_vocab);
    (tokens, types)
}

/// Fills `buf` (a whole number of `ty` blocks for rows of `cols`) with random weights.
pub fn random_weights(ty: GgmlType, cols: usize, seed: u64, buf: &mut [u8]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sigma = 1.0 / (cols as f32).sqrt();
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let ts = ty.type_size();
    match ty {
        GgmlType::F32 => buf
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&(rng.gen_range(-1.7f32..1.7) * sigma).to_le_bytes())),
        GgmlType::F16 => buf
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&f16(rng.gen_range(-1.7f32..1.7) * sigma))),
        GgmlType::BF16 => buf.chunks_exact_mut(2).for_each(|c| {
            let v = rng.gen_range(-1.7f32..1.7) * sigma;
            c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes())
        }),
        _ => {
            rng.fill(buf);
            // Overwrite each block's scales with values that give an RMS near sigma.
            for b in buf.chunks_exact_mut(ts) {
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q5_0 => b[0..2].copy_from_slice(&f16(
                        sigma / 4.6 * if ty == GgmlType::Q5_0 { 0.5 } else { 1.0 }
                    )),
                    GgmlType::Q4_1 | GgmlType::Q5_1 => {
                        let d = sigma / 4.6 * if ty == GgmlType::Q5_1 { 0.5 } else { 1.0 };
                        b[0..2].copy_from_slice(&f16(d));
                        b[2..4].copy_from_slice(&f16(
                            -d * if ty == GgmlType::Q5_1 { 15.5 } else { 7.5 }
                        ));
                    }
                    GgmlType::Q8_0 => b[0..2].copy_from_slice(&f16(sigma / 74.0)),
                    GgmlType::Q4K | GgmlType::Q5K => {
                        // 6-bit sub-block scales and mins are random in 0..63; keep mins small.
                        let d = sigma / 4.6 / 32.0 * if ty == GgmlType::Q5K { 0.5 } else { 1.0 };
                        b[0..2].copy_from_slice(&f16(d));
                        b[2..4].copy_from_slice(&f16(d * 0.25));
                    }
                    GgmlType::Q6K => {
                        for s in &mut b[192..208] {
                            *s = rng.gen_range(1u8..64);
                        }
                        b[208..210].copy_from_slice(&f16(sigma / 18.0 / 32.0));
                    }
                    other => unreachable!("random_weights: {other} is not a weight format"),
                }
            }
        }
    }
}

/// Builds the GGUF writer for `spec`; tensors are generated while the file is written.
pub fn writer(spec: &SyntheticSpec) -> GgufWriter {
    let s = &spec.shape;
    let head_dim = s.n_embd / s.n_head;
    let mut w = GgufWriter::new();
    w.meta_str("general.architecture", "llama")
        .meta_str(
            "general.name",
            &format!("synthetic {} {}", s.name, spec.quant),
        )
        .meta_bool("general.synthetic", true)
        .meta_u32("general.file_type", file_type_of(spec.quant))
        .meta_u32("llama.block_count", s.n_layer as u32)
        .meta_u32("llama.context_length", s.n_ctx as u32)
        .meta_u32("llama.embedding_length", s.n_embd as u32)
        .meta_u32("llama.feed_forward_length", s.n_ff as u32)
        .meta_u32("llama.attention.head_count", s.n_head as u32)
        .meta_u32("llama.attention.head_count_kv", s.n_head_kv as u32)
        .meta_u32("llama.rope.dimension_count", head_dim as u32)
        .meta_f32("llama.rope.freq_base", s.rope_base as f32)
        .meta_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .meta_u32("llama.vocab_size", s.n_vocab as u32)
        .meta_str("tokenizer.ggml.model", "gpt2")
        .meta_str("tokenizer.ggml.pre", "default");
    let (tokens, types) = vocab(s.n_vocab);
    w.meta_strings("tokenizer.ggml.tokens", tokens)
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(types)),
        )
        .meta_strings("tokenizer.ggml.merges", Vec::new())
        .meta_u32("tokenizer.ggml.bos_token_id", 256)
        .meta_u32("tokenizer.ggml.eos_token_id", 258)
        .meta_bool("tokenizer.ggml.add_bos_token", false);

    let mut seed = spec.seed;
    let mut next_seed = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed
    };
    let mut matrix = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let sd = next_seed();
        w.tensor_fill(
            name,
            &[cols as u64, rows as u64],
            ty,
            Box::new(move |buf| {
                // Row blocks are generated in parallel-friendly chunks of rows, each with its own seed.
                let row_bytes = buf.len() / rows;
                for (i, chunk) in buf.chunks_mut(row_bytes * 64).enumerate() {
                    random_weights(
                        ty,
                        cols,
                        sd ^ (i as u64).wrapping_mul(0x9E3779B97F4A7C15),
                        chunk,
                    );
                }
            }),
        );
    };
    let norm = |w: &mut GgufWriter, name: &str| {
        let v: Vec<u8> = (0..s.n_embd)
            .flat_map(|i| (1.0f32 + 0.01 * ((i % 7) as f32 - 3.0)).to_le_bytes())
            .collect();
        w.tensor(name, &[s.n_embd as u64], GgmlType::F32, v);
    };
    let (d, q, kv) = (s.n_embd, s.n_head * head_dim, s.n_head_kv * head_dim);
    matrix(&mut w, "token_embd.weight", s.n_vocab, d, spec.quant);
    for l in 0..s.n_layer {
        let n = |t: &str| format!("blk.{l}.{t}.weight");
        norm(&mut w, &n("attn_norm"));
        matrix(&mut w, &n("attn_q"), q, d, spec.quant);
        matrix(&mut w, &n("attn_k"), kv, d, spec.quant);
        matrix(&mut w, &n("attn_v"), kv, d, spec.quant);
        matrix(&mut w, &n("attn_output"), d, q, spec.quant);
        norm(&mut w, &n("ffn_norm"));
        matrix(&mut w, &n("ffn_gate"), s.n_ff, d, spec.quant);
        matrix(&mut w, &n("ffn_up"), s.n_ff, d, spec.quant);
        matrix(&mut w, &n("ffn_down"), d, s.n_ff, spec.quant);
    }
    norm(&mut w, "output_norm.weight");
    if let Some(out_ty) = spec.output {
        matrix(&mut w, "output.weight", s.n_vocab, d, out_ty);
    }
    w
}
