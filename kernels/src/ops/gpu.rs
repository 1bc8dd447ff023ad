//! Device plumbing shared by every op's launcher: a CubeCL client with a launch counter, flat
//! device buffers, uploads and read-backs. The runtime crate reaches CubeCL only through this
//! module (and the launchers beside each op), so CubeCL types stay inside `rocforge-kernels`.

use std::sync::atomic::{AtomicU64, Ordering};

pub use cubecl;
use cubecl::prelude::*;
pub use cubecl::prelude::{ComputeClient, Runtime};
use cubecl::server::Handle;

/// What can go wrong talking to a device after it was created.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("reading a device buffer failed: {0}")]
    Read(String),
    #[error("device synchronisation failed: {0}")]
    Sync(String),
}

/// A compute client plus the number of kernels launched through it (decode speed is decided
/// by launch count, so every launcher counts itself).
pub struct Gpu<R: Runtime> {
    client: ComputeClient<R>,
    launches: AtomicU64,
}

/// A flat device buffer of `len` elements of `elem_bytes` each.
#[derive(Clone, Debug)]
pub struct Buf {
    handle: Handle,
    len: usize,
    elem_bytes: usize,
}

impl Buf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes per element: 4 (f32, u32) or 2 (f16).
    pub fn elem_bytes(&self) -> usize {
        self.elem_bytes
    }
    /// Bytes the buffer holds.
    pub fn bytes(&self) -> u64 {
        (self.len * self.elem_bytes) as u64
    }
    /// The device handle, for launchers that take handles (`ops::matmul`).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// Elements `start..start + len` as a buffer of their own (the same memory). Where it
    /// is bound, `start * elem_bytes` must be a multiple of 256 (wgpu's binding offsets).
    pub fn view(&self, start: usize, len: usize) -> Buf {
        assert!(
            start + len <= self.len,
            "view {start}..{} of a buffer of {}",
            start + len,
            self.len
        );
        let handle = match start {
            0 => self.handle.clone(),
            _ => self
                .handle
                .clone()
                .offset_start((start * self.elem_bytes) as u64),
        };
        Buf {
            handle,
            len,
            elem_bytes: self.elem_bytes,
        }
    }
}

impl<R: Runtime> Gpu<R> {
    pub fn new(client: ComputeClient<R>) -> Self {
        Self {
            client,
            launches: AtomicU64::new(0),
        }
    }

    /// A client on `device`. Creating a client for an absent device may panic (CUDA, wgpu)
    /// or abort (HIP): callers probe for the device first.
    pub fn on(device: &R::Device) -> Self {
        Self::new(R::client(device))
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    /// Counts one kernel launch.
    pub(crate) fn count(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` launches made by launchers that take the client directly (`ops::matmul`).
    pub fn count_launches(&self, n: u64) {
        self.launches.fetch_add(n, Ordering::Relaxed);
    }

    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    fn upload(&self, bytes: &[u8], len: usize, elem_bytes: usize) -> Buf {
        // Zero-sized buffers are not valid bindings everywhere; keep at least one element.
        let handle = if bytes.is_empty() {
            self.client.create_from_slice(&vec![0u8; elem_bytes.max(4)])
        } else {
            self.client.create_from_slice(bytes)
        };
        Buf {
            handle,
            len: len.max(1),
            elem_bytes,
        }
    }

    pub fn f32s(&self, data: &[f32]) -> Buf {
        self.upload(bytemuck::cast_slice(data), data.len(), 4)
    }

    pub fn u32s(&self, data: &[u32]) -> Buf {
        self.upload(bytemuck::cast_slice(data), data.len(), 4)
    }

    pub fn f16s(&self, data: &[half::f16]) -> Buf {
        self.upload(bytemuck::cast_slice(data), data.len(), 2)
    }

    /// Raw bytes (a GGUF tensor) as 32-bit words, zero-padded: kernels read bytes out of words,
    /// so no layout needs 4-byte alignment.
    pub fn words(&self, bytes: &[u8]) -> Buf {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().div_ceil(4) * 4, 0);
        self.upload(&padded, padded.len() / 4, 4)
    }

    /// A zeroed buffer of `len` f32 (or u32) values.
    pub fn zeros(&self, len: usize) -> Buf {
        self.upload(&vec![0u8; len * 4], len, 4)
    }

    /// A zeroed buffer of `len` elements of `elem_bytes` each. Large buffers (a KV cache of a
    /// long context) are zeroed on the device: uploading gigabytes of host zeros took minutes.
    pub fn zeros_of(&self, len: usize, elem_bytes: usize) -> Buf {
        let bytes = len * elem_bytes;
        let words = bytes.div_ceil(4);
        if bytes < (16 << 20) || words > u32::MAX as usize {
            return self.upload(&vec![0u8; bytes], len, elem_bytes);
        }
        let handle = self.client.empty(words * 4);
        let (count, dim) = elementwise(words);
        // SAFETY: unit i writes word i only for i < words, the buffer's length in words.
        unsafe {
            super::launch::launch(
                &self.client,
                zero_kernel::ZeroKernel::<R>::new(
                    super::launch::settings(dim),
                    self.client.clone(),
                    super::launch::array_arg(),
                    (),
                ),
                count,
                &[
                    super::launch::Arg::of::<u32>(&handle, words),
                    super::launch::Arg::U32(words as u32),
                ],
            )
        }
        Buf {
            handle,
            len,
            elem_bytes,
        }
    }

    fn read_bytes(&self, buf: &Buf) -> Result<Vec<u8>, GpuError> {
        let bytes = self
            .client
            .read_one(buf.handle.clone())
            .map_err(|e| GpuError::Read(format!("{e:?}")))?;
        Ok(bytes[..buf.bytes() as usize].to_vec())
    }

    pub fn read_f32(&self, buf: &Buf) -> Result<Vec<f32>, GpuError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf)?))
    }

    /// Reads the first `n` f32 values into `out` (`out.len() >= n`).
    pub fn read_f32_into(&self, buf: &Buf, n: usize, out: &mut [f32]) -> Result<(), GpuError> {
        let h = self
            .client
            .read_one(buf.handle.clone())
            .map_err(|e| GpuError::Read(format!("{e:?}")))?;
        let src: &[u8] = &h[..n * 4];
        for (o, c) in out[..n].iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    pub fn read_u32(&self, buf: &Buf) -> Result<Vec<u32>, GpuError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf)?))
    }

    pub fn read_f16(&self, buf: &Buf) -> Result<Vec<half::f16>, GpuError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf)?))
    }

    /// Waits until every launched kernel has finished.
    pub fn sync(&self) -> Result<(), GpuError> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| GpuError::Sync(format!("{e:?}")))
    }

    /// `(bytes in use, bytes reserved)` as the device allocator reports them.
    pub fn memory_usage(&self) -> Option<(u64, u64)> {
        self.client
            .memory_usage()
            .ok()
            .map(|m| (m.bytes_in_use, m.bytes_reserved))
    }

    /// The largest single buffer the device binds (wgpu: the storage-buffer binding limit,
    /// 128 MiB on Mesa's lavapipe; CUDA and HIP: a quarter of the device memory).
    pub fn max_buffer_bytes(&self) -> u64 {
        self.client.properties().memory.max_page_size
    }

    /// Whether kernels may use f16 values (storage and arithmetic).
    pub fn supports_f16(&self) -> bool {
        self.client
            .properties()
            .supports_type(half::f16::as_type_native_unchecked())
    }
}

/// `out[i] = 0` for `i < n`: [`Gpu::zeros_of`] on the device.
#[cube(launch_unchecked)]
pub fn zero_kernel(out: &mut Array<u32>, n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        out[i] = 0u32;
    }
}

/// Where a launch finds the positions of its tokens.
#[derive(Clone, Copy, Debug)]
pub enum Pos<'a> {
    /// Tokens at `p, p + 1, ...`, `p` passed as an argument.
    Host(usize),
    /// Tokens from `buf[0]` on, read on the device, at most `max`: a replayed decode step keeps
    /// every launch argument fixed while the position moves (kernels add `buf[0]` to the
    /// argument).
    Device { buf: &'a Buf, max: usize },
    /// Tokens of several sequences, each at its own positions over its own KV pages
    /// (`ops::attention::paged_meta` lays `meta` out); no position reaches `kv_len`.
    Paged { meta: &'a Buf, kv_len: usize },
}

impl Pos<'_> {
    /// One past the largest position `n` tokens may reach (checks and grids are sized for it).
    pub fn end(&self, n: usize) -> usize {
        match *self {
            Pos::Host(p) => p + n,
            Pos::Device { max, .. } => max + n,
            Pos::Paged { kv_len, .. } => kv_len,
        }
    }
    /// The scalar argument (0 when the device holds the positions).
    pub(crate) fn scalar(&self) -> u32 {
        match *self {
            Pos::Host(p) => p as u32,
            Pos::Device { .. } | Pos::Paged { .. } => 0,
        }
    }
    /// The device word added to the argument: `zero` (one 0) unless the device holds it.
    pub(crate) fn buf<'b>(&'b self, zero: &'b Buf) -> &'b Buf {
        match self {
            Pos::Device { buf, .. } => buf,
            Pos::Host(_) | Pos::Paged { .. } => zero,
        }
    }
    /// The paged batch's layout, `zero` when the tokens are one run of positions.
    pub(crate) fn meta<'b>(&'b self, zero: &'b Buf) -> &'b Buf {
        match self {
            Pos::Paged { meta, .. } => meta,
            Pos::Host(_) | Pos::Device { .. } => zero,
        }
    }
    pub(crate) fn paged(&self) -> bool {
        matches!(self, Pos::Paged { .. })
    }
}

impl From<usize> for Pos<'_> {
    fn from(p: usize) -> Self {
        Pos::Host(p)
    }
}

/// Most cubes along one grid axis that every runtime accepts (wgpu: 65535).
pub const MAX_GRID_X: u32 = 65535;

/// A grid of at least `n` cubes, folded into two axes when `n` exceeds one axis. Kernels read
/// their index from `CUBE_POS` and return when it is `>= n`.
pub(crate) fn grid(n: usize) -> CubeCount {
    let n = n.max(1) as u32;
    if n <= MAX_GRID_X {
        CubeCount::Static(n, 1, 1)
    } else {
        CubeCount::Static(MAX_GRID_X, n.div_ceil(MAX_GRID_X), 1)
    }
}

/// One cube per row, for kernels that index rows by `CUBE_POS` without a bound check.
pub(crate) fn row_grid(rows: usize) -> CubeCount {
    assert!(
        rows >= 1 && rows <= MAX_GRID_X as usize,
        "{rows} rows: one launch takes 1 to {MAX_GRID_X}"
    );
    CubeCount::Static(rows as u32, 1, 1)
}

/// Threads per cube of the element-wise kernels.
pub(crate) const ELEMENTWISE_CUBE: u32 = 256;

/// The grid of an element-wise kernel over `n` elements (one unit each).
pub(crate) fn elementwise(n: usize) -> (CubeCount, CubeDim) {
    (
        grid(n.div_ceil(ELEMENTWISE_CUBE as usize)),
        CubeDim::new_1d(ELEMENTWISE_CUBE),
    )
}
