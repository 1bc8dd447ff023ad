//! `hip_check`: every kernel variant the runtime can launch, compiled to HIP C++ by CubeCL's HIP
//! compiler and then by hipcc for gfx90a (MI200, wave64) and gfx1030 (RDNA2, wave32), and the
//! quantized mat-mat on matrix units for gfx1100 (RDNA3, WMMA), so ROCm breakage shows without
//! an AMD GPU. `cargo xtask hip-check` (and `cargo xtask test`) run it;
//! it ends with the line `hip-check: N/M kernels compiled` and exits 1 when N < M.
//!
//! Kernel definitions are built through a wgpu client (any runtime's client would do; wgpu is
//! the one that exists everywhere, on lavapipe if need be). Each kernel's source is written to
//! `<dir>/<name>.<arch>.hip` (default `target/hip-check`, or the first argument). hipcc is slow
//! to start (it parses the HIP headers each time, ~1.5 s), so the sources are compiled in
//! bundles: one translation unit holds several kernels, each in a namespace of its own (and
//! with C++ linkage, so their entry points may share names); when a bundle fails, its kernels
//! are compiled one by one so the failures name the kernel. `HIPCC` overrides the compiler.
//!
//! Run: `cargo run --release -p rocforge-kernels --features wgpu,hip --example hip_check [DIR]`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};

use rocforge_kernels::ops::catalog::kernel_definitions;
use rocforge_kernels::ops::gpu::cubecl::hip::runtime::HipCompiler;
use rocforge_kernels::ops::gpu::cubecl::prelude::*;
use rocforge_kernels::ops::gpu::cubecl::wgpu::WgpuRuntime;
use rocforge_kernels::ops::gpu::cubecl::Compiler;
use rocforge_kernels::ops::matmul::catalog::mma_definitions;

/// Target architectures, their wavefront size, and whether they take the quantized mat-mat
/// only: that kernel runs where CubeCL 0.10's HIP compiler drives matrix units (RDNA3 WMMA,
/// wave32), so it is checked for gfx1100 instead. Debian's ROCm 5.2 has no gfx1100 device
/// library, so gfx1100 sources are compiled to assembly (`-S -nogpulib`: front end and code
/// generation, WMMA instructions included, without the device-library link).
const ARCHS: [(&str, u32, bool); 3] = [
    ("gfx90a", 64, false),
    ("gfx1030", 32, false),
    ("gfx1100", 32, true),
];

/// Kernels per hipcc translation unit.
const BUNDLE: usize = 24;

/// Lines of hipcc's output shown per failure.
const ERROR_LINES: usize = 6;

/// One kernel's HIP source for one architecture.
struct Source {
    case: String,
    arch: &'static str,
    path: PathBuf,
    text: String,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hip-check: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, String> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hip-check"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let hipcc = std::env::var("HIPCC").unwrap_or_else(|_| "hipcc".into());
    let client = WgpuRuntime::client(&Default::default());
    let (mut total, mut failures, mut sources) = (0usize, Vec::new(), Vec::new());
    for (arch, warp_size, mma_only) in ARCHS {
        // Fresh definitions per target: compiling drains state a clone of a definition shares
        // (the second compile of a clone loses its local declarations).
        let defs = if mma_only {
            mma_definitions(&client, warp_size)
        } else {
            kernel_definitions(&client, warp_size as usize)
        };
        total += defs.len();
        for (name, def) in defs {
            let case = format!("{name} [{arch}]");
            let mut options = <HipCompiler as Compiler>::CompilationOptions::default();
            options.warp_size = warp_size;
            match HipCompiler::default().compile(
                def,
                &options,
                ExecutionMode::Unchecked,
                AddressType::U32.unsigned_type(),
            ) {
                Ok(kernel) => {
                    let path = dir.join(format!("{name}.{arch}.hip"));
                    let text = kernel.to_string();
                    std::fs::write(&path, &text)
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                    sources.push(Source {
                        case,
                        arch,
                        path,
                        text,
                    });
                }
                Err(e) => failures.push(format!("{case}: CubeCL's HIP compiler failed: {e}")),
            }
        }
    }
    let bundles: Vec<&[Source]> = ARCHS
        .iter()
        .flat_map(|(arch, _, _)| chunks_of(&sources, arch))
        .collect();
    eprintln!(
        "hip-check: {} sources in {} hipcc bundles",
        sources.len(),
        bundles.len()
    );
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Vec<String>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(bundle) = bundles.get(i) else { break };
                        mine.push((i, compile_bundle(&hipcc, &dir, bundle)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .map(|(i, r)| (i, r.0, r.1))
            .collect()
    });
    results.sort_by_key(|r| r.0);
    let mut compiled = 0;
    for (_, failed, ok) in results {
        compiled += ok;
        failures.extend(failed);
    }
    for f in &failures {
        eprintln!("FAILED {f}");
    }
    println!("hip-check: {compiled}/{total} kernels compiled");
    Ok(compiled == total && failures.is_empty())
}

/// The sources of one architecture, `BUNDLE` at a time.
fn chunks_of<'a>(sources: &'a [Source], arch: &str) -> Vec<&'a [Source]> {
    let start = sources
        .iter()
        .position(|s| s.arch == arch)
        .unwrap_or(sources.len());
    let end = sources[start..]
        .iter()
        .position(|s| s.arch != arch)
        .map_or(sources.len(), |n| start + n);
    sources[start..end].chunks(BUNDLE).collect()
}

/// Compiles a bundle in one hipcc run; on failure, each of its kernels alone. Returns the
/// failure lines and the number of kernels that compiled.
fn compile_bundle(hipcc: &str, dir: &Path, bundle: &[Source]) -> (Vec<String>, usize) {
    let arch = bundle[0].arch;
    let mut includes: Vec<&str> = Vec::new();
    let mut body = String::new();
    for (i, s) in bundle.iter().enumerate() {
        body.push_str(&format!("// {}\nnamespace rf_k{i} {{\n", s.case));
        for line in s.text.lines() {
            if line.trim_start().starts_with("#include") {
                if !includes.contains(&line) {
                    includes.push(line);
                }
            } else {
                body.push_str(&line.replacen("extern \"C\" ", "", 1));
                body.push('\n');
            }
        }
        body.push_str("}\n");
    }
    let first = bundle[0]
        .path
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("bundle");
    let path = dir.join(format!("bundle-{first}.hip"));
    let text = format!("{}\n{body}", includes.join("\n"));
    if let Err(e) = std::fs::write(&path, text) {
        return (
            vec![format!(
                "{}: writing {}: {e}",
                bundle[0].case,
                path.display()
            )],
            0,
        );
    }
    if hipcc_one(hipcc, arch, &path).is_ok() {
        return (Vec::new(), bundle.len());
    }
    let mut failures = Vec::new();
    for s in bundle {
        if let Err(why) = hipcc_one(hipcc, arch, &s.path) {
            failures.push(format!("{}: {why}", s.case));
        }
    }
    let ok = bundle.len() - failures.len();
    (failures, ok)
}

/// Compiles one file with hipcc for `arch`; the error holds the first lines of its complaint.
fn hipcc_one(hipcc: &str, arch: &str, src: &Path) -> Result<(), String> {
    let assembly = ARCHS.iter().any(|&(a, _, mma_only)| a == arch && mma_only);
    let mode: &[&str] = if assembly {
        &["-nogpulib", "-S"]
    } else {
        &["-c"]
    };
    let out = Command::new(hipcc)
        .arg(format!("--offload-arch={arch}"))
        .arg("--cuda-device-only")
        .args(mode)
        .arg(src)
        .arg("-o")
        .arg(src.with_extension(if assembly { "s" } else { "o" }))
        .output()
        .map_err(|e| format!("running `{hipcc}`: {e} (install ROCm's hipcc or set HIPCC)"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let first: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("error"))
        .take(ERROR_LINES)
        .collect();
    let shown = if first.is_empty() {
        text.lines().take(ERROR_LINES).collect()
    } else {
        first
    };
    Err(format!(
        "hipcc failed ({}):\n    {}",
        src.display(),
        shown.join("\n    ")
    ))
}
