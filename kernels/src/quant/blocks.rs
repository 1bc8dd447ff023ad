//! Quant block layouts, defined once, exactly as ggml's `ggml-common.h`.
//!
//! Every struct is `#[repr(C)]`, `Pod`, and checked against [`GgmlType::type_size`] at compile
//! time. Weight bytes come straight from an mmap, so nothing here assumes the bytes are
//! aligned for the struct: read blocks with [`read_block`] (an unaligned copy that LLVM turns
//! into plain loads), never by casting a byte slice to `&[Block]`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::GgmlType;

/// Elements per block of the simple formats (`QK4_0`, `QK8_0`, ...).
pub const QK: usize = 32;
/// Elements per super-block of the k-quants (`QK_K`).
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in `Q4_K`/`Q5_K` (`K_SCALE_SIZE`).
pub const K_SCALE_SIZE: usize = 12;

/// `block_q4_0`: 32 weights `d * (q - 8)`, `q` 4-bit; element `j` is the low nibble of
/// `qs[j]`, element `j + 16` its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// `block_q4_1`: 32 weights `d * q + m`, `q` 4-bit, nibbles as in [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// `block_q5_0`: 32 weights `d * (q - 16)`, `q` 5-bit; bit 4 of element `j` is bit `j` of
/// the little-endian `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// `block_q5_1`: 32 weights `d * q + m`, `q` 5-bit, bits as in [`BlockQ5_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// `block_q8_0`: 32 values `d * q`, `q` signed 8-bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// `block_q8_1`: as [`BlockQ8_0`] plus `s = d * sum(qs)` (the activation format for the
/// `Q4_1`/`Q5_1` dot products, whose `m` term needs the block sum).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

/// `block_q4_K`: 8 sub-blocks of 32, weight `d * sc * q - dmin * m`, with 6-bit `sc`/`m`
/// packed in `scales` (see [`scale_min_k4`]); in each 64-element chunk the first 32 use the
/// low nibbles of 32 bytes of `qs`, the next 32 their high nibbles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// `block_q5_K`: as [`BlockQ4K`] with a fifth bit: bit `i` of `qh[l]` is bit 4 of element
/// `32 * i + l`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// `block_q6_K`: 16 sub-blocks of 16, weight `d * scales[i / 16] * (q - 32)`, `q` 6-bit: low
/// 4 bits in `ql`, high 2 bits in `qh` (layout in [`super::reference`]'s `dequant_q6k`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// `block_q8_K`: the activation format of the k-quant dot products. `d` is an `f32` here
/// (unlike every other block) and `bsums[i]` is the sum of `qs[16 * i..16 * i + 16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

// Sizes must equal ggml's `type_size`; the fast paths and GPU kernels index bytes by them.
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);
const _: () = assert!(size_of::<BlockQ8K>() == 292);

/// A block type with its [`GgmlType`], so byte offsets are derived from one place.
pub trait Block: Pod {
    const TYPE: GgmlType;
    /// Elements per block.
    const ELEMS: usize;
}

macro_rules! impl_block {
    ($($t:ty => $g:ident, $n:expr;)*) => {$(
        impl Block for $t {
            const TYPE: GgmlType = GgmlType::$g;
            const ELEMS: usize = $n;
        }
    )*};
}
impl_block! {
    BlockQ4_0 => Q4_0, QK;
    BlockQ4_1 => Q4_1, QK;
    BlockQ5_0 => Q5_0, QK;
    BlockQ5_1 => Q5_1, QK;
    BlockQ8_0 => Q8_0, QK;
    BlockQ8_1 => Q8_1, QK;
    BlockQ4K => Q4K, QK_K;
    BlockQ5K => Q5K, QK_K;
    BlockQ6K => Q6K, QK_K;
    BlockQ8K => Q8K, QK_K;
}

/// Reads block `i` of a byte row. Sound for any alignment of `bytes`.
///
/// Panics if the row holds fewer than `i + 1` blocks; callers validate lengths first.
#[inline(always)]
pub fn read_block<B: Block>(bytes: &[u8], i: usize) -> B {
    let n = size_of::<B>();
    bytemuck::pod_read_unaligned(&bytes[i * n..(i + 1) * n])
}

/// Iterates over the blocks of a byte row whose length is a multiple of the block size.
#[inline(always)]
pub fn blocks<B: Block>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    bytes
        .chunks_exact(size_of::<B>())
        .map(bytemuck::pod_read_unaligned)
}

/// Scale and min of sub-block `j` (0..8) of a `Q4_K`/`Q5_K` block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml_type_size() {
        fn check<B: Block>() {
            assert_eq!(size_of::<B>(), B::TYPE.type_size(), "{}", B::TYPE);
            assert_eq!(B::ELEMS, B::TYPE.block_size(), "{}", B::TYPE);
        }
        check::<BlockQ4_0>();
        check::<BlockQ4_1>();
        check::<BlockQ5_0>();
        check::<BlockQ5_1>();
        check::<BlockQ8_0>();
        check::<BlockQ8_1>();
        check::<BlockQ4K>();
        check::<BlockQ5K>();
        check::<BlockQ6K>();
        check::<BlockQ8K>();
    }

    #[test]
    fn read_block_is_alignment_agnostic() {
        let mut bytes = vec![0u8; 1 + 2 * 18];
        bytes[1..3].copy_from_slice(&f16::from_f32(1.5).to_bits().to_le_bytes());
        bytes[3] = 0x21;
        let b: BlockQ4_0 = read_block(&bytes[1..], 0);
        assert_eq!(b.d.to_f32(), 1.5);
        assert_eq!(b.qs[0], 0x21);
    }
}
