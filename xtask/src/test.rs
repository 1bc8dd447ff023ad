//! `cargo xtask test`: the project's whole test suite, set-up included, as CI runs it.
//!
//! 1. Set-up: installs the system packages the suites need when it can (root with apt-get),
//!    else stops with the one command to run; fetches every model of `fetch_model::MODELS`
//!    (as `cargo xtask fetch-model` does); points cubecl-hip-sys's build script at a
//!    `hipconfig` that answers with bindings the crate ships (see [`hip_env`]).
//! 2. One build: `cargo test --no-run` over the workspace, profile `ci` (release without
//!    cross-crate LTO), features `wgpu,hip`. Every later step uses its artifacts, so CubeCL is
//!    compiled once.
//! 3. The suites (`cargo xtask test --help` lists them): each test binary of that build (unit tests by package, integration tests by target), the doc tests, and
//!    hip-check (every kernel's HIP source through hipcc). A suite that cannot run fails the run;
//!    only `--skip` leaves one out. The test binaries run with `ROCFORGE_REQUIRE_MODELS=1`, so a
//!    test that would skip for an absent model or reference fails instead.
//! 4. A table: every suite ran / skipped on request / failed, with test counts and times.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::fetch_model;

pub const FEATURES: &str = "wgpu,hip";
pub const PROFILE: &str = "ci";

/// What a suite needs besides the build.
#[derive(Clone, Copy, PartialEq)]
enum Needs {
    Nothing,
    /// Mesa's lavapipe (Vulkan on the CPU) for wgpu.
    Vulkan,
    /// The real models and lavapipe.
    ModelsVulkan,
    Models,
    /// hipcc and ROCm's device libraries, and lavapipe (hip_check takes a wgpu client).
    Hipcc,
}

/// The suites, in the order they run: (name, what it tests, what it needs).
const SUITES: &[(&str, &str, Needs)] = &[
    (
        "fmt",
        "cargo fmt --all --check (rustfmt's default style)",
        Needs::Nothing,
    ),
    (
        "kernels-unit",
        "rocforge-kernels unit tests: CPU reference ops, quant block layouts",
        Needs::Nothing,
    ),
    (
        "quant-golden",
        "quant formats against ggml's bytes and values (fixtures)",
        Needs::Nothing,
    ),
    (
        "quant-bench",
        "quantized mat-vec timing benchmarks, #[ignore]d (listed as ignored)",
        Needs::Nothing,
    ),
    (
        "ops-kernels",
        "every CubeCL op kernel on wgpu (Mesa lavapipe) against the CPU reference",
        Needs::Vulkan,
    ),
    (
        "matmul-kernels",
        "the CubeCL matmul kernels on wgpu (lavapipe) against the CPU reference",
        Needs::Vulkan,
    ),
    (
        "runtime-unit",
        "rocforge-runtime unit tests: GGUF, tokenizer, sampler, CPU backend",
        Needs::Nothing,
    ),
    (
        "gguf",
        "GGUF reader/writer and the corpus of broken files",
        Needs::Nothing,
    ),
    (
        "tokenizer",
        "tokenizer and chat templates; llama.cpp's ids on the real SmolLM2",
        Needs::Models,
    ),
    (
        "golden-cpu",
        "real SmolLM2 on the CPU backend: greedy continuations and perplexity vs llama.cpp",
        Needs::Models,
    ),
    (
        "engine-cpu",
        "the multi-sequence engine on the CPU: batched vs single-sequence ids (tiny models, real SmolLM2), paged KV, full page pool, cancel",
        Needs::Models,
    ),
    (
        "gpu-wgpu",
        "the wgpu backend vs the CPU backend: tiny models and real SmolLM2, on lavapipe",
        Needs::ModelsVulkan,
    ),
    (
        "golden-gemma3-cpu",
        "real Gemma-3-270M on the CPU backend: prompt ids, greedy continuations and perplexity vs llama.cpp",
        Needs::Models,
    ),
    (
        "gpu-gemma3",
        "Gemma 3 on the wgpu backend (lavapipe): a tiny synthetic one vs the CPU backend, the real Gemma-3-270M's greedy continuations vs llama.cpp",
        Needs::ModelsVulkan,
    ),
    ("cli-unit", "rocforge-cli unit tests", Needs::Nothing),
    (
        "cli",
        "the rocforge binary: inspect, generate (real SmolLM2), perplexity, errors",
        Needs::Models,
    ),
    ("bench-unit", "rocforge-bench unit tests", Needs::Nothing),
    (
        "compare-gate",
        "the benchmark regression gate",
        Needs::Nothing,
    ),
    (
        "memory",
        "the benchmark's memory accounting",
        Needs::Nothing,
    ),
    (
        "suite-cli",
        "the rocforge-bench binary end to end",
        Needs::Nothing,
    ),
    ("xtask-unit", "xtask unit tests", Needs::Nothing),
    ("doc", "doc tests (cargo test --doc)", Needs::Nothing),
    (
        "hip-check",
        "every kernel's HIP source through hipcc for gfx90a and gfx1030",
        Needs::Hipcc,
    ),
    (
        "fuzz",
        "each cargo-fuzz target of fuzz/ for 15 s (nightly toolchain; cargo-fuzz installed if missing)",
        Needs::Nothing,
    ),
];

/// Test targets that are not suites: benches/tests/common.rs holds helpers the other tests
/// include as a module; cargo builds it as a target of its own, with no tests.
const NOT_SUITES: &[&str] = &["common"];

/// The packages behind [`Needs`] on Debian/Ubuntu.
const VULKAN_PACKAGES: &[&str] = &["mesa-vulkan-drivers"];
const HIP_PACKAGES: &[&str] = &["hipcc", "libamdhip64-dev", "rocm-device-libs"];

pub fn help() -> String {
    let mut s = String::from(
        "usage: cargo xtask test [--skip SUITE[,SUITE..]] [-- TEST BINARY ARGS]\n\n\
         Sets up what the tests need (system packages, models, hipconfig answer), builds once (profile ci,\n\
         features wgpu,hip), runs every suite and ends with a table. A suite that cannot run is a failure;\n\
         --skip leaves suites out on request. Arguments after -- go to every test binary (e.g. a name filter).\n\nsuites:\n",
    );
    for (name, what, _) in SUITES {
        s += &format!("  {name:<15} {what}\n");
    }
    s
}

pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with(args, &[])
}

fn cargo_cmd(args: &[&str], env: &[(String, OsString)]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn cargo_with(args: &[&str], env: &[(String, OsString)]) -> Result<()> {
    let status = cargo_cmd(args, env).status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Test counts of one suite.
#[derive(Default, Clone, Copy)]
struct Counts {
    passed: usize,
    failed: usize,
    ignored: usize,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

enum Outcome {
    Ran,
    Skipped,
    Failed(String),
}

struct Row {
    name: String,
    outcome: Outcome,
    counts: Option<Counts>,
    secs: f64,
}

/// A test executable of the build: the suite it belongs to and the package directory it runs in.
struct TestBin {
    suite: String,
    path: PathBuf,
    pkg_dir: PathBuf,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut skip: Vec<String> = Vec::new();
    let mut test_args: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{}", help());
                return Ok(());
            }
            "--skip" => skip.extend(
                it.next()
                    .context("--skip needs a list of suites")?
                    .split(',')
                    .map(str::to_string),
            ),
            s if s.starts_with("--skip=") => {
                skip.extend(s["--skip=".len()..].split(',').map(str::to_string))
            }
            "--" => test_args.extend(it.by_ref().cloned()),
            other => bail!("unknown argument `{other}`\n{}", help()),
        }
    }
    skip.retain(|s| !s.is_empty());
    if let Some(bad) = skip.iter().find(|s| !SUITES.iter().any(|(n, _, _)| n == s)) {
        bail!("unknown suite `{bad}` in --skip\n{}", help());
    }
    let wanted = |needs: Needs| {
        SUITES
            .iter()
            .any(|(n, _, nd)| *nd == needs && !skip.iter().any(|s| s == n))
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut setup: Vec<Row> = Vec::new();

    // Set-up. Missing packages stop the run here (with the command to run).
    let t = Instant::now();
    let (vulkan, hip) = (
        wanted(Needs::Vulkan) || wanted(Needs::ModelsVulkan) || wanted(Needs::Hipcc),
        wanted(Needs::Hipcc),
    );
    ensure_packages(vulkan, hip)?;
    setup.push(Row {
        name: "packages".into(),
        outcome: Outcome::Ran,
        counts: None,
        secs: t.elapsed().as_secs_f64(),
    });

    let t = Instant::now();
    let models = if wanted(Needs::Models) || wanted(Needs::ModelsVulkan) {
        match fetch_models() {
            Ok(()) => Outcome::Ran,
            Err(e) => {
                eprintln!("xtask test: {e:#}");
                Outcome::Failed(format!("{e:#}"))
            }
        }
    } else {
        Outcome::Skipped
    };
    setup.push(Row {
        name: "models".into(),
        outcome: models,
        counts: None,
        secs: t.elapsed().as_secs_f64(),
    });
    let env = hip_env()?;

    let skipped = |name: &str| skip.iter().any(|s| s == name);
    // fmt needs no build.
    if skipped("fmt") {
        rows.push(Row {
            name: "fmt".into(),
            outcome: Outcome::Skipped,
            counts: None,
            secs: 0.0,
        });
    } else {
        let t = Instant::now();
        let ok = cargo_cmd(&["fmt", "--all", "--check"], &[])
            .status()
            .is_ok_and(|s| s.success());
        let outcome = if ok {
            Outcome::Ran
        } else {
            Outcome::Failed("not in rustfmt's style (run `cargo fmt --all`)".into())
        };
        rows.push(Row {
            name: "fmt".into(),
            outcome,
            counts: None,
            secs: t.elapsed().as_secs_f64(),
        });
    }
    let t = Instant::now();
    let built = build(&env);
    let build_secs = t.elapsed().as_secs_f64();
    let (bins, hip_check_bin) = match built {
        Ok(b) => {
            setup.push(Row {
                name: "build".into(),
                outcome: Outcome::Ran,
                counts: None,
                secs: build_secs,
            });
            b
        }
        Err(e) => {
            setup.push(Row {
                name: "build".into(),
                outcome: Outcome::Failed(format!("{e:#}")),
                counts: None,
                secs: build_secs,
            });
            for (name, _, _) in &SUITES[1..] {
                let outcome = if skipped(name) {
                    Outcome::Skipped
                } else {
                    Outcome::Failed("the build failed".into())
                };
                rows.push(Row {
                    name: name.to_string(),
                    outcome,
                    counts: None,
                    secs: 0.0,
                });
            }
            return finish(&setup, &rows, started);
        }
    };

    let mut by_suite: BTreeMap<String, Vec<TestBin>> = BTreeMap::new();
    for b in bins {
        by_suite.entry(b.suite.clone()).or_default().push(b);
    }
    let mut names: Vec<String> = SUITES[1..].iter().map(|(n, _, _)| n.to_string()).collect();
    // A test target missing from SUITES still runs, under its own name.
    let extra: Vec<String> = by_suite
        .keys()
        .filter(|k| !names.contains(k))
        .cloned()
        .collect();
    for e in &extra {
        eprintln!("xtask test: test target `{e}` is not in xtask's suite list; running it anyway");
    }
    let at = names.iter().position(|n| n == "doc").unwrap_or(names.len());
    names.splice(at..at, extra);

    for name in names {
        if skipped(&name) {
            rows.push(Row {
                name,
                outcome: Outcome::Skipped,
                counts: None,
                secs: 0.0,
            });
            continue;
        }
        let t = Instant::now();
        let (outcome, counts) = match name.as_str() {
            "doc" => run_doc(&env, &test_args),
            "hip-check" => run_hip_check(&hip_check_bin),
            "fuzz" => run_fuzz(),
            _ => match by_suite.get(&name) {
                Some(bins) => run_bins(&name, bins, &test_args),
                None => (
                    Outcome::Failed("the build made no test binary for this suite".into()),
                    None,
                ),
            },
        };
        rows.push(Row {
            name,
            outcome,
            counts,
            secs: t.elapsed().as_secs_f64(),
        });
    }
    finish(&setup, &rows, started)
}

/// Prints the table; an error when anything failed.
fn finish(setup: &[Row], rows: &[Row], started: Instant) -> Result<()> {
    let mut out = String::from("\ncargo xtask test summary\n");
    out += &format!(
        "{:<15} {:<9} {:>33} {:>9}\n",
        "step / suite", "result", "tests", "time"
    );
    let mut failed = Vec::new();
    for (i, r) in setup.iter().chain(rows).enumerate() {
        if i == setup.len() {
            out += &format!("{}\n", "-".repeat(69));
        }
        let result = match &r.outcome {
            Outcome::Ran => "ran",
            Outcome::Skipped if i < setup.len() => "not needed",
            Outcome::Skipped => "skipped on request",
            Outcome::Failed(why) => {
                failed.push(format!("{}: {why}", r.name));
                "FAILED"
            }
        };
        let tests = r.counts.map_or(String::new(), |c| {
            format!(
                "{} passed, {} failed, {} ignored",
                c.passed, c.failed, c.ignored
            )
        });
        let time = if matches!(r.outcome, Outcome::Skipped) {
            String::new()
        } else {
            format!("{:.1} s", r.secs)
        };
        out += &format!("{:<15} {:<9} {:>33} {:>9}\n", r.name, result, tests, time);
    }
    let total: Counts = rows
        .iter()
        .filter_map(|r| r.counts)
        .fold(Counts::default(), |mut a, c| {
            a.add(c);
            a
        });
    let ran = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Ran))
        .count();
    let skipped = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Skipped))
        .count();
    out += &format!(
        "{} suites: {ran} ran, {skipped} skipped on request, {} failed; {} tests passed, {} failed, {} ignored; {:.0} s\n",
        rows.len(),
        rows.len() - ran - skipped,
        total.passed,
        total.failed,
        total.ignored,
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    if !failed.is_empty() {
        bail!(
            "{} failed:\n  {}",
            if failed.len() == 1 {
                "one step"
            } else {
                "some steps"
            },
            failed.join("\n  ")
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------- set-up

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs the packages the chosen suites need with apt-get when running as root; otherwise
/// names the command to run.
fn ensure_packages(vulkan: bool, hip: bool) -> Result<()> {
    let mut wanted: Vec<&str> = Vec::new();
    if vulkan {
        wanted.extend(VULKAN_PACKAGES);
    }
    if hip {
        wanted.extend(HIP_PACKAGES);
    }
    let missing: Vec<&str> = if on_path("dpkg-query").is_some() {
        wanted
            .iter()
            .copied()
            .filter(|p| {
                let out = Command::new("dpkg-query")
                    .args(["-W", "-f=${Status}", p])
                    .output();
                !out.is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("install ok installed")
                })
            })
            .collect()
    } else {
        // Not Debian: check for what the packages provide.
        let mut m = Vec::new();
        if vulkan && !Path::new("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json").exists() {
            m.push("Mesa's lavapipe Vulkan driver (Debian: mesa-vulkan-drivers)");
        }
        if hip && on_path("hipcc").is_none() {
            m.push("hipcc and ROCm's device libraries (Debian: hipcc libamdhip64-dev rocm-device-libs)");
        }
        if !m.is_empty() {
            bail!("missing system packages: install {}, or leave the suites that need them out (see --help)", m.join(" and "));
        }
        return Ok(());
    };
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() || on_path("apt-get").is_none() {
        bail!("missing system packages; run `sudo {command}` (or leave the suites that need them out: --skip, see --help)");
    }
    eprintln!("xtask test: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let ok = apt(&["update", "-qq"]).is_ok_and(|s| s.success())
        && apt(&[&["install", "-y", "-qq"][..], &missing].concat()).is_ok_and(|s| s.success());
    if !ok {
        bail!("`{command}` failed (see above); run it by hand, or leave the suites that need it out (see --help)");
    }
    Ok(())
}

/// Every model of `fetch-model`'s list, in its cache (where the tests look).
fn fetch_models() -> Result<()> {
    for m in fetch_model::MODELS {
        fetch_model::fetch(m).with_context(|| {
            format!(
                "cannot fetch model `{}` into {} (the golden tests need it; fetch it with `cargo xtask fetch-model {}`, or --skip golden-cpu,gpu-wgpu,tokenizer,cli)",
                m.name,
                fetch_model::cache_dir().join("models").display(),
                m.name
            )
        })?;
    }
    Ok(())
}

/// The newest HIP bindings cubecl-hip-sys ships, when its bindings directory cannot be read.
const NEWEST_BUNDLED_HIP_PATCH: &str = "60850";

/// The environment for every cargo call that builds cubecl-hip-sys.
///
/// Its build script picks HIP bindings from the patch number of `hipconfig --version`; with a
/// ROCm it ships no bindings for (Debian's ROCm 5.2, installed for hipcc), the crate does not
/// compile. Then we write a `hipconfig` that answers that build script only (cargo sets
/// `CARGO_PKG_NAME`) with the newest bundled patch and passes everything else to the real one,
/// and put it first on the child cargo's PATH. HIP is loaded at run time anyway.
///
/// Cargo reruns a build script when an environment variable it declared with
/// `rerun-if-env-changed` changes, not when PATH does, so an answer cached by a build without
/// the wrapper would stick. The script declares `HIP_PATH`; we set it to the wrapper's HIP
/// directory (`<dir>/bin/hipconfig`, the layout from which hipconfig derives HIP_PATH), whose
/// name carries the answer. A build with another answer (or none) had another HIP_PATH, so the
/// script reruns and answers afresh. HIP_PATH is read by nothing else at build time.
fn hip_env() -> Result<Vec<(String, OsString)>> {
    let Some(real) = on_path("hipconfig") else {
        // No ROCm: the build script picks the newest bindings itself.
        return Ok(Vec::new());
    };
    let version = Command::new(&real)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", real.display()))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    // The build script's parse: `MAJOR.MINOR.PATCH-...`.
    let patch = version
        .split('-')
        .next()
        .and_then(|v| v.split('.').nth(2))
        .unwrap_or("")
        .to_string();
    let shipped = shipped_hip_patches();
    if !patch.is_empty() && shipped.contains(&patch) {
        return Ok(Vec::new());
    }
    let answer = shipped
        .iter()
        .max_by_key(|p| p.parse::<u64>().unwrap_or(0))
        .cloned()
        .unwrap_or_else(|| NEWEST_BUNDLED_HIP_PATCH.into());
    let hip_dir = target_dir()
        .join("rocforge-hipconfig")
        .join(format!("hip_{answer}"));
    let bin = hip_dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("{}: cannot create", bin.display()))?;
    let script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask test` (xtask/src/test.rs, hip_env): cubecl-hip-sys ships no HIP bindings\n\
         # for this system's hipconfig ({version}); its build script gets the newest bundled patch instead.\n\
         if [ \"$CARGO_PKG_NAME\" = \"cubecl-hip-sys\" ] && {{ [ \"$1\" = \"--version\" ] || [ \"$1\" = \"-v\" ]; }}; then\n  \
           echo \"7.0.{answer}-rocforge\"\n  exit 0\nfi\nexec '{}' \"$@\"\n",
        real.display()
    );
    let wrapper = bin.join("hipconfig");
    if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(script.as_str()) {
        std::fs::write(&wrapper, &script)
            .with_context(|| format!("{}: cannot write", wrapper.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    eprintln!("xtask test: hipconfig says {version}, which cubecl-hip-sys has no bindings for; its build gets hip_{answer} from {}", wrapper.display());
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    Ok(vec![
        ("PATH".into(), path),
        ("HIP_PATH".into(), hip_dir.into_os_string()),
    ])
}

/// The HIP patch numbers of the bindings that the locked cubecl-hip-sys ships
/// (`src/bindings/bindings_<patch>.rs` in cargo's registry sources); empty when not found.
fn shipped_hip_patches() -> Vec<String> {
    let find = || -> Option<Vec<String>> {
        let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).ok()?;
        let at = lock.find("name = \"cubecl-hip-sys\"")?;
        let version = lock[at..]
            .lines()
            .nth(1)?
            .strip_prefix("version = \"")?
            .trim_end_matches('"')
            .to_string();
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        for index in std::fs::read_dir(home.join("registry/src")).ok()?.flatten() {
            let dir = index
                .path()
                .join(format!("cubecl-hip-sys-{version}/src/bindings"));
            if let Ok(entries) = std::fs::read_dir(&dir) {
                let patches: Vec<String> = entries
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_prefix("bindings_")?
                            .strip_suffix(".rs")
                            .map(str::to_string)
                    })
                    .collect();
                if !patches.is_empty() {
                    return Some(patches);
                }
            }
        }
        None
    };
    if let Some(p) = find() {
        return p;
    }
    // On a fresh machine the sources are unpacked once cargo has fetched them.
    let _ = cargo(&["fetch", "--quiet"]);
    find().unwrap_or_default()
}

// -------------------------------------------------------------------------------------- build

fn build_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "test",
        "--profile",
        PROFILE,
        "--workspace",
        "--features",
        FEATURES,
    ];
    a.extend(extra);
    a
}

/// Suite name of a test executable: unit tests by package (`<package>-unit`, without the
/// `rocforge-` prefix), integration tests by target name.
fn suite_of(package_dir: &Path, kind: &str, target: &str) -> String {
    if kind == "lib" || kind == "bin" {
        let pkg = package_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("unknown");
        let short = match pkg.strip_prefix("rocforge-").unwrap_or(pkg) {
            "benches" => "bench",
            s => s,
        };
        return format!("{short}-unit");
    }
    match target {
        "gpu_backends" => "gpu-wgpu".into(),
        t => t.replace('_', "-"),
    }
}

/// Builds every test binary and the hip_check example; returns them (by suite) and the example.
fn build(env: &[(String, OsString)]) -> Result<(Vec<TestBin>, Option<PathBuf>)> {
    let args = build_args(&["--no-run", "--message-format=json-render-diagnostics"]);
    let mut child = cargo_cmd(&args, env)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let (mut bins, mut hip_check) = (Vec::new(), None);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let target = msg["target"]["name"].as_str().unwrap_or_default();
        let kind = msg["target"]["kind"][0].as_str().unwrap_or_default();
        if kind == "example" && target == "hip_check" {
            hip_check = Some(PathBuf::from(exe));
        }
        if msg["profile"]["test"] != true || (kind == "test" && NOT_SUITES.contains(&target)) {
            continue;
        }
        let pkg_dir = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default())
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        bins.push(TestBin {
            suite: suite_of(&pkg_dir, kind, target),
            path: PathBuf::from(exe),
            pkg_dir,
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok((bins, hip_check))
}

// ------------------------------------------------------------------------------------- suites

/// Counts from a libtest summary line: `test result: ok. 12 passed; 0 failed; 1 ignored; ...`.
fn parse_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |word: &str| -> usize {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    Some(Counts {
        passed: num("passed"),
        failed: num("failed"),
        ignored: num("ignored"),
    })
}

/// Runs `cmd` with stdout echoed and parsed for libtest summaries.
fn run_counted(cmd: &mut Command) -> Result<(bool, Counts, usize)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let (mut counts, mut summaries) = (Counts::default(), 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(c) = parse_result(&line) {
            counts.add(c);
            summaries += 1;
        }
    }
    Ok((child.wait()?.success(), counts, summaries))
}

/// Mesa's window-system loaders print an error for every wgpu instance when XDG_RUNTIME_DIR is
/// unset (a CI shell, ssh); lavapipe needs no window system, so give them an empty private one.
fn quiet_mesa(cmd: &mut Command) {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = target_dir().join("rocforge-xdg-runtime");
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
}

fn run_bins(name: &str, bins: &[TestBin], test_args: &[String]) -> (Outcome, Option<Counts>) {
    let mut total = Counts::default();
    for b in bins {
        eprintln!("xtask test [{name}]: {}", b.path.display());
        let mut cmd = Command::new(&b.path);
        // As `cargo test` runs them: from the package directory.
        cmd.args(test_args)
            .current_dir(&b.pkg_dir)
            .env("CARGO_MANIFEST_DIR", &b.pkg_dir)
            .env("ROCFORGE_REQUIRE_MODELS", "1");
        quiet_mesa(&mut cmd);
        match run_counted(&mut cmd) {
            Ok((ok, c, _)) => {
                total.add(c);
                if !ok {
                    let why = if c.failed > 0 {
                        format!(
                            "{} failed",
                            if c.failed == 1 {
                                "1 test".to_string()
                            } else {
                                format!("{} tests", c.failed)
                            }
                        )
                    } else {
                        format!("{} exited with an error", b.path.display())
                    };
                    return (Outcome::Failed(why), Some(total));
                }
            }
            Err(e) => {
                return (
                    Outcome::Failed(format!("cannot run {}: {e}", b.path.display())),
                    Some(total),
                )
            }
        }
    }
    // A test target without tests has lost them (a cfg, a rename): not a pass. Benchmarks that
    // are #[ignore]d (quant-bench) count as present.
    if total.passed + total.ignored == 0 && test_args.is_empty() && !name.ends_with("-unit") {
        return (Outcome::Failed("no test ran".into()), Some(total));
    }
    (Outcome::Ran, Some(total))
}

fn run_doc(env: &[(String, OsString)], test_args: &[String]) -> (Outcome, Option<Counts>) {
    let mut args = build_args(&["--doc"]);
    if !test_args.is_empty() {
        args.push("--");
        args.extend(test_args.iter().map(String::as_str));
    }
    let mut cmd = cargo_cmd(&args, env);
    cmd.env("ROCFORGE_REQUIRE_MODELS", "1");
    match run_counted(&mut cmd) {
        Ok((true, c, _)) => (Outcome::Ran, Some(c)),
        Ok((false, c, _)) => (Outcome::Failed("doc tests failed".into()), Some(c)),
        Err(e) => (Outcome::Failed(format!("cannot run cargo: {e}")), None),
    }
}

fn hipcc_installed() -> bool {
    let hipcc = std::env::var("HIPCC").unwrap_or_else(|_| "hipcc".into());
    Command::new(hipcc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every fuzz target briefly (`cargo xtask fuzz --seconds 15`), its build cached in the target
/// directory. Needs the nightly toolchain; installs cargo-fuzz from crates.io when it is missing.
fn run_fuzz() -> (Outcome, Option<Counts>) {
    let ok = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&["+nightly", "--version"]) {
        return (
            Outcome::Failed("no nightly toolchain (rustup toolchain install nightly)".into()),
            None,
        );
    }
    if !ok(&["+nightly", "fuzz", "--version"]) {
        eprintln!("xtask test: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        if !ok(&["install", "cargo-fuzz", "--locked"]) {
            return (
                Outcome::Failed("cargo install cargo-fuzz failed".into()),
                None,
            );
        }
    }
    if std::env::var_os("ROCFORGE_FUZZ_TARGET_DIR").is_none() {
        std::env::set_var("ROCFORGE_FUZZ_TARGET_DIR", target_dir().join("fuzz"));
    }
    match crate::fuzz::run(&["--seconds".to_string(), "15".to_string()]) {
        Ok(()) => (Outcome::Ran, None),
        Err(e) => (Outcome::Failed(format!("{e:#}")), None),
    }
}

fn run_hip_check(bin: &Option<PathBuf>) -> (Outcome, Option<Counts>) {
    if !hipcc_installed() {
        return (Outcome::Failed("hipcc not found (apt-get install hipcc libamdhip64-dev rocm-device-libs, or set HIPCC)".into()), None);
    }
    let Some(bin) = bin else {
        return (
            Outcome::Failed("the build made no hip_check example".into()),
            None,
        );
    };
    let out = target_dir().join("hip-check");
    eprintln!("xtask: {} {}", bin.display(), out.display());
    let mut cmd = Command::new(bin);
    quiet_mesa(cmd.arg(&out));
    let mut child = match cmd.stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                Outcome::Failed(format!("cannot run {}: {e}", bin.display())),
                None,
            )
        }
    };
    let mut counts = None;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        // `hip-check: N/M kernels compiled`
        if let Some((n, m)) = line
            .strip_prefix("hip-check: ")
            .and_then(|r| r.strip_suffix(" kernels compiled"))
            .and_then(|r| r.split_once('/'))
        {
            if let (Ok(n), Ok(m)) = (n.parse::<usize>(), m.parse::<usize>()) {
                counts = Some(Counts {
                    passed: n,
                    failed: m.saturating_sub(n),
                    ignored: 0,
                });
            }
        }
    }
    match child.wait() {
        Ok(s) if s.success() && counts.is_some() => (Outcome::Ran, counts),
        Ok(_) => (
            Outcome::Failed(
                "some kernels did not compile with hipcc (see FAILED lines above)".into(),
            ),
            counts,
        ),
        Err(e) => (Outcome::Failed(e.to_string()), counts),
    }
}

/// `cargo xtask hip-check`: builds the `hip_check` example (with the same profile, features and
/// hipconfig answer as `cargo xtask test`) and runs it.
pub fn hip_check() -> Result<()> {
    ensure_packages(true, true)?;
    let env = hip_env()?;
    cargo_with(
        &[
            "build",
            "--profile",
            PROFILE,
            "-p",
            "rocforge-kernels",
            "--features",
            FEATURES,
            "--example",
            "hip_check",
        ],
        &env,
    )?;
    let bin = target_dir()
        .join(PROFILE)
        .join("examples")
        .join("hip_check");
    match run_hip_check(&Some(bin)) {
        (Outcome::Ran, _) => Ok(()),
        (Outcome::Failed(why), _) => bail!("hip-check failed: {why}"),
        (Outcome::Skipped, _) => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_parse() {
        let c = parse_result("test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 1.02s").unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (12, 0, 3));
        let c = parse_result("test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.5s").unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (5, 2, 0));
        assert!(parse_result("test foo ... ok").is_none());
    }

    #[test]
    fn test_executables_map_to_listed_suites() {
        let root = workspace_root();
        assert_eq!(
            suite_of(&root.join("kernels"), "lib", "rocforge_kernels"),
            "kernels-unit"
        );
        assert_eq!(
            suite_of(&root.join("crates/rocforge-cli"), "bin", "rocforge"),
            "cli-unit"
        );
        assert_eq!(
            suite_of(&root.join("benches"), "lib", "rocforge_bench"),
            "bench-unit"
        );
        assert_eq!(
            suite_of(
                &root.join("crates/rocforge-runtime"),
                "test",
                "gpu_backends"
            ),
            "gpu-wgpu"
        );
        assert_eq!(
            suite_of(&root.join("crates/rocforge-runtime"), "test", "golden_cpu"),
            "golden-cpu"
        );
        for s in [
            "kernels-unit",
            "cli-unit",
            "bench-unit",
            "gpu-wgpu",
            "golden-cpu",
            "xtask-unit",
            "runtime-unit",
        ] {
            assert!(SUITES.iter().any(|(n, _, _)| *n == s), "{s} is not listed");
        }
    }

    #[test]
    fn every_integration_test_file_has_a_listed_suite_and_back() {
        let root = workspace_root();
        let mut found = vec![
            "fmt".to_string(),
            "doc".to_string(),
            "hip-check".to_string(),
            "fuzz".to_string(),
        ];
        for dir in [
            "kernels/tests",
            "crates/rocforge-runtime/tests",
            "crates/rocforge-cli/tests",
            "benches/tests",
        ] {
            for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(target) = name.strip_suffix(".rs").filter(|t| !NOT_SUITES.contains(t))
                else {
                    continue;
                };
                let suite = suite_of(&root.join(dir), "test", target);
                assert!(
                    SUITES.iter().any(|(n, _, _)| *n == suite),
                    "{dir}/{name}: suite `{suite}` missing from SUITES"
                );
                found.push(suite);
            }
        }
        for (name, _, _) in SUITES {
            assert!(
                name.ends_with("-unit") || found.iter().any(|f| f == name),
                "suite `{name}` has no test target"
            );
        }
    }
}
