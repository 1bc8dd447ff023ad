//! Golden tests of the quant formats against gguf-py (fixtures written by
//! `fixtures/make_quant_fixtures.py` from real model blocks), and of the fast dot products
//! against the plain oracle. Needs only the committed fixtures.

use std::path::PathBuf;

use rocforge_kernels::quant::fast::{
    matmul_with, vec_dot_tolerance, vec_dot_with, Isa, VEC_DOT_TOLERANCE,
};
use rocforge_kernels::quant::{
    dequantize_row, dot_ref, matmul, matvec, quantize_row, vec_dot, PreparedActs, QuantError,
};
use rocforge_kernels::GgmlType;

struct Fixture {
    kind: String,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    stem: String,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn type_by_name(name: &str) -> GgmlType {
    (0..64)
        .filter_map(GgmlType::from_id)
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn manifest() -> Vec<Fixture> {
    let text = std::fs::read_to_string(fixture_dir().join("manifest.txt")).expect("manifest.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            Fixture {
                kind: f[0].into(),
                ty: type_by_name(f[1]),
                rows: f[2].parse().unwrap(),
                cols: f[3].parse().unwrap(),
                stem: f[4].into(),
            }
        })
        .collect()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn dequant_fixtures() -> Vec<Fixture> {
    manifest()
        .into_iter()
        .filter(|f| f.kind == "dequant")
        .collect()
}

/// Deterministic activations (xorshift, roughly normal: sum of four uniforms).
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| (next() + next() + next() + next()) * 2.0)
        .collect()
}

/// A weight matrix of `rows` rows built from a fixture's real blocks, shuffled
/// deterministically so rows differ: (bytes, cols).
fn matrix_from_fixture(f: &Fixture, rows: usize) -> (Vec<u8>, usize) {
    let bin = read(&format!("{}.bin", f.stem));
    let bsize = f.ty.type_size();
    let blocks: Vec<&[u8]> = bin.chunks_exact(bsize).collect();
    let per_row = f.cols / f.ty.block_size();
    let mut out = Vec::with_capacity(rows * per_row * bsize);
    for i in 0..rows * per_row {
        out.extend_from_slice(blocks[(i * 7 + i / blocks.len()) % blocks.len()]);
    }
    (out, f.cols)
}

#[test]
fn fixtures_cover_every_supported_weight_type() {
    let covered: Vec<GgmlType> = dequant_fixtures().iter().map(|f| f.ty).collect();
    for ty in (0..64)
        .filter_map(GgmlType::from_id)
        .filter(|t| t.is_supported_weight())
    {
        assert!(covered.contains(&ty), "no dequant fixture for {ty}");
        assert!(vec_dot_tolerance(ty).is_some(), "no tolerance for {ty}");
    }
    assert_eq!(VEC_DOT_TOLERANCE.len(), covered.len());
}

#[test]
fn dequant_equals_gguf_py_exactly() {
    for f in dequant_fixtures() {
        let bin = read(&format!("{}.bin", f.stem));
        let want = read_f32(&format!("{}.f32", f.stem));
        let row_bytes = f.ty.row_bytes(f.cols as u64).unwrap() as usize;
        assert_eq!(bin.len(), f.rows * row_bytes, "{}", f.stem);
        for r in 0..f.rows {
            let mut got = vec![0f32; f.cols];
            dequantize_row(f.ty, &bin[r * row_bytes..(r + 1) * row_bytes], &mut got).unwrap();
            for (i, (g, w)) in got
                .iter()
                .zip(&want[r * f.cols..(r + 1) * f.cols])
                .enumerate()
            {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{} row {r} element {i}: {g} vs {w}",
                    f.ty
                );
            }
        }
        // The whole fixture as one long row gives the same values.
        let mut all = vec![0f32; f.rows * f.cols];
        dequantize_row(f.ty, &bin, &mut all).unwrap();
        assert!(
            all.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}",
            f.ty
        );
    }
}

#[test]
fn dequant_of_unaligned_bytes_is_the_same() {
    for f in dequant_fixtures() {
        let bin = read(&format!("{}.bin", f.stem));
        let mut shifted = vec![0u8; bin.len() + 1];
        shifted[1..].copy_from_slice(&bin);
        let (mut a, mut b) = (vec![0f32; f.rows * f.cols], vec![0f32; f.rows * f.cols]);
        dequantize_row(f.ty, &bin, &mut a).unwrap();
        dequantize_row(f.ty, &shifted[1..], &mut b).unwrap();
        assert_eq!(a, b, "{}", f.ty);
    }
}

#[test]
fn quantizers_equal_gguf_py_bytes() {
    let input = read_f32("quantize_input.f32");
    let fixtures: Vec<Fixture> = manifest()
        .into_iter()
        .filter(|f| f.kind == "quantize")
        .collect();
    assert!(fixtures.len() >= 5);
    for f in fixtures {
        let want = read(&format!("{}.bin", f.stem));
        let row_bytes = f.ty.row_bytes(f.cols as u64).unwrap() as usize;
        for r in 0..f.rows {
            let mut got = vec![0u8; row_bytes];
            quantize_row(f.ty, &input[r * f.cols..(r + 1) * f.cols], &mut got).unwrap();
            let want = &want[r * row_bytes..(r + 1) * row_bytes];
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "{} row {r}: first differing byte {i} (block {})",
                    f.ty,
                    i / f.ty.type_size()
                );
            }
        }
    }
}

/// Normalised error of a fast dot against the oracle: `|fast - ref| / sum |w_i x_i|`.
fn normalised_error(ty: GgmlType, row: &[u8], x: &[f32], fast: f32) -> f64 {
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, row, &mut w).unwrap();
    let scale: f64 = w
        .iter()
        .zip(x)
        .map(|(&w, &x)| (w as f64 * x as f64).abs())
        .sum();
    let reference = dot_ref(ty, row, x).unwrap() as f64;
    (fast as f64 - reference).abs() / scale.max(f64::MIN_POSITIVE)
}

#[test]
fn vec_dot_matches_dot_ref_within_tolerance() {
    for f in dequant_fixtures() {
        let tol = vec_dot_tolerance(f.ty).unwrap();
        for (rows, seed) in [(f.rows, 1), (7, 2)] {
            let (w, cols) = matrix_from_fixture(&f, rows);
            let row_bytes = w.len() / rows;
            let x = activations(cols, seed);
            let mut acts = PreparedActs::new();
            acts.prepare(f.ty, &x).unwrap();
            for isa in Isa::available() {
                let mut worst = 0f64;
                for r in 0..rows {
                    let row = &w[r * row_bytes..(r + 1) * row_bytes];
                    let fast = vec_dot_with(isa, f.ty, row, &acts).unwrap();
                    assert!(fast.is_finite(), "{} {isa:?} row {r}", f.ty);
                    worst = worst.max(normalised_error(f.ty, row, &x, fast));
                }
                eprintln!("{:>5} {isa:?} rows {rows}: worst normalised error {worst:.2e} (budget {tol:.0e})", f.ty);
                assert!(
                    worst <= tol,
                    "{} {isa:?}: normalised error {worst:.3e} > {tol:.0e}",
                    f.ty
                );
            }
        }
    }
}

/// Every instruction set against the oracle on rows of odd block counts (1, 3, 5, 7 blocks:
/// no even-block unrolling can hide a missed tail), in batches of 1 to 9 tokens (the batched
/// kernels take tokens in groups of four plus a remainder).
#[test]
fn every_isa_matches_dot_ref_at_odd_lengths() {
    eprintln!(
        "instruction sets here: {:?} (matmul uses {})",
        Isa::available(),
        rocforge_kernels::quant::simd_level()
    );
    for f in dequant_fixtures() {
        let tol = vec_dot_tolerance(f.ty).unwrap();
        let bin = read(&format!("{}.bin", f.stem));
        let bsize = f.ty.type_size();
        for n_blocks in [1usize, 3, 5, 7] {
            let cols = n_blocks * f.ty.block_size();
            let rows = 3;
            let blocks = bin.len() / bsize;
            let w: Vec<u8> = (0..rows * n_blocks)
                .flat_map(|i| {
                    let b = (i * 5 + 1) % blocks;
                    bin[b * bsize..(b + 1) * bsize].iter().copied()
                })
                .collect();
            let xs: Vec<Vec<f32>> = (0..9).map(|t| activations(cols, 40 + t)).collect();
            let tokens: Vec<PreparedActs> = xs
                .iter()
                .map(|x| {
                    let mut a = PreparedActs::new();
                    a.prepare(f.ty, x).unwrap();
                    a
                })
                .collect();
            for isa in Isa::available() {
                for n_tok in [1, 4, 5, 9] {
                    let mut out = vec![0f32; rows * n_tok];
                    matmul_with(isa, f.ty, &w, rows, cols, &tokens[..n_tok], &mut out).unwrap();
                    for t in 0..n_tok {
                        for r in 0..rows {
                            let row = &w[r * n_blocks * bsize..(r + 1) * n_blocks * bsize];
                            let got = out[t * rows + r];
                            let err = normalised_error(f.ty, row, &xs[t], got);
                            assert!(
                                got.is_finite() && err <= tol,
                                "{} {isa:?} {n_blocks} blocks, {n_tok} tokens, token {t} row {r}: error {err:.3e} > {tol:.0e}",
                                f.ty
                            );
                        }
                    }
                }
            }
        }
    }
}

/// AVX2 and AVX-512 VNNI differ only in how bytes are multiplied; both sum integers exactly,
/// so their results are bit for bit equal.
#[test]
fn avx2_and_avx512_vnni_agree_bit_for_bit() {
    if !Isa::available().contains(&Isa::Avx512Vnni) {
        eprintln!("AVX-512 VNNI not on this CPU: nothing to compare");
        return;
    }
    for f in dequant_fixtures() {
        let rows = 11;
        let (w, cols) = matrix_from_fixture(&f, rows);
        let tokens: Vec<PreparedActs> = (0..6)
            .map(|t| {
                let mut a = PreparedActs::new();
                a.prepare(f.ty, &activations(cols, 70 + t)).unwrap();
                a
            })
            .collect();
        let run = |isa| {
            let mut out = vec![0f32; rows * tokens.len()];
            matmul_with(isa, f.ty, &w, rows, cols, &tokens, &mut out).unwrap();
            out
        };
        let (a, b) = (run(Isa::Avx2), run(Isa::Avx512Vnni));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{} output {i}: avx2 {a} vnni {b}",
                f.ty
            );
        }
    }
}

#[test]
fn isas_agree_closely() {
    let isas = Isa::available();
    for f in dequant_fixtures() {
        let (w, cols) = matrix_from_fixture(&f, 5);
        let mut acts = PreparedActs::new();
        acts.prepare(f.ty, &activations(cols, 9)).unwrap();
        for row in w.chunks_exact(w.len() / 5) {
            let v: Vec<f32> = isas
                .iter()
                .map(|&isa| vec_dot_with(isa, f.ty, row, &acts).unwrap())
                .collect();
            for x in &v[1..] {
                assert!(
                    (x - v[0]).abs() <= 1e-4 * (1.0 + v[0].abs()),
                    "{}: {v:?}",
                    f.ty
                );
            }
        }
    }
}

#[test]
fn matvec_equals_per_row_vec_dot_and_matmul_equals_matvecs() {
    for f in dequant_fixtures() {
        // Enough rows to split into several parallel chunks; odd on purpose.
        let rows = 301;
        let (w, cols) = matrix_from_fixture(&f, rows);
        let row_bytes = w.len() / rows;
        let tokens: Vec<PreparedActs> = (0..19)
            .map(|t| {
                let mut a = PreparedActs::new();
                a.prepare(f.ty, &activations(cols, 100 + t)).unwrap();
                a
            })
            .collect();
        let mut mv = vec![0f32; rows];
        matvec(f.ty, &w, rows, cols, &tokens[0], &mut mv).unwrap();
        for r in 0..rows {
            let d = vec_dot(f.ty, &w[r * row_bytes..(r + 1) * row_bytes], &tokens[0]).unwrap();
            assert_eq!(mv[r].to_bits(), d.to_bits(), "{} row {r}", f.ty);
        }
        for isa in Isa::available() {
            let mut mm = vec![0f32; rows * tokens.len()];
            matmul_with(isa, f.ty, &w, rows, cols, &tokens, &mut mm).unwrap();
            for (t, acts) in tokens.iter().enumerate() {
                let mut one = vec![0f32; rows];
                matmul_with(
                    isa,
                    f.ty,
                    &w,
                    rows,
                    cols,
                    std::slice::from_ref(acts),
                    &mut one,
                )
                .unwrap();
                assert_eq!(
                    &mm[t * rows..(t + 1) * rows],
                    &one[..],
                    "{} {isa:?} token {t}",
                    f.ty
                );
            }
        }
        // Unaligned weights give the same answer.
        let mut shifted = vec![0u8; w.len() + 1];
        shifted[1..].copy_from_slice(&w);
        let mut mv2 = vec![0f32; rows];
        matvec(f.ty, &shifted[1..], rows, cols, &tokens[0], &mut mv2).unwrap();
        assert_eq!(mv, mv2, "{}", f.ty);
    }
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let ty = GgmlType::Q4_1;
    let (rows, cols) = (3, 64);
    let w = vec![0u8; rows * 40];
    let mut acts = PreparedActs::new();
    acts.prepare(ty, &activations(cols, 1)).unwrap();
    let mut out = vec![0f32; rows];
    assert!(matvec(ty, &w, rows, cols, &acts, &mut out).is_ok());
    assert!(matches!(
        matvec(ty, &w[1..], rows, cols, &acts, &mut out),
        Err(QuantError::Length { .. })
    ));
    assert!(matvec(ty, &w, rows, cols, &acts, &mut out[1..]).is_err());
    assert!(matvec(ty, &w, rows, cols + 32, &acts, &mut out).is_err());
    assert!(matvec(ty, &w, rows, 48, &acts, &mut out).is_err());
    assert!(matches!(
        matvec(GgmlType::Q8_0, &w, rows, cols, &acts, &mut out),
        Err(QuantError::ActsType { .. })
    ));
    assert!(matvec(GgmlType::Q2K, &w, rows, cols, &acts, &mut out).is_err());
    assert!(matmul(ty, &w, rows, cols, &[acts.clone(), acts.clone()], &mut out).is_err());
    assert!(vec_dot(ty, &w[..39], &acts).is_err());
    assert!(acts.prepare(ty, &[0.0; 33]).is_err());
    assert!(acts.prepare(GgmlType::Q4K, &[0.0; 64]).is_err());
    assert!(acts.prepare(GgmlType::I8, &[0.0; 64]).is_err());
    assert!(dot_ref(ty, &w[..40], &[0.0; 63]).is_err());
    assert!(quantize_row(GgmlType::Q8_1, &[0.0; 32], &mut [0u8; 34]).is_err());
    assert!(dequantize_row(GgmlType::Q6K, &[0u8; 210], &mut [0f32; 255]).is_err());
    // Empty inputs are fine.
    let mut empty = PreparedActs::new();
    empty.prepare(ty, &[]).unwrap();
    assert_eq!(vec_dot(ty, &[], &empty).unwrap(), 0.0);
    let mut out0 = vec![1f32; 2];
    matvec(ty, &[], 2, 0, &empty, &mut out0).unwrap();
    assert_eq!(out0, [0.0, 0.0]);
}
