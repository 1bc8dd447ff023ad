//! The fast CPU matrix-vector products of the reference backend, after llama.cpp: the
//! activation vector is quantized once to the weight type's `vec_dot_type`
//! ([`GgmlType::vec_dot_type`]: `Q8_0`, `Q8_1`, `Q8_K`, or plain `f32`), then every weight row
//! is dotted with it block by block in integers.
//!
//! Kernels come in three sets, [`portable`] and, on x86-64, AVX2 (+FMA, F16C) and AVX-512
//! VNNI ([`x86`]); the set is chosen once per process by runtime detection ([`Isa::detect`]),
//! never by `-C target-cpu`. The row loops are `#[inline(always)]` generic bodies instantiated
//! inside one `#[target_feature]` function per set, so the whole loop is compiled for the
//! detected instruction set.
//!
//! Error budget against [`super::dot_ref`]: [`VEC_DOT_TOLERANCE`].

pub mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::blocks::*;
use super::quantize::{quantize_q8_0, quantize_q8_1, quantize_q8k};
use super::{GgmlType, QuantError};

/// Normalised error budget of [`vec_dot`] against the plain oracle [`super::dot_ref`], per
/// weight type: `|fast - ref| / sum_i |w_i * x_i|` must stay below it. The quantized types pay
/// for rounding the activations to 8 bits (~1/254 relative per element, mostly cancelling);
/// float types only for summation order. Measured worst cases on the golden fixtures (real
/// blocks, 256..512 columns): ~1.1e-3 quantized, ~5e-8 float; the budgets leave ~4x margin.
pub const VEC_DOT_TOLERANCE: &[(GgmlType, f64)] = &[
    (GgmlType::F32, 5e-7),
    (GgmlType::F16, 5e-7),
    (GgmlType::BF16, 5e-7),
    (GgmlType::Q4_0, 4e-3),
    (GgmlType::Q4_1, 4e-3),
    (GgmlType::Q5_0, 4e-3),
    (GgmlType::Q5_1, 4e-3),
    (GgmlType::Q8_0, 4e-3),
    (GgmlType::Q4K, 4e-3),
    (GgmlType::Q5K, 4e-3),
    (GgmlType::Q6K, 4e-3),
];

/// Looks up [`VEC_DOT_TOLERANCE`].
pub fn vec_dot_tolerance(ty: GgmlType) -> Option<f64> {
    VEC_DOT_TOLERANCE
        .iter()
        .find(|(t, _)| *t == ty)
        .map(|&(_, tol)| tol)
}

/// An instruction set the kernels are compiled for, in increasing order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any target.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Isa {
    /// The best set this CPU runs, detected once per process.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Isa::Avx512Vnni;
                }
                return Isa::Avx2;
            }
            Isa::Portable
        })
    }

    /// Every set this CPU runs (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|&isa| isa <= best)
            .collect()
    }

    /// The name reported in benchmark results: `avx512_vnni`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512_vnni",
        }
    }

    /// `self` if this CPU runs it, else the best set it does run.
    fn or_detected(self) -> Isa {
        self.min(Isa::detect())
    }
}

/// The instruction set the quantized dot products of [`matmul`] and [`vec_dot`] run with on
/// this CPU ([`Isa::name`]).
pub fn simd_level() -> &'static str {
    Isa::detect().name()
}

/// Activations prepared once per input vector (quantized to the weight type's
/// `vec_dot_type`), reused for every row. Owns its buffers: re-preparing a vector of the same
/// length allocates nothing.
#[derive(Debug, Clone)]
pub struct PreparedActs {
    dot_type: GgmlType,
    len: usize,
    f32s: Vec<f32>,
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    q8k: Vec<BlockQ8K>,
}

impl Default for PreparedActs {
    fn default() -> Self {
        Self::new()
    }
}

impl PreparedActs {
    /// Empty activations (length 0, prepared for `F32` weights).
    pub fn new() -> Self {
        Self {
            dot_type: GgmlType::F32,
            len: 0,
            f32s: Vec::new(),
            q8_0: Vec::new(),
            q8_1: Vec::new(),
            q8k: Vec::new(),
        }
    }

    /// Prepares `x` for products with weights of type `weight_type`. Fails if the type has no
    /// dot product or `x` is not a whole number of activation blocks.
    pub fn prepare(&mut self, weight_type: GgmlType, x: &[f32]) -> Result<(), QuantError> {
        let dot_type = weight_type.vec_dot_type().ok_or(QuantError::Unsupported {
            ty: weight_type,
            op: "vec_dot",
        })?;
        let block = dot_type.block_size();
        if x.len() % block != 0 {
            return Err(QuantError::PartialBlock {
                ty: dot_type,
                n: x.len(),
                block,
            });
        }
        fn fill<B>(v: &mut Vec<B>, x: &[f32], n: usize, q: fn(&[f32]) -> B) {
            v.clear();
            v.extend(x.chunks_exact(n).map(q));
        }
        match dot_type {
            GgmlType::F32 => {
                self.f32s.clear();
                self.f32s.extend_from_slice(x);
            }
            GgmlType::Q8_0 => fill(&mut self.q8_0, x, QK, quantize_q8_0),
            GgmlType::Q8_1 => fill(&mut self.q8_1, x, QK, quantize_q8_1),
            GgmlType::Q8K => fill(&mut self.q8k, x, QK_K, quantize_q8k),
            _ => unreachable!("vec_dot_type returns one of the above"),
        }
        self.dot_type = dot_type;
        self.len = x.len();
        Ok(())
    }

    /// Number of activations prepared.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no activations are prepared.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The activation format (`F32`, `Q8_0`, `Q8_1` or `Q8_K`).
    pub fn dot_type(&self) -> GgmlType {
        self.dot_type
    }

    /// Checks that these activations fit weights of `ty` with `cols` columns.
    fn check(&self, ty: GgmlType, cols: usize) -> Result<(), QuantError> {
        let needed = ty
            .vec_dot_type()
            .ok_or(QuantError::Unsupported { ty, op: "vec_dot" })?;
        if needed != self.dot_type {
            return Err(QuantError::ActsType {
                weights: ty,
                needed,
                prepared: self.dot_type,
            });
        }
        QuantError::check_len("prepared activations", cols, self.len)
    }

    // Slices of the active buffer, exactly `len` elements long once `check` passed.
    fn f32s(&self) -> &[f32] {
        &self.f32s[..self.len]
    }
    fn q8_0(&self) -> &[BlockQ8_0] {
        &self.q8_0[..self.len / QK]
    }
    fn q8_1(&self) -> &[BlockQ8_1] {
        &self.q8_1[..self.len / QK]
    }
    fn q8k(&self) -> &[BlockQ8K] {
        &self.q8k[..self.len / QK_K]
    }
}

/// One row of weights dotted with the prepared activations of `T` tokens: the portable or
/// x86 kernel of one weight type. Implementations are zero-sized and `#[inline(always)]`, so
/// the generic row loops below compile to one specialised loop per type and instruction set.
trait RowDot {
    /// Whether a call for several tokens does less work than one call per token (the kernel
    /// unpacks each weight block once for all of them).
    const GROUPED: bool;
    /// # Safety
    /// `row` holds exactly the blocks for `acts[t].len()` elements (equal for every `t`), and
    /// the CPU runs the kernel's instruction set.
    unsafe fn dot<const T: usize>(row: &[u8], acts: [&PreparedActs; T]) -> [f32; T];
    /// Whether [`RowDot::dot_tile`] and [`RowDot::unpack_row`] are implemented (and faster
    /// than [`RowDot::dot`] for four tokens or more).
    const TILED: bool = false;
    /// Row `row` unpacked for [`RowDot::dot_tile`]: 32 bytes per block into `q`, a scale per
    /// block into `d`.
    ///
    /// # Safety
    /// `row` holds `d.len()` blocks, `q` is `32 * d.len()` long; only called when `TILED`.
    #[inline(always)]
    unsafe fn unpack_row(_row: &[u8], _q: &mut [u8], _d: &mut [f32]) {
        unreachable!("only tiled kernels unpack rows")
    }
    /// `TILE_ROWS` unpacked rows times `TILE_TOKENS` tokens, equal bit for bit to
    /// [`RowDot::dot`] per row.
    ///
    /// # Safety
    /// As [`RowDot::unpack_row`], for rows of as many blocks as the activations.
    #[inline(always)]
    unsafe fn dot_tile(
        _q: [&[u8]; TILE_ROWS],
        _d: [&[f32]; TILE_ROWS],
        _acts: [&PreparedActs; TILE_TOKENS],
    ) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
        unreachable!("only tiled kernels take tiles")
    }
}

/// Rows and tokens of [`RowDot::dot_tile`].
const TILE_ROWS: usize = 4;
const TILE_TOKENS: usize = 4;

/// Kernels that take one token at a time (portable, float): `T` calls.
macro_rules! row_dots_each {
    ($module:ident: $($name:ident => $kernel:ident($acts:ident);)*) => {$(
        pub(super) struct $name;
        impl RowDot for $name {
            const GROUPED: bool = false;
            #[inline(always)]
            #[allow(unused_unsafe)]
            unsafe fn dot<const T: usize>(row: &[u8], acts: [&PreparedActs; T]) -> [f32; T] {
                let mut out = [0f32; T];
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = unsafe { $module::$kernel(row, a.$acts()) };
                }
                out
            }
        }
    )*};
}

mod portable_dots {
    use super::*;
    row_dots_each! { portable:
        Q4_0 => dot_q4_0(q8_0); Q4_1 => dot_q4_1(q8_1); Q5_0 => dot_q5_0(q8_0);
        Q5_1 => dot_q5_1(q8_1); Q8_0 => dot_q8_0(q8_0); Q4K => dot_q4k(q8k);
        Q5K => dot_q5k(q8k); Q6K => dot_q6k(q8k); F32 => dot_f32(f32s);
        F16 => dot_f16(f32s); BF16 => dot_bf16(f32s);
    }
}

/// The x86 kernels, generic over how bytes are multiplied ([`x86::Avx2`], [`x86::Vnni`]).
#[cfg(target_arch = "x86_64")]
mod x86_dots {
    use std::marker::PhantomData;

    use super::x86::IntDot;
    use super::*;

    macro_rules! row_dots_tokens {
        ($($name:ident => $kernel:ident($acts:ident);)*) => {$(
            pub(in super::super) struct $name<D>(PhantomData<D>);
            impl<D: IntDot> RowDot for $name<D> {
                const GROUPED: bool = true;
                #[inline(always)]
                unsafe fn dot<const T: usize>(row: &[u8], acts: [&PreparedActs; T]) -> [f32; T] {
                    x86::$kernel::<D, T>(row, acts.map(|a| a.$acts()))
                }
            }
        )*};
    }
    row_dots_tokens! {
        Q4_1 => dot_q4_1(q8_1); Q5_1 => dot_q5_1(q8_1); Q4K => dot_q4k(q8k);
        Q5K => dot_q5k(q8k); Q6K => dot_q6k(q8k);
    }

    const _: () = assert!(x86::TILE_ROWS == TILE_ROWS && x86::TILE_TOKENS == TILE_TOKENS);

    /// The signed formats against `Q8_0`, with row x token tiles where bytes multiply by VNNI.
    macro_rules! row_dots_signed {
        ($($name:ident => $kernel:ident, $bytes:expr, $off:expr, $unpack:ident;)*) => {$(
            pub(in super::super) struct $name<D>(PhantomData<D>);
            impl<D: IntDot> RowDot for $name<D> {
                const GROUPED: bool = true;
                const TILED: bool = D::TILES;
                #[inline(always)]
                unsafe fn dot<const T: usize>(row: &[u8], acts: [&PreparedActs; T]) -> [f32; T] {
                    x86::$kernel::<D, T>(row, acts.map(|a| a.q8_0()))
                }
                #[inline(always)]
                unsafe fn unpack_row(row: &[u8], q: &mut [u8], d: &mut [f32]) {
                    x86::unpack_signed_row(row, $bytes, q, d, |b| x86::$unpack(b))
                }
                #[inline(always)]
                unsafe fn dot_tile(
                    q: [&[u8]; TILE_ROWS],
                    d: [&[f32]; TILE_ROWS],
                    acts: [&PreparedActs; TILE_TOKENS],
                ) -> [[f32; TILE_TOKENS]; TILE_ROWS] {
                    x86::tile_signed::<D>(q, d, acts.map(|a| a.q8_0()), $off)
                }
            }
        )*};
    }
    row_dots_signed! {
        Q4_0 => dot_q4_0, 18, 8, unpack_q4_0_unsigned;
        Q5_0 => dot_q5_0, 22, 16, unpack_q5_0_unsigned;
        Q8_0 => dot_q8_0, 34, -128, unpack_q8_0_unsigned;
    }

    /// Float weights are read once per token; they are not in the hot path of quantized models.
    macro_rules! float_dots {
        ($($name:ident => $kernel:ident;)*) => {$(
            pub(in super::super) struct $name<D>(PhantomData<D>);
            impl<D> RowDot for $name<D> {
                const GROUPED: bool = false;
                #[inline(always)]
                unsafe fn dot<const T: usize>(row: &[u8], acts: [&PreparedActs; T]) -> [f32; T] {
                    let mut out = [0f32; T];
                    for (o, a) in out.iter_mut().zip(acts) {
                        *o = unsafe { x86::$kernel(row, a.f32s()) };
                    }
                    out
                }
            }
        )*};
    }
    float_dots! { F32 => dot_f32; F16 => dot_f16; BF16 => dot_bf16; }
}

/// Output of a block of rows: element `(t, r)` (token `t`, local row `r`) goes to
/// `ptr[t * stride + r]`. Parallel tasks write disjoint rows of one buffer through it.
#[derive(Clone, Copy)]
struct OutRows {
    ptr: *mut f32,
    stride: usize,
}
// SAFETY: every task writes only its own rows; the caller keeps the buffer alive.
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// The same layout starting at local row `r0`.
    ///
    /// # Safety
    /// `r0` is within the buffer.
    unsafe fn from_row(self, r0: usize) -> OutRows {
        OutRows {
            ptr: self.ptr.add(r0),
            stride: self.stride,
        }
    }
}

/// Tokens per tile in the batched loop: the tile's activations stay in cache while each row
/// of the chunk is read once for all of them.
const TOKEN_TILE: usize = 16;

/// Rows the tiled kernels unpack at a time: 256 rows of 2048 columns are 576 KiB.
const UNPACK_ROWS: usize = 256;
const _: () = assert!(UNPACK_ROWS.is_multiple_of(TILE_ROWS));

thread_local! {
    /// Rows unpacked for the tiled kernels (bytes, scales), grown to the largest chunk seen.
    static UNPACKED: std::cell::RefCell<(Vec<u8>, Vec<f32>)> = Default::default();
}

/// Tokens per kernel call inside a tile: each weight block is unpacked once for this many.
const TOKENS_PER_DOT: usize = 4;

/// Rows `weights` (`row_bytes` each) times every token of `acts`, into `out`.
#[inline(always)]
unsafe fn rows_body<K: RowDot>(
    weights: &[u8],
    row_bytes: usize,
    acts: &[PreparedActs],
    out: OutRows,
) {
    let rows = weights.len() / row_bytes;
    let put = |t: usize, r: usize, v: f32| *out.ptr.add(t * out.stride + r) = v;
    let row_at = |r: usize| weights.get_unchecked(r * row_bytes..(r + 1) * row_bytes);
    // Prefill with a tiled kernel: blocks of whole tiles' rows are unpacked once, for every
    // token, into this thread's scratch (a bounded block, so it stays in L2).
    let tiled_rows = if K::TILED && acts.len() >= TILE_TOKENS {
        rows - rows % TILE_ROWS
    } else {
        0
    };
    // A pointer rather than a closure run by `with`: the loop must stay inside this function,
    // which is compiled for the detected instruction set (a closure may be left out of line,
    // without the target features). Nothing below re-enters: no other borrow of it exists.
    let (q, d) = &mut *UNPACKED.with(|scratch| scratch.as_ptr());
    let nb = acts.first().map_or(0, |a| a.len() / 32);
    for r0 in (0..tiled_rows).step_by(UNPACK_ROWS) {
        let r1 = (r0 + UNPACK_ROWS).min(tiled_rows);
        q.resize((r1 - r0) * nb * 32, 0);
        d.resize((r1 - r0) * nb, 0.0);
        for r in r0..r1 {
            let i = r - r0;
            K::unpack_row(
                row_at(r),
                &mut q[i * nb * 32..(i + 1) * nb * 32],
                &mut d[i * nb..(i + 1) * nb],
            );
        }
        for (tile_idx, tile) in acts.chunks(TOKEN_TILE).enumerate() {
            let t0 = tile_idx * TOKEN_TILE;
            let tiled_tokens = tile.len() - tile.len() % TILE_TOKENS;
            for r in (r0..r1).step_by(TILE_ROWS) {
                let at = |i: usize| r - r0 + i;
                let qs: [&[u8]; TILE_ROWS] =
                    std::array::from_fn(|i| &q[at(i) * nb * 32..(at(i) + 1) * nb * 32]);
                let ds: [&[f32]; TILE_ROWS] =
                    std::array::from_fn(|i| &d[at(i) * nb..(at(i) + 1) * nb]);
                for (g, group) in tile[..tiled_tokens].chunks_exact(TILE_TOKENS).enumerate() {
                    let v = K::dot_tile(qs, ds, std::array::from_fn(|k| &group[k]));
                    for (i, v) in v.into_iter().enumerate() {
                        for (k, v) in v.into_iter().enumerate() {
                            put(t0 + g * TILE_TOKENS + k, r + i, v);
                        }
                    }
                }
                for (k, a) in tile[tiled_tokens..].iter().enumerate() {
                    for i in 0..TILE_ROWS {
                        put(
                            t0 + tiled_tokens + k,
                            r + i,
                            K::dot::<1>(row_at(r + i), [a])[0],
                        );
                    }
                }
            }
        }
    }
    for (tile_idx, tile) in acts.chunks(TOKEN_TILE).enumerate() {
        rows_untiled::<K>(tiled_rows, rows, tile, tile_idx * TOKEN_TILE, &row_at, &put);
    }
}

/// Rows `r0..rows` times the tokens of `tile` (token `t0` first), one row at a time.
#[inline(always)]
unsafe fn rows_untiled<'a, K: RowDot>(
    r0: usize,
    rows: usize,
    tile: &[PreparedActs],
    t0: usize,
    row_at: &impl Fn(usize) -> &'a [u8],
    put: &impl Fn(usize, usize, f32),
) {
    for r in r0..rows {
        let row = row_at(r);
        let group = if K::GROUPED {
            TOKENS_PER_DOT
        } else {
            tile.len() + 1
        };
        let groups = tile.chunks_exact(group);
        let rest = groups.remainder();
        let mut t = t0;
        for g in groups {
            let v = K::dot::<TOKENS_PER_DOT>(row, std::array::from_fn(|k| &g[k]));
            for (k, v) in v.into_iter().enumerate() {
                put(t + k, r, v);
            }
            t += TOKENS_PER_DOT;
        }
        for a in rest {
            put(t, r, K::dot::<1>(row, [a])[0]);
            t += 1;
        }
    }
}

type RowsFn = unsafe fn(GgmlType, &[u8], usize, &[PreparedActs], OutRows);

macro_rules! dispatch_rows {
    ($dots:ident $(<$d:ty>)?, $ty:expr, $($args:expr),*) => {
        match $ty {
            GgmlType::Q4_0 => rows_body::<$dots::Q4_0$(<$d>)?>($($args),*),
            GgmlType::Q4_1 => rows_body::<$dots::Q4_1$(<$d>)?>($($args),*),
            GgmlType::Q5_0 => rows_body::<$dots::Q5_0$(<$d>)?>($($args),*),
            GgmlType::Q5_1 => rows_body::<$dots::Q5_1$(<$d>)?>($($args),*),
            GgmlType::Q8_0 => rows_body::<$dots::Q8_0$(<$d>)?>($($args),*),
            GgmlType::Q4K => rows_body::<$dots::Q4K$(<$d>)?>($($args),*),
            GgmlType::Q5K => rows_body::<$dots::Q5K$(<$d>)?>($($args),*),
            GgmlType::Q6K => rows_body::<$dots::Q6K$(<$d>)?>($($args),*),
            GgmlType::F32 => rows_body::<$dots::F32$(<$d>)?>($($args),*),
            GgmlType::F16 => rows_body::<$dots::F16$(<$d>)?>($($args),*),
            GgmlType::BF16 => rows_body::<$dots::BF16$(<$d>)?>($($args),*),
            _ => unreachable!("validated at the public entry"),
        }
    };
}

unsafe fn rows_portable(ty: GgmlType, w: &[u8], rb: usize, acts: &[PreparedActs], out: OutRows) {
    dispatch_rows!(portable_dots, ty, w, rb, acts, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(ty: GgmlType, w: &[u8], rb: usize, acts: &[PreparedActs], out: OutRows) {
    dispatch_rows!(x86_dots<x86::Avx2>, ty, w, rb, acts, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_avx512_vnni(ty: GgmlType, w: &[u8], rb: usize, acts: &[PreparedActs], out: OutRows) {
    dispatch_rows!(x86_dots<x86::Vnni>, ty, w, rb, acts, out)
}

fn rows_fn(isa: Isa) -> RowsFn {
    match isa.or_detected() {
        Isa::Portable => rows_portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => rows_avx2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => rows_avx512_vnni,
        #[cfg(not(target_arch = "x86_64"))]
        _ => rows_portable,
    }
}

/// Checks a weight matrix against prepared activations; returns the bytes per row.
fn check_weights(
    ty: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    acts: &[PreparedActs],
) -> Result<usize, QuantError> {
    if !ty.is_supported_weight() {
        return Err(QuantError::Unsupported { ty, op: "vec_dot" });
    }
    for a in acts {
        a.check(ty, cols)?;
    }
    let block = ty.block_size();
    if cols % block != 0 {
        return Err(QuantError::PartialBlock { ty, n: cols, block });
    }
    let row_bytes = cols / block * ty.type_size();
    let total = rows.checked_mul(row_bytes).ok_or(QuantError::Length {
        what: "weights",
        expected: usize::MAX,
        got: weights.len(),
    })?;
    QuantError::check_len("weight bytes", total, weights.len())?;
    Ok(row_bytes)
}

/// `row . x` for one weight row of type `ty` against activations prepared for `ty`.
pub fn vec_dot(ty: GgmlType, row: &[u8], acts: &PreparedActs) -> Result<f32, QuantError> {
    vec_dot_with(Isa::detect(), ty, row, acts)
}

/// [`vec_dot`] with an explicit instruction set (for tests and benchmarks). An `Isa` the CPU
/// lacks falls back to the best one it has.
pub fn vec_dot_with(
    isa: Isa,
    ty: GgmlType,
    row: &[u8],
    acts: &PreparedActs,
) -> Result<f32, QuantError> {
    let row_bytes = check_weights(ty, row, 1, acts.len(), std::slice::from_ref(acts))?;
    let mut out = 0f32;
    if row_bytes == 0 {
        return Ok(out);
    }
    // SAFETY: lengths validated above; `rows_fn` picks a set this CPU runs; one output element.
    unsafe {
        rows_fn(isa)(
            ty,
            row,
            row_bytes,
            std::slice::from_ref(acts),
            OutRows {
                ptr: &mut out,
                stride: 1,
            },
        )
    };
    Ok(out)
}

/// `out[r] = row_r(weights) . x` for `r in 0..rows`; `weights` is `rows` rows of `cols`
/// elements of type `ty`, `acts` holds `x` prepared for `ty`. Rows run in parallel on
/// rayon's pool, in chunks of rows; nothing is allocated.
pub fn matvec(
    ty: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    acts: &PreparedActs,
    out: &mut [f32],
) -> Result<(), QuantError> {
    matmul(ty, weights, rows, cols, std::slice::from_ref(acts), out)
}

/// Batched product: `out[t * rows + r] = row_r . x_t` for `t in 0..acts.len()`. Rows are the
/// outer loop (in parallel chunks) so each weight row is read from memory once for all tokens.
pub fn matmul(
    ty: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    acts: &[PreparedActs],
    out: &mut [f32],
) -> Result<(), QuantError> {
    matmul_with(Isa::detect(), ty, weights, rows, cols, acts, out)
}

/// [`matmul`] with an explicit instruction set (for tests and benchmarks).
pub fn matmul_with(
    isa: Isa,
    ty: GgmlType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    acts: &[PreparedActs],
    out: &mut [f32],
) -> Result<(), QuantError> {
    let row_bytes = check_weights(ty, weights, rows, cols, acts)?;
    QuantError::check_len("output", rows * acts.len(), out.len())?;
    if row_bytes == 0 {
        out.fill(0.0);
    }
    if rows == 0 || acts.is_empty() || row_bytes == 0 {
        return Ok(());
    }
    let kernel = rows_fn(isa);
    let out = OutRows {
        ptr: out.as_mut_ptr(),
        stride: rows,
    };
    let chunk = chunk_rows(rows, row_bytes * acts.len());
    let run = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY: lengths validated above; chunk `c` writes only rows r0..r1 of every token.
        unsafe {
            kernel(
                ty,
                &weights[r0 * row_bytes..r1 * row_bytes],
                row_bytes,
                acts,
                out.from_row(r0),
            )
        }
    };
    let n_chunks = rows.div_ceil(chunk);
    if n_chunks == 1 {
        run(0);
    } else {
        (0..n_chunks).into_par_iter().for_each(run);
    }
    Ok(())
}

/// Rows per parallel task: about four tasks per thread for balance, but at least ~16 KiB of
/// work each so rayon's overhead stays small; one chunk when the whole product is tiny.
fn chunk_rows(rows: usize, bytes_per_row: usize) -> usize {
    const MIN_TASK_BYTES: usize = 16 << 10;
    let threads = rayon::current_num_threads().max(1);
    let by_balance = rows.div_ceil(threads * 4);
    let by_size = MIN_TASK_BYTES.div_ceil(bytes_per_row.max(1));
    by_balance.max(by_size).clamp(1, rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_preparing_same_length_allocates_nothing() {
        let x: Vec<f32> = (0..512).map(|i| (i as f32).sin()).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4K, GgmlType::F16] {
            let mut a = PreparedActs::new();
            a.prepare(ty, &x).unwrap();
            let ptrs = (
                a.f32s.as_ptr(),
                a.q8_0.as_ptr(),
                a.q8_1.as_ptr(),
                a.q8k.as_ptr(),
            );
            a.prepare(ty, &x[..256]).unwrap();
            a.prepare(ty, &x).unwrap();
            assert_eq!(
                ptrs,
                (
                    a.f32s.as_ptr(),
                    a.q8_0.as_ptr(),
                    a.q8_1.as_ptr(),
                    a.q8k.as_ptr()
                )
            );
            assert_eq!((a.len(), a.dot_type()), (512, ty.vec_dot_type().unwrap()));
        }
    }

    #[test]
    fn chunks_split_big_products_and_keep_small_ones_whole() {
        assert!(chunk_rows(49152, 612) < 49152 / 2);
        assert_eq!(chunk_rows(4, 64), 4);
    }
}
