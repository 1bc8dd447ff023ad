//! SentencePiece BPE ("llama" vocabularies) as llama.cpp runs it (`llm_tokenizer_spm`):
//! start from single UTF-8 chars, repeatedly merge the adjacent pair whose joined text is
//! the highest-scoring token (leftmost on ties), then emit each piece, or its bytes as
//! `<0xXX>` tokens when it is not a token. Written by hand because `tokenizers`' BPE
//! works from merge ranks, not from scores.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::{TokenKind, Vocab};
use super::TokenizerError;

/// The SentencePiece stand-in for a space.
pub const SPACE: &str = "\u{2581}";

#[derive(Debug, Clone)]
pub struct SpmModel {
    /// Token for each byte: `<0xXX>`, else the byte itself as a one-char token.
    byte_tokens: Box<[Option<u32>; 256]>,
    unk: Option<u32>,
}

/// A candidate merge of the pieces starting at `left` and `right`.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

/// One piece of the text being merged: `text[start..start + len]`, in a linked list.
#[derive(Clone, Copy)]
struct Piece {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmModel {
    pub fn new(vocab: &Vocab) -> Result<Self, TokenizerError> {
        let mut byte_tokens = Box::new([None; 256]);
        for (byte, slot) in byte_tokens.iter_mut().enumerate() {
            let hex = format!("<0x{byte:02X}>");
            *slot = vocab.ids.get(&hex).copied();
            if slot.is_none() && byte < 0x80 {
                *slot = vocab.ids.get(&(byte as u8 as char).to_string()).copied();
            }
        }
        // Byte tokens must name their byte: decoding reads it back from the text.
        for (id, kind) in vocab.kinds.iter().enumerate() {
            if *kind == TokenKind::Byte && parse_byte_token(&vocab.texts[id]).is_none() {
                return Err(TokenizerError::BadByteToken {
                    id: id as u32,
                    text: vocab.texts[id].clone(),
                });
            }
        }
        Ok(Self {
            byte_tokens,
            unk: vocab.unk,
        })
    }

    /// Appends the ids of `text`, whose spaces are already `▁`.
    pub fn encode(
        &self,
        vocab: &Vocab,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut pieces: Vec<Piece> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Piece {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            })
            .collect();
        let count = pieces.len();
        for (i, piece) in pieces.iter_mut().enumerate() {
            piece.next = (i + 1 < count).then_some(i + 1);
        }
        if pieces.is_empty() {
            return Ok(());
        }

        let mut queue = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<Bigram>,
                    pieces: &[Piece],
                    left: Option<usize>,
                    right: Option<usize>| {
            let (Some(left), Some(right)) = (left, right) else {
                return;
            };
            let (l, r) = (pieces[left], pieces[right]);
            let joined = &text[l.start..r.start + r.len];
            if let Some(&id) = vocab.ids.get(joined) {
                queue.push(Bigram {
                    left,
                    right,
                    score: vocab.scores[id as usize],
                    len: joined.len(),
                });
            }
        };
        for i in 1..count {
            push(&mut queue, &pieces, Some(i - 1), Some(i));
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (pieces[bigram.left], pieces[bigram.right]);
            // Skip pairs made stale by an earlier merge.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.len {
                continue;
            }
            pieces[bigram.left].len += r.len;
            pieces[bigram.left].next = r.next;
            pieces[bigram.right].len = 0;
            if let Some(next) = r.next {
                pieces[next].prev = Some(bigram.left);
            }
            push(&mut queue, &pieces, l.prev, Some(bigram.left));
            push(&mut queue, &pieces, Some(bigram.left), r.next);
        }

        // Every merged piece is a token by construction; only single chars can miss.
        let mut at = Some(0);
        while let Some(i) = at {
            let piece = pieces[i];
            let piece_text = &text[piece.start..piece.start + piece.len];
            match vocab.ids.get(piece_text) {
                Some(&id) => out.push(id),
                None => {
                    for byte in piece_text.bytes() {
                        let id = self.byte_tokens[byte as usize]
                            .or(self.unk)
                            .ok_or(TokenizerError::UnencodableByte(byte))?;
                        out.push(id);
                    }
                }
            }
            at = piece.next;
        }
        Ok(())
    }
}

/// The byte of a `<0xXX>` token.
pub fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
