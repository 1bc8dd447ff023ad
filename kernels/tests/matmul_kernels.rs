//! Matmul kernels against the CPU reference, on every runtime enabled by features.
//!
//! Tests are written once, generic over `R: Runtime`, and instantiated per runtime and per
//! format by `runtime_tests!`, so they filter as `wgpu::q4_k::matvec`. Weights are random
//! GGUF blocks (random quant bytes, sane `f16` headers); the oracle is `quant::dequantize_row`
//! with products accumulated in `f64`. Errors are judged by NMSE against a per-format table.
#![cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]

use cubecl::prelude::*;
use half::f16;
use rocforge_kernels::ops::activation::{self, GateAct};
use rocforge_kernels::ops::matmul::catalog;
use rocforge_kernels::ops::matmul::{
    self as mm, DequantScratch, Epilogue, KernelFormat, MatmulError, Matvec, QWeight,
};
use rocforge_kernels::quant::dequantize_row;
use rocforge_kernels::GgmlType;

/// Largest accepted normalised mean squared error per format. The kernels compute in `f32`
/// on exactly the reference's dequantized values, so only summation order differs.
const NMSE_TOLERANCE: &[(KernelFormat, f64)] = &[
    (KernelFormat::F32, 1e-10),
    (KernelFormat::F16, 1e-10),
    (KernelFormat::Q4_0, 1e-10),
    (KernelFormat::Q4_1, 1e-10),
    (KernelFormat::Q5_0, 1e-10),
    (KernelFormat::Q5_1, 1e-10),
    (KernelFormat::Q8_0, 1e-10),
    (KernelFormat::Q4K, 1e-10),
    (KernelFormat::Q5K, 1e-10),
    (KernelFormat::Q6K, 1e-10),
];

/// NMSE budget of the prefill path above `MAX_MATVEC_TOKENS` (dequantize + cubek's matmul):
/// on tensor-core GPUs cubek multiplies `f32` operands as TF32 (10-bit mantissa, like
/// cuBLAS's default), measured at 4e-8 to 1.3e-7 on the H200; exact `f32` elsewhere.
const PREFILL_NMSE_TOLERANCE: f64 = 1e-6;
/// The same with f16 operands (weights and activations rounded to 11-bit mantissas, f32
/// accumulation), where the device multiplies f16 on its matrix units.
const PREFILL_F16_NMSE_TOLERANCE: f64 = 2e-5;

/// `(rows, blocks per row)` cases: one row of one block, rows that are not a multiple of the
/// cube's rows, several blocks per row. Plain types use column counts that are not a multiple
/// of a cube's lanes instead (the mat-vec reads `x` as vec4, so they stay multiples of 4; odd
/// widths are refused, see `check_errors`).
/// (rows, blocks per row): one block; a few; a full trip of a 32-lane plane's wide K-quant
/// chunks; rows of 37 blocks, more than a trip of any layout (its tail clamped and masked).
const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 3), (37, 8), (5, 37)];
const PLAIN_COLS: &[usize] = &[4, 68, 300, 1028];

// ---------------------------------------------------------------------------------------
// CPU side: random blocks and the scalar oracle.

struct Rng(u64);

impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next_u32() as f32 / u32::MAX as f32)
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform(-1.0, 1.0)).collect()
    }
}

fn cols_of(fmt: KernelFormat, shape_index: usize) -> usize {
    match fmt {
        KernelFormat::F32 | KernelFormat::F16 => PLAIN_COLS[shape_index],
        _ => SHAPES[shape_index].1 * fmt.ggml().block_size(),
    }
}

/// Random GGUF bytes for `rows x cols`: random quants, `f16` headers set to small scales
/// (random header bytes would give NaN/inf).
fn random_weight(rng: &mut Rng, fmt: KernelFormat, rows: usize, cols: usize) -> Vec<u8> {
    let ty = fmt.ggml();
    let half = |v: f32| f16::from_f32(v).to_le_bytes();
    match fmt {
        KernelFormat::F32 => rng
            .vec(rows * cols)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        KernelFormat::F16 => rng.vec(rows * cols).iter().flat_map(|&v| half(v)).collect(),
        _ => {
            let n_blocks = rows * cols / ty.block_size();
            let mut bytes: Vec<u8> = (0..n_blocks * ty.type_size())
                .map(|_| rng.next_u32() as u8)
                .collect();
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                let d = half(rng.uniform(0.001, 0.05));
                let m = half(rng.uniform(-0.05, 0.05));
                match fmt {
                    KernelFormat::Q6K => block[208..210].copy_from_slice(&d),
                    KernelFormat::Q4_0 | KernelFormat::Q5_0 | KernelFormat::Q8_0 => {
                        block[..2].copy_from_slice(&d)
                    }
                    _ => {
                        block[..2].copy_from_slice(&d);
                        block[2..4].copy_from_slice(&m);
                    }
                }
            }
            bytes
        }
    }
}

/// The oracle: `quant::dequantize_row` (ggml's scalar loops) over every row.
fn dequantize_cpu(fmt: KernelFormat, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let ty = fmt.ggml();
    let row_bytes = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
    let mut out = vec![0f32; rows * cols];
    for (src, dst) in bytes
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(cols))
    {
        dequantize_row(ty, src, dst).expect("reference dequantization");
    }
    out
}

/// `Y[t, r] = W[r, :] · X[t, :]` in `f64`.
fn matmul_cpu(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let xt = &x[t * cols..(t + 1) * cols];
            y[t * rows + r] = row
                .iter()
                .zip(xt)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

fn assert_close(case: &str, fmt: KernelFormat, got: &[f32], want: &[f32]) {
    let tol = NMSE_TOLERANCE
        .iter()
        .find(|(f, _)| *f == fmt)
        .expect("every format has a tolerance")
        .1;
    assert_within(case, tol, got, want)
}

fn assert_within(case: &str, tol: f64, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}: length");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{case}: non-finite output {got:?}"
    );
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let norm: f64 = want
        .iter()
        .map(|&w| (w as f64).powi(2))
        .sum::<f64>()
        .max(1e-30);
    let nmse = err / norm;
    assert!(
        nmse <= tol,
        "{case}: nmse {nmse:e} > {tol:e}\n got {:?}\nwant {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

// ---------------------------------------------------------------------------------------
// Device side, generic over the runtime.

struct Case<R: Runtime> {
    client: ComputeClient<R>,
    rng: Rng,
}

impl<R: Runtime> Case<R> {
    fn new(seed: u64) -> Self {
        Self {
            client: R::client(&Default::default()),
            rng: Rng(seed | 1),
        }
    }

    /// Random weight on device, with its CPU dequantization.
    fn weight(&mut self, fmt: KernelFormat, rows: usize, cols: usize) -> (QWeight<R>, Vec<f32>) {
        let bytes = random_weight(&mut self.rng, fmt, rows, cols);
        let w = QWeight::upload(&self.client, fmt.ggml(), rows, cols, &bytes).expect("upload");
        (w, dequantize_cpu(fmt, &bytes, rows, cols))
    }

    fn upload(&self, v: &[f32]) -> cubecl::server::Handle {
        self.client.create_from_slice(f32::as_bytes(v))
    }

    fn read(&self, h: cubecl::server::Handle) -> Vec<f32> {
        let bytes = self.client.read_one(h).expect("read back");
        f32::from_bytes(&bytes).to_vec()
    }

    fn shapes(fmt: KernelFormat) -> impl Iterator<Item = (usize, usize)> {
        (0..SHAPES.len()).map(move |i| (SHAPES[i].0, cols_of(fmt, i)))
    }
}

fn check_matvec<R: Runtime>(fmt: KernelFormat, epilogue: Epilogue) {
    let mut c = Case::<R>::new(0x9E37_79B9 ^ fmt as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (w, wf) = c.weight(fmt, rows, cols);
        let x = c.rng.vec(cols);
        let residual = c.rng.vec(rows);
        let y = c.upload(&residual);
        mm::matvec(&c.client, &w, &c.upload(&x), &y, epilogue).expect("matvec");
        let mut want = matmul_cpu(&wf, rows, cols, &x, 1);
        if epilogue == Epilogue::Accumulate {
            want.iter_mut().zip(&residual).for_each(|(w, r)| *w += r);
        }
        assert_close(
            &format!("matvec {fmt} {rows}x{cols} {epilogue:?}"),
            fmt,
            &c.read(y),
            &want,
        );
    }
}

fn act_cpu(act: GateAct) -> fn(f32) -> f32 {
    match act {
        GateAct::Silu => activation::silu,
        GateAct::GeluTanh => activation::gelu_tanh,
    }
}

fn check_gated<R: Runtime>(fmt: KernelFormat, act: GateAct) {
    let mut c = Case::<R>::new(0x5151 ^ fmt as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (gate, gf) = c.weight(fmt, rows, cols);
        let (up, uf) = c.weight(fmt, rows, cols);
        let x = c.rng.vec(cols);
        let h = c.client.empty(rows * 4);
        mm::matvec_gated(&c.client, &gate, &up, act, &c.upload(&x), &h).expect("gated");
        let g = matmul_cpu(&gf, rows, cols, &x, 1);
        let u = matmul_cpu(&uf, rows, cols, &x, 1);
        let f = act_cpu(act);
        let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| f(g) * u).collect();
        assert_close(
            &format!("gated {act:?} {fmt} {rows}x{cols}"),
            fmt,
            &c.read(h),
            &want,
        );
    }
}

/// RMSNorm folded into the mat-vec and into the SwiGLU mat-vec, against `norm::rms_norm` then
/// the product (coalesced formats; the others must refuse).
fn check_norm_fused<R: Runtime>(fmt: KernelFormat) {
    let mut c = Case::<R>::new(0x4E4F ^ fmt as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (gate, gf) = c.weight(fmt, rows, cols);
        let (up, uf) = c.weight(fmt, rows, cols);
        let x: Vec<f32> = c.rng.vec(cols).iter().map(|v| 3.0 * v).collect();
        let nw: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let mut xn = vec![0.0; cols];
        rocforge_kernels::ops::norm::rms_norm(&x, &nw, 1e-5, &mut xn);
        let (xh, nwh) = (c.upload(&x), c.upload(&nw));
        let y = c.client.empty(rows * 4);
        let h = c.client.empty(rows * 4);
        if !mm::fuses_norm(&c.client, &gate) {
            assert!(mm::matvec_norm(&c.client, &gate, &xh, &nwh, 1e-5, &y).is_err());
            continue;
        }
        mm::matvec_norm(&c.client, &gate, &xh, &nwh, 1e-5, &y).expect("matvec_norm");
        let act = if rows % 2 == 0 {
            GateAct::Silu
        } else {
            GateAct::GeluTanh
        };
        mm::matvec_gated_norm(&c.client, &gate, &up, act, &xh, &nwh, 1e-5, &h).expect("gated_norm");
        let g = matmul_cpu(&gf, rows, cols, &xn, 1);
        let u = matmul_cpu(&uf, rows, cols, &xn, 1);
        let f = act_cpu(act);
        let want_h: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| f(g) * u).collect();
        assert_close(
            &format!("matvec_norm {fmt} {rows}x{cols}"),
            fmt,
            &c.read(y),
            &g,
        );
        assert_close(
            &format!("gated_norm {act:?} {fmt} {rows}x{cols}"),
            fmt,
            &c.read(h),
            &want_h,
        );
    }
}

/// NMSE budget of the mat-vec on half activations (`Fusion::half_x`): `x` rounded to 11-bit
/// mantissas after its block's scaling, products summed in f16 (the wide lanes: up to 16 per
/// half before `f32`, `KernelFormat::half_chain`). The
/// cases below include single-row, single-block outputs whose sums cancel, where the relative
/// error of one value reaches a few 1e-3 (measured on the H200: 4.9e-5 for Q5_0 norm + gated).
const HALF_X_NMSE_TOLERANCE: f64 = 1e-4;
/// The same cases on the `f32` kernel (formats without a half path): the gated product of two
/// sums of inputs spanning 1e-3 to 3e3 loses more than the plain cases' 1e-10 (2.2e-10 seen).
const HALF_X_F32_NMSE_TOLERANCE: f64 = 1e-8;

/// Gated outputs `silu(g) * u` judged through their inputs: each must be `silu(g') * u'` for
/// some `g'`, `u'` within `sqrt(tol)` of the root mean square of `g` (of `u`) around the
/// reference's, the error an NMSE of `tol` allows each dot product. An NMSE on the products
/// themselves would let SiLU's exponential tail turn an input error of 0.4 % at `g = -35` into
/// 14 % of an output of 1e-14 (a one-row case).
fn assert_gated_within(case: &str, tol: f64, got: &[f32], g: &[f32], u: &[f32]) {
    assert_eq!(got.len(), g.len(), "{case}: length");
    let rms =
        |v: &[f32]| (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let (dg, du) = (tol.sqrt() * rms(g), tol.sqrt() * rms(u));
    let silu = |x: f64| x / (1.0 + (-x).exp());
    // SiLU's minimum, where the interval holds it.
    const SILU_MIN_AT: f64 = -1.278_464_542_761_074;
    // Rounding of the largest output, and an f32 output's floor: SiLU far into its tail
    // (1e-67 at g = -160) is 0 in f32.
    let noise = 1e-6
        * g.iter()
            .zip(u)
            .map(|(&g, &u)| (silu(g as f64) * u as f64).abs())
            .fold(0.0, f64::max)
        + f32::MIN_POSITIVE as f64;
    for (i, ((&y, &g), &u)) in got.iter().zip(g).zip(u).enumerate() {
        let (g, u) = (g as f64, u as f64);
        let mut acts = vec![silu(g - dg), silu(g + dg)];
        if (g - dg..=g + dg).contains(&SILU_MIN_AT) {
            acts.push(silu(SILU_MIN_AT));
        }
        let ends: Vec<f64> = acts
            .iter()
            .flat_map(|a| [a * (u - du), a * (u + du)])
            .collect();
        let lo = ends.iter().copied().fold(f64::INFINITY, f64::min) - noise;
        let hi = ends.iter().copied().fold(f64::NEG_INFINITY, f64::max) + noise;
        assert!(
            y.is_finite() && (lo..=hi).contains(&(y as f64)),
            "{case}: row {i}: {y} outside [{lo}, {hi}] (g {g}, u {u}, slack {dg} / {du})"
        );
    }
}

/// The single-token mat-vec on packed-half activations, every fusion it takes (plain,
/// accumulate, norm, gated, gated + norm), against the CPU with `x` in the thousands in one
/// block and tiny in another (the per-block scale must keep both). Formats without a half path
/// take the `f32` kernel through the same call; devices without `f16` skip (wgpu on lavapipe).
/// The K-quants add a row long enough for the long-row split (`api::long_rows`) on this
/// device's planes, one block past the bar so the split planes' trips differ.
fn check_half_x<R: Runtime>(fmt: KernelFormat) {
    let mut c = Case::<R>::new(0x4858 ^ fmt as u64);
    let base = mm::matvec_config(&c.client);
    let long = (fmt.wide_cols() > 32).then(|| {
        let cols = mm::api::long_row_cols(base, fmt) + fmt.ggml().block_size();
        assert!(
            mm::api::long_rows(base, fmt, cols),
            "{fmt} {cols} columns split"
        );
        (3, cols)
    });
    let shapes: Vec<_> = Case::<R>::shapes(fmt).chain(long).collect();
    let max_cols = shapes.iter().map(|s| s.1).max().unwrap_or(0);
    let Some(half) = mm::HalfActs::<R>::forced(&c.client, max_cols) else {
        eprintln!("skipped: the device has no f16");
        return;
    };
    for (rows, cols) in shapes {
        let (gate, gf) = c.weight(fmt, rows, cols);
        let (up, uf) = c.weight(fmt, rows, cols);
        let mut x = c.rng.vec(cols);
        for (i, v) in x.iter_mut().enumerate() {
            match (i / 32) % 3 {
                0 => *v *= 3000.0,
                1 => *v *= 1e-3,
                _ => {}
            }
        }
        let nw: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let mut xn = vec![0.0; cols];
        rocforge_kernels::ops::norm::rms_norm(&x, &nw, 1e-5, &mut xn);
        let (xd, nwd) = (c.upload(&x), c.upload(&nw));
        let residual = c.rng.vec(rows);
        let tol = if fmt.matvec_half() {
            HALF_X_NMSE_TOLERANCE
        } else {
            HALF_X_F32_NMSE_TOLERANCE
        };
        for (norm, gated, acc) in [
            (false, false, false),
            (false, false, true),
            (true, false, false),
            (false, true, false),
            (true, true, false),
        ] {
            let y = c.upload(&residual);
            let op = Matvec {
                up: gated.then_some((&up, GateAct::Silu)),
                norm: norm.then_some((&nwd, 1e-5)),
                epilogue: if acc {
                    Epilogue::Accumulate
                } else {
                    Epilogue::Store
                },
                half: Some(&half),
                ..Matvec::new(&gate, &xd, &y)
            };
            assert_eq!(op.fusion().half_x, fmt.matvec_half(), "{fmt} takes halves");
            mm::launch_matvec(&c.client, &op).expect("half matvec");
            let xin = if norm { &xn } else { &x };
            let g = matmul_cpu(&gf, rows, cols, xin, 1);
            let case = format!("half_x {fmt} {rows}x{cols} norm {norm} gated {gated} acc {acc}");
            if gated {
                let u = matmul_cpu(&uf, rows, cols, xin, 1);
                assert_gated_within(&case, tol, &c.read(y), &g, &u);
                continue;
            }
            let want: Vec<f32> = if acc {
                g.iter().zip(&residual).map(|(g, r)| g + r).collect()
            } else {
                g
            };
            assert_within(&case, tol, &c.read(y), &want);
        }
    }
}

/// The conversion before a half mat-vec (`half_x_kernel`, no f16 type: it runs on every
/// backend): each 32 columns scaled by their largest magnitude, which is stored, rounded to the
/// nearest half, each run of 4 columns stored as the pairs (0, 2), (1, 3); with and without the
/// folded RMSNorm; a block of zeros gives scale 0 and zero halves; values down in f16's
/// subnormal range keep their rounding; the wide lanes' interleaved orders hold the same pieces.
fn check_half_x_conversion<R: Runtime>() {
    let mut c = Case::<R>::new(0x4843);
    let cols = 512;
    let half = mm::HalfActs::<R>::conversion_only(&c.client, cols);
    let mut x = c.rng.vec(cols);
    for (i, v) in x.iter_mut().enumerate() {
        match i / 32 {
            0 => *v *= 3000.0,
            1 => *v = 0.0,
            2 => *v *= if i % 32 == 0 { 1.0 } else { 1e-6 },
            _ => {}
        }
    }
    let nw: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
    let (xd, nwd) = (c.upload(&x), c.upload(&nw));
    for norm in [false, true] {
        let mut want = x.clone();
        if norm {
            rocforge_kernels::ops::norm::rms_norm(&x, &nw, 1e-5, &mut want);
        }
        half.convert(&c.client, &xd, norm.then_some((&nwd, 1e-5)), cols)
            .expect("convert");
        let (bits, scales) = half.read(&c.client).expect("read");
        for b in 0..cols / 32 {
            let block = &want[32 * b..32 * b + 32];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let got = scales[b];
            assert!(
                (got - amax).abs() <= 1e-5 * amax,
                "norm {norm} block {b}: scale {got} vs {amax}"
            );
            for (k, &v) in block.iter().enumerate() {
                // Run r = k / 4; column k % 4 of it sits at half 2 * (k % 2) + (k % 4) / 2.
                let at = 32 * b + 4 * (k / 4) + 2 * (k % 2) + (k % 4) / 2;
                let want_h = if amax > 0.0 {
                    f16::from_f32(v * (1.0 / amax))
                } else {
                    f16::ZERO
                };
                let got_h = f16::from_bits(bits[at]);
                // One half ulp for the norm computed on the device in another order.
                let ulp = f32::from(want_h).abs() * 2f32.powi(-10) + 2f32.powi(-24);
                assert!(
                    (f32::from(got_h) - f32::from(want_h)).abs() <= if norm { ulp } else { 0.0 },
                    "norm {norm} block {b} column {k}: {got_h} vs {want_h}"
                );
            }
        }
    }
    // Interleaved for wide lanes: the same 16-byte pieces, each where `XLayout::piece` puts
    // it (a bijection), with full and partial groups (512 columns: 16 chunks of 32, 8 of 64,
    // 8 of Q6_K's lanes).
    half.convert(&c.client, &xd, None, cols).expect("convert");
    let (columns, _) = half.read(&c.client).expect("read");
    for layout in [
        (32, 6, false),
        (64, 3, false),
        (32, 32, false),
        (64, 4, true),
        (64, 3, true),
    ]
    .map(|(chunk_cols, group, q6k)| mm::XLayout {
        chunk_cols,
        group,
        q6k,
    }) {
        half.convert_as(&c.client, &xd, None, cols, layout)
            .expect("convert");
        let (bits, _) = half.read(&c.client).expect("read");
        let mut seen = vec![false; cols / 8];
        for q in 0..cols / 8 {
            let at = layout.piece(q as u32, cols as u32) as usize;
            assert!(
                !seen[at],
                "{layout:?}: piece {q} lands on a taken place {at}"
            );
            seen[at] = true;
            assert_eq!(
                bits[8 * at..8 * at + 8],
                columns[8 * q..8 * q + 8],
                "{layout:?}: piece {q} at {at}"
            );
        }
    }
    assert!(
        half.convert_as(
            &c.client,
            &xd,
            None,
            96,
            mm::XLayout {
                chunk_cols: 64,
                group: 2,
                q6k: false
            }
        )
        .is_err(),
        "96 columns in 64-column chunks"
    );
    assert!(
        half.convert_as(
            &c.client,
            &xd,
            None,
            320,
            mm::XLayout {
                chunk_cols: 64,
                group: 2,
                q6k: true
            }
        )
        .is_err(),
        "320 columns in Q6_K blocks"
    );
    assert!(
        half.convert_as(
            &c.client,
            &xd,
            None,
            512,
            mm::XLayout {
                chunk_cols: 32,
                group: 2,
                q6k: true
            }
        )
        .is_err(),
        "Q6_K's lanes in 32-column chunks"
    );
    assert!(
        half.convert(&c.client, &xd, None, 33).is_err(),
        "33 columns"
    );
    assert!(
        half.convert(&c.client, &xd, None, 544).is_err(),
        "beyond the buffers"
    );
}

fn check_matmul<R: Runtime>(fmt: KernelFormat, tokens: usize) {
    let mut c = Case::<R>::new(0xABCD ^ (fmt as u64) << 8 ^ tokens as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (w, wf) = c.weight(fmt, rows, cols);
        let x = c.rng.vec(tokens * cols);
        let y = c.client.empty(tokens * rows * 4);
        let scratch = DequantScratch::new(&c.client, rows * cols);
        mm::matmul(&c.client, &w, &c.upload(&x), &y, tokens, Some(&scratch)).expect("matmul");
        let want = matmul_cpu(&wf, rows, cols, &x, tokens);
        let case = format!("matmul {fmt} {tokens}x{rows}x{cols}");
        if tokens > mm::MAX_MATVEC_TOKENS {
            let tol = match scratch.precision() {
                mm::PrefillPrecision::F32 => PREFILL_NMSE_TOLERANCE,
                mm::PrefillPrecision::F16 { .. } => PREFILL_F16_NMSE_TOLERANCE,
            };
            assert_within(&case, tol, &c.read(y), &want);
        } else {
            assert_close(&case, fmt, &c.read(y), &want);
            // Several tokens in both row layouts (`mm::whole_rows` picks by size and device).
            if tokens > 1 {
                let xd = c.upload(&x);
                for whole in [false, true] {
                    let y = c.client.empty(tokens * rows * 4);
                    let op = mm::Matvec {
                        tokens,
                        whole_rows: Some(whole),
                        ..mm::Matvec::new(&w, &xd, &y)
                    };
                    mm::launch_matvec(&c.client, &op).expect("matvec");
                    let case = format!("{case}, whole rows {whole}");
                    assert_close(&case, fmt, &c.read(y), &want);
                }
            }
        }
    }
}

/// The quantized mat-mat on the matrix units, every tile it launches, batches of one partial
/// tile and of several (the output starts as noise, so a missed element shows), against the CPU reference; and the dequantize path it
/// replaces, on the same inputs. Devices without f16 `cmma` (lavapipe) run the latter only.
fn check_mma<R: Runtime>(fmt: KernelFormat) {
    let mut c = Case::<R>::new(0x5EED ^ (fmt as u64) << 8);
    let mma = match mm::prefill_kernel(&c.client, 64) {
        mm::PrefillKernel::Mma(cfg) => Some(cfg),
        mm::PrefillKernel::Dequantize => None,
    };
    if let (Some(cfg), KernelFormat::F32 | KernelFormat::F16) = (mma, fmt) {
        // x is read as f16 in 16-byte vectors: other widths are refused (and `matmul` takes
        // the dequantize path for them).
        let (w, _) = c.weight(fmt, 3, 12);
        let (x, y) = (c.upload(&[0.0; 9 * 12]), c.client.empty(9 * 3 * 4));
        let err = mm::launch_mma(&c.client, &w, &x, &y, 9, cfg).expect_err("12 columns");
        assert!(matches!(err, MatmulError::BadShape { .. }), "{err}");
    }
    // Plain widths rounded up to a multiple of 8, the quantized mat-mat's.
    let shapes = Case::<R>::shapes(fmt).map(|(rows, cols)| (rows, cols.next_multiple_of(8)));
    for (rows, cols) in shapes {
        let (w, wf) = c.weight(fmt, rows, cols);
        for tokens in [9, 40, 77] {
            let x = c.rng.vec(tokens * cols);
            let y0 = c.rng.vec(tokens * rows);
            let xd = c.upload(&x);
            let want = matmul_cpu(&wf, rows, cols, &x, tokens);
            let scratch = DequantScratch::new(&c.client, rows * cols);
            let y = c.client.empty(tokens * rows * 4);
            mm::matmul_dequantized(&c.client, &w, &xd, &y, tokens, Some(&scratch))
                .expect("dequantize path");
            let tol = match scratch.precision() {
                mm::PrefillPrecision::F32 => PREFILL_NMSE_TOLERANCE,
                mm::PrefillPrecision::F16 { .. } => PREFILL_F16_NMSE_TOLERANCE,
            };
            let case = format!("dequantized matmul {fmt} {tokens}x{rows}x{cols}");
            assert_within(&case, tol, &c.read(y), &want);
            let Some(plane) = mma.map(|cfg| cfg.plane) else {
                continue;
            };
            // Every tile the runtime launches, with either step width, staged a slot per
            // load and wide (where the format has a wide staging; else the same kernel).
            let wides: &[bool] = if fmt.mma_quad() > 1 {
                &[false, true]
            } else {
                &[false]
            };
            let cfgs = catalog::mma_configs(plane).into_iter().flat_map(|cfg| {
                [128, 256].into_iter().flat_map(move |k_step| {
                    wides.iter().map(move |&wide| mm::MmaConfig {
                        k_step,
                        wide,
                        ..cfg
                    })
                })
            });
            // The activations as the norm and the gated activation write them for it: f16,
            // each run of 4 in pair order (0, 2, 1, 3).
            let pairs: Vec<half::f16> = (0..x.len())
                .map(|i| half::f16::from_f32(x[if i % 4 == 1 || i % 4 == 2 { i ^ 3 } else { i }]))
                .collect();
            let x16 = c.client.create_from_slice(bytemuck::cast_slice(&pairs));
            for cfg in cfgs {
                let y = c.upload(&y0);
                mm::launch_mma(&c.client, &w, &xd, &y, tokens, cfg).expect("mma");
                let case = format!("mma {fmt} {tokens}x{rows}x{cols} tile {cfg:?}");
                assert_within(&case, PREFILL_F16_NMSE_TOLERANCE, &c.read(y), &want);
                let y = c.upload(&y0);
                mm::launch_mma_half(&c.client, &w, &x16, &y, tokens, cfg).expect("mma half");
                let case = format!("{case}, f16 activations");
                assert_within(&case, PREFILL_F16_NMSE_TOLERANCE, &c.read(y), &want);
                // The columns split over cubes, evenly and not (partials summed after).
                for splits in [2, 3] {
                    let y = c.upload(&y0);
                    mm::launch_mma_split(&c.client, &w, &xd, &y, tokens, cfg, splits)
                        .expect("mma split");
                    let case = format!("{case}, {splits} splits");
                    assert_within(&case, PREFILL_F16_NMSE_TOLERANCE, &c.read(y), &want);
                }
            }
        }
    }
}

fn check_dequantize<R: Runtime>(fmt: KernelFormat) {
    let mut c = Case::<R>::new(0x7777 ^ fmt as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (w, wf) = c.weight(fmt, rows, cols);
        let scratch = DequantScratch::new(&c.client, rows * cols);
        mm::dequantize(&c.client, &w, &scratch).expect("dequantize");
        match scratch.precision() {
            mm::PrefillPrecision::F32 => {
                let got = c.read(scratch.handle().clone());
                assert_eq!(
                    got[..rows * cols],
                    wf[..],
                    "dequantize {fmt} {rows}x{cols} is not exact"
                );
            }
            mm::PrefillPrecision::F16 { .. } => {
                // Each weight rounded once to f16 (the f32 value it decodes to, then f16).
                let bytes = c.client.read_one(scratch.handle().clone()).unwrap();
                let got: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes[..rows * cols * 2]);
                let want: Vec<half::f16> = wf.iter().map(|&v| half::f16::from_f32(v)).collect();
                assert_eq!(
                    got, want,
                    "dequantize {fmt} {rows}x{cols} to f16 is not exact"
                );
            }
        }
    }
}

/// The embedding lookup returns the dequantized rows exactly, by argument and by device ids.
fn check_embed<R: Runtime>(fmt: KernelFormat) {
    let mut c = Case::<R>::new(0x5151 ^ fmt as u64);
    for (rows, cols) in Case::<R>::shapes(fmt) {
        let (w, wf) = c.weight(fmt, rows, cols);
        let ids: Vec<u32> = [rows - 1, 0, rows / 2].iter().map(|&r| r as u32).collect();
        let ids_h = c.client.create_from_slice(u32::as_bytes(&ids));
        let out = c.client.empty(ids.len() * cols * 4);
        mm::embed(&c.client, &w, &ids_h, ids.len(), None, &out).expect("embed");
        let got = c.read(out);
        for (t, &r) in ids.iter().enumerate() {
            let r = r as usize;
            assert_eq!(
                got[t * cols..(t + 1) * cols],
                wf[r * cols..(r + 1) * cols],
                "embed {fmt} {rows}x{cols}: row {r}"
            );
        }
        // The table in two row blocks, one launch per block: each writes its tokens' rows.
        if rows > 1 {
            let bytes = random_weight(&mut c.rng, fmt, rows, cols);
            let wf = dequantize_cpu(fmt, &bytes, rows, cols);
            let (first, row_bytes) = (rows / 2, bytes.len() / rows);
            let out = c.client.empty(ids.len() * cols * 4);
            for (r0, n) in [(0, first), (first, rows - first)] {
                let part = &bytes[r0 * row_bytes..(r0 + n) * row_bytes];
                let block = QWeight::upload(&c.client, fmt.ggml(), n, cols, part).expect("upload");
                mm::embed_rows(&c.client, &block, r0, &ids_h, ids.len(), &out).expect("embed rows");
            }
            let got = c.read(out);
            for (t, &r) in ids.iter().enumerate() {
                let r = r as usize;
                assert_eq!(
                    got[t * cols..(t + 1) * cols],
                    wf[r * cols..(r + 1) * cols],
                    "embed_rows {fmt} {rows}x{cols}: row {r}"
                );
            }
        }
        let one = c.client.empty(cols * 4);
        mm::embed(&c.client, &w, &ids_h, 1, Some(rows as u32 - 1), &one).expect("embed one");
        assert_eq!(
            c.read(one)[..],
            wf[(rows - 1) * cols..],
            "embed {fmt} {rows}x{cols}: token argument"
        );
        assert!(mm::embed(
            &c.client,
            &w,
            &ids_h,
            1,
            Some(rows as u32),
            &c.client.empty(cols * 4)
        )
        .is_err());
    }
}

fn check_errors<R: Runtime>() {
    let c = Case::<R>::new(1);
    let client = &c.client;
    assert!(matches!(
        QWeight::<R>::upload(client, GgmlType::Q4_0, 2, 33, &[0; 36]),
        Err(MatmulError::BadShape { .. })
    ));
    assert!(matches!(
        QWeight::<R>::upload(client, GgmlType::Q4_0, 2, 32, &[0; 35]),
        Err(MatmulError::ByteLength {
            expected: 36,
            got: 35,
            ..
        })
    ));
    assert!(matches!(
        QWeight::<R>::upload(client, GgmlType::Q2K, 1, 256, &[0; 84]),
        Err(MatmulError::UnsupportedType(GgmlType::Q2K))
    ));
    let w = QWeight::<R>::upload(client, GgmlType::Q8_0, 4, 64, &[0; 4 * 2 * 34]).unwrap();
    let small = c.upload(&[0.0; 16]);
    let y = client.empty(16);
    assert!(matches!(
        mm::matvec(client, &w, &small, &y, Epilogue::Store),
        Err(MatmulError::BufferTooSmall {
            what: "x",
            needed: 256,
            ..
        })
    ));
    let w2 = QWeight::<R>::upload(client, GgmlType::Q8_0, 2, 64, &[0; 2 * 2 * 34]).unwrap();
    assert!(matches!(
        mm::matvec_gated(client, &w, &w2, GateAct::Silu, &c.upload(&[0.0; 64]), &y),
        Err(MatmulError::Mismatch(_))
    ));
    // The norm and the gated pair are single-token fusions.
    let x2 = c.upload(&[0.0; 128]);
    let y2 = client.empty(32);
    let op = Matvec {
        tokens: 2,
        norm: Some((&x2, 1e-5)),
        ..Matvec::new(&w, &x2, &y2)
    };
    assert!(matches!(
        mm::launch_matvec(client, &op),
        Err(MatmulError::Fusion(_))
    ));
    // The mat-vec reads `x` as vec4: a plain weight of odd width is refused, not misread.
    let odd = QWeight::<R>::upload(client, GgmlType::F32, 2, 5, &[0; 2 * 5 * 4]).unwrap();
    assert!(matches!(
        mm::matvec(client, &odd, &c.upload(&[0.0; 8]), &y, Epilogue::Store),
        Err(MatmulError::BadShape { cols: 5, .. })
    ));
}

fn check_catalog<R: Runtime>() {
    let c = Case::<R>::new(2);
    let f16 = c
        .client
        .properties()
        .supports_type(half::f16::as_type_native_unchecked());
    for v in catalog::variants() {
        let needs_f16 = match v.kind {
            catalog::KernelKind::Dequantize { f16 } => f16,
            catalog::KernelKind::Matvec { fusion, .. } => fusion.half_x,
            catalog::KernelKind::HalfX { .. } => true,
            _ => false,
        };
        if needs_f16 && !f16 {
            continue;
        }
        catalog::launch_variant(&c.client, &v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
}

macro_rules! format_tests {
    ($runtime:ty; $($name:ident => $fmt:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            const FMT: KernelFormat = KernelFormat::$fmt;
            #[test]
            fn matvec() { check_matvec::<$runtime>(FMT, Epilogue::Store) }
            #[test]
            fn matvec_accumulate() { check_matvec::<$runtime>(FMT, Epilogue::Accumulate) }
            #[test]
            fn swiglu() { check_gated::<$runtime>(FMT, GateAct::Silu) }
            #[test]
            fn geglu() { check_gated::<$runtime>(FMT, GateAct::GeluTanh) }
            #[test]
            fn matmul_small_batch() { check_matmul::<$runtime>(FMT, 3) }
            #[test]
            fn matmul_max_matvec_batch() { check_matmul::<$runtime>(FMT, mm::MAX_MATVEC_TOKENS) }
            #[test]
            fn matmul_prefill() { check_matmul::<$runtime>(FMT, 11) }
            #[test]
            fn mma() { check_mma::<$runtime>(FMT) }
            #[test]
            fn dequantize() { check_dequantize::<$runtime>(FMT) }
            #[test]
            fn embed() { check_embed::<$runtime>(FMT) }
            #[test]
            fn norm_fused() { check_norm_fused::<$runtime>(FMT) }
            #[test]
            fn half_x() { check_half_x::<$runtime>(FMT) }
        }
    )*};
}

macro_rules! runtime_tests {
    ($module:ident, $runtime:ty) => {
        mod $module {
            use super::*;
            #[test]
            fn errors() { check_errors::<$runtime>() }
            #[test]
            fn catalog_variants_launch() { check_catalog::<$runtime>() }
            #[test]
            fn half_x_conversion() { check_half_x_conversion::<$runtime>() }
            format_tests!($runtime;
                f32 => F32, f16 => F16, q4_0 => Q4_0, q4_1 => Q4_1, q5_0 => Q5_0,
                q5_1 => Q5_1, q8_0 => Q8_0, q4_k => Q4K, q5_k => Q5K, q6_k => Q6K);
        }
    };
}

#[cfg(feature = "wgpu")]
runtime_tests!(wgpu, cubecl::wgpu::WgpuRuntime);
// CUDA and HIP instances need the GPU (creating a HIP client without one aborts the process):
// they are compiled only with the `device-tests` feature, e.g. on the H200
// `cargo test --release -p rocforge-kernels --features cuda,device-tests --test matmul_kernels`.
#[cfg(all(feature = "cuda", feature = "device-tests"))]
runtime_tests!(cuda, cubecl::cuda::CudaRuntime);
#[cfg(all(feature = "hip", feature = "device-tests"))]
runtime_tests!(hip, cubecl::hip::HipRuntime);
