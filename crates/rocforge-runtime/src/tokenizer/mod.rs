//! Text to token ids and back, matching llama.cpp (`src/llama-vocab.cpp`) for the GGUF
//! tokenizers it calls "gpt2" (byte-level BPE) and "llama" (SentencePiece), plus chat
//! templates. Built once from the `tokenizer.*` metadata in a [`TokenizerSpec`].
//!
//! Layout: `spec` (GGUF metadata in), `vocab` (tokens, special ids, flags, special-token
//! splitting), `bpe` and `spm` (the two models), `decode` (ids to text, streaming),
//! `chat` (templates), `budget` (the templates' memory bound, with the counting allocator
//! binaries install).

mod bpe;
mod budget;
mod chat;
mod decode;
mod spec;
mod spm;
mod vocab;

pub use budget::{Budget, Overrun, TemplateAllocator};
pub use chat::{memory_budget, render_template as render_chat_template_str, ChatMessage};
pub use decode::TokenStream;
pub use vocab::{ModelKind, TokenKind};

use bpe::{pre_tokenizer_config, BpeModel};
use spm::SpmModel;
use vocab::{Fragment, PreFlags, Vocab};

/// The `tokenizer.ggml.*` and `tokenizer.chat_template` metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. "smollm", "llama-bpe", "default", "qwen2", "gpt-2".
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (may be empty): 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (may be empty).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` (may be empty): "left right" pairs, best first.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model {0:?} (expected \"gpt2\" or \"llama\")")]
    UnsupportedModel(String),
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("the vocabulary has {0} tokens, more than u32 ids can address")]
    VocabTooLarge(usize),
    #[error("{field} has {got} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("the tokenizer adds a {0} token but the vocabulary names none")]
    MissingSpecialToken(&'static str),
    #[error("merge {index} ({merge:?}) is not two space-separated tokens")]
    BadMerge { index: usize, merge: String },
    #[error("byte token {id} ({text:?}) is not of the form <0xXX>")]
    BadByteToken { id: u32, text: String },
    #[error("byte 0x{0:02X} has no token and the vocabulary has no unknown token")]
    UnencodableByte(u8),
    #[error("tokenizers backend: {0}")]
    Backend(String),
}

#[derive(Debug, Clone)]
enum Model {
    Bpe(Box<BpeModel>),
    Spm(SpmModel),
}

/// A GGUF tokenizer. Cheap to share by reference; all methods take `&self`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    /// Bytes of each token with control tokens shown (llama.cpp `cache_token_to_piece`).
    pieces: Vec<Box<[u8]>>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Validates `spec` and builds the tokenizer; llama.cpp's defaults fill what the
    /// file leaves out (SPM: BOS 1, EOS 2, UNK 0, adds BOS and a space prefix; BPE: adds
    /// BOS only where the pre-tokenizer type says so, e.g. Llama 3).
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self, TokenizerError> {
        let pre = pre_tokenizer_config(spec.pre.as_deref());
        let flags = match spec.model.as_str() {
            "gpt2" => pre.flags,
            _ => PreFlags {
                add_bos: true,
                clean_spaces: false,
                ignore_merges: false,
            },
        };
        let vocab = Vocab::from_spec(spec, flags)?;
        let model = match vocab.model {
            ModelKind::Bpe => Model::Bpe(Box::new(BpeModel::new(&vocab, &spec.merges, &pre)?)),
            ModelKind::Spm => Model::Spm(SpmModel::new(&vocab)?),
        };
        let pieces = decode::build_pieces(&vocab);
        Ok(Self {
            vocab,
            model,
            pieces,
            chat_template: spec.chat_template.clone(),
        })
    }

    /// Token ids of `text` as llama.cpp's `llama_tokenize`. `add_special` adds BOS/EOS
    /// where the model asks for them; `parse_special` turns control-token texts such as
    /// `<|im_start|>` into their ids (user-defined tokens are always matched).
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let vocab = &self.vocab;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        // `from_spec` guarantees the ids exist when the flags are set.
        if let (true, true, Some(bos)) = (add_special, vocab.add_bos, vocab.bos) {
            out.push(bos);
        }
        // SPM puts a space before text that starts the input or follows a special token.
        let mut after_special = true;
        for fragment in vocab.partition(text, parse_special) {
            match (fragment, &self.model) {
                (Fragment::Token(id), _) => {
                    out.push(id);
                    after_special = true;
                }
                (Fragment::Text(text), Model::Bpe(bpe)) => bpe.encode(text, &mut out)?,
                (Fragment::Text(text), Model::Spm(spm)) => {
                    let prefix = if vocab.add_space_prefix && after_special {
                        " "
                    } else {
                        ""
                    };
                    let escaped = format!("{prefix}{text}").replace(' ', spm::SPACE);
                    spm.encode(vocab, &escaped, &mut out)?;
                    after_special = false;
                }
            }
        }
        if let (true, true, Some(eos)) = (add_special, vocab.add_eos, vocab.eos) {
            out.push(eos);
        }
        Ok(out)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn model_kind(&self) -> ModelKind {
        self.vocab.model
    }

    /// The token's text as stored in the vocabulary (byte-level or `▁` form).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.vocab.kind(id)
    }

    /// The id of a token given its exact vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.ids.get(text).copied()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos
    }

    pub fn eot_id(&self) -> Option<u32> {
        self.vocab.eot
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.vocab.pad
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.vocab.unk
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn adds_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// End of generation: EOS, EOT and the end-of-turn tokens llama.cpp knows by text
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, `<end_of_turn>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.is_eog(id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The prompt for `messages` from the model's chat template, or ChatML when the
    /// model has none or it fails to render, runs out of fuel or exceeds the output cap
    /// (so this does not fail today; the `Result` leaves room for a strict mode). Callers
    /// that want to report the fallback use [`Tokenizer::render_chat_template`] first.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let text = |id: Option<u32>| id.and_then(|id| self.token_str(id)).unwrap_or("");
        let rendered = self.chat_template.as_deref().and_then(|template| {
            chat::render_template(
                template,
                messages,
                add_generation_prompt,
                text(self.vocab.bos),
                text(self.vocab.eos),
            )
            .ok()
        });
        Ok(rendered.unwrap_or_else(|| chat::render_chatml(messages, add_generation_prompt)))
    }

    /// ChatML for `messages`, the fallback of [`Tokenizer::apply_chat_template`].
    pub fn chatml(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        chat::render_chatml(messages, add_generation_prompt)
    }

    /// Warnings about the file's tokenizer metadata that llama.cpp also only warns about
    /// (special token ids outside the vocabulary, which fall back to the defaults).
    pub fn warnings(&self) -> &[String] {
        &self.vocab.warnings
    }

    /// Like [`Tokenizer::apply_chat_template`] without the fallback: the template's own
    /// compile or render error (fuel and output cap included), or `None` when the model has
    /// no template.
    pub fn render_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Option<Result<String, minijinja::Error>> {
        let text = |id: Option<u32>| id.and_then(|id| self.token_str(id)).unwrap_or("");
        let template = self.chat_template.as_deref()?;
        Some(chat::render_template(
            template,
            messages,
            add_generation_prompt,
            text(self.vocab.bos),
            text(self.vocab.eos),
        ))
    }
}
