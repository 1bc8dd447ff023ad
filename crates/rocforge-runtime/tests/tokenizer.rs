//! Tokenizer tests: tiny hand-made vocabularies for each model type (fast, always run),
//! and golden checks on the real SmolLM2 GGUF against llama.cpp's ids (skipped with a
//! message when the model is absent, failed under `cargo xtask test`).

use std::path::PathBuf;

use rocforge_runtime::testing;
use rocforge_runtime::tokenizer::{ChatMessage, Tokenizer, TokenizerError, TokenizerSpec};

// ---------------------------------------------------------------- tiny vocabularies

/// GPT-2's byte-to-unicode table: the vocabulary text of each byte.
fn byte_level_chars() -> Vec<String> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// Byte-level BPE: the 256 byte chars, a few merged words and digits, and specials.
fn gpt2_spec(pre: &str) -> TokenizerSpec {
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2", "12 3",
        "123 4", "Ġ .",
    ];
    let mut tokens = byte_level_chars();
    let mut types = vec![1; tokens.len()];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for (text, kind) in [
        ("<|endoftext|>", CONTROL),
        ("<|im_start|>", CONTROL),
        ("<|im_end|>", CONTROL),
        ("<tool>", USER_DEFINED),
    ] {
        tokens.push(text.to_string());
        types.push(kind);
    }
    TokenizerSpec {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        merges: merges.iter().map(|m| m.to_string()).collect(),
        bos_id: Some(id_in(&tokens, "<|endoftext|>")),
        eos_id: Some(id_in(&tokens, "<|endoftext|>")),
        tokens,
        token_types: types,
        ..Default::default()
    }
}

/// SentencePiece: unk, bos, eos, 256 byte tokens, then scored pieces.
fn spm_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, CONTROL, CONTROL];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("a", -2.0),
        ("b", -2.0),
        ("c", -2.0),
        ("▁h", -3.0),
        ("ll", -3.0),
        ("▁he", -4.0),
        ("▁hell", -5.0),
        ("▁hello", -6.0),
        ("▁w", -3.0),
        ("or", -2.5),
        ("▁wor", -4.0),
        ("ld", -3.5),
        ("▁world", -5.0),
        ("ab", -1.5),
        ("bc", -1.2),
        ("abc", -1.0),
        ("<|im_start|>", 0.0),
    ];
    for (text, score) in pieces {
        tokens.push(text.into());
        types.push(if text.starts_with("<|") { CONTROL } else { 1 });
        scores.push(score);
    }
    TokenizerSpec {
        model: "llama".into(),
        tokens,
        token_types: types,
        scores,
        ..Default::default()
    }
}

fn id_in(tokens: &[String], text: &str) -> u32 {
    tokens.iter().position(|t| t == text).unwrap() as u32
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text)
        .unwrap_or_else(|| panic!("no token {text:?}"))
}

const VARIED_TEXTS: &[&str] = &[
    "hello world",
    "Hello, World! It's 2024-06-01 and π ≈ 3.14159.",
    "  leading and   multiple   spaces\tand\ttabs\n\nnewlines\r\n",
    "emoji 🦀🚀 and 日本語のテキスト, ünïcödé, Ελληνικά, עברית",
    "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "digits 1234567890 0.5 1e-9 -42",
    "trailing spaces   ",
    "",
];

#[test]
fn gpt2_encodes_words_through_merges() {
    let tok = Tokenizer::from_spec(&gpt2_spec("gpt-2")).unwrap();
    let ids = tok.encode("hello world", false, false).unwrap();
    assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "Ġworld")]);
    assert_eq!(tok.decode(&ids), "hello world");
}

#[test]
fn gpt2_round_trips_varied_text() {
    for pre in [
        "default",
        "gpt-2",
        "smollm",
        "llama-bpe",
        "qwen2",
        "deepseek-llm",
        "no-such-pre",
    ] {
        let tok = Tokenizer::from_spec(&gpt2_spec(pre)).unwrap();
        for text in VARIED_TEXTS {
            let ids = tok.encode(text, false, false).unwrap();
            assert_eq!(tok.detokenize(&ids, true), *text, "pre {pre}");
        }
    }
}

#[test]
fn gpt2_pre_tokenizers_split_digits_as_llama_cpp() {
    let ids = |pre: &str| {
        let tok = Tokenizer::from_spec(&gpt2_spec(pre)).unwrap();
        let ids = tok.encode("1234", false, false).unwrap();
        ids.iter()
            .map(|&i| tok.token_str(i).unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("gpt-2"), ["1234"]);
    assert_eq!(ids("smollm"), ["1", "2", "3", "4"]);
    assert_eq!(ids("qwen2"), ["1", "2", "3", "4"]);
    assert_eq!(ids("llama-bpe"), ["123", "4"]);
    // "default" isolates runs of three ASCII digits last.
    assert_eq!(ids("default"), ["123", "4"]);
}

#[test]
fn gpt2_parse_special_emits_control_tokens() {
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    let text = "<|im_start|>user\nhello<|im_end|>";
    let parsed = tok.encode(text, false, true).unwrap();
    assert_eq!(parsed[0], id(&tok, "<|im_start|>"));
    assert_eq!(*parsed.last().unwrap(), id(&tok, "<|im_end|>"));
    assert_eq!(tok.detokenize(&parsed, true), text);
    // Control tokens print nothing by default.
    assert_eq!(tok.decode(&parsed), "user\nhello");

    let literal = tok.encode(text, false, false).unwrap();
    assert!(!literal.contains(&id(&tok, "<|im_start|>")));
    assert_eq!(tok.decode(&literal), text);
}

#[test]
fn gpt2_user_defined_tokens_always_split() {
    let tok = Tokenizer::from_spec(&gpt2_spec("gpt-2")).unwrap();
    let ids = tok.encode("a<tool>b", false, false).unwrap();
    assert_eq!(ids, vec![id(&tok, "a"), id(&tok, "<tool>"), id(&tok, "b")]);
    assert_eq!(tok.decode(&ids), "a<tool>b");
}

#[test]
fn gpt2_bos_eos_rules() {
    let eot = |tok: &Tokenizer| id(tok, "<|endoftext|>");
    // GPT-2 style: no BOS unless the file says so.
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    assert!(!tok.adds_bos());
    assert_eq!(
        tok.encode("hello", true, false).unwrap(),
        vec![id(&tok, "hello")]
    );
    // Llama 3's pre-tokenizer implies BOS.
    let tok = Tokenizer::from_spec(&gpt2_spec("llama-bpe")).unwrap();
    assert_eq!(
        tok.encode("hello", true, false).unwrap(),
        vec![eot(&tok), id(&tok, "hello")]
    );
    assert_eq!(
        tok.encode("hello", false, false).unwrap(),
        vec![id(&tok, "hello")]
    );
    // The file's flags win.
    let spec = TokenizerSpec {
        add_bos: Some(false),
        add_eos: Some(true),
        ..gpt2_spec("llama-bpe")
    };
    let tok = Tokenizer::from_spec(&spec).unwrap();
    assert_eq!(
        tok.encode("hello", true, false).unwrap(),
        vec![id(&tok, "hello"), eot(&tok)]
    );
}

#[test]
fn gpt2_end_of_generation_set() {
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    assert!(tok.is_eog(id(&tok, "<|im_end|>")));
    assert!(tok.is_eog(id(&tok, "<|endoftext|>")));
    assert!(!tok.is_eog(id(&tok, "<|im_start|>")));
    assert!(!tok.is_eog(id(&tok, "hello")));
    assert!(!tok.is_eog(u32::MAX));
}

#[test]
fn gpt2_clean_spaces_follows_pre_type() {
    let text = "hello .";
    let tok = Tokenizer::from_spec(&gpt2_spec("gpt-2")).unwrap();
    let ids = tok.encode(text, false, false).unwrap();
    assert_eq!(tok.decode(&ids), "hello.");
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    assert_eq!(tok.decode(&tok.encode(text, false, false).unwrap()), text);
}

#[test]
fn stream_holds_back_partial_utf8() {
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    let text = "é🦀<|im_end|>x";
    let ids = tok.encode(text, false, true).unwrap();
    // é is 2 byte tokens and 🦀 is 4: the first byte must print nothing.
    assert_eq!(ids.len(), 2 + 4 + 1 + 1);
    let mut stream = tok.stream();
    let outs: Vec<String> = ids.iter().map(|&i| stream.push(i)).collect();
    assert_eq!(outs, ["", "é", "", "", "", "🦀", "", "x"]);
    assert_eq!(stream.finish(), "");

    let mut special = tok.stream().with_special(true);
    let shown: String = ids.iter().map(|&i| special.push(i)).collect();
    assert_eq!(shown, text);
}

#[test]
fn stream_flushes_invalid_bytes() {
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    let lead = tok.encode("é", false, false).unwrap()[0]; // 0xC3 alone
    let mut stream = tok.stream();
    assert_eq!(stream.push(lead), "");
    assert_eq!(stream.push(id(&tok, "hello")), "\u{FFFD}hello");
    assert_eq!(stream.push(lead), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
}

#[test]
fn spm_merges_by_score_with_space_prefix() {
    let tok = Tokenizer::from_spec(&spm_spec()).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    let ids = tok.encode("hello world", true, false).unwrap();
    assert_eq!(ids, vec![1, id(&tok, "▁hello"), id(&tok, "▁world")]);
    assert_eq!(tok.decode(&ids[1..]), "hello world");
    // "bc" outscores "ab", so "abc" forms from a + bc.
    let ids = tok.encode("abc", false, false).unwrap();
    assert_eq!(ids, vec![id(&tok, "▁"), id(&tok, "abc")]);
}

#[test]
fn spm_byte_fallback_round_trips() {
    let tok = Tokenizer::from_spec(&spm_spec()).unwrap();
    let ids = tok.encode("é", false, false).unwrap();
    assert_eq!(
        ids,
        vec![id(&tok, "▁"), id(&tok, "<0xC3>"), id(&tok, "<0xA9>")]
    );
    for text in VARIED_TEXTS {
        let ids = tok.encode(text, false, false).unwrap();
        // The decoder drops the one space the encoder added.
        assert_eq!(tok.decode(&ids), *text);
    }
}

#[test]
fn spm_special_tokens_and_prefix() {
    let tok = Tokenizer::from_spec(&spm_spec()).unwrap();
    let ids = tok.encode("<|im_start|>hello", false, true).unwrap();
    // Text after a special token gets the space prefix again, as in llama.cpp.
    assert_eq!(ids, vec![id(&tok, "<|im_start|>"), id(&tok, "▁hello")]);
    let spec = TokenizerSpec {
        add_space_prefix: Some(false),
        add_eos: Some(true),
        ..spm_spec()
    };
    let tok = Tokenizer::from_spec(&spec).unwrap();
    assert_eq!(
        tok.encode("abc", true, false).unwrap(),
        vec![1, id(&tok, "abc"), 2]
    );
}

#[test]
fn bad_specs_are_errors() {
    let err = |spec: TokenizerSpec| Tokenizer::from_spec(&spec).unwrap_err();
    assert!(matches!(
        err(TokenizerSpec {
            model: "bert".into(),
            ..gpt2_spec("gpt-2")
        }),
        TokenizerError::UnsupportedModel(_)
    ));
    assert!(matches!(
        err(TokenizerSpec {
            model: "gpt2".into(),
            ..Default::default()
        }),
        TokenizerError::EmptyVocab
    ));
    assert!(matches!(
        err(TokenizerSpec {
            token_types: vec![1, 1],
            ..gpt2_spec("gpt-2")
        }),
        TokenizerError::LengthMismatch { .. }
    ));
    assert!(matches!(
        err(TokenizerSpec {
            scores: vec![0.0],
            ..spm_spec()
        }),
        TokenizerError::LengthMismatch { .. }
    ));
    // As in llama.cpp, a special id outside the vocabulary is a warning and the default id.
    let tok = Tokenizer::from_spec(&TokenizerSpec {
        eos_id: Some(1 << 20),
        ..gpt2_spec("gpt-2")
    })
    .unwrap();
    assert_eq!(tok.warnings().len(), 1, "{:?}", tok.warnings());
    assert!(
        tok.warnings()[0].contains("eos_token_id = 1048576"),
        "{:?}",
        tok.warnings()
    );
    assert!(tok
        .eos_id()
        .is_none_or(|id| (id as usize) < tok.vocab_size()));
    let mut spec = gpt2_spec("gpt-2");
    spec.merges.push("nospace".into());
    assert!(matches!(err(spec), TokenizerError::BadMerge { .. }));
    // A one-token SPM vocabulary has no BOS for llama.cpp's default add_bos.
    let spec = TokenizerSpec {
        model: "llama".into(),
        tokens: vec!["a".into()],
        ..Default::default()
    };
    assert!(matches!(
        err(spec),
        TokenizerError::MissingSpecialToken("bos")
    ));
    let mut spec = spm_spec();
    spec.tokens[3] = "<0xZZ>".into();
    assert!(matches!(err(spec), TokenizerError::BadByteToken { .. }));
}

#[test]
fn out_of_range_ids_decode_to_nothing() {
    let tok = Tokenizer::from_spec(&gpt2_spec("gpt-2")).unwrap();
    assert_eq!(tok.decode(&[u32::MAX, id(&tok, "hello")]), "hello");
    assert_eq!(tok.token_str(u32::MAX), None);
}

#[test]
fn chat_template_renders_and_falls_back_to_chatml() {
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", " Hi "),
    ];
    let template =
        "{% for m in messages %}[{{ m.role | upper }}]{{ m['content'].strip() }}{% endfor %}\
                    {% if add_generation_prompt %}[A]{% endif %}{{ eos_token }}";
    let spec = TokenizerSpec {
        chat_template: Some(template.into()),
        ..gpt2_spec("smollm")
    };
    let tok = Tokenizer::from_spec(&spec).unwrap();
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        "[SYSTEM]Be brief.[USER]Hi[A]<|endoftext|>"
    );

    let chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n";
    let tok = Tokenizer::from_spec(&gpt2_spec("smollm")).unwrap();
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), chatml);
    let broken = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}";
    let spec = TokenizerSpec {
        chat_template: Some(broken.into()),
        ..gpt2_spec("smollm")
    };
    let tok = Tokenizer::from_spec(&spec).unwrap();
    assert!(tok.render_chat_template(&messages, true).unwrap().is_err());
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), chatml);
}

// ---------------------------------------------------------------- real model (SmolLM2)

fn real_tokenizer() -> Option<Tokenizer> {
    let Some(path) = testing::real_model() else {
        testing::skip_or_fail("real model", testing::FETCH_SMOLLM2);
        return None;
    };
    let file = rocforge_runtime::gguf::GgufFile::open(&path).expect("open GGUF");
    Some(Tokenizer::from_spec(&TokenizerSpec::from_gguf(&file)).expect("tokenizer from GGUF"))
}

/// llama.cpp's ids for the SmolLM2 prompts (a copy of shared/refs/smollm2-greedy.json).
fn references() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-greedy.json");
    let text = std::fs::read_to_string(&path).expect("references fixture");
    serde_json::from_str(&text).expect("references parse")
}

fn ids_of(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_matches_llama_cpp_references() {
    let Some(tok) = real_tokenizer() else {
        return;
    };
    let refs = references();
    let cases = refs["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = tok.encode(prompt, true, true).unwrap();
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt {prompt:?}");
        let generated = ids_of(&case["llama_cpp"]["generated_ids"]);
        let expected = case["generated_text_llama_cpp"].as_str().unwrap();
        assert_eq!(tok.decode(&generated), expected);
        let mut stream = tok.stream();
        let mut streamed: String = generated.iter().map(|&i| stream.push(i)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, expected);
    }
}

#[test]
fn smollm2_metadata_and_specials() {
    let Some(tok) = real_tokenizer() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(!tok.adds_bos());
    assert!(tok.is_eog(2) && tok.is_eog(0)); // <|im_end|>, <|endoftext|>
    assert!(!tok.is_eog(1));
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>\n", true, true)
        .unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    // Digits are split one by one.
    let digits = tok.encode("2024", false, true).unwrap();
    assert_eq!(digits.len(), 4);
}

#[test]
fn smollm2_round_trips_varied_text() {
    let Some(tok) = real_tokenizer() else { return };
    let mut texts: Vec<String> = VARIED_TEXTS.iter().map(|t| t.to_string()).collect();
    texts.push("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n".into());
    for text in &texts {
        let ids = tok.encode(text, false, true).unwrap();
        assert_eq!(tok.detokenize(&ids, true), *text);
        let mut stream = tok.stream().with_special(true);
        let mut streamed: String = ids.iter().map(|&i| stream.push(i)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, *text);
    }
}

#[test]
fn smollm2_chat_template() {
    let Some(tok) = real_tokenizer() else { return };
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

// ---------------------------------------------------------------- real model (Gemma 3)

/// The Gemma-3-270M tokenizer: SentencePiece-style, 262,144 tokens, BOS added, no space
/// prefix; the first real vocabulary for the SPM tokenizer.
fn gemma3_tokenizer() -> Option<Tokenizer> {
    let Some(path) = rocforge_runtime::testing::real_gemma3() else {
        eprintln!("skipped: Gemma 3 GGUF not found (cargo xtask fetch-model gemma3, or set ROCFORGE_GEMMA3_MODEL)");
        return None;
    };
    let file = rocforge_runtime::gguf::GgufFile::open(&path).expect("open GGUF");
    Some(Tokenizer::from_spec(&TokenizerSpec::from_gguf(&file)).expect("tokenizer from GGUF"))
}

#[test]
fn gemma3_matches_llama_cpp_references() {
    let Some(tok) = gemma3_tokenizer() else {
        return;
    };
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    assert!(tok.adds_bos());
    let path = rocforge_runtime::testing::refs_file("gemma3-greedy.json");
    let cases = rocforge_runtime::testing::llama_cpp_refs(&path).unwrap();
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let ids = tok.encode(&case.prompt, true, true).unwrap();
        assert_eq!(ids, case.prompt_ids, "prompt {:?}", case.prompt);
        assert_eq!(
            tok.decode(&case.llama_cpp.generated_ids),
            case.generated_text
        );
    }
}

#[test]
fn gemma3_round_trips_varied_text() {
    let Some(tok) = gemma3_tokenizer() else {
        return;
    };
    for text in VARIED_TEXTS {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(tok.detokenize(&ids, false), *text, "{ids:?}");
    }
    // No space prefix: a leading word and the same word after a space are different tokens.
    let (bare, spaced) = (
        tok.encode("France", false, false).unwrap(),
        tok.encode(" France", false, false).unwrap(),
    );
    assert_eq!(bare.len(), 1);
    assert_ne!(bare, spaced);
}
