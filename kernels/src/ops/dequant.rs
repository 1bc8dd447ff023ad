//! GGUF weights on the device, kept in their file layout: the bytes go up once as 32-bit words
//! and kernels decode elements in place (the byte layouts are those of [`crate::quant::blocks`]).
//!
//! Also the plain linear kernel (`out = W · x`, one cube per output, one element at a time):
//! the simple path that the tuned mat-vec kernels are checked against, and the one the GPU
//! backend falls back to for formats without a tuned kernel.

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::gpu::{grid, Buf, Gpu};
use super::norm::cube_sum;
use crate::GgmlType;

// ggml type ids, the comptime key of each decoder variant.
const T_F32: u32 = 0;
const T_F16: u32 = 1;
const T_Q4_0: u32 = 2;
const T_Q4_1: u32 = 3;
const T_Q5_0: u32 = 6;
const T_Q5_1: u32 = 7;
const T_Q8_0: u32 = 8;
const T_BF16: u32 = 30;

/// Formats the device decoders read.
pub const DEVICE_FORMATS: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Bytes of one 32-element block of a simple quant format (comptime helper).
fn block_bytes(ty: u32) -> usize {
    GgmlType::from_id(ty).map_or(0, GgmlType::type_size)
}

/// Byte `i` of a little-endian byte stream stored as words.
#[cube]
pub fn byte_at(w: &Array<u32>, i: usize) -> u32 {
    (w[i / 4] >> ((i % 4) * 8) as u32) & 0xFF
}

/// The 16-bit little-endian value at even byte offset `i`.
#[cube]
fn u16_at(w: &Array<u32>, i: usize) -> u32 {
    (w[i / 4] >> ((i % 4) * 8) as u32) & 0xFFFF
}

/// IEEE half bits to f32, subnormals and infinities included (no f16 hardware needed).
#[cube]
pub fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1F;
    let mant = h & 0x3FF;
    let mut v = f32::reinterpret(sign | ((exp + 112) << 23) | (mant << 13));
    if exp == 0 {
        // 2^-24 per mantissa step
        v = f32::cast_from(mant) * 5.960_464_5e-8;
        if sign != 0 {
            v = -v;
        }
    } else if exp == 31 {
        v = f32::reinterpret(sign | 0x7F80_0000 | (mant << 13));
    }
    v
}

/// The 4-bit quant of element `j` (0..32) of a block whose 16 quant bytes start at `qs`:
/// element `j` is the low nibble of byte `j`, element `j + 16` its high nibble.
#[cube]
fn nibble(w: &Array<u32>, qs: usize, j: usize) -> u32 {
    let byte = byte_at(w, qs + j % 16);
    let mut q = byte & 0xF;
    if j >= 16 {
        q = byte >> 4;
    }
    q
}

/// Bit 4 of a 5-bit quant: bit `j` of the little-endian 32-bit `qh` at byte `qh`.
#[cube]
fn high_bit(w: &Array<u32>, qh: usize, j: usize) -> u32 {
    ((byte_at(w, qh + j / 8) >> (j % 8) as u32) & 1) << 4
}

/// Element `e` of the row whose bytes start at `row` (GGUF layout of type `ty`).
#[cube]
pub fn element(w: &Array<u32>, row: usize, e: usize, #[comptime] ty: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime!(ty == T_F32) {
        v = f32::reinterpret(w[row / 4 + e]);
    } else if comptime!(ty == T_F16) {
        v = f16_bits_to_f32(u16_at(w, row + 2 * e));
    } else if comptime!(ty == T_BF16) {
        v = f32::reinterpret(u16_at(w, row + 2 * e) << 16);
    } else {
        let j = e % 32;
        let b = row + (e / 32) * comptime!(block_bytes(ty));
        let d = f16_bits_to_f32(u16_at(w, b));
        if comptime!(ty == T_Q8_0) {
            let mut q = i32::cast_from(byte_at(w, b + 2 + j));
            if q >= 128 {
                q -= 256;
            }
            v = d * f32::cast_from(q);
        } else if comptime!(ty == T_Q4_0) {
            v = d * (f32::cast_from(nibble(w, b + 2, j)) - 8.0);
        } else if comptime!(ty == T_Q4_1) {
            let m = f16_bits_to_f32(u16_at(w, b + 2));
            v = d * f32::cast_from(nibble(w, b + 4, j)) + m;
        } else if comptime!(ty == T_Q5_0) {
            let q = nibble(w, b + 6, j) | high_bit(w, b + 2, j);
            v = d * (f32::cast_from(q) - 16.0);
        } else if comptime!(ty == T_Q5_1) {
            let m = f16_bits_to_f32(u16_at(w, b + 2));
            let q = nibble(w, b + 8, j) | high_bit(w, b + 4, j);
            v = d * f32::cast_from(q) + m;
        }
    }
    v
}

/// A weight matrix `(rows, cols)` on the device in its GGUF layout.
pub struct DeviceWeight {
    pub buf: Buf,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

/// A weight format the device decoders do not read.
#[derive(Debug, thiserror::Error)]
#[error("weights of type {ty} cannot be used on the GPU yet (device formats: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0)")]
pub struct UnsupportedFormat {
    pub ty: GgmlType,
}

impl DeviceWeight {
    /// Uploads `bytes` (GGUF layout, `rows` rows of `cols`) once.
    pub fn upload<R: Runtime>(
        gpu: &Gpu<R>,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, UnsupportedFormat> {
        if !DEVICE_FORMATS.contains(&ty) || cols % 32 != 0 {
            return Err(UnsupportedFormat { ty });
        }
        let row_bytes = ty.row_bytes(cols as u64).expect("cols are whole blocks") as usize;
        assert_eq!(
            bytes.len(),
            rows * row_bytes,
            "weight bytes do not match ({rows}, {cols}) {ty}"
        );
        Ok(Self {
            buf: gpu.words(bytes),
            ty,
            rows,
            cols,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.ty
            .row_bytes(self.cols as u64)
            .expect("validated at upload") as usize
    }

    pub fn bytes(&self) -> u64 {
        (self.rows * self.row_bytes()) as u64
    }
}

/// Threads per cube of the plain linear kernel.
pub(crate) const LINEAR_CUBE: usize = 64;

/// Cube `t * rows + r` computes `out[t * rows + r] = W[r] · x[t]`.
#[cube(launch_unchecked)]
pub fn linear_plain_kernel(
    w: &Array<u32>,
    x: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    cols: u32,
    row_bytes: u32,
    n: u32,
    #[comptime] ty: u32,
    #[comptime] block: usize,
) {
    let total = rows as usize * n as usize;
    // Cubes past the end (a folded grid) compute a valid row and skip the store, so every
    // unit reaches the barriers of the sum.
    let idx = min(CUBE_POS, total - 1);
    let r = idx % rows as usize;
    let t = idx / rows as usize;
    let row = r * row_bytes as usize;
    let xb = t * cols as usize;
    let mut acc = 0.0f32;
    let mut e = UNIT_POS as usize;
    while e < cols as usize {
        acc += element(w, row, e, ty) * x[xb + e];
        e += block;
    }
    let s = cube_sum(acc, block);
    if CUBE_POS < total && UNIT_POS == 0 {
        out[idx] = s;
    }
}

/// `out[t] = W · x[t]` for the first `n` rows of `x`.
pub fn launch_linear_plain<R: Runtime>(
    gpu: &Gpu<R>,
    w: &DeviceWeight,
    x: &Buf,
    out: &Buf,
    n: usize,
) {
    assert!(
        n >= 1 && n * w.cols <= x.len() && n * w.rows <= out.len(),
        "linear {}x{}: {n} rows out of range",
        w.rows,
        w.cols
    );
    gpu.count();
    // SAFETY: every cube reads row r < rows of W and row t < n of x, both asserted above.
    unsafe {
        launch::launch(
            gpu.client(),
            linear_plain_kernel::LinearPlainKernel::<R>::new(
                launch::settings(CubeDim::new_1d(LINEAR_CUBE as u32)),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                array_arg(),
                (),
                (),
                (),
                (),
                w.ty.id(),
                LINEAR_CUBE,
            ),
            grid(n * w.rows),
            &[
                Arg::buf::<u32>(&w.buf),
                Arg::buf::<f32>(&x),
                Arg::buf::<f32>(&out),
                Arg::U32(w.rows as u32),
                Arg::U32(w.cols as u32),
                Arg::U32(w.row_bytes() as u32),
                Arg::U32(n as u32),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn block_bytes_follow_ggml() {
        assert_eq!(super::block_bytes(super::T_Q4_0), 18);
        assert_eq!(super::block_bytes(super::T_Q8_0), 34);
        assert_eq!(super::block_bytes(super::T_Q5_1), 24);
    }
}
