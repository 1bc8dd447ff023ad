//! Tokenizer on arbitrary small vocabularies and arbitrary text. Properties: building fails
//! cleanly or gives a tokenizer whose encodings hold only ids inside the vocabulary and
//! decode without panic; on a complete byte-level vocabulary (the tiny models'),
//! decode(encode(text)) == text.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rocforge_kernels::GgmlType;
use rocforge_runtime::gguf::GgufFile;
use rocforge_runtime::testing::tiny_model;
use rocforge_runtime::tokenizer::TokenizerSpec;
use rocforge_runtime::Tokenizer;

#[derive(Arbitrary, Debug)]
struct Input {
    spm: bool,
    pre: Option<String>,
    tokens: Vec<String>,
    token_types: Vec<i32>,
    scores: Vec<f32>,
    /// Merges as pairs of token indices (most are then valid), plus raw strings.
    merge_pairs: Vec<(u8, u8)>,
    raw_merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eot: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    add_space_prefix: Option<bool>,
    text: String,
    add_special: bool,
    parse_special: bool,
}

fn tiny_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let file =
            GgufFile::from_bytes("tiny.gguf", &tiny_model(GgmlType::Q8_0, 1).to_bytes()).unwrap();
        Tokenizer::from_spec(&TokenizerSpec::from_gguf(&file)).unwrap()
    })
}

fn check(tok: &Tokenizer, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
    let Ok(ids) = tok.encode(text, add_special, parse_special) else {
        return Vec::new();
    };
    for &id in &ids {
        assert!(
            (id as usize) < tok.vocab_size(),
            "id {id} outside a vocabulary of {}",
            tok.vocab_size()
        );
    }
    let _ = tok.decode(&ids);
    let mut stream = tok.stream();
    for &id in &ids {
        stream.push(id);
    }
    stream.finish();
    ids
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    [
        "",
        "hello world",
        "<|im_start|>user\nHi<|im_end|>",
        "  spaces\tand\nnewlines  ",
        "héllo wörld 🎉 日本語",
        "\u{0}\u{ff}",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| (format!("text-{i}"), t.as_bytes().to_vec()))
    .collect()
}

fuzz_target!(init: common::write_seeds(seeds()), |data: &[u8]| {
    // The raw bytes as text on the tiny model's complete byte-level vocabulary: exact round trip.
    if let Ok(text) = std::str::from_utf8(data) {
        let tok = tiny_tokenizer();
        let ids = check(tok, text, false, false);
        assert_eq!(tok.decode(&ids), text, "round trip of {text:?} through {ids:?}");
        check(tok, text, true, true);
    }
    // The same bytes as a structured arbitrary vocabulary.
    let Ok(input) = Input::arbitrary(&mut arbitrary::Unstructured::new(data)) else { return };
    let n = input.tokens.len().max(1);
    let mut merges: Vec<String> = input
        .merge_pairs
        .iter()
        .filter_map(|&(a, b)| Some(format!("{} {}", input.tokens.get(a as usize % n)?, input.tokens.get(b as usize % n)?)))
        .collect();
    merges.extend(input.raw_merges);
    let spec = TokenizerSpec {
        model: if input.spm { "llama" } else { "gpt2" }.into(),
        pre: input.pre,
        tokens: input.tokens,
        token_types: input.token_types,
        scores: input.scores,
        merges,
        bos_id: input.bos,
        eos_id: input.eos,
        unk_id: input.unk,
        pad_id: None,
        eot_id: input.eot,
        add_bos: input.add_bos,
        add_eos: input.add_eos,
        add_space_prefix: input.add_space_prefix,
        chat_template: None,
    };
    let Ok(tok) = Tokenizer::from_spec(&spec) else { return };
    check(&tok, &input.text, input.add_special, input.parse_special);
});
