//! Model loading from a tiny model whose metadata the fuzzer rewrites (hyperparameters,
//! tokenizer tables, special ids, types), then one CPU forward at ctx <= 16 of up to 8
//! arbitrary token ids in batches of up to 8 (longer prompts run the same code on more rows,
//! and the forward pass dominates an execution's cost). Properties: no panic; a model that loads
//! evaluates or returns an error; ids sampled from its logits are inside the vocabulary.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rocforge_kernels::GgmlType;
use rocforge_runtime::gguf::{GgufFile, GgufWriter, MetaArray, MetaValue};
use rocforge_runtime::testing::tiny_model;
use rocforge_runtime::{BackendKind, BackendOptions, Model, Sampler, SamplerConfig, Session};

const QUANTS: [GgmlType; 4] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::F16,
];

const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.feed_forward_length",
    "llama.vocab_size",
    "llama.context_length",
    "llama.rope.dimension_count",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
];

#[derive(Arbitrary, Debug)]
enum Value {
    Remove,
    U32(u32),
    U64(u64),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    /// The existing array with one element replaced.
    PatchString(u16, String),
    PatchI32(u16, i32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    quant: u8,
    edits: Vec<(u8, Value)>,
    /// Drop this tensor (index into the table).
    drop_tensor: Option<u8>,
    tokens: Vec<u16>,
    ctx: u8,
    batch: u8,
    all_logits: bool,
    temperature: u8,
}

fn bases() -> &'static [GgufFile] {
    static B: OnceLock<Vec<GgufFile>> = OnceLock::new();
    B.get_or_init(|| {
        QUANTS
            .iter()
            .map(|&q| GgufFile::from_bytes("tiny.gguf", &tiny_model(q, 1).to_bytes()).unwrap())
            .collect()
    })
}

fn apply(meta: &mut Vec<(String, MetaValue)>, key: &str, v: Value) {
    let pos = meta.iter().position(|(k, _)| k == key);
    let new = match v {
        Value::Remove => {
            if let Some(i) = pos {
                meta.remove(i);
            }
            return;
        }
        Value::U32(x) => MetaValue::U32(x),
        Value::U64(x) => MetaValue::U64(x),
        Value::I32(x) => MetaValue::I32(x),
        Value::F32(x) => MetaValue::F32(x),
        Value::Bool(x) => MetaValue::Bool(x),
        Value::Str(x) => MetaValue::String(x),
        Value::Strings(x) => MetaValue::Array(MetaArray::String(x)),
        Value::I32s(x) => MetaValue::Array(MetaArray::I32(x)),
        Value::F32s(x) => MetaValue::Array(MetaArray::F32(x)),
        Value::PatchString(i, s) => match pos.map(|p| meta[p].1.clone()) {
            Some(MetaValue::Array(MetaArray::String(mut v))) if !v.is_empty() => {
                let n = v.len();
                v[i as usize % n] = s;
                MetaValue::Array(MetaArray::String(v))
            }
            _ => return,
        },
        Value::PatchI32(i, x) => match pos.map(|p| meta[p].1.clone()) {
            Some(MetaValue::Array(MetaArray::I32(mut v))) if !v.is_empty() => {
                let n = v.len();
                v[i as usize % n] = x;
                MetaValue::Array(MetaArray::I32(v))
            }
            _ => return,
        },
    };
    match pos {
        Some(i) => meta[i].1 = new,
        None => meta.push((key.to_string(), new)),
    }
}

fn build(input: &mut Input) -> Vec<u8> {
    let base = &bases()[input.quant as usize % QUANTS.len()];
    let mut meta: Vec<(String, MetaValue)> = base.metadata().to_vec();
    for (k, v) in input.edits.drain(..) {
        apply(&mut meta, KEYS[k as usize % KEYS.len()], v);
    }
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.meta(&k, v);
    }
    for (i, t) in base.tensors().iter().enumerate() {
        if input.drop_tensor.map(usize::from) != Some(i) {
            w.tensor(&t.name, &t.dims, t.ty, base.tensor_data(t).to_vec());
        }
    }
    w.to_bytes()
}

/// Most ids one input evaluates; the context and batch are at most twice and once that.
const MAX_TOKENS: usize = 8;

fuzz_target!(init: {
    common::one_thread();
    common::write_seeds(common::gguf_seeds())
}, |data: &[u8]| {
    let Ok(mut input) = Input::arbitrary(&mut arbitrary::Unstructured::new(data)) else { return };
    let bytes = build(&mut input);
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", &bytes) else { return };
    let Ok(model) = Model::from_gguf(file) else { return };
    let model = std::sync::Arc::new(model);
    let n_vocab = model.config.n_vocab;
    assert_eq!(model.tokenizer.vocab_size(), n_vocab);
    let opts = BackendOptions {
        ctx: 1 + input.ctx as usize % (2 * MAX_TOKENS),
        max_batch: 1 + input.batch as usize % MAX_TOKENS,
    };
    let Ok(mut session) = Session::new(model.clone(), BackendKind::Cpu, opts.clone()) else { return };
    // A few ids past the vocabulary too: they must be refused, not read out of bounds.
    let tokens: Vec<u32> = input.tokens.iter().take(opts.ctx.min(MAX_TOKENS)).map(|&t| t as u32 % (n_vocab as u32 + 2)).collect();
    let result = if input.all_logits {
        session.eval_all_logits(&tokens, |_, row| assert_eq!(row.len(), n_vocab))
    } else {
        session.prefill(&tokens)
    };
    if result.is_ok() {
        let cfg = SamplerConfig { temperature: input.temperature as f32 / 64.0, ..Default::default() };
        let mut sampler = Sampler::new(cfg).unwrap();
        let id = session.sample(&mut sampler).expect("sampling after a successful prefill");
        assert!((id as usize) < n_vocab);
    }
});
