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
//! the scale plane, so decode reads exactly GGUF's bytes per weight. Block `b` of row `r` is
//! global block `r * blocks_per_row + b` in both planes. F32 and F16 rows go to the quant
//! plane as they are, zero-padded to a multiple of 4 weights (the scale plane stays empty).

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
                quants.extend_from_slice(&block[off + header..]);
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
