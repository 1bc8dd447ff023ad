//! Graph replay: a recorded step ([`super::launch::record`]) captured once into a CUDA or HIP
//! graph on a stream of our own, then replayed with one driver call per step.
//!
//! CubeCL stays the kernel language and compiler: each recorded kernel is compiled by
//! CubeCL's `CudaCompiler` / `HipCompiler` (the code `cargo xtask hip-check` compiles), with
//! the info block passed by pointer (a device buffer per launch, written once), then loaded
//! with NVRTC / hiprtc. The buffers are the ones CubeCL allocated (`client.get_resource` gives
//! their device pointers), so a graph holds no memory of its own but those info blocks.
//!
//! Two streams meet here: CubeCL's and ours. The caller keeps them apart: it waits for
//! CubeCL's work (`client.sync`) before a replay that reads what CubeCL wrote, and every
//! replay ends with a blocking read, so CubeCL never sees our stream busy.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::launch::Recording;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "hip")]
mod hip;

/// A driver for graphs on one device: captures recordings, replays them, moves step inputs and
/// outputs. One per backend; every call comes from the thread that owns the backend.
pub trait Replayer: Send {
    /// Captures `rec` into a graph; returns its index for [`Replayer::replay`].
    fn capture(&mut self, rec: Recording) -> Result<usize, String>;
    /// Enqueues graph `graph` on our stream.
    fn replay(&mut self, graph: usize) -> Result<(), String>;
    /// Writes `value` into word 0 of I/O buffer `io` (ordered before later replays).
    fn write_u32(&mut self, io: usize, value: u32) -> Result<(), String>;
    /// Waits for our stream, then reads word 0 of I/O buffer `io`.
    fn read_u32(&mut self, io: usize) -> Result<u32, String>;
    /// Launches (graph nodes) of graph `graph`.
    fn nodes(&self, graph: usize) -> usize;
}

/// A replayer for `client`'s device, with `io` the buffers the host writes or reads each step
/// (their pointers are resolved once). `Err` says why graphs are not available here (wgpu, or
/// a driver that refuses).
pub fn replayer<R: Runtime>(
    client: &ComputeClient<R>,
    io: &[&Handle],
) -> Result<Box<dyn Replayer>, String> {
    let any = client as &dyn std::any::Any;
    #[cfg(feature = "cuda")]
    if let Some(c) = any.downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>() {
        return cuda::CudaReplayer::new(c, io).map(|r| Box::new(r) as Box<dyn Replayer>);
    }
    #[cfg(feature = "hip")]
    if let Some(c) = any.downcast_ref::<ComputeClient<cubecl::hip::HipRuntime>>() {
        return hip::HipReplayer::new(c, io).map(|r| Box::new(r) as Box<dyn Replayer>);
    }
    let _ = (any, io);
    Err(format!(
        "graph replay runs on CUDA and HIP, not {}",
        R::name(client)
    ))
}

/// A recorded kernel compiled for our launches: entry point, cube shape, dynamic shared memory
/// and whether it takes an info block.
pub(crate) struct Compiled {
    pub source: String,
    pub entry: String,
    pub cube_dim: (u32, u32, u32),
    pub shared_bytes: u32,
    pub has_info: bool,
}

/// Compiles the recorded kernel `task` (a `Box<dyn CubeTask<C>>` behind `Any`) with `options`,
/// the info block passed by pointer.
pub(crate) fn compile<D: cubecl_cpp_dialect::Dialect>(
    task: &(dyn std::any::Any + Send),
    options: &cubecl_cpp_dialect::CompilationOptions,
) -> Result<Compiled, String> {
    let task = task
        .downcast_ref::<Box<dyn cubecl::CubeTask<cubecl_cpp_dialect::CppCompiler<D>>>>()
        .ok_or("a recorded kernel was compiled for another runtime")?;
    let compiled = task
        .compile(
            &mut Default::default(),
            options,
            ExecutionMode::Unchecked,
            AddressType::U32.unsigned_type(),
        )
        .map_err(|e| format!("CubeCL could not compile {}: {e:?}", task.name()))?;
    let repr = compiled
        .repr
        .as_ref()
        .ok_or("CubeCL returned no kernel representation")?;
    Ok(Compiled {
        source: compiled.source.clone(),
        entry: compiled.entrypoint_name.clone(),
        cube_dim: (
            compiled.cube_dim.x,
            compiled.cube_dim.y,
            compiled.cube_dim.z,
        ),
        shared_bytes: repr.shared_memory_size() as u32,
        has_info: repr.info.has_info(),
    })
}

/// Names the dialect of a `CppCompiler<D>`.
pub(crate) trait HasDialect {
    type D: cubecl_cpp::shared::Dialect;
}
impl<D: cubecl_cpp::shared::Dialect> HasDialect for cubecl_cpp::shared::CppCompiler<D> {
    type D = D;
}

/// CubeCL's C++ code generator (the compiler types of its CUDA and HIP runtimes).
pub(crate) mod cubecl_cpp_dialect {
    #[cfg(feature = "cuda")]
    pub use cubecl::cuda::CudaCompiler;
    #[cfg(feature = "hip")]
    pub use cubecl::hip::runtime::HipCompiler;
    pub use cubecl_cpp::shared::{CompilationOptions, CppCompiler, Dialect};
}
