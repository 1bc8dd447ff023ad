//! The vocabulary as llama.cpp holds it (`llama_vocab::impl::load`): token texts and kinds,
//! special ids, per-model flags and the end-of-generation set, validated once from a
//! [`TokenizerSpec`]. Both models (BPE and SPM) encode and decode through this table.

use std::collections::{BTreeSet, HashMap};

use super::{TokenizerError, TokenizerSpec};

/// What a token is, from GGUF `tokenizer.ggml.token_type` (llama.cpp `llama_token_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_gguf(t: i32) -> Self {
        match t {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Hidden when decoding without `special` (llama.cpp `attr_special`).
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// The two tokenizer families llama.cpp names by `tokenizer.ggml.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// "gpt2": byte-level BPE.
    Bpe,
    /// "llama": SentencePiece BPE with scores.
    Spm,
}

/// Texts llama.cpp treats as end of generation whatever their id (`special_eog_ids`).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts llama.cpp picks the EOT token from when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// A piece of input after splitting on special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

#[derive(Debug, Clone)]
pub struct Vocab {
    pub model: ModelKind,
    pub texts: Vec<String>,
    pub kinds: Vec<TokenKind>,
    pub scores: Vec<f32>,
    pub ids: HashMap<String, u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    /// llama.cpp `clean_spaces`: strip spaces before punctuation when detokenizing.
    pub clean_spaces: bool,
    eog: BTreeSet<u32>,
    /// Problems llama.cpp only warns about (see [`super::Tokenizer::warnings`]).
    pub warnings: Vec<String>,
    /// Control, user-defined and unknown tokens, longest text first (`cache_special_tokens`).
    specials: Vec<u32>,
}

impl Vocab {
    /// Validates the spec and applies llama.cpp's per-model defaults. `pre_flags` are the
    /// defaults that the BPE pre-tokenizer type sets (add_bos, clean_spaces).
    pub fn from_spec(spec: &TokenizerSpec, pre_flags: PreFlags) -> Result<Self, TokenizerError> {
        let model = match spec.model.as_str() {
            "gpt2" => ModelKind::Bpe,
            "llama" => ModelKind::Spm,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        check_len("tokenizer.ggml.token_type", spec.token_types.len(), n)?;
        check_len("tokenizer.ggml.scores", spec.scores.len(), n)?;

        // llama.cpp renames empty tokens so that every text maps back to one id.
        let texts: Vec<String> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut kinds: Vec<TokenKind> = if spec.token_types.is_empty() {
            vec![TokenKind::Normal; n]
        } else {
            spec.token_types
                .iter()
                .map(|&t| TokenKind::from_gguf(t))
                .collect()
        };
        let scores = if spec.scores.is_empty() {
            vec![0.0; n]
        } else {
            spec.scores.clone()
        };
        // Later duplicates win, as in llama.cpp's `token_to_id[word] = i`.
        let ids: HashMap<String, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        // llama.cpp's historical defaults, used where the file names no id or an id outside
        // the vocabulary (which llama.cpp reports as "bad special token" and ignores).
        let in_range = |id: u32| (id as usize) < n;
        let (default_bos, default_eos, default_unk) = match model {
            ModelKind::Spm => (Some(1), Some(2), Some(0)),
            ModelKind::Bpe => (Some(11), Some(11), None),
        };
        let mut warnings = Vec::new();
        let mut special = |key: &str, id: Option<u32>, default: Option<u32>| {
            let default = default.filter(|&i| in_range(i));
            match id {
                Some(id) if in_range(id) => Some(id),
                Some(id) => {
                    let fallback = default.map_or("none".to_string(), |d| d.to_string());
                    warnings.push(format!(
                        "tokenizer.ggml.{key} = {id} is outside the vocabulary of {n} tokens; using {fallback}"
                    ));
                    default
                }
                None => default,
            }
        };
        let bos = special("bos_token_id", spec.bos_id, default_bos);
        let eos = special("eos_token_id", spec.eos_id, default_eos);
        let unk = special("unknown_token_id", spec.unk_id, default_unk);
        let pad = special("padding_token_id", spec.pad_id, None);
        let mut eot = special("eot_token_id", spec.eot_id, None);

        let (add_bos, add_eos, add_space_prefix, clean_spaces) = match model {
            ModelKind::Spm => (true, false, true, false),
            ModelKind::Bpe => (pre_flags.add_bos, false, false, pre_flags.clean_spaces),
        };
        let add_bos = spec.add_bos.unwrap_or(add_bos);
        let add_eos = spec.add_eos.unwrap_or(add_eos);
        let add_space_prefix = spec.add_space_prefix.unwrap_or(add_space_prefix);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken("bos"));
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken("eos"));
        }

        // Tokens recognised by text become control tokens, as llama.cpp overrides them.
        let id_of = |text: &str| ids.get(text).copied();
        let mut by_text: Vec<u32> = EOG_TEXTS.iter().filter_map(|t| id_of(t)).collect();
        if eot.is_none() {
            eot = EOT_TEXTS.iter().filter_map(|t| id_of(t)).min();
            by_text.extend(eot);
        }
        for &id in &by_text {
            kinds[id as usize] = TokenKind::Control;
        }
        let mut eog: BTreeSet<u32> = EOG_TEXTS.iter().filter_map(|t| id_of(t)).collect();
        eog.extend(eos.into_iter().chain(eot));

        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    kinds[id as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                )
            })
            .collect();
        specials.sort_by(|&a, &b| {
            texts[b as usize]
                .len()
                .cmp(&texts[a as usize].len())
                .then(a.cmp(&b))
        });

        Ok(Self {
            model,
            texts,
            kinds,
            scores,
            ids,
            bos,
            eos,
            eot,
            unk,
            pad,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            eog,
            warnings,
            specials,
        })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Splits `text` on special-token texts (llama.cpp `tokenizer_st_partition`): each
    /// special token, longest first, is cut out of every remaining text fragment.
    /// User-defined tokens are always cut; control and unknown ones only with `parse_special`.
    pub fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            if !parse_special && self.kinds[id as usize].is_special() {
                continue;
            }
            let special = self.texts[id as usize].as_str();
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(special)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(special) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }
}

/// Defaults that llama.cpp ties to the BPE pre-tokenizer name.
#[derive(Debug, Clone, Copy)]
pub struct PreFlags {
    pub add_bos: bool,
    pub clean_spaces: bool,
    pub ignore_merges: bool,
}

fn check_len(field: &'static str, got: usize, expected: usize) -> Result<(), TokenizerError> {
    if got != 0 && got != expected {
        return Err(TokenizerError::LengthMismatch {
            field,
            got,
            expected,
        });
    }
    Ok(())
}
