//! The weight formats the matmul kernels read, with the constants of their upload layout.
//!
//! A *block* is the GGUF block (32 or 256 weights; 4 weights for the plain types, whose rows
//! are padded to 4). A *slot* is the piece of a block that `decode::decode_slot` unpacks: a
//! word of quants (two for `Q8_0`), 8 or 16 weights in runs of 4 consecutive columns, or a
//! plain block of 4. The mat-vec gives each lane `slots_per_lane` consecutive slots per block
//! and `unroll` blocks per trip; both are tuning knobs per format.

use cubecl::prelude::*;

use crate::quant::GgmlType;

/// A weight format, as a comptime kernel parameter (one compiled kernel per format).
#[derive(CubeType, Clone, Copy, Hash, PartialEq, Eq, Debug)]
pub enum KernelFormat {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl KernelFormat {
    /// Every format, in the order tests and kernel listings walk them.
    pub const ALL: [KernelFormat; 10] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The kernel format of a GGUF type, `None` for types without a kernel.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        Some(match ty {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4K => Self::Q4K,
            GgmlType::Q5K => Self::Q5K,
            GgmlType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// The GGUF type stored in this format.
    pub fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4K => GgmlType::Q4K,
            Self::Q5K => GgmlType::Q5K,
            Self::Q6K => GgmlType::Q6K,
        }
    }

    /// Weights per block in the uploaded layout (4 for the plain types).
    pub fn elems_per_block(self) -> u32 {
        match self {
            Self::F32 | Self::F16 => 4,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// `u32` words per block in the quant plane: the GGUF block minus its `f16` header.
    pub fn words_per_block(self) -> u32 {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 | Self::Q4_1 => 4,
            Self::Q5_0 | Self::Q5_1 => 5,
            Self::Q8_0 => 8,
            Self::Q4K => 32,
            Self::Q5K => 40,
            Self::Q6K => 52,
        }
    }

    /// `f16` values per block in the scale plane (`d`, then `m`/`dmin` where the format has it).
    /// `Q4_K`/`Q5_K` move their 12 bytes of packed 6-bit scales there too (6 more halves'
    /// room), so a block's header is one aligned 16-byte run and its quants start on a 16-byte
    /// boundary (the wide mat-vec's loads).
    pub fn halves_per_block(self) -> u32 {
        match self {
            Self::F32 | Self::F16 => 0,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 | Self::Q6K => 1,
            Self::Q4_1 | Self::Q5_1 => 2,
            Self::Q4K | Self::Q5K => 8,
        }
    }

    /// Columns a wide mat-vec lane takes at once (`MatvecConfig::wide`): a 32-weight block,
    /// or a K-quant's 64-weight chunk (`Q4_K`/`Q5_K`: two sub-blocks, one quant word per 8
    /// weights; `Q6_K`: 16 positions of one half-block in each of its 4 sub-rows, 4 runs of 16
    /// columns 32 apart, see `kernels::XLayout`).
    pub fn wide_cols(self) -> u32 {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 64,
            _ => 32,
        }
    }

    /// 32-column groups (one activation scale each) that a wide lane's columns touch.
    pub fn wide_groups(self) -> u32 {
        match self {
            Self::Q6K => 4,
            _ => self.wide_cols() / 32,
        }
    }

    /// Whether the single-token mat-vec takes `x` as packed halves: the [`Self::half_x`]
    /// formats, and `Q6_K` in the wide layout only (`decode::dot_q6k_h2`).
    pub fn matvec_half(self) -> bool {
        self.half_x() || self == Self::Q6K
    }

    /// Slots per block: each a `u32` word of quants (two for `Q8_0`) whose weights sit in
    /// runs of 4 columns, so neighbouring lanes read neighbouring words and neighbouring 16-byte
    /// runs of `x`; a plain block of 4 weights is one slot.
    pub fn slots_per_block(self) -> u32 {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4K | Self::Q5K => 32,
            Self::Q6K => 16,
            _ => 4,
        }
    }

    /// Runs of 4 weights (4 consecutive columns) per slot.
    pub fn groups_per_slot(self) -> u32 {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q6K => 4,
            _ => 2,
        }
    }

    /// Consecutive slots of a block one mat-vec lane decodes. K-quants: 32 weights (one or
    /// two sub-block scales decoded per 32 weights instead of per 8). The 32-weight formats
    /// keep one slot per lane: with a whole block per lane, the lanes' `x` runs sit 128 bytes
    /// apart and a row of 18 blocks (SmolLM2) leaves most of a plane idle, which measured
    /// slower on the H200 (docs/kernels.md).
    pub fn slots_per_lane(self) -> u32 {
        match self {
            Self::Q4K | Self::Q5K => 4,
            Self::Q6K => 2,
            _ => 1,
        }
    }

    /// Lanes that share one block in the mat-vec.
    pub fn lanes_per_block(self) -> u32 {
        self.slots_per_block() / self.slots_per_lane()
    }

    /// Blocks per lane whose loads one mat-vec trip issues together (K-quants: 2; the others
    /// measured no better unrolled, see `slots_per_lane`).
    pub fn unroll(self) -> u32 {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 2,
            _ => 1,
        }
    }

    /// Whether the single-token mat-vec can take `x` as packed halves (`decode::dot_slot_h2`,
    /// `decode::dot_wide_h2`): the formats whose slot is two runs of 4 columns, each under one
    /// scale, with quants of at most 8 bits laid out so that one mask takes a pair of them (all
    /// but Q6_K and floats).
    pub fn half_x(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q4K | Self::Q5K
        )
    }

    /// What the half mat-vec subtracts from a quant made the half `1024 + n` (`decode::magic_h2`):
    /// 1024 plus the format's own offset (`Q4_0` 8, `Q5_0` 16, `Q8_0` 128 for its flipped sign).
    pub(crate) fn half_offset(self) -> f32 {
        1024.0
            + match self {
                Self::Q4_0 => 8.0,
                Self::Q5_0 => 16.0,
                Self::Q8_0 => 128.0,
                _ => 0.0,
            }
    }

    /// Products each half of a wide lane's packed-half chain sums before the chain meets `f32`
    /// (`decode::dot_block_h2`, `decode::dot_kchunk_h2`): fewer conversions and adds per
    /// weight the longer the chain, more f16 rounding in the sum. The 4-bit formats' products
    /// are below 16 in magnitude (activations are in [-1, 1]): a whole 32-weight block or
    /// K-quant sub-block, 16 per half. The 5-bit ones reach 31 and `Q8_0`'s 128: with 16 a chain,
    /// `Q5_0`'s gated half-path test on the H200 left its error budget
    /// (`HALF_X_NMSE_TOLERANCE`), so they stop at 8 and 4.
    pub(crate) fn half_chain(self) -> u32 {
        match self {
            Self::Q8_0 => 4,
            Self::Q5_0 | Self::Q5_1 | Self::Q5K => 8,
            _ => 16,
        }
    }

    /// Slots whose quant words are one aligned 16-byte load of the quant plane, where the
    /// quantized mat-mat takes them together (`decode::decode_slots_h2`): the half formats
    /// whose blocks (and, for `Q5_K`, fifth-bit words) start on 16 bytes; 1 (a slot at a time)
    /// for the rest, so above 1 implies [`Self::half_x`] (the quads decode to half pairs).
    pub fn mma_quad(self) -> u32 {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q4K | Self::Q5K => 4,
            Self::Q8_0 => 2,
            _ => 1,
        }
    }

    /// Whether a weight is `a * q + m` with an offset `m` (a min) rather than `a * q`.
    pub fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1 | Self::Q4K | Self::Q5K)
    }

    /// Byte offset of the `f16` header inside the GGUF block (`Q6_K` keeps `d` at the end).
    pub(crate) fn header_offset(self) -> usize {
        match self {
            Self::Q6K => 208,
            _ => 0,
        }
    }
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ggml().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_tile_each_block() {
        for f in KernelFormat::ALL {
            assert_eq!(
                f.slots_per_block() * f.groups_per_slot() * 4,
                f.elems_per_block(),
                "{f}"
            );
            assert_eq!(f.slots_per_block() % f.slots_per_lane(), 0, "{f}");
            // The narrowest plane (8 lanes) still covers a block.
            assert!(f.lanes_per_block() <= 8, "{f}");
            // The mat-mat's wide staging decodes half pairs, and its 16-byte loads stay
            // inside a block and a quad of slots inside one step's slots.
            if f.mma_quad() > 1 {
                assert!(f.half_x(), "{f}");
                assert_eq!((4 * f.words_per_block()) % 16, 0, "{f}");
                assert_eq!(f.slots_per_block() % f.mma_quad(), 0, "{f}");
            }
        }
    }

    #[test]
    fn planes_hold_exactly_the_gguf_bytes() {
        for f in KernelFormat::ALL {
            let ty = f.ggml();
            if matches!(f, KernelFormat::F32 | KernelFormat::F16) {
                continue;
            }
            assert_eq!(f.elems_per_block() as usize, ty.block_size(), "{f}");
            let bytes = 4 * f.words_per_block() + 2 * f.halves_per_block();
            assert_eq!(bytes as usize, ty.type_size(), "{f}");
        }
    }
}
