//! The one launch path of every ROCforge kernel, and the recorder behind graph replay.
//!
//! Each launcher builds its kernel (the `#[cube]` macro's `XKernel::new`, with its comptime
//! arguments) and lists the runtime arguments once, as [`Arg`]s, in the kernel's parameter
//! order. [`launch`] then does what the macro's own `launch_unchecked` does: it registers the
//! arguments with CubeCL's `KernelLauncher` and hands the kernel to the client.
//!
//! While a thread records ([`record`]), the same call does not launch: it keeps the kernel
//! (compiled later by the graph layer, `ops::graph`), its grid and its arguments, with the
//! info block (scalars, then array lengths) laid out by CubeCL's own `InfoBuilder`, so the
//! parameters a replay passes are the ones CubeCL's compiled code expects.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use cubecl::client::ComputeClient;
use cubecl::prelude::KernelId;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::{CubeTask, InfoBuilder};

/// One runtime argument of a kernel, in parameter order.
pub(crate) enum Arg<'a> {
    /// An array over `handle`, `len` as `ArrayArg::from_raw_parts` takes it, of element
    /// type `ty` (vector width included).
    Array {
        handle: &'a Handle,
        len: usize,
        ty: Type,
    },
    U32(u32),
    F32(f32),
}

impl<'a> Arg<'a> {
    /// A flat device buffer of `T` over its whole length.
    pub(crate) fn buf<T: CubePrimitive>(b: &'a super::gpu::Buf) -> Self {
        Self::Array {
            handle: b.handle(),
            len: b.len(),
            ty: T::as_type_native_unchecked(),
        }
    }
    /// A handle holding `len` values of `T` (scalars).
    pub(crate) fn of<T: CubePrimitive>(handle: &'a Handle, len: usize) -> Self {
        Self::Array {
            handle,
            len,
            ty: T::as_type_native_unchecked(),
        }
    }
    /// A handle read as `len` vectors of `N` values of `T` (`len` as the launcher passes it).
    pub(crate) fn vec<T: CubePrimitive>(handle: &'a Handle, len: usize, n: usize) -> Self {
        Self::Array {
            handle,
            len,
            ty: T::as_type_native_unchecked().with_vector_size(n),
        }
    }
}

/// The compilation arguments of a kernel's array parameter (none aliased).
pub(crate) fn array_arg() -> ArrayCompilationArg {
    ArrayCompilationArg { inplace: None }
}

/// Kernel settings of a launch: its cube shape, 32-bit addressing (what every launcher uses).
/// Cubes are 1- or 2-D: the weight decoding reads `UNIT_POS_Z` as a zero the compiler cannot
/// see (`matmul::decode::magic`), so a cube with depth would corrupt every weight it unpacks.
pub(crate) fn settings(dim: CubeDim) -> KernelSettings {
    assert_eq!(dim.z, 1, "ROCforge launches 1- or 2-D cubes only");
    KernelSettings::default()
        .cube_dim(dim)
        .address_type(AddressType::U32)
}

/// One recorded launch.
pub struct Node {
    /// The kernel, by its CubeCL id ([`Recording::kernels`] holds it once).
    pub kernel: KernelId,
    pub cube_count: (u32, u32, u32),
    /// Buffers in parameter order.
    pub buffers: Vec<Handle>,
    /// The info block (scalars, then static metadata) as CubeCL lays it out; empty when the
    /// kernel has none.
    pub info: Vec<u64>,
}

/// The launches of a recorded step, in order, and their kernels.
#[derive(Default)]
pub struct Recording {
    pub nodes: Vec<Node>,
    /// `Box<dyn CubeTask<R::Compiler>>` per distinct kernel, boxed again as `Any` so the graph
    /// layer can take it back for its own runtime.
    pub kernels: HashMap<KernelId, Box<dyn Any + Send>>,
    /// Why the step cannot be replayed (a launch the recorder cannot express), if so.
    pub unrecordable: Option<String>,
}

thread_local! {
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's launches recorded instead of launched; returns what `f`
/// returned and the recording.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Recording) {
    RECORDING.with_borrow_mut(|r| *r = Some(Recording::default()));
    let out = f();
    let rec = RECORDING.with_borrow_mut(|r| r.take()).unwrap_or_default();
    (out, rec)
}

/// Launches `kernel` over `count` with `args` (in parameter order), or records it while this
/// thread records.
///
/// # Safety
/// As CubeCL's `launch_unchecked`: the kernel's reads and writes stay within the buffers, and
/// `args` match the kernel's parameters in order and type.
pub(crate) unsafe fn launch<R: Runtime, K: CubeKernel + 'static>(
    client: &ComputeClient<R>,
    kernel: K,
    count: CubeCount,
    args: &[Arg<'_>],
) {
    let mut kernel = Some(kernel);
    RECORDING.with_borrow_mut(|rec| {
        if let Some(rec) = rec.as_mut() {
            if let Some(k) = kernel.take() {
                record_one::<R, K>(rec, k, &count, args);
            }
        }
    });
    let Some(kernel) = kernel else { return };
    // The launcher reads only the address type of its settings (the kernel holds its own).
    let mut launcher = KernelLauncher::<R>::new(settings(CubeDim::new_1d(1)));
    for a in args {
        match a {
            Arg::Array { handle, len, ty } => {
                // SAFETY: the caller vouches for `len` elements behind `handle`.
                let arg = unsafe { ArrayArg::from_raw_parts((*handle).clone(), *len) };
                launcher.register_array(arg, *ty)
            }
            Arg::U32(v) => launcher.register_scalar(*v),
            Arg::F32(v) => launcher.register_scalar(*v),
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { launcher.launch_unchecked(count, kernel, client) }
}

fn record_one<R: Runtime, K: CubeKernel + 'static>(
    rec: &mut Recording,
    kernel: K,
    count: &CubeCount,
    args: &[Arg<'_>],
) {
    let CubeCount::Static(x, y, z) = *count else {
        rec.unrecordable
            .get_or_insert_with(|| format!("{} has a dynamic grid", kernel.name()));
        return;
    };
    let id = kernel.id();
    if !rec.kernels.contains_key(&id) {
        let task: Box<dyn CubeTask<R::Compiler>> = Box::new(cubecl_runtime::kernel::KernelTask::<
            R::Compiler,
            K,
        >::new(kernel));
        rec.kernels.insert(id.clone(), Box::new(task));
    }
    let mut info = InfoBuilder::default();
    let mut buffers = Vec::new();
    for a in args {
        match a {
            Arg::Array { handle, len, ty } => {
                // What `KernelLauncher::register_array` registers.
                let buffer_len = handle.size_in_used() / ty.size() as u64;
                let len = (*len / ty.vector_size()) as u64;
                info.metadata
                    .register_array(buffer_len, len, AddressType::U32);
                buffers.push((*handle).clone());
            }
            Arg::U32(v) => info.scalars.push(*v),
            Arg::F32(v) => info.scalars.push(*v),
        }
    }
    let info = info.finish(AddressType::U32).data;
    rec.nodes.push(Node {
        kernel: id,
        cube_count: (x, y, z),
        buffers,
        info,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubes_are_flat() {
        let _ = settings(CubeDim::new_2d(32, 4));
    }

    #[test]
    #[should_panic(expected = "1- or 2-D cubes only")]
    fn a_deep_cube_is_refused() {
        let _ = settings(CubeDim::new_3d(32, 2, 2));
    }
}
