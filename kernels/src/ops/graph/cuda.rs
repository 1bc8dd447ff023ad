//! CUDA graphs over CubeCL-compiled kernels (driver API through cudarc, as CubeCL's own CUDA
//! runtime uses it).

use std::collections::HashMap;
use std::ffi::{c_void, CString};

use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cudarc::driver::result as cu;
use cudarc::driver::sys;

use super::cubecl_cpp_dialect::{CompilationOptions, CudaCompiler};
use super::{compile, Compiled, HasDialect, Replayer};
use crate::ops::launch::Recording;

type Dialect = <CudaCompiler as HasDialect>::D;

struct Func {
    func: sys::CUfunction,
    cube_dim: (u32, u32, u32),
    shared_bytes: u32,
    has_info: bool,
}

pub(crate) struct CudaReplayer {
    client: ComputeClient<CudaRuntime>,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    arch: u32,
    options: CompilationOptions,
    funcs: HashMap<KernelId, Func>,
    graphs: Vec<(sys::CUgraphExec, usize)>,
    /// Device memory we allocated (info blocks), freed on drop.
    owned: Vec<sys::CUdeviceptr>,
    io: Vec<sys::CUdeviceptr>,
}

// SAFETY: the driver handles are used from one thread at a time (the backend's owner); CUDA
// contexts, streams and graph execs may move between threads.
unsafe impl Send for CudaReplayer {}

fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

impl CudaReplayer {
    pub(crate) fn new(client: &ComputeClient<CudaRuntime>, io: &[&Handle]) -> Result<Self, String> {
        // CubeCL works in the primary context of the client's device; its buffers live there.
        // CubeCL's CUDA client serves device 0 in ROCforge (`CudaDevice::default`).
        // SAFETY: plain driver queries and the primary context's retain.
        let (ctx, arch, warp) = unsafe {
            cu::init().map_err(err("cuInit"))?;
            let dev = cu::device::get(0).map_err(err("cuDeviceGet"))?;
            let attr = |a| cu::device::get_attribute(dev, a).map_err(err("cuDeviceGetAttribute"));
            use sys::CUdevice_attribute::*;
            let arch = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? * 10
                + attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let warp = attr(CU_DEVICE_ATTRIBUTE_WARP_SIZE)?;
            let ctx = cu::primary_ctx::retain(dev).map_err(err("cuDevicePrimaryCtxRetain"))?;
            cu::ctx::set_current(ctx).map_err(err("cuCtxSetCurrent"))?;
            (ctx, arch as u32, warp as u32)
        };
        // SAFETY: a stream in the current context.
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(err("cuStreamCreate"))?;
        // CubeCL's CUDA runtime options, but the info block by pointer (no grid constant), so
        // the numerics are those of CubeCL's own launches.
        let mut options = CompilationOptions::default();
        options.warp_size = warp;
        options.supports_features.fast_math = true;
        options.supports_features.fast_tanh = arch >= 75 && sys::CUDA_VERSION >= 12080;
        options.supports_features.clusters = arch >= 90;
        options.supports_features.elect_sync = arch >= 90;
        let mut r = Self {
            client: client.clone(),
            ctx,
            stream,
            arch,
            options,
            funcs: HashMap::new(),
            graphs: Vec::new(),
            owned: Vec::new(),
            io: Vec::new(),
        };
        r.io = io.iter().map(|h| r.pointer(h)).collect::<Result<_, _>>()?;
        Ok(r)
    }

    fn current(&self) -> Result<(), String> {
        // SAFETY: a context retained in `new`.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(err("cuCtxSetCurrent"))
    }

    fn pointer(&self, h: &Handle) -> Result<sys::CUdeviceptr, String> {
        let r = self
            .client
            .get_resource(h.clone())
            .map_err(|e| format!("resolving a device buffer: {e:?}"))?;
        Ok(r.resource().ptr)
    }

    fn load(&mut self, id: &KernelId, rec: &Recording) -> Result<(), String> {
        if self.funcs.contains_key(id) {
            return Ok(());
        }
        let task = rec
            .kernels
            .get(id)
            .ok_or("a recorded launch names no recorded kernel")?;
        let Compiled {
            source,
            entry,
            cube_dim,
            shared_bytes,
            has_info,
        } = compile::<Dialect>(task.as_ref(), &self.options)?;
        let ptx = nvrtc(&source, self.arch, &entry)?;
        // SAFETY: PTX from NVRTC, NUL-terminated; the entry point exists in it.
        let func = unsafe {
            let module = cu::module::load_data(ptx.as_ptr() as *const c_void)
                .map_err(err("cuModuleLoadData"))?;
            let name = CString::new(entry.clone()).map_err(|e| e.to_string())?;
            let func =
                cu::module::get_function(module, name).map_err(err("cuModuleGetFunction"))?;
            cu::function::set_function_attribute(
                func,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .map_err(err("cuFuncSetAttribute"))?;
            func
        };
        self.funcs.insert(
            id.clone(),
            Func {
                func,
                cube_dim,
                shared_bytes,
                has_info,
            },
        );
        Ok(())
    }
}

/// NVRTC as CubeCL's CUDA runtime calls it (architecture, CUDA and CCCL include paths,
/// line info).
fn nvrtc(source: &str, arch: u32, entry: &str) -> Result<Vec<std::ffi::c_char>, String> {
    let arch = if arch >= 90 {
        format!("--gpu-architecture=sm_{arch}a")
    } else {
        format!("--gpu-architecture=sm_{arch}")
    };
    let include = cubecl::cuda::install::include_path();
    let cccl = cubecl::cuda::install::cccl_include_path();
    let inc = format!("--include-path={}", include.display());
    let inc_cccl = format!("--include-path={}", cccl.display());
    let mut options = vec![arch.as_str(), inc.as_str(), "-lineinfo"];
    if cccl.exists() {
        options.push(&inc_cccl);
    }
    let src = CString::new(source).map_err(|e| e.to_string())?;
    // SAFETY: NVRTC over a NUL-terminated source that outlives the program.
    unsafe {
        let program = cudarc::nvrtc::result::create_program(src.as_c_str(), None)
            .map_err(|e| format!("nvrtcCreateProgram({entry}): {e:?}"))?;
        if cudarc::nvrtc::result::compile_program(program, &options).is_err() {
            let log = cudarc::nvrtc::result::get_program_log(program)
                .map(|l| {
                    std::ffi::CStr::from_ptr(l.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            return Err(format!("NVRTC could not compile {entry}: {log}"));
        }
        cudarc::nvrtc::result::get_ptx(program).map_err(|e| format!("nvrtcGetPTX({entry}): {e:?}"))
    }
}

impl Replayer for CudaReplayer {
    fn capture(&mut self, rec: Recording) -> Result<usize, String> {
        if let Some(why) = &rec.unrecordable {
            return Err(why.clone());
        }
        self.current()?;
        for n in &rec.nodes {
            self.load(&n.kernel, &rec)?;
        }
        // Parameters: each buffer's device pointer, then the info block's (written now, read
        // by every replay).
        let mut params: Vec<Vec<u64>> = Vec::with_capacity(rec.nodes.len());
        for n in &rec.nodes {
            let mut p: Vec<u64> = n
                .buffers
                .iter()
                .map(|h| self.pointer(h))
                .collect::<Result<_, _>>()?;
            if self.funcs[&n.kernel].has_info {
                let bytes = n.info.len() * 8;
                // SAFETY: a fresh allocation of `bytes`, filled from the recorded words.
                let ptr = unsafe {
                    let ptr = cu::malloc_sync(bytes.max(8)).map_err(err("cuMemAlloc"))?;
                    self.owned.push(ptr);
                    cu::memcpy_htod_sync(ptr, &n.info).map_err(err("cuMemcpyHtoD"))?;
                    ptr
                };
                p.push(ptr);
            }
            params.push(p);
        }
        // SAFETY: every launch goes to our stream in capture mode; the pointers are CubeCL's
        // live buffers (the caller keeps their handles) and our info blocks.
        unsafe {
            // Relaxed: CubeCL's own thread may allocate while we capture.
            cu::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
            .map_err(err("cuStreamBeginCapture"))?;
            let mut failed = None;
            for (n, p) in rec.nodes.iter().zip(params.iter_mut()) {
                let f = &self.funcs[&n.kernel];
                let mut args: Vec<*mut c_void> =
                    p.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
                if let Err(e) = cu::launch_kernel(
                    f.func,
                    n.cube_count,
                    f.cube_dim,
                    f.shared_bytes,
                    self.stream,
                    &mut args,
                ) {
                    failed = Some(format!("cuLaunchKernel during capture: {e:?}"));
                    break;
                }
            }
            let graph = cu::stream::end_capture(self.stream).map_err(err("cuStreamEndCapture"));
            if let Some(f) = failed {
                if let Ok(g) = graph {
                    let _ = cu::graph::destroy(g);
                }
                return Err(f);
            }
            let graph = graph?;
            let exec = cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                .map_err(err("cuGraphInstantiate"));
            let _ = cu::graph::destroy(graph);
            let exec = exec?;
            cu::graph::upload(exec, self.stream).map_err(err("cuGraphUpload"))?;
            self.graphs.push((exec, rec.nodes.len()));
        }
        Ok(self.graphs.len() - 1)
    }

    fn replay(&mut self, graph: usize) -> Result<(), String> {
        self.current()?;
        let (exec, _) = self.graphs[graph];
        // SAFETY: an instantiated graph on our stream.
        unsafe { cu::graph::launch(exec, self.stream) }.map_err(err("cuGraphLaunch"))
    }

    fn write_u32(&mut self, io: usize, value: u32) -> Result<(), String> {
        self.current()?;
        // SAFETY: io pointers are CubeCL buffers of at least one word; a pageable source is
        // staged before the call returns.
        unsafe { cu::memcpy_htod_async(self.io[io], &[value], self.stream) }
            .map_err(err("cuMemcpyHtoDAsync"))
    }

    fn read_u32(&mut self, io: usize) -> Result<u32, String> {
        self.current()?;
        let mut v = [0u32];
        // SAFETY: as in `write_u32`; the stream is drained before `v` is read.
        unsafe {
            cu::memcpy_dtoh_async(&mut v, self.io[io], self.stream)
                .map_err(err("cuMemcpyDtoHAsync"))?;
            cu::stream::synchronize(self.stream).map_err(err("cuStreamSynchronize"))?;
        }
        Ok(v[0])
    }

    fn nodes(&self, graph: usize) -> usize {
        self.graphs[graph].1
    }
}

impl Drop for CudaReplayer {
    fn drop(&mut self) {
        // SAFETY: our own stream, graphs and allocations, released once.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            let _ = cu::stream::synchronize(self.stream);
            for (exec, _) in self.graphs.drain(..) {
                let _ = cu::graph::exec_destroy(exec);
            }
            for p in self.owned.drain(..) {
                let _ = cu::free_sync(p);
            }
            let _ = cu::stream::destroy(self.stream);
        }
    }
}
