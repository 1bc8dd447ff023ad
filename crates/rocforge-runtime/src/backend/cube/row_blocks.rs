//! Weights larger than the device's largest buffer: a matrix held as row blocks, each its own
//! device buffer. Vulkan drivers bind 128 MiB to a few GiB per storage buffer, less than a
//! large vocabulary's embedding (Gemma 3's 262,144 x 640 `Q8_0` table is 170 MiB) or output
//! matrix (~0.5-1 GiB on an 8B model with a 128k vocabulary), and these two are what exceed
//! it in practice. A matrix that fits stays one block, so unsplit weights run exactly as before.
//!
//! A block is a whole number of rows starting at a multiple of [`ROW_ALIGN`], so each block's
//! slice of a logits row starts on a binding-aligned offset and its mat-vec writes there
//! directly; the lookup launches once per block with the block's row range (tokens of other
//! blocks are skipped), or once into the one block that holds a single token.

use rocforge_kernels::ops::gpu::{Gpu, Runtime};
use rocforge_kernels::GgmlType;

use super::Matrix;

/// Rows of a block start at multiples of this: 64 `f32` logits are 256 bytes, wgpu's storage
/// binding offset alignment.
pub(super) const ROW_ALIGN: usize = 64;

/// Rows per block of a `rows` x `cols` matrix of `ty` for blocks of at most `max_bytes`
/// device bytes: every row when the matrix fits, else the largest multiple of [`ROW_ALIGN`]
/// that fits. An error when not even [`ROW_ALIGN`] rows fit.
pub(super) fn rows_per_block(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    max_bytes: u64,
) -> Result<usize, String> {
    // The device layouts add nothing to a GGUF row but padding of the plain types to whole
    // groups of 4 weights (`ops::matmul::layout`).
    let padded = cols.next_multiple_of(ty.block_size().max(4)) as u64;
    let row_bytes = ty
        .row_bytes(padded)
        .ok_or_else(|| format!("{cols} columns are not whole {ty} blocks"))?;
    let fit = (max_bytes / row_bytes.max(1)) as usize;
    if fit >= rows {
        return Ok(rows);
    }
    let aligned = fit / ROW_ALIGN * ROW_ALIGN;
    if aligned == 0 {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        return Err(format!(
            "a block of {ROW_ALIGN} rows needs {:.2} MiB and this device binds at most {:.2} MiB per buffer",
            mib(ROW_ALIGN as u64 * row_bytes),
            mib(max_bytes)
        ));
    }
    Ok(aligned)
}

/// Rows `first..first + rows` of a matrix, in one device buffer (two planes for the tuned
/// layout).
pub(super) struct RowBlock<R: Runtime> {
    pub first: usize,
    pub rows: usize,
    pub m: Matrix<R>,
}

/// A `(rows, cols)` matrix as row blocks (one block when it fits in a buffer).
pub(super) struct RowBlocks<R: Runtime> {
    blocks: Vec<RowBlock<R>>,
}

impl<R: Runtime> RowBlocks<R> {
    /// Uploads the GGUF bytes of a `rows` x `cols` matrix of `ty` in blocks of at most
    /// `max_bytes` device bytes.
    pub fn upload(
        gpu: &Gpu<R>,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        max_bytes: u64,
    ) -> Result<Self, String> {
        let per_block = rows_per_block(ty, rows, cols, max_bytes)?;
        let row_bytes = bytes.len() / rows.max(1);
        let blocks = (0..rows)
            .step_by(per_block)
            .map(|first| {
                let n = per_block.min(rows - first);
                let part = &bytes[first * row_bytes..(first + n) * row_bytes];
                Matrix::upload(gpu, ty, part, n, cols).map(|m| RowBlock { first, rows: n, m })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { blocks })
    }

    /// The matrix when it is one block.
    pub fn single(&self) -> Option<&Matrix<R>> {
        match &self.blocks[..] {
            [b] => Some(&b.m),
            _ => None,
        }
    }

    pub fn blocks(&self) -> &[RowBlock<R>] {
        &self.blocks
    }

    /// The block holding row `row` (the caller has checked `row` is below the row count).
    pub fn block_of(&self, row: usize) -> &RowBlock<R> {
        let k = self.blocks.partition_point(|b| b.first <= row);
        &self.blocks[k.saturating_sub(1)]
    }

    /// Whether every block takes the tuned kernels.
    pub fn is_tuned(&self) -> bool {
        self.blocks.iter().all(|b| matches!(b.m, Matrix::Tuned(_)))
    }

    /// The same device buffers again (a tied output projection reads the embedding's), where
    /// every block takes the tuned kernels.
    pub fn shared(&self) -> Option<Self> {
        let blocks = self.blocks.iter().map(|b| match &b.m {
            Matrix::Tuned(w) => Some(RowBlock {
                first: b.first,
                rows: b.rows,
                m: Matrix::Tuned(w.clone()),
            }),
            Matrix::Plain(_) => None,
        });
        Some(Self {
            blocks: blocks.collect::<Option<Vec<_>>>()?,
        })
    }

    /// Bytes of the GGUF tensor it came from.
    pub fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.m.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matrix_that_fits_is_one_block() {
        // Q8_0: 34 bytes per 32 weights.
        assert_eq!(rows_per_block(GgmlType::Q8_0, 320, 64, 320 * 68), Ok(320));
        assert_eq!(rows_per_block(GgmlType::Q8_0, 320, 64, u64::MAX), Ok(320));
    }

    #[test]
    fn blocks_are_whole_aligned_rows_within_the_limit() {
        // 150 rows' worth: blocks of 128 rows (320 rows: 128 + 128 + 64).
        assert_eq!(rows_per_block(GgmlType::Q8_0, 320, 64, 150 * 68), Ok(128));
        // Gemma 3's embedding on lavapipe: 262,144 x 640 Q8_0 (680-byte rows) under 128 MiB.
        let rows = rows_per_block(GgmlType::Q8_0, 262_144, 640, 128 << 20).unwrap();
        assert_eq!(rows % ROW_ALIGN, 0);
        assert!(rows as u64 * 680 <= 128 << 20 && (rows + ROW_ALIGN) as u64 * 680 > 128 << 20);
        // F16 rows pad to whole groups of 4 weights: 34 weights take 36 * 2 bytes.
        assert_eq!(rows_per_block(GgmlType::F16, 1000, 34, 64 * 72), Ok(64));
        assert!(rows_per_block(GgmlType::F16, 1000, 34, 64 * 72 - 1).is_err());
    }

    #[test]
    fn too_small_a_buffer_for_one_aligned_block_is_an_error() {
        let e = rows_per_block(GgmlType::Q8_0, 320, 64, 63 * 68).unwrap_err();
        assert!(e.contains("binds at most"), "{e}");
    }
}
