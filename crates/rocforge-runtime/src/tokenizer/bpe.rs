//! Byte-level BPE ("gpt2" vocabularies) through the `tokenizers` crate: BPE model from the
//! GGUF vocab and merges, and the pre-tokenizer regexes that llama.cpp ties to
//! `tokenizer.ggml.pre` (`llm_tokenizer_bpe`), each applied as an isolating split, then
//! the byte-to-unicode mapping. Special tokens never reach this model: `Vocab::partition`
//! cuts them out first, as llama.cpp does.

use std::collections::HashSet;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::vocab::{PreFlags, Vocab};
use super::TokenizerError;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

const DEFAULT_REGEXES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    // Six letters are escaped: their canonical equivalents would break the ranges.
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
const DEEPSEEK_CODER: &[&str] = &[
    "[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
];

/// The regexes and flags of one llama.cpp pre-tokenizer type.
#[derive(Debug, Clone, Copy)]
pub struct PreTokenizerConfig {
    pub regexes: &'static [&'static str],
    pub flags: PreFlags,
}

/// Maps `tokenizer.ggml.pre` to llama.cpp's settings. A missing or unknown name gets
/// llama.cpp's "default" type (llama.cpp warns on a missing name and refuses an unknown
/// one; we tokenize with the default rather than refuse a model).
pub fn pre_tokenizer_config(pre: Option<&str>) -> PreTokenizerConfig {
    let flags = |add_bos, clean_spaces, ignore_merges| PreFlags {
        add_bos,
        clean_spaces,
        ignore_merges,
    };
    let (regexes, flags): (&'static [&'static str], PreFlags) = match pre.unwrap_or("default") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (&[LLAMA3], flags(true, true, true)),
        "dbrx" | "smaug-bpe" => (&[LLAMA3], flags(false, true, false)),
        "deepseek-llm" => (DEEPSEEK_LLM, flags(false, false, false)),
        "deepseek-coder" => (DEEPSEEK_CODER, flags(false, false, false)),
        "falcon" => (
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
            flags(false, true, false),
        ),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" => {
            (&[GPT2], flags(false, true, false))
        }
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], flags(false, true, false))
        }
        "smollm" | "command-r" => (&[r"\p{N}", GPT2], flags(false, false, false)),
        "qwen2" | "deepseek-r1-qwen" => (&[QWEN2], flags(false, false, false)),
        "stablelm2" | "megrez" => (&[QWEN2], flags(false, true, false)),
        "tekken" => (&[TEKKEN], flags(true, false, true)),
        "poro-chat" => (&[BLOOM], flags(false, false, false)),
        "bloom" | "gpt3-finnish" => (&[BLOOM], flags(false, true, false)),
        "viking" => (&[BLOOM, r"\p{N}"], flags(false, false, false)),
        _ => (DEFAULT_REGEXES, flags(false, true, false)),
    };
    PreTokenizerConfig { regexes, flags }
}

#[derive(Clone)]
pub struct BpeModel {
    hf: tokenizers::Tokenizer,
}

impl std::fmt::Debug for BpeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BpeModel")
    }
}

impl BpeModel {
    pub fn new(
        vocab: &Vocab,
        merges: &[String],
        config: &PreTokenizerConfig,
    ) -> Result<Self, TokenizerError> {
        let hf_err = |e: tokenizers::Error| TokenizerError::Backend(e.to_string());
        let merges = parse_merges(vocab, merges)?;
        let hf_vocab: tokenizers::models::bpe::Vocab =
            vocab.ids.iter().map(|(t, &id)| (t.clone(), id)).collect();
        let model = BPE::builder()
            .vocab_and_merges(hf_vocab, merges)
            .ignore_merges(config.flags.ignore_merges)
            .build()
            .map_err(hf_err)?;
        let mut steps = Vec::with_capacity(config.regexes.len() + 1);
        for regex in config.regexes {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(hf_err)?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));
        let mut hf = tokenizers::Tokenizer::new(model);
        hf.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
        Ok(Self { hf })
    }

    /// Appends the ids of `text`, which holds no special token.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let encoding = self
            .hf
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }
}

/// Parses "left right" merges in rank order. `tokenizers` refuses merges whose parts or
/// result are not tokens; llama.cpp would never produce such a token either, so they are
/// dropped. A repeated pair keeps its first (best) rank, as llama.cpp's `emplace` does.
fn parse_merges(vocab: &Vocab, merges: &[String]) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        // Search from byte 1 like llama.cpp, so a pair may start with a space.
        let split = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
        let Some(at) = split else {
            return Err(TokenizerError::BadMerge {
                index,
                merge: merge.clone(),
            });
        };
        let (left, right) = (&merge[..at], &merge[at + 1..]);
        let known = |t: &str| vocab.ids.contains_key(t);
        if !known(left) || !known(right) || !known(&format!("{left}{right}")) {
            continue;
        }
        if seen.insert((left, right)) {
            out.push((left.to_string(), right.to_string()));
        }
    }
    Ok(out)
}

/// GPT-2's byte-to-unicode table, inverted: the byte each printable stand-in char means.
fn unicode_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The other 68 bytes map, in order, to U+0100 onwards.
    let n = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// Turns a byte-level token text back into bytes (llama.cpp `llama_decode_text`), keeping
/// llama.cpp's marker for a char outside the byte-level alphabet.
pub fn byte_level_decode(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match unicode_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                let utf8 = c.encode_utf8(&mut buf).as_bytes();
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in utf8 {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(utf8);
                out.push(b']');
            }
        }
    }
}
