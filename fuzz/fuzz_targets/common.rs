//! Shared by the fuzz targets: seed corpora written on request, from the test fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use rocforge_kernels::GgmlType;
use rocforge_runtime::testing::{broken_corpus, tiny_model};

/// `cargo xtask fuzz` sets this to the target's corpus directory so that each target writes
/// its seeds there before fuzzing.
pub fn seed_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("ROCFORGE_FUZZ_SEED_DIR")?);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// One rayon thread: a fuzz run starts one process per core, and the CPU backend's matmuls on
/// tiny models cost more in thread hand-offs than in arithmetic. Call first in `init`.
pub fn one_thread() {
    std::env::set_var("RAYON_NUM_THREADS", "1");
}

pub fn write_seeds(seeds: impl IntoIterator<Item = (String, Vec<u8>)>) {
    if let Some(dir) = seed_dir() {
        for (name, bytes) in seeds {
            let _ = std::fs::write(dir.join(format!("seed-{name}")), bytes);
        }
    }
}

/// Valid tiny models in several formats, and every file of the broken corpus.
pub fn gguf_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::F16,
    ]
    .into_iter()
    .map(|q| (format!("tiny-{q}"), tiny_model(q, 1).to_bytes()))
    .collect();
    out.extend(
        broken_corpus()
            .into_iter()
            .map(|b| (b.name.to_string(), b.bytes)),
    );
    out
}
