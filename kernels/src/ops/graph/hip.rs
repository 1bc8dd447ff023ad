//! HIP graphs over CubeCL-compiled kernels (cubecl-hip-sys, the bindings CubeCL's HIP runtime
//! uses). Compiled and hip-checked here; not yet run on AMD hardware (docs/kernels.md).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::null_mut;

use cubecl::hip::HipRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl_hip_sys as hip;

use super::cubecl_cpp_dialect::{CompilationOptions, HipCompiler};
use super::{compile, Compiled, HasDialect, Replayer};
use crate::ops::launch::Recording;

struct Func {
    func: hip::hipFunction_t,
    cube_dim: (u32, u32, u32),
    shared_bytes: u32,
    has_info: bool,
}

pub(crate) struct HipReplayer {
    client: ComputeClient<HipRuntime>,
    stream: hip::hipStream_t,
    options: CompilationOptions,
    funcs: HashMap<KernelId, Func>,
    graphs: Vec<(hip::hipGraphExec_t, usize)>,
    owned: Vec<*mut c_void>,
    io: Vec<hip::hipDeviceptr_t>,
}

// SAFETY: used from one thread at a time; HIP streams and graph execs may move between threads.
unsafe impl Send for HipReplayer {}

fn check(status: hip::hipError_t, what: &str) -> Result<(), String> {
    if status == hip::HIP_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what} failed with HIP status {status}"))
    }
}

impl HipReplayer {
    pub(crate) fn new(client: &ComputeClient<HipRuntime>, io: &[&Handle]) -> Result<Self, String> {
        let warp = client.properties().hardware.plane_size_max;
        let mut stream: hip::hipStream_t = null_mut();
        // SAFETY: device 0 (the one CubeCL's HIP client serves in ROCforge) and a new stream.
        unsafe {
            check(hip::hipSetDevice(0), "hipSetDevice")?;
            check(
                hip::hipStreamCreateWithFlags(&mut stream, hip::hipStreamNonBlocking),
                "hipStreamCreateWithFlags",
            )?;
        }
        // CubeCL's HIP runtime options (the info block goes by pointer there too).
        let mut options = CompilationOptions::default();
        options.warp_size = warp;
        options.supports_features.fast_math = true;
        let mut r = Self {
            client: client.clone(),
            stream,
            options,
            funcs: HashMap::new(),
            graphs: Vec::new(),
            owned: Vec::new(),
            io: Vec::new(),
        };
        r.io = io.iter().map(|h| r.pointer(h)).collect::<Result<_, _>>()?;
        Ok(r)
    }

    fn pointer(&self, h: &Handle) -> Result<hip::hipDeviceptr_t, String> {
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
        } = compile::<<HipCompiler as HasDialect>::D>(task.as_ref(), &self.options)?;
        let code = hiprtc(&source, &entry)?;
        let mut module: hip::hipModule_t = null_mut();
        let mut func: hip::hipFunction_t = null_mut();
        let name = CString::new(entry.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a code object from hiprtc; the entry point exists in it.
        unsafe {
            check(
                hip::hipModuleLoadData(&mut module, code.as_ptr() as *const c_void),
                "hipModuleLoadData",
            )?;
            check(
                hip::hipModuleGetFunction(&mut func, module, name.as_ptr()),
                "hipModuleGetFunction",
            )?;
        }
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

/// hiprtc as CubeCL's HIP runtime calls it (C++17, the HIP include path, -O3).
fn hiprtc(source: &str, entry: &str) -> Result<Vec<c_char>, String> {
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let include = hip::get_hip_include_path().map_err(|e| format!("HIP include path: {e}"))?;
    let opts: Vec<CString> = [format!("-I{include}"), "--std=c++17".into(), "-O3".into()]
        .into_iter()
        .map(|o| CString::new(o).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut program: hip::hiprtcProgram = null_mut();
    // SAFETY: hiprtc over NUL-terminated strings that outlive the calls.
    unsafe {
        let ok = hip::hiprtcResult_HIPRTC_SUCCESS;
        if hip::hiprtcCreateProgram(
            &mut program,
            src.as_ptr(),
            null_mut(),
            0,
            null_mut(),
            null_mut(),
        ) != ok
        {
            return Err(format!("hiprtcCreateProgram({entry}) failed"));
        }
        if hip::hiprtcCompileProgram(program, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) != ok {
            let mut size = 0usize;
            let mut log = String::new();
            if hip::hiprtcGetProgramLogSize(program, &mut size) == ok && size > 0 {
                let mut buf = vec![0 as c_char; size];
                if hip::hiprtcGetProgramLog(program, buf.as_mut_ptr()) == ok {
                    log = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                }
            }
            return Err(format!("hiprtc could not compile {entry}: {log}"));
        }
        let mut size = 0usize;
        if hip::hiprtcGetCodeSize(program, &mut size) != ok {
            return Err(format!("hiprtcGetCodeSize({entry}) failed"));
        }
        let mut code = vec![0 as c_char; size];
        if hip::hiprtcGetCode(program, code.as_mut_ptr()) != ok {
            return Err(format!("hiprtcGetCode({entry}) failed"));
        }
        Ok(code)
    }
}

impl Replayer for HipReplayer {
    fn capture(&mut self, rec: Recording) -> Result<usize, String> {
        if let Some(why) = &rec.unrecordable {
            return Err(why.clone());
        }
        for n in &rec.nodes {
            self.load(&n.kernel, &rec)?;
        }
        let mut params: Vec<Vec<*mut c_void>> = Vec::with_capacity(rec.nodes.len());
        for n in &rec.nodes {
            let mut p: Vec<*mut c_void> = n
                .buffers
                .iter()
                .map(|h| self.pointer(h))
                .collect::<Result<_, _>>()?;
            if self.funcs[&n.kernel].has_info {
                let bytes = (n.info.len() * 8).max(8);
                let mut ptr: *mut c_void = null_mut();
                // SAFETY: a fresh allocation of `bytes`, filled from the recorded words.
                unsafe {
                    check(hip::hipMalloc(&mut ptr, bytes), "hipMalloc")?;
                    self.owned.push(ptr);
                    check(
                        hip::hipMemcpyHtoD(ptr, n.info.as_ptr() as *const c_void, n.info.len() * 8),
                        "hipMemcpyHtoD",
                    )?;
                }
                p.push(ptr);
            }
            params.push(p);
        }
        // SAFETY: launches on our stream in capture mode over CubeCL's live buffers and our
        // info blocks.
        unsafe {
            check(
                hip::hipStreamBeginCapture(
                    self.stream,
                    hip::hipStreamCaptureMode_hipStreamCaptureModeRelaxed,
                ),
                "hipStreamBeginCapture",
            )?;
            let mut failed = None;
            for (n, p) in rec.nodes.iter().zip(params.iter_mut()) {
                let f = &self.funcs[&n.kernel];
                let mut args: Vec<*mut c_void> = p
                    .iter_mut()
                    .map(|v| v as *mut *mut c_void as *mut c_void)
                    .collect();
                let (gx, gy, gz) = n.cube_count;
                let (bx, by, bz) = f.cube_dim;
                let status = hip::hipModuleLaunchKernel(
                    f.func,
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    f.shared_bytes,
                    self.stream,
                    args.as_mut_ptr(),
                    null_mut(),
                );
                if status != hip::HIP_SUCCESS {
                    failed = Some(format!("hipModuleLaunchKernel during capture: {status}"));
                    break;
                }
            }
            let mut graph: hip::hipGraph_t = null_mut();
            let end = check(
                hip::hipStreamEndCapture(self.stream, &mut graph),
                "hipStreamEndCapture",
            );
            if let Some(f) = failed {
                if !graph.is_null() {
                    hip::hipGraphDestroy(graph);
                }
                return Err(f);
            }
            end?;
            let mut exec: hip::hipGraphExec_t = null_mut();
            let inst = check(
                hip::hipGraphInstantiate(&mut exec, graph, null_mut(), null_mut(), 0),
                "hipGraphInstantiate",
            );
            hip::hipGraphDestroy(graph);
            inst?;
            self.graphs.push((exec, rec.nodes.len()));
        }
        Ok(self.graphs.len() - 1)
    }

    fn replay(&mut self, graph: usize) -> Result<(), String> {
        let (exec, _) = self.graphs[graph];
        // SAFETY: an instantiated graph on our stream.
        check(
            unsafe { hip::hipGraphLaunch(exec, self.stream) },
            "hipGraphLaunch",
        )
    }

    fn write_u32(&mut self, io: usize, value: u32) -> Result<(), String> {
        let v = [value];
        // SAFETY: io pointers are CubeCL buffers of at least one word; a pageable source is
        // staged before the call returns.
        check(
            unsafe {
                hip::hipMemcpyHtoDAsync(self.io[io], v.as_ptr() as *const c_void, 4, self.stream)
            },
            "hipMemcpyHtoDAsync",
        )
    }

    fn read_u32(&mut self, io: usize) -> Result<u32, String> {
        let mut v = [0u32];
        // SAFETY: as in `write_u32`; the stream is drained before `v` is read.
        unsafe {
            check(
                hip::hipMemcpyDtoHAsync(v.as_mut_ptr() as *mut c_void, self.io[io], 4, self.stream),
                "hipMemcpyDtoHAsync",
            )?;
            check(
                hip::hipStreamSynchronize(self.stream),
                "hipStreamSynchronize",
            )?;
        }
        Ok(v[0])
    }

    fn nodes(&self, graph: usize) -> usize {
        self.graphs[graph].1
    }
}

impl Drop for HipReplayer {
    fn drop(&mut self) {
        // SAFETY: our own stream, graphs and allocations, released once.
        unsafe {
            hip::hipStreamSynchronize(self.stream);
            for (exec, _) in self.graphs.drain(..) {
                hip::hipGraphExecDestroy(exec);
            }
            for p in self.owned.drain(..) {
                hip::hipFree(p);
            }
            hip::hipStreamDestroy(self.stream);
        }
    }
}
