//! Fixtures shared by the test suites of every crate: tiny valid models and the corpus of
//! broken GGUF files. Public so the CLI and benchmark crates test against the same files.

use std::path::{Path, PathBuf};

use rocforge_kernels::GgmlType;

use crate::gguf::{GgufWriter, MetaValue};
use crate::synthetic::{self, LlamaShape, SyntheticSpec};

/// A tiny valid Llama model (2 layers, 64 wide, vocab 320) in `quant`.
pub fn tiny_model(quant: GgmlType, seed: u64) -> GgufWriter {
    let shape = LlamaShape::preset("tiny").expect("tiny preset");
    synthetic::writer(&SyntheticSpec {
        shape,
        quant,
        output: None,
        seed,
    })
}

/// A tiny valid Gemma 3 model (6 layers, layer 5 global, a sliding window of 8 keys,
/// 64 wide with head dim 32, vocab 320) in `quant`.
pub fn tiny_gemma3(quant: GgmlType, seed: u64) -> GgufWriter {
    let shape = LlamaShape::preset("tiny-gemma3").expect("tiny-gemma3 preset");
    synthetic::writer(&SyntheticSpec {
        shape,
        quant,
        output: None,
        seed,
    })
}

/// The real SmolLM2 model if present: `$ROCFORGE_TEST_MODEL`, else the fetch-model cache.
pub fn real_model() -> Option<PathBuf> {
    env_or_cached_model("ROCFORGE_TEST_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real Gemma-3-270M Q4_K_M model if present: `$ROCFORGE_GEMMA3_MODEL`, else the
/// fetch-model cache (`cargo xtask fetch-model gemma3`).
pub fn real_gemma3() -> Option<PathBuf> {
    env_or_cached_model("ROCFORGE_GEMMA3_MODEL", "gemma-3-270m-q4_k_m.gguf")
}

/// `$env_var` if set (and present), else `file_name` in the fetch-model cache.
fn env_or_cached_model(env_var: &str, file_name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    cached_model(file_name)
}

/// `file_name` in the fetch-model cache (`$ROCFORGE_CACHE_DIR`, else `$XDG_CACHE_HOME/rocforge`,
/// else `~/.cache/rocforge`, as `cargo xtask fetch-model` writes it) if present.
pub fn cached_model(file_name: &str) -> Option<PathBuf> {
    let cache = if let Some(d) = std::env::var_os("ROCFORGE_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("rocforge")
    } else {
        PathBuf::from(std::env::var_os("HOME")?).join(".cache/rocforge")
    };
    let p = cache.join("models").join(file_name);
    p.exists().then_some(p)
}

/// Whether an absent model or reference fails a test instead of skipping it:
/// `ROCFORGE_REQUIRE_MODELS=1`, which `cargo xtask test` sets (it has fetched them all).
pub fn inputs_required() -> bool {
    std::env::var_os("ROCFORGE_REQUIRE_MODELS").is_some_and(|v| v == "1")
}

/// A test that cannot run because `what` is absent: says SKIPPED on stderr, or panics when
/// inputs are required ([`inputs_required`]). `how` says how to get it.
pub fn skip_or_fail(what: &str, how: &str) {
    if inputs_required() {
        panic!("{what} absent ({how}); ROCFORGE_REQUIRE_MODELS=1 (set by `cargo xtask test`) makes that a failure, not a skip");
    }
    eprintln!("SKIPPED: {what} absent ({how})");
}

/// How to get the real SmolLM2 model, for [`skip_or_fail`].
pub const FETCH_SMOLLM2: &str = "run `cargo xtask fetch-model smollm2` or set ROCFORGE_TEST_MODEL";

/// One broken file: a name, its bytes, and a phrase its error message must contain.
pub struct BrokenFile {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub expect: &'static str,
}

fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset just past the first occurrence of `needle`.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
        + needle.len()
}

/// The corpus of broken GGUF files, each derived from a valid tiny model.
pub fn broken_corpus() -> Vec<BrokenFile> {
    let good = tiny_model(GgmlType::Q8_0, 1).to_bytes();
    let mut out = Vec::new();
    let mut push = |name, bytes, expect| {
        out.push(BrokenFile {
            name,
            bytes,
            expect,
        })
    };

    push("empty", Vec::new(), "truncated");
    push(
        "bad-magic",
        b"GGML\x03\0\0\0"
            .iter()
            .chain(&good[8..])
            .copied()
            .collect(),
        "not a GGUF file",
    );
    let mut v = good.clone();
    v[4..8].copy_from_slice(&99u32.to_le_bytes());
    push("bad-version", v, "unsupported GGUF version 99");
    push("truncated-header", good[..200].to_vec(), "truncated");
    push(
        "truncated-tensor-data",
        good[..good.len() - 100].to_vec(),
        "truncated",
    );
    let mut v = good.clone();
    patch_u64(&mut v, 8, 1 << 60);
    push("absurd-tensor-count", v, "tensor count");
    let mut v = good.clone();
    patch_u64(&mut v, 16, u64::MAX);
    push("absurd-metadata-count", v, "metadata count");
    let mut v = good.clone();
    patch_u64(&mut v, 24, 1 << 62); // length of the first key
    push("absurd-string-length", v, "length");
    let mut v = good.clone();
    // tokenizer.ggml.tokens: key, then type u32 (9), element type u32 (8), then the count.
    let at = find(&v, b"tokenizer.ggml.tokens") + 8;
    patch_u64(&mut v, at, 1 << 59);
    push(
        "absurd-array-length",
        v,
        "length of array `tokenizer.ggml.tokens`",
    );
    let mut v = good.clone();
    // The first tensor's record: name, n_dims u32, dims, type u32, offset u64.
    let at = find(&v, b"token_embd.weight") + 4 + 16 + 4;
    patch_u64(&mut v, at, 1 << 40);
    push("offset-past-end", v, "truncated");
    let mut v = good.clone();
    let at = find(&v, b"token_embd.weight") + 4 + 16;
    v[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    push("unknown-tensor-type", v, "unknown tensor type id 77");
    let mut v = good.clone();
    let at = find(&v, b"token_embd.weight") + 4 + 16 + 4;
    patch_u64(&mut v, at, 3);
    push("misaligned-offset", v, "not aligned");
    let mut v = good.clone();
    // blk.0.attn_k points at token_embd's bytes (offset 0): in bounds and aligned, but overlapping.
    let at = find(&v, b"blk.0.attn_k.weight") + 4 + 16 + 4;
    patch_u64(&mut v, at, 0);
    push("overlapping-tensors", v, "overlaps");

    let mut w = tiny_model(GgmlType::Q8_0, 1);
    let mut missing = GgufWriter::new();
    // Rebuild without blk.1.ffn_up by copying every tensor but that one.
    {
        let file_bytes = w.to_bytes();
        let dir = std::env::temp_dir().join(format!("rocforge-corpus-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("src.gguf");
        std::fs::write(&p, &file_bytes).expect("write temp file");
        let f = crate::gguf::GgufFile::open(&p).expect("valid tiny model");
        for (k, val) in f.metadata() {
            missing.meta(k, val.clone());
        }
        let mut wrong_shape = GgufWriter::new();
        for (k, val) in f.metadata() {
            wrong_shape.meta(k, val.clone());
        }
        for t in f.tensors() {
            let data = f.tensor_data(t).to_vec();
            if t.name != "blk.1.ffn_up.weight" {
                missing.tensor(&t.name, &t.dims, t.ty, data.clone());
            }
            if t.name == "blk.0.attn_k.weight" {
                // Same bytes, transposed shape.
                wrong_shape.tensor(&t.name, &[t.dims[1], t.dims[0]], t.ty, data);
            } else {
                wrong_shape.tensor(&t.name, &t.dims, t.ty, data);
            }
        }
        drop(f);
        let _ = std::fs::remove_dir_all(&dir);
        push("missing-tensor", missing.to_bytes(), "blk.1.ffn_up.weight");
        push("wrong-shape", wrong_shape.to_bytes(), "blk.0.attn_k.weight");
    }
    w.meta("general.architecture", MetaValue::String("mamba".into()));
    push(
        "unsupported-architecture",
        w.to_bytes(),
        "unsupported architecture `mamba`",
    );
    out
}

/// Writes the corpus into `dir` as `<name>.gguf` files.
pub fn write_broken_corpus(dir: &Path) -> std::io::Result<Vec<(PathBuf, &'static str)>> {
    std::fs::create_dir_all(dir)?;
    broken_corpus()
        .into_iter()
        .map(|b| {
            let p = dir.join(format!("{}.gguf", b.name));
            std::fs::write(&p, &b.bytes)?;
            Ok((p, b.expect))
        })
        .collect()
}

/// The reference data directory: `$ROCFORGE_REFS`, else `shared/refs` beside the checkout,
/// else the copy committed under `crates/rocforge-runtime/tests/fixtures`.
pub fn refs_file(name: &str) -> PathBuf {
    let candidates = [
        std::env::var_os("ROCFORGE_REFS").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/refs")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name)
        })
}

/// One reference continuation: the chosen ids, the runner-up at each step and the top-2 gap.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RefContinuation {
    pub generated_ids: Vec<u32>,
    pub second_ids: Vec<u32>,
    pub top2_gap: Vec<f32>,
}

/// One reference prompt of `smollm2-greedy.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RefCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub llama_cpp: RefContinuation,
    pub exact_f32: RefContinuation,
}

#[derive(serde::Deserialize)]
struct RefFile {
    cases: Vec<RefCase>,
}

/// One reference prompt of a file with llama.cpp's continuation only (`gemma3-greedy.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LlamaCppCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    #[serde(flatten)]
    pub llama_cpp: RefContinuation,
    pub generated_text: String,
}

/// Reads the cases of a llama.cpp-only greedy reference file.
pub fn llama_cpp_refs(path: &Path) -> Result<Vec<LlamaCppCase>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        cases: Vec<LlamaCppCase>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: File = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f.cases)
}

/// Reads the greedy reference cases.
pub fn greedy_refs(path: &Path) -> Result<Vec<RefCase>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: RefFile = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f.cases)
}

/// The agreement rule of the references: the run equals the reference until its end, or until a
/// step where the run takes the reference's runner-up and the top-2 gap there is below
/// `max_gap` (a numeric near-tie). Returns the step it parted at, or a description of the
/// first real disagreement.
pub fn agrees_with(
    run: &[u32],
    reference: &RefContinuation,
    max_gap: f32,
) -> Result<Option<usize>, String> {
    for (i, &want) in reference.generated_ids.iter().enumerate() {
        let Some(&got) = run.get(i) else {
            return Err(format!(
                "the run stopped after {i} tokens, the reference has {}",
                reference.generated_ids.len()
            ));
        };
        if got == want {
            continue;
        }
        let gap = reference.top2_gap.get(i).copied().unwrap_or(f32::INFINITY);
        if reference.second_ids.get(i) == Some(&got) && gap < max_gap {
            return Ok(Some(i));
        }
        return Err(format!(
            "step {i}: got {got}, reference {want} (runner-up {:?}, gap {gap})",
            reference.second_ids.get(i)
        ));
    }
    Ok(None)
}
