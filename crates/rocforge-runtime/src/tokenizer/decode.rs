//! Ids back to text as llama.cpp does it: each token's bytes (`token_to_piece`, cached
//! per id), whole-sequence clean-up (`detokenize`), and a streaming decoder that releases
//! text only once it is complete UTF-8.

use super::bpe::byte_level_decode;
use super::spm::{parse_byte_token, SPACE};
use super::vocab::{ModelKind, TokenKind, Vocab};
use super::Tokenizer;

/// The bytes of every token as llama.cpp's `token_to_piece(special = true)` gives them.
pub fn build_pieces(vocab: &Vocab) -> Vec<Box<[u8]>> {
    (0..vocab.len())
        .map(|id| {
            let text = vocab.texts[id].as_str();
            let mut bytes = Vec::with_capacity(text.len());
            match (vocab.kinds[id], vocab.model) {
                // Control, unknown and user-defined tokens are their text.
                (TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined, _) => {
                    bytes.extend_from_slice(text.as_bytes())
                }
                (TokenKind::Normal, ModelKind::Bpe) => byte_level_decode(text, &mut bytes),
                (TokenKind::Normal, ModelKind::Spm) => {
                    bytes.extend_from_slice(text.replace(SPACE, " ").as_bytes())
                }
                (TokenKind::Byte, ModelKind::Spm) => bytes.extend(parse_byte_token(text)),
                // Unused, undefined and BPE byte tokens print nothing.
                _ => {}
            }
            bytes.into_boxed_slice()
        })
        .collect()
}

impl Tokenizer {
    /// The bytes of one token; control and unknown tokens are empty unless `special`.
    /// An id outside the vocabulary is empty.
    pub fn token_bytes(&self, id: u32, special: bool) -> &[u8] {
        match self.vocab.kind(id) {
            Some(kind) if special || !kind.is_special() => &self.pieces[id as usize],
            _ => &[],
        }
    }

    /// Text of `ids` as llama.cpp's `llama_detokenize(remove_special = false,
    /// unparse_special = false)`: control tokens vanish, the leading space that SPM adds
    /// is dropped, and vocabularies that ask for it get spaces before punctuation removed.
    /// Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.detokenize(ids, false)
    }

    /// As [`Tokenizer::decode`], printing control tokens' text when `special` is set.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id, special);
            let strip_space = i == 0 && self.vocab.add_space_prefix;
            bytes.extend_from_slice(if strip_space {
                piece.strip_prefix(b" ").unwrap_or(piece)
            } else {
                piece
            });
        }
        if self.vocab.clean_spaces {
            bytes = clean_up_spaces(bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A streaming decoder for generated ids, control tokens hidden.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            pending: Vec::new(),
            special: false,
        }
    }

    /// A streaming decoder that goes on from the bytes an earlier one held back
    /// ([`TokenStream::into_pending`]): for callers that keep many streams between calls.
    pub fn resume_stream(&self, pending: Vec<u8>) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            pending,
            special: false,
        }
    }
}

/// llama.cpp's `clean_spaces` passes: " ?" " !" " ." " ," lose the space, " ' " loses
/// both, and " 's" " 'm" " 'll" " 're" " 've" lose the space. Indices follow the C++
/// in-place loops so that overlapping cases come out the same.
fn clean_up_spaces(mut text: Vec<u8>) -> Vec<u8> {
    fn pass(text: &mut Vec<u8>, mut step: impl FnMut(&mut Vec<u8>, &mut usize, &mut usize)) {
        let n = text.len();
        let mut total = usize::from(n > 0);
        let mut i = 1;
        while i < n {
            step(text, &mut i, &mut total);
            i += 1;
        }
        text.truncate(total);
    }
    pass(&mut text, |t, i, total| {
        let x = t[*i];
        if t[*i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            *total -= 1;
        }
        t[*total] = x;
        *total += 1;
    });
    pass(&mut text, |t, i, total| {
        let x = t[*i];
        if x == b'\'' && *i + 1 < t.len() && t[*i - 1] == b' ' && t[*i + 1] == b' ' {
            *total -= 1;
            *i += 1;
            t[*i] = 0;
        }
        t[*total] = x;
        *total += 1;
    });
    // Pass three reads ahead, so it needs the length before the pass truncates.
    let n = text.len();
    pass(&mut text, |t, i, total| {
        let x = t[*i];
        if t[*i - 1] == b' ' && x == b'\'' && *i + 1 < n {
            let x1 = t[*i + 1];
            let x2 = t.get(*i + 2).copied().filter(|_| *i + 2 < n);
            let drop = matches!(x1, b's' | b'm')
                || matches!(
                    (x1, x2),
                    (b'l', Some(b'l')) | (b'r', Some(b'e')) | (b'v', Some(b'e'))
                );
            if drop {
                *total -= 1;
            }
        }
        t[*total] = x;
        *total += 1;
    });
    text
}

/// Decodes generated ids one at a time, as llama.cpp's CLI prints them (pieces
/// concatenated, no clean-up), holding back an incomplete UTF-8 sequence until the
/// token that completes it arrives.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
    special: bool,
}

impl TokenStream<'_> {
    /// Also print control tokens' text (llama.cpp `special = true`).
    pub fn with_special(mut self, special: bool) -> Self {
        self.special = special;
        self
    }

    /// Adds one id; returns the text completed by it (often empty).
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tokenizer.token_bytes(id, self.special));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe by construction: `valid_up_to` bounds a valid prefix.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The bytes held back (an incomplete UTF-8 character), for [`Tokenizer::resume_stream`].
    pub fn into_pending(self) -> Vec<u8> {
        self.pending
    }

    /// Whatever is still held back, invalid bytes as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
