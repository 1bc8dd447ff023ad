//! `cargo xtask hip-check`: every kernel variant the runtime can launch, compiled to HIP C++ by
//! CubeCL's HIP compiler and then by hipcc for gfx90a (MI200, wave64) and gfx1030 (RDNA2,
//! wave32), so ROCm breakage shows without an AMD GPU.
//!
//! Kernel definitions are built through a wgpu client (any runtime's client would do; wgpu is
//! the one that exists everywhere, on lavapipe if need be). Sources and objects go under
//! `target/hip-check/`. `HIPCC` overrides the compiler (default `hipcc` on the PATH).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use rocforge_kernels::ops::catalog::kernel_definitions;
use rocforge_kernels::ops::gpu::cubecl::hip::runtime::HipCompiler;
use rocforge_kernels::ops::gpu::cubecl::prelude::*;
use rocforge_kernels::ops::gpu::cubecl::wgpu::WgpuRuntime;
use rocforge_kernels::ops::gpu::cubecl::Compiler;

/// Target architectures and their wavefront size.
const ARCHS: [(&str, u32); 2] = [("gfx90a", 64), ("gfx1030", 32)];

/// Lines of hipcc's output shown per failure.
const ERROR_LINES: usize = 6;

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hip-check")
}

pub fn run() -> Result<()> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hipcc = std::env::var("HIPCC").unwrap_or_else(|_| "hipcc".into());
    let client = WgpuRuntime::client(&Default::default());
    let (mut total, mut failures) = (0usize, Vec::new());
    // CubeCL's compile runs here, serially; hipcc jobs (the slow part) go to worker threads.
    let mut jobs: Vec<(String, &'static str, PathBuf)> = Vec::new();
    for (arch, warp_size) in ARCHS {
        // Fresh definitions per target: compiling drains state a clone of a definition shares
        // (the second compile of a clone loses its local declarations).
        let defs = kernel_definitions(&client);
        total += defs.len();
        for (name, def) in defs {
            let case = format!("{name} [{arch}]");
            let mut options = <HipCompiler as Compiler>::CompilationOptions::default();
            options.warp_size = warp_size;
            let source = match HipCompiler::default().compile(def, &options, ExecutionMode::Unchecked, AddressType::U32.unsigned_type()) {
                Ok(kernel) => kernel.to_string(),
                Err(e) => {
                    failures.push(format!("{case}: CubeCL's HIP compiler failed: {e}"));
                    continue;
                }
            };
            let src = dir.join(format!("{name}.{arch}.hip"));
            std::fs::write(&src, source).with_context(|| format!("writing {}", src.display()))?;
            jobs.push((case, arch, src));
        }
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Option<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((case, arch, src)) = jobs.get(i) else { break };
                        mine.push((i, hipcc_one(&hipcc, case, arch, src)));
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<(usize, Result<Option<String>>)> = handles.into_iter().flat_map(|h| h.join().expect("hipcc worker panicked")).collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let mut compiled = 0usize;
    for r in results {
        match r? {
            None => compiled += 1,
            Some(f) => failures.push(f),
        }
    }
    for f in &failures {
        eprintln!("FAILED {f}");
    }
    println!("hip-check: {compiled}/{total} kernels compiled");
    if !failures.is_empty() {
        bail!("{} of {total} kernel builds failed", failures.len());
    }
    Ok(())
}

/// Compiles one source with hipcc: `None` when it built, else the failure line to report.
fn hipcc_one(hipcc: &str, case: &str, arch: &str, src: &Path) -> Result<Option<String>> {
    let out = Command::new(hipcc)
        .arg(format!("--offload-arch={arch}"))
        .args(["--cuda-device-only", "-c"])
        .arg(src)
        .arg("-o")
        .arg(src.with_extension("o"))
        .output()
        .with_context(|| format!("running `{hipcc}` (install ROCm's hipcc or set HIPCC)"))?;
    if out.status.success() {
        return Ok(None);
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    let first: Vec<&str> = text.lines().filter(|l| l.contains("error")).take(ERROR_LINES).collect();
    let shown = if first.is_empty() { text.lines().take(ERROR_LINES).collect() } else { first };
    Ok(Some(format!("{case}: hipcc failed ({}):\n    {}", src.display(), shown.join("\n    "))))
}
