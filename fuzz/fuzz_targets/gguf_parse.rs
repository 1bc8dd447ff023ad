//! GGUF parser on arbitrary bytes. Properties: no panic; every tensor's data lies in the file
//! and tensors do not overlap; a parsed file written back by `GgufWriter` parses to the same
//! metadata and tensors.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use rocforge_runtime::gguf::{GgufFile, GgufWriter, DEFAULT_ALIGNMENT};

fuzz_target!(init: common::write_seeds(common::gguf_seeds()), |data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data) else { return };
    let mut end = 0u64;
    for t in file.tensors() {
        assert!(t.offset >= end, "tensor {} overlaps the previous one", t.name);
        assert_eq!(file.tensor_data(t).len() as u64, t.size);
        end = t.offset + t.size;
    }
    // The writer always aligns to 32 bytes: round-trip only files that say the same.
    if file.alignment() != DEFAULT_ALIGNMENT {
        return;
    }
    // Compared as bytes: metadata may hold NaN, which is not equal to itself.
    let written = rewrite(&file);
    let again = GgufFile::from_bytes("again.gguf", &written).expect("a written file parses");
    assert_eq!(rewrite(&again), written);
});

fn rewrite(file: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        w.meta(k, v.clone());
    }
    for t in file.tensors() {
        w.tensor(&t.name, &t.dims, t.ty, file.tensor_data(t).to_vec());
    }
    w.to_bytes()
}
