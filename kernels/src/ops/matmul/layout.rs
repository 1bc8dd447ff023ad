//! The upload layout: GGUF weight bytes split once into two `u32` planes.
//!
//! GGUF blocks are 18, 20, 22, 24, 34, 144, 176 or 210 bytes, so their `f16` headers and
//! quant bytes sit at any byte offset. At upload every block is split, keeping byte order:
//! - the *quant plane* gets the block minus its header (16, 16, 20, 20, 32, 128, 160 or 208
//!   bytes: always whole words, so every block starts on a word, and a `Q4_0`, `Q4_1`, `Q8_0`,
//!   `Q4_K` or `Q5_K` block on 16 bytes, which the wide mat-vec loads at once);
//! - the *scale plane* gets the header: the `f16` halves (`d`, then `m`/`dmin`), packed two
//!   per word; `Q4_K`/`Q5_K` add their 12 bytes of packed 6-bit scales, so their 16-byte
//!   header is one aligned run.
//!
//! Nothing is dequantized and nothing is added but at most 2 bytes of padding at the end of
//! the scale plane, so decode reads exactly GGUF's bytes per weight. One thing moves: `Q5_K`'s
//! 32 bytes of fifth bits are re-laid per 64-weight chunk ([`q5k_fifth_words`]), so a lane
//! reads 8 bytes of them instead of 32 and takes each quant word's bits with one shift.
//! Block `b` of row `r` is global block `r * blocks_per_row + b` in both planes. F32 and F16
//! rows go to the quant plane as they are, zero-padded to a multiple of 4 weights (the scale
//! plane stays empty).

use super::format::KernelFormat;

/// The two planes of one weight matrix, ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedWeight {
    /// Quant plane: `rows * blocks_per_row * words_per_block` words.
    pub quants: Vec<u32>,
    /// Scale plane: `rows * blocks_per_row * halves_per_block` halves, two per word (one
    /// zero word for the plain types, so every kernel binding is non-empty).
    pub scales: Vec<u32>,
    /// Blocks per row in the planes (padded blocks of 4 for the plain types).
    pub blocks_per_row: u32,
}

/// Splits `rows` GGUF rows of `cols` weights into the planes (the header is
/// `2 * halves_per_block` bytes at `header_offset`). The caller has checked that
/// `bytes` holds exactly `rows` rows of `cols` weights of `fmt`.
pub fn pack(fmt: KernelFormat, rows: usize, cols: usize, bytes: &[u8]) -> PackedWeight {
    let epb = fmt.elems_per_block() as usize;
    let blocks_per_row = cols.div_ceil(epb);
    match fmt {
        KernelFormat::F32 | KernelFormat::F16 => {
            let width = if fmt == KernelFormat::F32 { 4 } else { 2 };
            let row_bytes = cols * width;
            let padded = blocks_per_row * epb * width;
            let mut out = Vec::with_capacity(rows * padded);
            for row in bytes.chunks_exact(row_bytes).take(rows) {
                out.extend_from_slice(row);
                out.resize(out.len() + padded - row_bytes, 0);
            }
            PackedWeight {
                quants: words(&out),
                scales: vec![0],
                blocks_per_row: blocks_per_row as u32,
            }
        }
        _ => {
            let block_bytes = fmt.ggml().type_size();
            let header = 2 * fmt.halves_per_block() as usize;
            let off = fmt.header_offset();
            let n_blocks = rows * blocks_per_row;
            let mut quants = Vec::with_capacity(n_blocks * (block_bytes - header));
            let mut halves = Vec::with_capacity(n_blocks * header + 2);
            for block in bytes.chunks_exact(block_bytes).take(n_blocks) {
                halves.extend_from_slice(&block[off..off + header]);
                quants.extend_from_slice(&block[..off]);
                let rest = &block[off + header..];
                if fmt == KernelFormat::Q5K {
                    let fifth = q5k_fifth_words(rest[..32].try_into().expect("32 bytes of qh"));
                    quants.extend(fifth.iter().flat_map(|w| w.to_le_bytes()));
                    quants.extend_from_slice(&rest[32..]);
                } else {
                    quants.extend_from_slice(rest);
                }
            }
            halves.resize(halves.len().next_multiple_of(4).max(4), 0);
            PackedWeight {
                quants: words(&quants),
                scales: words(&halves),
                blocks_per_row: blocks_per_row as u32,
            }
        }
    }
}

/// Shift that aligns quant word `i % 4`'s fifth bits in its [`q5k_fifth_words`] word with
/// the positions [`Q5K_FIFTH_LOW`] (a negative shift is to the left).
pub const Q5K_FIFTH_SHIFT: [i32; 4] = [-4, -2, 4, 6];

/// Bit of byte `k`'s low-nibble fifth bit in an aligned word (`decode::q5k_fifth`): bytes 0
/// and 2 where the kernels' quant pairs (0, 2) take a fifth bit (4 and 20), bytes 1 and 3 one
/// above; the high nibble's bit sits 4 above the low one's.
pub const Q5K_FIFTH_LOW: [u32; 4] = [4, 5, 20, 21];

/// `Q5_K`'s fifth bits (`qh`, 32 bytes: bit `2j` of byte `l` for weight `64j + l`, bit `2j + 1`
/// for `64j + 32 + l`) as the quant plane holds them: quant word `i` of chunk `j` (bytes
/// `4i .. 4i + 4` of its 32 nibble bytes, weights `64j + 4i + k` and `64j + 32 + 4i + k`) has
/// its 8 fifth bits in word `2j + i / 4`, at [`Q5K_FIFTH_LOW`] (and 4 above) moved by
/// [`Q5K_FIFTH_SHIFT`]`[i % 4]`. The four words' shifted bits tile the 32 bits, so a chunk's bits
/// are 2 words, and one shift (`decode::q5k_fifth`) puts a quant word's 8 bits where its four
/// half pairs take them.
pub fn q5k_fifth_words(qh: &[u8; 32]) -> [u32; 8] {
    let mut out = [0u32; 8];
    for j in 0..4 {
        for i in 0..8 {
            for (k, &low) in Q5K_FIFTH_LOW.iter().enumerate() {
                let l = 4 * i + k;
                let at = |bit: u32| (bit as i32 + Q5K_FIFTH_SHIFT[i % 4]) as u32;
                let lo = u32::from(qh[l] >> (2 * j)) & 1;
                let hi = u32::from(qh[l] >> (2 * j + 1)) & 1;
                out[2 * j + i / 4] |= (lo << at(low)) | (hi << at(low + 4));
            }
        }
    }
    out
}

/// Little-endian words of a byte buffer whose length is a multiple of 4.
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_block_splits_into_header_and_quants() {
        let mut block = [0u8; 18];
        block[0] = 0xAA;
        block[1] = 0xBB;
        for (i, b) in block[2..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let p = pack(KernelFormat::Q4_0, 1, 32, &block);
        assert_eq!(p.scales, vec![0xBBAA]);
        assert_eq!(p.quants[0], 0x0302_0100);
        assert_eq!(p.quants.len(), 4);
    }

    #[test]
    fn q4k_header_with_its_scales_goes_to_the_scale_plane() {
        let block: Vec<u8> = (0..144).map(|i| i as u8).collect();
        let p = pack(KernelFormat::Q4K, 1, 256, &block);
        assert_eq!(
            p.scales,
            vec![0x0302_0100, 0x0706_0504, 0x0B0A_0908, 0x0F0E_0D0C]
        );
        assert_eq!(p.quants.len(), 32);
        assert_eq!(p.quants[0], 0x1312_1110);
    }

    #[test]
    fn q6k_header_is_at_the_end() {
        let mut block = [0u8; 210];
        block[208] = 0x34;
        block[209] = 0x12;
        block[0] = 7;
        let p = pack(KernelFormat::Q6K, 1, 256, &block);
        assert_eq!(p.scales, vec![0x1234]);
        assert_eq!(p.quants.len(), 52);
        assert_eq!(p.quants[0], 7);
    }

    /// The kernels' reading of a re-laid fifth bit (`decode::q5k_fifth`, then the pair masks).
    fn fifth_bit(words: &[u32; 8], col: usize) -> u32 {
        let (j, c) = (col / 64, col % 64);
        let (high, l) = (c / 32, c % 32);
        let (i, k) = (l / 4, l % 4);
        let s = words[2 * j + i / 4];
        let d = Q5K_FIFTH_SHIFT[i % 4];
        let aligned = if d < 0 { s << -d } else { s >> d };
        (aligned >> (Q5K_FIFTH_LOW[k] + 4 * high as u32)) & 1
    }

    #[test]
    fn q5k_fifth_bits_are_a_permutation_the_kernels_read_back() {
        let mut seed = 0x5151_u32;
        for round in 0..64 {
            let mut qh = [0u8; 32];
            for b in qh.iter_mut() {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (seed >> 24) as u8;
            }
            if round == 0 {
                qh = [0xFF; 32];
            }
            let words = q5k_fifth_words(&qh);
            let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
            let want: u32 = qh.iter().map(|b| b.count_ones()).sum();
            assert_eq!(ones, want, "no bit lost or doubled");
            for col in 0..256 {
                let (j, c) = (col / 64, col % 64);
                let bit = u32::from(qh[c % 32] >> (2 * j + c / 32)) & 1;
                assert_eq!(fifth_bit(&words, col), bit, "column {col}");
            }
        }
    }

    #[test]
    fn q5k_block_keeps_its_nibbles_and_relays_its_fifth_bits() {
        let block: Vec<u8> = (0..176).map(|i| (i * 7 + 3) as u8).collect();
        let p = pack(KernelFormat::Q5K, 1, 256, &block);
        assert_eq!(p.quants.len(), 40);
        let want = q5k_fifth_words(block[16..48].try_into().unwrap());
        assert_eq!(p.quants[..8], want);
        assert_eq!(
            p.quants[8],
            u32::from_le_bytes(
                [48 * 7 + 3, 49 * 7 + 3, 50 * 7 + 3, 51 * 7 + 3].map(|v: u32| v as u8)
            )
        );
    }

    #[test]
    fn f16_rows_are_padded_to_four() {
        let bytes: Vec<u8> = (0..2 * 3 * 2).map(|i| i as u8 + 1).collect(); // 2 rows of 3
        let p = pack(KernelFormat::F16, 2, 3, &bytes);
        assert_eq!(p.blocks_per_row, 1);
        assert_eq!(p.quants.len(), 4);
        assert_eq!(p.quants[1] >> 16, 0);
        assert_eq!(p.quants[2] & 0xFFFF, 0x0807);
    }
}
