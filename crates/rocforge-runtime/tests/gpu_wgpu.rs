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
use rocforge_runtime::testing::{real_model, tiny_model};
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
        let prompt = [1u32, 5, 9, 33, 100, 7, 250];
        cpu.forward(&prompt, 0, true).unwrap();
        gpu.forward(&prompt, 0, true).unwrap();
        let e = nmse(gpu.logits().unwrap(), cpu.logits().unwrap());
        eprintln!("{ty}: prefill (all logits) nmse {e:.2e}, {} launches", gpu.launches_last_forward());
        assert!(e <= tol, "{ty}: prefill logits nmse {e:.2e} > {tol:.0e}");

        let mut pos = prompt.len();
        let mut token = cpu.argmax().unwrap();
        for step in 0..6 {
            cpu.forward(&[token], pos, false).unwrap();
            gpu.forward(&[token], pos, false).unwrap();
            let (c, g) = (cpu.logits().unwrap().to_vec(), gpu.logits().unwrap().to_vec());
            let e = nmse(&g, &c);
            assert!(e <= tol, "{ty}: decode step {step} logits nmse {e:.2e} > {tol:.0e}");
            let (tc, tg) = (cpu.argmax().unwrap(), gpu.argmax().unwrap());
            assert!(tc == tg || gap(&c, tg as usize) < 1e-2, "{ty}: step {step} argmax {tg} vs cpu {tc}");
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

#[test]
fn real_model_greedy_tokens_match_cpu_backend() {
    let Some(path) = real_model() else {
        eprintln!("SKIPPED: real model absent (run `cargo xtask fetch-model smollm2` or set ROCFORGE_TEST_MODEL)");
        return;
    };
    let model = Model::load(path).unwrap();
    let prompt = model.tokenizer.encode("The capital of France is", true, true).unwrap();
    let opts = BackendOptions { ctx: 256, max_batch: 64 };
    let mut cpu = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
    let mut gpu = backend::create(BackendKind::Wgpu, model.clone(), &opts).unwrap();
    cpu.forward(&prompt, 0, false).unwrap();
    gpu.forward(&prompt, 0, false).unwrap();
    let mut pos = prompt.len();
    let (mut ids_cpu, mut ids_gpu) = (Vec::new(), Vec::new());
    for step in 0..20 {
        let (tc, tg) = (cpu.argmax().unwrap(), gpu.argmax().unwrap());
        ids_cpu.push(tc);
        ids_gpu.push(tg);
        if tc != tg {
            // Only a near-tie may part them (the CPU's 8-bit activations against f32 dots).
            let g = gap(cpu.logits().unwrap(), tg as usize);
            assert!(step >= 16 || g < 0.5, "step {step}: gpu {tg} vs cpu {tc}, cpu gap {g}\ncpu {ids_cpu:?}\ngpu {ids_gpu:?}");
            eprintln!("parted at step {step} on a near-tie (gap {g})");
            break;
        }
        cpu.forward(&[tc], pos, false).unwrap();
        gpu.forward(&[tg], pos, false).unwrap();
        pos += 1;
    }
    eprintln!("cpu {ids_cpu:?}\ngpu {ids_gpu:?}\ndecode launches {}", gpu.launches_last_forward());
    eprintln!("{:?}", gpu.memory());
    assert!(ids_cpu.len() >= 16 && ids_cpu[..16] == ids_gpu[..16], "fewer than 16 greedy tokens agree");
}
