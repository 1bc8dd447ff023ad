//! The wgpu backend against the CPU reference backend: logits of tiny generated models for a
//! prefill and several decode steps (every device weight format), and greedy tokens on the real
//! SmolLM2 model when it is present. On a machine without a GPU, wgpu runs on lavapipe.
//!
//! The backends differ on purpose in two places, which the tolerances absorb: the CPU
//! quantizes activations to 8 bits for quantized dot products (llama.cpp's method) while the
//! GPU dots in f32, and the GPU keeps an f16 KV cache where the device has f16.
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use rocforge_kernels::GgmlType;
use rocforge_runtime::backend::{self, Backend, BackendKind, BackendOptions};
use rocforge_runtime::testing::{agrees_with, greedy_refs, real_model, refs_file, tiny_model};
use rocforge_runtime::Model;

/// NMSE budget of the logits per weight format (see the header for why they are not zero).
const TOLERANCE: &[(GgmlType, f64)] = &[
    (GgmlType::F32, 1e-5),
    (GgmlType::F16, 1e-5),
    (GgmlType::BF16, 1e-5),
    (GgmlType::Q8_0, 1e-3),
    (GgmlType::Q4_0, 3e-3),
    (GgmlType::Q4_1, 3e-3),
    (GgmlType::Q5_0, 3e-3),
    (GgmlType::Q5_1, 3e-3),
];

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite GPU logits");
    let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    num / want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().max(1e-30)
}

fn tiny(ty: GgmlType) -> Arc<Model> {
    let dir = std::env::temp_dir().join(format!("rocforge-gpu-wgpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{ty}.gguf"));
    tiny_model(ty, 7).write_file(&path).unwrap();
    Model::load(&path).unwrap()
}

/// Gap between the best logit and `token`'s: small gaps make a different argmax legitimate.
fn gap(logits: &[f32], token: usize) -> f32 {
    logits.iter().cloned().fold(f32::MIN, f32::max) - logits[token]
}

#[test]
fn tiny_model_logits_match_cpu_backend() {
    for &(ty, tol) in TOLERANCE {
        let model = tiny(ty);
        let opts = BackendOptions { ctx: 64, max_batch: 16 };
        let mut cpu = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
        let mut gpu = backend::create(BackendKind::Wgpu, model.clone(), &opts).unwrap();
        assert_eq!(gpu.kind(), BackendKind::Wgpu);

        // Prefill with every token's logits (the perplexity path), then the last-token path.
        // 12 tokens: above MAX_MATVEC_TOKENS, so prefill takes the dequantize + mat-mat path.
        let prompt = [1u32, 5, 9, 33, 100, 7, 250, 3, 17, 64, 128, 200];
        cpu.forward(&prompt, 0, true).unwrap();
        gpu.forward(&prompt, 0, true).unwrap();
        let e = nmse(gpu.logits().unwrap(), cpu.logits().unwrap());
        eprintln!("{ty}: prefill (all logits) nmse {e:.2e}, {} launches", gpu.launches_last_forward());
        assert!(e <= tol, "{ty}: prefill logits nmse {e:.2e} > {tol:.0e}");

        let nv = model.config.n_vocab;
        let last = &cpu.logits().unwrap()[(prompt.len() - 1) * nv..];
        let mut token = rocforge_runtime::sampler::argmax(last) as u32;
        let mut pos = prompt.len();
        for step in 0..6 {
            cpu.forward(&[token], pos, false).unwrap();
            gpu.forward(&[token], pos, false).unwrap();
            let (c, g) = (cpu.logits().unwrap().to_vec(), gpu.logits().unwrap().to_vec());
            let e = nmse(&g, &c);
            assert!(e <= tol, "{ty}: decode step {step} logits nmse {e:.2e} > {tol:.0e}");
            let (tc, tg) = (cpu.argmax().unwrap(), gpu.argmax().unwrap());
            // A different argmax is legitimate within the noise the tolerance allows.
            let rms = (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt();
            let allowed = 4.0 * (tol as f32).sqrt() * rms;
            assert!(tc == tg || gap(&c, tg as usize) < allowed, "{ty}: step {step} argmax {tg} vs cpu {tc} (gap {} > {allowed})", gap(&c, tg as usize));
            pos += 1;
            token = tc;
        }
        // Decode launches: embedding, per layer 12 or 13 (attention splits), output norm and matrix.
        let n_layer = model.config.n_layer as u64;
        let launches = gpu.launches_last_forward();
        assert!((1 + 12 * n_layer + 2..=1 + 13 * n_layer + 2).contains(&launches), "{launches} decode launches");
        let mem = gpu.memory();
        assert!(mem.weights_bytes > 0 && mem.kv_cache_bytes > 0 && mem.scratch_bytes > 0, "{mem:?}");
    }
}

#[test]
fn backend_errors_are_clear() {
    let model = tiny(GgmlType::Q8_0);
    let opts = BackendOptions { ctx: 8, max_batch: 4 };
    let mut gpu = backend::create(BackendKind::Wgpu, model.clone(), &opts).unwrap();
    assert!(gpu.forward(&[1; 9], 0, false).is_err(), "more tokens than max_batch");
    assert!(gpu.forward(&[1, 2], 7, false).is_err(), "past the context");
    assert!(gpu.forward(&[100_000], 0, false).is_err(), "token outside the vocabulary");
    if !BackendKind::Hip.compiled() {
        let err = backend::create(BackendKind::Hip, model.clone(), &opts).err().expect("no hip in this build");
        assert!(err.to_string().contains("--features hip"), "{err}");
    }
    // Auto never picks a CPU adapter such as lavapipe: here it is a real GPU or the CPU backend.
    let auto = backend::create(BackendKind::Auto, model, &opts).unwrap();
    eprintln!("auto picked {} on {}", auto.kind(), auto.device_name());
}

/// Greedy ids of `n` steps after `prompt`.
fn greedy(b: &mut dyn Backend, prompt: &[u32], n: usize) -> Vec<u32> {
    b.forward(prompt, 0, false).unwrap();
    let mut ids = Vec::new();
    for pos in prompt.len()..prompt.len() + n {
        let t = b.argmax().unwrap();
        ids.push(t);
        b.forward(&[t], pos, false).unwrap();
    }
    ids
}

/// The real model: greedy tokens for "The capital of France is". The GPU must agree with the
/// CPU backend for 16 tokens, or, where the two part at a near-tie, follow one of the two
/// references of `shared/refs` by its agreement rule: the CPU (8-bit activations, like
/// llama.cpp) and the GPU plain path (f32 dots, like the exact-f32 reference) legitimately part
/// at such steps.
#[test]
fn real_model_greedy_tokens_match_cpu_backend() {
    let Some(path) = real_model() else {
        eprintln!("SKIPPED: real model absent (run `cargo xtask fetch-model smollm2` or set ROCFORGE_TEST_MODEL)");
        return;
    };
    let model = Model::load(path).unwrap();
    let text = "The capital of France is";
    let prompt = model.tokenizer.encode(text, true, true).unwrap();
    let opts = BackendOptions { ctx: 256, max_batch: 64 };
    let mut cpu = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
    let mut gpu = backend::create(BackendKind::Wgpu, model.clone(), &opts).unwrap();
    let n = 20;
    let (ids_cpu, ids_gpu) = (greedy(cpu.as_mut(), &prompt, n), greedy(gpu.as_mut(), &prompt, n));
    let same = ids_cpu.iter().zip(&ids_gpu).take_while(|(a, b)| a == b).count();
    eprintln!("cpu {ids_cpu:?}\ngpu {ids_gpu:?}\n{same} agree; decode launches {}; {:?}", gpu.launches_last_forward(), gpu.memory());
    if same >= 16 {
        return;
    }
    let refs = greedy_refs(&refs_file("smollm2-greedy.json")).unwrap();
    let case = refs.iter().find(|c| c.prompt == text).expect("reference case");
    assert_eq!(prompt, case.prompt_ids);
    let k = case.exact_f32.generated_ids.len().min(n);
    let short = |r: &rocforge_runtime::testing::RefContinuation| rocforge_runtime::testing::RefContinuation {
        generated_ids: r.generated_ids[..k].to_vec(),
        second_ids: r.second_ids[..k].to_vec(),
        top2_gap: r.top2_gap[..k].to_vec(),
    };
    let (vs_llama, vs_exact) = (agrees_with(&ids_gpu, &short(&case.llama_cpp), 0.5), agrees_with(&ids_gpu, &short(&case.exact_f32), 0.5));
    eprintln!("gpu vs llama.cpp {vs_llama:?}, vs exact f32 {vs_exact:?}");
    assert!(vs_llama.is_ok() || vs_exact.is_ok(), "gpu parted from the cpu after {same} tokens and agrees with neither reference");
}
