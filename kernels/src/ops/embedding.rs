//! Embedding lookup (`token_embd`): `x[t] = dequantize(token_embd[tokens[t]])`, rows read in
//! their GGUF layout by the device decoders of [`super::dequant`].

use cubecl::prelude::*;

use super::launch::{self, array_arg, Arg};

use super::dequant::{element, DeviceWeight};
use super::gpu::{elementwise, Buf, Gpu};

/// Reference: the row of `token` as f32 (what the CPU backend does per token).
pub fn embed_row(
    ty: crate::GgmlType,
    table: &[u8],
    n_cols: usize,
    token: usize,
    out: &mut [f32],
) -> Result<(), crate::quant::QuantError> {
    let row_bytes = ty.row_bytes(n_cols as u64).unwrap_or(0) as usize;
    crate::quant::dequantize_row(ty, &table[token * row_bytes..(token + 1) * row_bytes], out)
}

/// One unit per (token, column). With `from_scalar` the single token is `token0` (decode:
/// nothing to upload); otherwise token `t` is `tokens[t]`. With `ranged`, `w` is the row block
/// `row0..row0 + rows` of a larger table: tokens outside it are skipped (another block's launch
/// writes them) and the others read row `tokens[t] - row0`.
#[cube(launch_unchecked)]
pub fn embedding_kernel(
    w: &Array<u32>,
    tokens: &Array<u32>,
    out: &mut Array<f32>,
    token0: u32,
    n: u32,
    cols: u32,
    row_bytes: u32,
    row0: u32,
    rows: u32,
    #[comptime] ty: u32,
    #[comptime] from_scalar: bool,
    #[comptime] ranged: bool,
) {
    let idx = ABSOLUTE_POS;
    if idx < n as usize * cols as usize {
        let t = idx / cols as usize;
        let e = idx % cols as usize;
        let mut tok = token0;
        if comptime!(!from_scalar) {
            tok = tokens[t];
        }
        let mut inside = true;
        if comptime!(ranged) {
            inside = tok >= row0 && tok < row0 + rows;
        }
        if inside {
            if comptime!(ranged) {
                tok -= row0;
            }
            out[idx] = element(w, tok as usize * row_bytes as usize, e, ty);
        }
    }
}

/// Which tokens to embed.
#[derive(Clone, Copy)]
pub enum Tokens<'a> {
    /// One token id, passed as a kernel argument.
    One(u32),
    /// `n` ids already on the device.
    Device(&'a Buf, usize),
}

/// Embeds the tokens into rows `0..n` of `out`. Token ids must be below `w.rows` (the caller
/// validates them on the host, where they come from).
pub fn launch_embedding<R: Runtime>(
    gpu: &Gpu<R>,
    w: &DeviceWeight,
    tokens: Tokens<'_>,
    dummy: &Buf,
    out: &Buf,
) {
    let (ids, n, token0, from_scalar) = match tokens {
        Tokens::One(t) => (dummy, 1, t, true),
        Tokens::Device(b, n) => (b, n, 0, false),
    };
    assert!(
        token0 < w.rows as u32,
        "embedding: token {token0} outside {} rows",
        w.rows
    );
    launch(gpu, w, ids, n, token0, None, out, from_scalar);
}

/// The lookup of a table split into row blocks, for the block `w` holding rows
/// `first_row..first_row + w.rows`: rows `t < n` of `out` whose id in `ids` falls in the block
/// get that row; the others are left as they are (one launch per block embeds a batch).
pub fn launch_embedding_rows<R: Runtime>(
    gpu: &Gpu<R>,
    w: &DeviceWeight,
    first_row: usize,
    ids: &Buf,
    n: usize,
    out: &Buf,
) {
    assert!(
        first_row + w.rows <= u32::MAX as usize,
        "embedding: row block past 32-bit ids"
    );
    launch(gpu, w, ids, n, 0, Some(first_row as u32), out, false);
}

#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime>(
    gpu: &Gpu<R>,
    w: &DeviceWeight,
    ids: &Buf,
    n: usize,
    token0: u32,
    first_row: Option<u32>,
    out: &Buf,
    from_scalar: bool,
) {
    assert!(
        n >= 1 && (from_scalar || n <= ids.len()) && n * w.cols <= out.len(),
        "embedding: {n} tokens out of range"
    );
    let (count, dim) = elementwise(n * w.cols);
    gpu.count();
    // SAFETY: the kernel guards its unit count; token ids are below `w.rows`, or inside the
    // block's range when ranged (caller contract).
    unsafe {
        launch::launch(
            gpu.client(),
            embedding_kernel::EmbeddingKernel::<R>::new(
                launch::settings(dim),
                gpu.client().clone(),
                array_arg(),
                array_arg(),
                array_arg(),
                (),
                (),
                (),
                (),
                (),
                (),
                w.ty.id(),
                from_scalar,
                first_row.is_some(),
            ),
            count,
            &[
                Arg::buf::<u32>(&w.buf),
                Arg::buf::<u32>(&ids),
                Arg::buf::<f32>(&out),
                Arg::U32(token0),
                Arg::U32(n as u32),
                Arg::U32(w.cols as u32),
                Arg::U32(w.row_bytes() as u32),
                Arg::U32(first_row.unwrap_or(0)),
                Arg::U32(w.rows as u32),
            ],
        )
    }
}
