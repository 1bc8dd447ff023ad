//! GGUF reader/writer round trips and the corpus of broken files.

use rocforge_kernels::GgmlType;
use rocforge_runtime::gguf::{GgufError, GgufFile, GgufWriter, MetaArray, MetaValue};
use rocforge_runtime::testing::{broken_corpus, tiny_model};
use rocforge_runtime::{Error, Model};

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rocforge-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn metadata_and_tensors_round_trip() {
    let mut w = GgufWriter::new();
    w.meta("u8", MetaValue::U8(7))
        .meta("i8", MetaValue::I8(-7))
        .meta("u16", MetaValue::U16(65535))
        .meta("i16", MetaValue::I16(-300))
        .meta("u32", MetaValue::U32(123456))
        .meta("i32", MetaValue::I32(-123456))
        .meta("f32", MetaValue::F32(0.25))
        .meta("bool", MetaValue::Bool(true))
        .meta("str", MetaValue::String("héllo".into()))
        .meta("u64", MetaValue::U64(1 << 40))
        .meta("i64", MetaValue::I64(-(1 << 40)))
        .meta("f64", MetaValue::F64(-2.5))
        .meta("arr_f32", MetaValue::Array(MetaArray::F32(vec![1.0, 2.0])))
        .meta(
            "arr_str",
            MetaValue::Array(MetaArray::String(vec!["a".into(), "".into(), "ccc".into()])),
        )
        .meta(
            "arr_arr",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U8(vec![1, 2]),
                MetaArray::Bool(vec![true]),
            ])),
        );
    let t1: Vec<u8> = (0..4 * 3 * 2).map(|i| i as u8).collect();
    let t2: Vec<u8> = vec![9; 34 * 2];
    w.tensor("a", &[3, 2], GgmlType::F32, t1.clone()).tensor(
        "b",
        &[64],
        GgmlType::Q8_0,
        t2.clone(),
    );
    let p = temp("roundtrip.gguf");
    w.write_file(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata().len(), 15);
    assert_eq!(f.get("u16"), Some(&MetaValue::U16(65535)));
    assert_eq!(f.get("str").and_then(|v| v.as_str()), Some("héllo"));
    assert_eq!(f.get("i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(
        f.get("arr_str"),
        Some(&MetaValue::Array(MetaArray::String(vec![
            "a".into(),
            "".into(),
            "ccc".into()
        ])))
    );
    assert_eq!(
        f.get("arr_arr").and_then(|v| v.as_array()).map(|a| a.len()),
        Some(2)
    );
    let a = f.tensor("a").unwrap();
    assert_eq!(
        (a.ty, a.dims.clone(), a.size),
        (GgmlType::F32, vec![3, 2], 24)
    );
    assert_eq!(f.tensor_data(a), &t1[..]);
    let b = f.tensor("b").unwrap();
    assert_eq!(b.offset % 32, 0);
    assert_eq!(f.tensor_data(b), &t2[..]);
}

#[test]
fn tiny_model_loads_with_expected_config() {
    let p = temp("tiny.gguf");
    tiny_model(GgmlType::Q4_0, 3).write_file(&p).unwrap();
    let m = Model::load(&p).unwrap();
    let c = &m.config;
    assert_eq!(
        (
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            c.n_ff,
            c.n_vocab
        ),
        (2, 64, 4, 2, 16, 160, 320)
    );
    assert!(m.weights.tied_output);
    assert_eq!(m.weights.layers[1].ffn_down.ty, GgmlType::Q4_0);
    assert_eq!(
        (
            m.weights.layers[0].attn_k.rows,
            m.weights.layers[0].attn_k.cols
        ),
        (32, 64)
    );
}

#[test]
fn every_broken_file_gives_its_error() {
    let dir = std::env::temp_dir().join(format!("rocforge-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for b in broken_corpus() {
        let p = dir.join(format!("{}.gguf", b.name));
        std::fs::write(&p, &b.bytes).unwrap();
        let err = Model::load(&p).expect_err(b.name);
        let msg = err.to_string();
        assert!(
            msg.contains(b.expect),
            "{}: message `{msg}` lacks `{}`",
            b.name,
            b.expect
        );
        assert!(
            msg.contains(&p.display().to_string()),
            "{}: message `{msg}` does not name the file",
            b.name
        );
        match (&err, b.name) {
            (Error::Gguf(GgufError::BadMagic { .. }), "bad-magic") => {}
            (Error::Gguf(GgufError::UnsupportedVersion { version: 99, .. }), "bad-version") => {}
            (Error::Gguf(GgufError::AbsurdCount { .. }), n)
                if n.starts_with("absurd") || n == "truncated-header" => {}
            (Error::Gguf(GgufError::Truncated { .. }), n)
                if n.contains("truncated") || n == "empty" || n == "offset-past-end" => {}
            (
                Error::Gguf(GgufError::Tensor { .. }),
                "unknown-tensor-type" | "misaligned-offset" | "overlapping-tensors",
            ) => {}
            (Error::Tensor { .. }, "missing-tensor" | "wrong-shape") => {}
            (Error::UnsupportedArchitecture { .. }, "unsupported-architecture") => {}
            (e, n) => panic!("{n}: unexpected error variant {e:?}"),
        }
    }
}

#[test]
fn every_prefix_of_a_valid_file_is_rejected_without_panic() {
    let good = tiny_model(GgmlType::Q8_0, 1).to_bytes();
    let p = temp("prefix.gguf");
    // Every cut inside the header, then a sample of cuts through the tensor data.
    let header_end = 6000.min(good.len());
    for cut in (0..header_end).chain((header_end..good.len()).step_by(997)) {
        std::fs::write(&p, &good[..cut]).unwrap();
        assert!(
            GgufFile::open(&p).is_err(),
            "a file cut at {cut} of {} bytes was accepted",
            good.len()
        );
    }
}

#[test]
fn missing_file_names_the_path() {
    let err = Model::load("/nonexistent/model.gguf").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}
