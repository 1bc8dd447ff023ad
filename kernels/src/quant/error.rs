//! The one error type of the quant module, returned by every validating public entry.

use super::GgmlType;

/// Why a quant operation refused its arguments. Inputs are validated once at each public
/// entry; nothing past that point panics on bad lengths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The operation has no implementation for this type.
    #[error("{op} is not supported for tensor type {ty}")]
    Unsupported { ty: GgmlType, op: &'static str },
    /// The element count is not a whole number of blocks.
    #[error("{n} elements is not a whole number of {ty} blocks ({block} elements each)")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    /// A byte buffer has the wrong length for its element count.
    #[error("a {ty} buffer of {n} elements takes {expected} bytes, got {got}")]
    ByteLength {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    /// Two arguments disagree on a length (`what` names the argument).
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// Activations were prepared for another dot type than the weights need.
    #[error("activations prepared as {prepared} but {weights} weights need {needed}")]
    ActsType {
        weights: GgmlType,
        needed: GgmlType,
        prepared: GgmlType,
    },
}

impl QuantError {
    /// Checks that `bytes` bytes hold exactly `n` elements of `ty`.
    pub fn check_row(ty: GgmlType, n: usize, bytes: usize) -> Result<(), Self> {
        let block = ty.block_size();
        if n % block != 0 {
            return Err(Self::PartialBlock { ty, n, block });
        }
        let expected = n / block * ty.type_size();
        if bytes != expected {
            return Err(Self::ByteLength {
                ty,
                n,
                expected,
                got: bytes,
            });
        }
        Ok(())
    }

    /// Checks that two lengths agree.
    pub fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Self> {
        if expected == got {
            Ok(())
        } else {
            Err(Self::Length {
                what,
                expected,
                got,
            })
        }
    }
}
