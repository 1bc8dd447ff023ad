//! Every CubeCL op against its CPU reference, on every runtime this build has. Cases are named
//! `op/shape` so a failure says which; the error measure is llama.cpp's normalised MSE
//! (`sum (a - b)^2 / sum b^2`), with one budget per op kept in [`TOLERANCE`]. NaN and infinity
//! fail separately.
//!
//! `cargo test --release -p rocforge-kernels --features wgpu --test ops_kernels` runs them on
//! wgpu (lavapipe on a CPU-only machine). CUDA and HIP instances need the GPU (a HIP client
//! without one aborts the process), so they compile only with the `device-tests` feature:
//! `cargo test --release -p rocforge-kernels --features cuda,device-tests --test ops_kernels`.
#![cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]

use rocforge_kernels::ops::attention::{self, AttnScratch, AttnShape, KvCache, KvType};
use rocforge_kernels::ops::dequant::{self, DeviceWeight, DEVICE_FORMATS};
use rocforge_kernels::ops::gpu::{Gpu, Pos, Runtime};
use rocforge_kernels::ops::norm::Rows;
use rocforge_kernels::ops::rope::{self, RopeShape, RopeSrc};
use rocforge_kernels::ops::{activation, argmax, embedding, norm};
use rocforge_kernels::quant;
use rocforge_kernels::GgmlType;

/// NMSE budget per op. Element-wise ops differ from the reference only by rounding; reductions
/// add summation-order error; f16 caches round K and V to 11 bits.
const TOLERANCE: &[(&str, f64)] = &[
    ("rms_norm", 1e-10),
    ("add_rms_norm", 1e-10),
    ("swiglu", 1e-12),
    // tanh from exp on the device: a few ulps apart from the reference's tanh.
    ("geglu", 1e-10),
    ("scale", 0.0),
    ("add_rms_normed", 1e-10),
    ("rms_norm_heads", 1e-10),
    ("add_assign", 0.0),
    ("rope_store", 1e-12),
    ("rope_store_f16", 1e-6),
    ("attention", 1e-10),
    ("attention_f16", 1e-5),
    // Flash attention multiplies on the matrix units: Q (scaled) and the probabilities in f16.
    ("attention_flash", 2e-5),
    ("embedding", 0.0),
    ("linear_plain", 1e-10),
    // The quantized mat-mat's activations: f16 (11-bit mantissa, NMSE about 1e-7 of a
    // uniform spread) in its pair order; a wrong order fails by orders of magnitude.
    ("f16_pairs", 1e-6),
    // An input a launch must leave as it was.
    ("unchanged", 0.0),
];

/// `got` (f16 in the mat-mat's pair order: 0, 2, 1, 3 in each run of 4) back in order.
fn from_pairs(got: &[half::f16]) -> Vec<f32> {
    (0..got.len())
        .map(|i| {
            let j = if i % 4 == 1 || i % 4 == 2 { i ^ 3 } else { i };
            got[j].to_f32()
        })
        .collect()
}

fn tolerance(op: &str) -> f64 {
    TOLERANCE
        .iter()
        .find(|(o, _)| *o == op)
        .map(|t| t.1)
        .unwrap_or_else(|| panic!("no tolerance for {op}"))
}

/// Checks `got` against `want` with `op`'s budget; `case` names the shape.
fn check(op: &str, case: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{op}/{case}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{op}/{case}: non-finite value {} at {i}", got[i]);
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = want
        .iter()
        .map(|&b| (b as f64).powi(2))
        .sum::<f64>()
        .max(1e-30);
    let nmse = num / den;
    assert!(
        nmse <= tolerance(op),
        "{op}/{case}: nmse {nmse:.3e} > {:.1e}",
        tolerance(op)
    );
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rms_norm<R: Runtime>(gpu: &Gpu<R>) {
    for (rows, d) in [(1, 64), (3, 576), (2, 4096)] {
        let case = format!("rows{rows}_d{d}");
        let (x, y, w) = (values(rows * d, 1), values(rows * d, 2), values(d, 3));
        let mut want = vec![0.0; rows * d];
        for r in 0..rows {
            norm::rms_norm(
                &x[r * d..(r + 1) * d],
                &w,
                1e-5,
                &mut want[r * d..(r + 1) * d],
            );
        }
        let (xb, wb, out) = (gpu.f32s(&x), gpu.f32s(&w), gpu.zeros(rows * d));
        let all = Rows::Range {
            first: 0,
            count: rows,
        };
        norm::launch_rms_norm(gpu, &xb, &wb, &out, all, 1e-5);
        check("rms_norm", &case, &gpu.read_f32(&out).unwrap(), &want);
        // Last row only, as the output norm of a decode step does.
        let last = Rows::Range {
            first: rows - 1,
            count: 1,
        };
        norm::launch_rms_norm(gpu, &xb, &wb, &out, last, 1e-5);
        check(
            "rms_norm",
            &format!("{case}_last"),
            &gpu.read_f32(&out).unwrap()[..d],
            &want[(rows - 1) * d..],
        );
        // Picked rows in any order, as the logits of a multi-sequence batch take them.
        let order: Vec<u32> = (0..rows as u32).rev().collect();
        let picked = Rows::Picked {
            pick: &gpu.u32s(&order),
            count: rows,
            end: rows,
        };
        norm::launch_rms_norm(gpu, &xb, &wb, &out, picked, 1e-5);
        let got = gpu.read_f32(&out).unwrap();
        for (i, &r) in order.iter().enumerate() {
            let r = r as usize;
            check(
                "rms_norm",
                &format!("{case}_picked{i}"),
                &got[i * d..(i + 1) * d],
                &want[r * d..(r + 1) * d],
            );
        }

        let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        for r in 0..rows {
            norm::rms_norm(
                &sum[r * d..(r + 1) * d],
                &w,
                1e-5,
                &mut want[r * d..(r + 1) * d],
            );
        }
        let yb = gpu.f32s(&y);
        norm::launch_add_rms_norm(gpu, &xb, &yb, &wb, &out, all, 1e-5);
        check("add_rms_norm", &case, &gpu.read_f32(&out).unwrap(), &want);
        check(
            "add_assign",
            &format!("{case}_residual"),
            &gpu.read_f32(&xb).unwrap(),
            &sum,
        );
        if gpu.supports_f16() {
            // Into f16 in the quantized mat-mat's pair order (its activations), after the
            // residual above: rmsnorm(x + y), then adding y once more.
            let out16 = gpu.zeros_of(rows * d, 2);
            norm::launch_rms_norm(gpu, &xb, &wb, &out16, all, 1e-5);
            let got = from_pairs(&gpu.read_f16(&out16).unwrap());
            check("f16_pairs", &format!("rms_norm_{case}"), &got, &want);
            let sum2: Vec<f32> = sum.iter().zip(&y).map(|(a, b)| a + b).collect();
            let mut want2 = vec![0.0; rows * d];
            for r in 0..rows {
                let row = r * d..(r + 1) * d;
                norm::rms_norm(&sum2[row.clone()], &w, 1e-5, &mut want2[row]);
            }
            norm::launch_add_rms_norm(gpu, &xb, &yb, &wb, &out16, all, 1e-5);
            let got = from_pairs(&gpu.read_f16(&out16).unwrap());
            check("f16_pairs", &format!("add_rms_norm_{case}"), &got, &want2);
            check(
                "add_assign",
                &format!("{case}_residual_f16"),
                &gpu.read_f32(&xb).unwrap(),
                &sum2,
            );
        }

        // Gemma's post-norm residual: x += rmsnorm(y) * w.
        let mut want = x.clone();
        for r in 0..rows {
            norm::add_rms_normed(
                &mut want[r * d..(r + 1) * d],
                &y[r * d..(r + 1) * d],
                &w,
                1e-6,
            );
        }
        let xb = gpu.f32s(&x);
        norm::launch_add_rms_normed(gpu, &xb, &yb, &wb, rows, 1e-6);
        check("add_rms_normed", &case, &gpu.read_f32(&xb).unwrap(), &want);
    }
}

/// Per-head q/k norm in place: heads inside token rows, alone and as parts of a fused QKV row.
fn rms_norm_heads<R: Runtime>(gpu: &Gpu<R>) {
    for (tokens, heads, hd, off, stride) in [
        (1, 4, 256, 0, 1024),
        (3, 1, 256, 1024, 1536),
        (5, 9, 64, 0, 576),
        (2, 3, 64, 64, 320),
    ] {
        let case = format!("t{tokens}_heads{heads}_hd{hd}_off{off}_stride{stride}");
        let (x, w) = (values(tokens * stride + off, 12), values(hd, 13));
        let mut want = x.clone();
        for t in 0..tokens {
            let at = off + t * stride;
            norm::rms_norm_heads(&mut want[at..at + heads * hd], &w, 1e-6);
        }
        let xb = gpu.f32s(&x);
        norm::launch_rms_norm_heads(
            gpu,
            &xb,
            &gpu.f32s(&w),
            norm::HeadRows {
                tokens,
                heads,
                off,
                stride,
            },
            1e-6,
        );
        check("rms_norm_heads", &case, &gpu.read_f32(&xb).unwrap(), &want);
    }
}

fn elementwise<R: Runtime>(gpu: &Gpu<R>) {
    for n in [1, 1000, 70_000] {
        let (g, u) = (values(n, 4), values(n, 5));
        let mut want = g.clone();
        activation::swiglu(&mut want, &u);
        let (gb, ub) = (gpu.f32s(&g), gpu.f32s(&u));
        activation::launch_swiglu(gpu, &gb, &ub, n);
        check(
            "swiglu",
            &format!("n{n}"),
            &gpu.read_f32(&gb).unwrap(),
            &want,
        );

        let g4: Vec<f32> = g.iter().map(|v| v * 4.0).collect(); // GELU's curved part spans about [-4, 4]
        let mut want = g4.clone();
        activation::gated(activation::GateAct::GeluTanh, &mut want, &u);
        let gb = gpu.f32s(&g4);
        if gpu.supports_f16() && n % 4 == 0 {
            // Into f16 in the quantized mat-mat's pair order, `gate` untouched.
            let out16 = gpu.zeros_of(n, 2);
            activation::launch_gated_half(gpu, activation::GateAct::GeluTanh, &gb, &ub, &out16, n);
            let got = from_pairs(&gpu.read_f16(&out16).unwrap());
            check("f16_pairs", &format!("geglu_n{n}"), &got, &want);
            check(
                "unchanged",
                &format!("geglu_n{n}_gate"),
                &gpu.read_f32(&gb).unwrap(),
                &g4,
            );
        }
        activation::launch_gated(gpu, activation::GateAct::GeluTanh, &gb, &ub, n);
        check(
            "geglu",
            &format!("n{n}"),
            &gpu.read_f32(&gb).unwrap(),
            &want,
        );

        let want: Vec<f32> = g.iter().map(|v| v * 25.298_221).collect();
        let xb = gpu.f32s(&g);
        activation::launch_scale(gpu, &xb, 25.298_221, n);
        check(
            "scale",
            &format!("n{n}"),
            &gpu.read_f32(&xb).unwrap(),
            &want,
        );

        let mut want = g.clone();
        activation::add_assign(&mut want, &u);
        let xb = gpu.f32s(&g);
        activation::launch_add_assign(gpu, &xb, &ub, n);
        check(
            "add_assign",
            &format!("n{n}"),
            &gpu.read_f32(&xb).unwrap(),
            &want,
        );
    }
}

fn kv_types<R: Runtime>(gpu: &Gpu<R>) -> Vec<KvType> {
    if gpu.supports_f16() {
        vec![KvType::F32, KvType::F16]
    } else {
        eprintln!("this device has no f16: f16 KV cache not tested");
        vec![KvType::F32]
    }
}

fn rope_store<R: Runtime>(gpu: &Gpu<R>) {
    for kv in kv_types(gpu) {
        for (n_head, n_kv, hd, rope_dim, pos, n, neox) in [
            (4, 2, 64, 64, 5, 3, false),
            (9, 3, 64, 32, 0, 1, false),
            (8, 8, 128, 128, 40, 7, false),
            (4, 1, 256, 256, 30, 5, true),
            (4, 2, 64, 32, 3, 2, true),
        ] {
            let mode = if neox { "neox" } else { "normal" };
            let case = format!(
                "{}_{mode}_h{n_head}_kv{n_kv}_hd{hd}_rot{rope_dim}_pos{pos}_n{n}",
                kv.name()
            );
            let rotate = if neox { rope::rope_neox } else { rope::rope };
            let ctx = pos + n + 2;
            let (q_dim, kv_dim, half) = (n_head * hd, n_kv * hd, rope_dim / 2);
            let inv = rope::inv_freqs(rope_dim, 10000.0, None);
            let (cos, sin) = rope::rope_tables(ctx, &inv);
            let (q, k, v) = (
                values(n * q_dim, 6),
                values(n * kv_dim, 7),
                values(n * kv_dim, 8),
            );
            let (mut want_q, mut want_k) = (q.clone(), k.clone());
            for t in 0..n {
                let (c, s) = (
                    &cos[(pos + t) * half..(pos + t + 1) * half],
                    &sin[(pos + t) * half..(pos + t + 1) * half],
                );
                rotate(&mut want_q[t * q_dim..(t + 1) * q_dim], hd, c, s);
                rotate(&mut want_k[t * kv_dim..(t + 1) * kv_dim], hd, c, s);
            }
            // The same projections as three buffers and as one fused QKV buffer (token rows of
            // Q, K, V back to back, as the fused projection writes them).
            let (qb, kb, vb) = (gpu.f32s(&q), gpu.f32s(&k), gpu.f32s(&v));
            let fused: Vec<f32> = (0..n)
                .flat_map(|t| {
                    [
                        &q[t * q_dim..(t + 1) * q_dim],
                        &k[t * kv_dim..(t + 1) * kv_dim],
                        &v[t * kv_dim..(t + 1) * kv_dim],
                    ]
                    .concat()
                })
                .collect();
            let qkv = gpu.f32s(&fused);
            for (src_name, src) in [
                (
                    "separate",
                    RopeSrc::Separate {
                        q: &qb,
                        k: &kb,
                        v: &vb,
                    },
                ),
                ("fused", RopeSrc::Fused(&qkv)),
            ] {
                let case = format!("{case}_{src_name}");
                let cache = KvCache::new(gpu, 2, ctx, kv_dim, kv);
                let q_out = gpu.zeros(n * q_dim);
                let shape = RopeShape {
                    n_head,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    rot_pairs: half,
                };
                rope::launch_rope_store_mode(
                    gpu,
                    src,
                    &q_out,
                    &gpu.f32s(&cos),
                    &gpu.f32s(&sin),
                    &cache,
                    1,
                    pos,
                    n,
                    shape,
                    neox,
                );
                check(
                    "rope_store",
                    &format!("{case}_q"),
                    &gpu.read_f32(&q_out).unwrap(),
                    &want_q,
                );
                let (kc, vc) = cache.read_layer(gpu, 1).unwrap();
                let op = if kv == KvType::F16 {
                    "rope_store_f16"
                } else {
                    "rope_store"
                };
                check(
                    op,
                    &format!("{case}_k"),
                    &kc[pos * kv_dim..(pos + n) * kv_dim],
                    &want_k,
                );
                check(
                    op,
                    &format!("{case}_v"),
                    &vc[pos * kv_dim..(pos + n) * kv_dim],
                    &v,
                );
                assert!(
                    kc[..pos * kv_dim].iter().all(|&x| x == 0.0),
                    "rope_store/{case}: wrote below pos"
                );
            }
        }
    }
}

fn attention<R: Runtime>(gpu: &Gpu<R>) {
    for kv in kv_types(gpu) {
        // (heads, kv heads, head_dim, pos, n, window): decode at several lengths (1 to 32
        // splits), prefill from 0 and a continued prefill; sliding windows (Gemma 3: hd 256)
        // shorter than the context, in decode with splits and in prefill across the edge.
        for (n_head, n_kv, hd, pos, n, window) in [
            (4, 2, 64, 0, 1, None),
            (9, 3, 64, 700, 1, None),
            (4, 1, 64, 9000, 1, None),
            (4, 2, 64, 0, 20, None),
            (8, 2, 128, 30, 9, None),
            (4, 4, 64, 300, 3, None),
            (4, 1, 256, 20, 3, None),
            (4, 1, 256, 600, 1, Some(512)),
            (4, 1, 64, 9000, 1, Some(512)),
            (4, 1, 256, 10, 40, Some(16)),
            (2, 1, 64, 0, 9, Some(1)),
            // A head_dim that no vector width divides: keys read one value per load.
            (3, 1, 18, 40, 2, None),
            // Prefill on the matrix units where the device has them (flash attention): groups
            // of 4, 3 (a tile of 21 tokens, one row idle) and 1, several key tiles, a window
            // inside the tile, and one key wide.
            (8, 2, 128, 0, 100, None),
            (9, 3, 64, 37, 64, None),
            (4, 4, 64, 0, 33, None),
            (32, 8, 128, 5, 150, Some(100)),
            (4, 1, 256, 200, 70, Some(16)),
            (2, 1, 64, 0, 17, Some(1)),
        ] {
            let win = window.map_or("full".to_string(), |w| format!("win{w}"));
            let case = format!(
                "{}_h{n_head}_kv{n_kv}_hd{hd}_pos{pos}_n{n}_{win}",
                kv.name()
            );
            let shape = AttnShape {
                n_heads: n_head,
                n_kv_heads: n_kv,
                head_dim: hd,
            };
            let (ctx, q_dim, kv_dim) = (pos + n, n_head * hd, n_kv * hd);
            let q = values(n * q_dim, 9);
            // Keys and values as the cache stores them (rounded through f16 when it is f16).
            let round = |x: Vec<f32>| match kv {
                KvType::F32 => x,
                KvType::F16 => x
                    .into_iter()
                    .map(|v| half::f16::from_f32(v).to_f32())
                    .collect(),
            };
            let (k, v) = (
                round(values(ctx * kv_dim, 10)),
                round(values(ctx * kv_dim, 11)),
            );
            let mut want = vec![0.0; n * q_dim];
            for t in 0..n {
                for h in 0..n_head {
                    let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                    let out = &mut want[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
                    attention::attend_head_window(
                        qh,
                        &k,
                        &v,
                        h / (n_head / n_kv),
                        pos + t,
                        window,
                        shape,
                        out,
                    );
                }
            }
            // Fill the cache through rope_store with rot_pairs = 0 (a plain copy).
            let cache = KvCache::new(gpu, 1, ctx, kv_dim, kv);
            let dummy_q = gpu.zeros(ctx * q_dim);
            let rs = RopeShape {
                n_head,
                n_kv_heads: n_kv,
                head_dim: hd,
                rot_pairs: 0,
            };
            let none = gpu.zeros(1);
            let (kb, vb) = (gpu.f32s(&k), gpu.f32s(&v));
            let src = RopeSrc::Separate {
                q: &dummy_q,
                k: &kb,
                v: &vb,
            };
            rope::launch_rope_store(
                gpu,
                src,
                &gpu.zeros(ctx * q_dim),
                &none,
                &none,
                &cache,
                0,
                0,
                ctx,
                rs,
            );
            let scratch = AttnScratch::new(gpu, 32, shape);
            let out = gpu.zeros(n * q_dim);
            attention::launch_attention_window(
                gpu,
                &gpu.f32s(&q),
                &cache,
                0,
                &scratch,
                &out,
                pos,
                n,
                shape,
                window,
            );
            let op = |paged| {
                if attention::flash_plane(gpu, n, shape, paged).is_some() {
                    "attention_flash"
                } else if kv == KvType::F16 {
                    "attention_f16"
                } else {
                    "attention"
                }
            };
            check(op(false), &case, &gpu.read_f32(&out).unwrap(), &want);

            // The same sequence over scattered KV pages (a multi-sequence batch's layout): its
            // keys stored through a page table in reverse order, then the same queries.
            let page = attention::KV_PAGE_SIZE;
            let n_pages = ctx.div_ceil(page) + 2;
            let pages: Vec<u32> = (0..ctx.div_ceil(page) as u32)
                .rev()
                .map(|p| p + 1)
                .collect();
            let paged = KvCache::new(gpu, 1, n_pages * page, kv_dim, kv);
            let mut meta = Vec::new();
            attention::paged_meta([(0, ctx, &pages[..])], &mut meta);
            let store = gpu.u32s(&meta);
            rope::launch_rope_store(
                gpu,
                src,
                &gpu.zeros(ctx * q_dim),
                &none,
                &none,
                &paged,
                0,
                Pos::Paged {
                    meta: &store,
                    kv_len: ctx,
                },
                ctx,
                rs,
            );
            attention::paged_meta([(pos, n, &pages[..])], &mut meta);
            let queries = gpu.u32s(&meta);
            let out = gpu.zeros(n * q_dim);
            attention::launch_attention_window(
                gpu,
                &gpu.f32s(&q),
                &paged,
                0,
                &scratch,
                &out,
                Pos::Paged {
                    meta: &queries,
                    kv_len: ctx,
                },
                n,
                shape,
                window,
            );
            check(
                op(true),
                &format!("{case}_paged"),
                &gpu.read_f32(&out).unwrap(),
                &want,
            );
        }
    }
}

/// `rows` random rows of `cols` quantized to `ty`, and their dequantized values.
fn quantized(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let src = values(rows * cols, seed);
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut bytes = vec![0u8; rows * rb];
    let mut deq = vec![0.0f32; rows * cols];
    for r in 0..rows {
        quant::quantize_row(
            ty,
            &src[r * cols..(r + 1) * cols],
            &mut bytes[r * rb..(r + 1) * rb],
        )
        .unwrap();
        quant::dequantize_row(
            ty,
            &bytes[r * rb..(r + 1) * rb],
            &mut deq[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    (bytes, deq)
}

fn embedding<R: Runtime>(gpu: &Gpu<R>) {
    let (rows, cols) = (50, 96);
    for ty in DEVICE_FORMATS {
        let (bytes, deq) = quantized(ty, rows, cols, 12);
        let w = DeviceWeight::upload(gpu, ty, &bytes, rows, cols).unwrap();
        let tokens = [7u32, 0, 49, 7];
        let out = gpu.zeros(tokens.len() * cols);
        let ids = gpu.u32s(&tokens);
        embedding::launch_embedding(
            gpu,
            &w,
            embedding::Tokens::Device(&ids, tokens.len()),
            &ids,
            &out,
        );
        let want: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| deq[t as usize * cols..(t as usize + 1) * cols].to_vec())
            .collect();
        check(
            "embedding",
            &format!("{ty}_batch"),
            &gpu.read_f32(&out).unwrap(),
            &want,
        );
        embedding::launch_embedding(gpu, &w, embedding::Tokens::One(49), &ids, &out);
        check(
            "embedding",
            &format!("{ty}_one"),
            &gpu.read_f32(&out).unwrap()[..cols],
            &deq[49 * cols..50 * cols],
        );
        // The table in row blocks 0..32 and 32..50, one launch per block: each writes the
        // rows of its tokens only, together the whole lookup.
        let row_bytes = bytes.len() / rows;
        let out = gpu.zeros(tokens.len() * cols);
        for (first, n) in [(0, 32), (32, rows - 32)] {
            let part = &bytes[first * row_bytes..(first + n) * row_bytes];
            let block = DeviceWeight::upload(gpu, ty, part, n, cols).unwrap();
            embedding::launch_embedding_rows(gpu, &block, first, &ids, tokens.len(), &out);
        }
        check(
            "embedding",
            &format!("{ty}_rows"),
            &gpu.read_f32(&out).unwrap(),
            &want,
        );
    }
}

fn linear_plain<R: Runtime>(gpu: &Gpu<R>) {
    for ty in DEVICE_FORMATS {
        for (rows, cols, n) in [(40, 96, 1), (33, 576, 3)] {
            let (bytes, deq) = quantized(ty, rows, cols, 13);
            let x = values(n * cols, 14);
            let want: Vec<f32> = (0..n)
                .flat_map(|t| {
                    (0..rows)
                        .map(|r| {
                            (0..cols)
                                .map(|c| deq[r * cols + c] * x[t * cols + c])
                                .sum::<f32>()
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let w = DeviceWeight::upload(gpu, ty, &bytes, rows, cols).unwrap();
            let out = gpu.zeros(n * rows);
            dequant::launch_linear_plain(gpu, &w, &gpu.f32s(&x), &out, n);
            check(
                "linear_plain",
                &format!("{ty}_{rows}x{cols}_n{n}"),
                &gpu.read_f32(&out).unwrap(),
                &want,
            );
        }
    }
}

fn argmax_matches<R: Runtime>(gpu: &Gpu<R>) {
    // Whole 4-vectors (300, 49,152, 128,256: the vector path) and not (1, 4,099).
    for (n, seed) in [(1usize, 1u64), (300, 2), (4099, 4), (49152, 3), (128256, 5)] {
        let mut x = values(n, seed);
        let want = argmax::argmax(&x);
        let out = gpu.zeros(1);
        argmax::launch_argmax(gpu, &gpu.f32s(&x), 0, n, &out);
        assert_eq!(gpu.read_u32(&out).unwrap()[0] as usize, want, "argmax/n{n}");
        // A tie: the lower index wins.
        if n > 10 {
            x[n - 1] = x[want];
            let idx = want.min(n - 1);
            argmax::launch_argmax(gpu, &gpu.f32s(&x), 0, n, &out);
            assert_eq!(
                gpu.read_u32(&out).unwrap()[0] as usize,
                idx,
                "argmax/n{n}_tie"
            );
            // A tie inside one 4-vector (an even index and the odd one after it): the lower wins.
            let mut x = values(n, seed);
            let top = x[argmax::argmax(&x)] + 1.0;
            let want = (n / 2) | 1;
            x[want - 1] = top;
            x[want] = top;
            argmax::launch_argmax(gpu, &gpu.f32s(&x), 0, n, &out);
            assert_eq!(
                gpu.read_u32(&out).unwrap()[0] as usize,
                want - 1,
                "argmax/n{n}_tie_before"
            );
        }
    }
    // Several rows in one launch, vectors (n = 1,000) and not (n = 999).
    for n in [1000usize, 999] {
        let rows = 5;
        let x = values(rows * n, 11);
        let out = gpu.zeros(rows);
        argmax::launch_argmax_rows(gpu, &gpu.f32s(&x), 0, n, rows, &out);
        let want: Vec<u32> = x.chunks(n).map(|r| argmax::argmax(r) as u32).collect();
        assert_eq!(gpu.read_u32(&out).unwrap(), want, "argmax/rows_n{n}");
    }
    // A later row of a (rows, n) buffer.
    let x = values(3 * 100, 9);
    let out = gpu.zeros(1);
    argmax::launch_argmax(gpu, &gpu.f32s(&x), 200, 100, &out);
    assert_eq!(
        gpu.read_u32(&out).unwrap()[0] as usize,
        argmax::argmax(&x[200..]),
        "argmax/row2"
    );
}

fn launches_are_counted<R: Runtime>(gpu: &Gpu<R>) {
    let before = gpu.launches();
    let x = gpu.zeros(8);
    activation::launch_add_assign(gpu, &x, &x, 8);
    activation::launch_swiglu(gpu, &x, &x, 8);
    assert_eq!(gpu.launches() - before, 2);
}

/// One `#[test]` per op for a runtime: `$name` module, `$gpu` expression making the `Gpu`.
macro_rules! runtime_tests {
    ($name:ident, $gpu:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn rms_norm() {
                super::rms_norm(&$gpu)
            }
            #[test]
            fn rms_norm_heads() {
                super::rms_norm_heads(&$gpu)
            }
            #[test]
            fn elementwise() {
                super::elementwise(&$gpu)
            }
            #[test]
            fn rope_store() {
                super::rope_store(&$gpu)
            }
            #[test]
            fn attention() {
                super::attention(&$gpu)
            }
            #[test]
            fn embedding() {
                super::embedding(&$gpu)
            }
            #[test]
            fn linear_plain() {
                super::linear_plain(&$gpu)
            }
            #[test]
            fn argmax() {
                super::argmax_matches(&$gpu)
            }
            #[test]
            fn launches_are_counted() {
                super::launches_are_counted(&$gpu)
            }
        }
    };
}

#[cfg(feature = "wgpu")]
runtime_tests!(
    wgpu,
    Gpu::<cubecl::wgpu::WgpuRuntime>::on(&Default::default())
);
#[cfg(all(feature = "cuda", feature = "device-tests"))]
runtime_tests!(
    cuda,
    Gpu::<cubecl::cuda::CudaRuntime>::on(&Default::default())
);
#[cfg(all(feature = "hip", feature = "device-tests"))]
runtime_tests!(hip, Gpu::<cubecl::hip::HipRuntime>::on(&Default::default()));
