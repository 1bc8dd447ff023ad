//! Which model a run uses and what it is: `--model` or `$ROCFORGE_TEST_MODEL`, else the
//! cached real SmolLM2, else a synthetic model written once; and its identity for reports
//! (sha256, architecture, parameters, quant format, synthetic or real).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rocforge_kernels::GgmlType;
use rocforge_runtime::synthetic::{self, LlamaShape, SyntheticSpec};
use rocforge_runtime::{info, Model};
use sha2::{Digest, Sha256};

use crate::error::{io_err, BenchError, Result};

/// The model of a result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub sha256: String,
    pub name: Option<String>,
    pub architecture: String,
    pub parameters: u64,
    /// Bytes of all tensors in the file.
    pub weights_bytes: u64,
    /// `Q4_1`, `Q4_K_M`, ...
    pub quant: String,
    /// Where `quant` came from: `general.file_type`, `file name` or `tensor types`.
    pub quant_source: String,
    pub tensor_types: BTreeMap<String, usize>,
    /// Random weights written by `gen-model` (`general.synthetic`): speed is real, text is not.
    pub synthetic: bool,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
}

impl ModelInfo {
    /// llama-bench's model column: `llama 135M Q4_1`, plus `(synthetic weights)`.
    pub fn label(&self) -> String {
        let params = self.parameters as f64;
        let size = if params >= 1e9 {
            format!("{:.1}B", params / 1e9)
        } else {
            format!("{:.0}M", params / 1e6)
        };
        let synthetic = if self.synthetic {
            " (synthetic weights)"
        } else {
            ""
        };
        format!("{} {size} {}{synthetic}", self.architecture, self.quant)
    }
}

/// Describes a loaded model.
pub fn describe(model: &Model) -> Result<ModelInfo> {
    let file = model.gguf();
    let quant = info::quant_summary(file);
    let c = &model.config;
    Ok(ModelInfo {
        path: file.path().display().to_string(),
        sha256: sha256_file(file.path())?,
        name: file
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        architecture: c.architecture.to_string(),
        parameters: model.n_params(),
        weights_bytes: model.weights_bytes(),
        quant: quant.format,
        quant_source: quant.source.to_string(),
        tensor_types: quant.tensor_types,
        synthetic: file
            .get("general.synthetic")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        n_layer: c.n_layer,
        n_embd: c.n_embd,
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        n_vocab: c.n_vocab,
    })
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Where the model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOrigin {
    /// `--model` or `$ROCFORGE_TEST_MODEL`.
    Given,
    /// The cached real SmolLM2.
    Cached,
    /// A synthetic SmolLM2-shaped model written by the suite.
    Synthetic,
}

/// Picks the model: `explicit`, else `$ROCFORGE_TEST_MODEL`, else the cached SmolLM2, else a
/// synthetic SmolLM2-135M Q4_1 written (once) into `synthetic_dir`.
pub fn resolve(explicit: Option<&Path>, synthetic_dir: &Path) -> Result<(PathBuf, ModelOrigin)> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ROCFORGE_TEST_MODEL").map(PathBuf::from));
    if let Some(p) = given {
        return if p.is_file() {
            Ok((p, ModelOrigin::Given))
        } else {
            Err(BenchError::MissingModel(p))
        };
    }
    if let Some(p) = rocforge_runtime::testing::real_model() {
        return Ok((p, ModelOrigin::Cached));
    }
    let path = synthetic_dir.join("synthetic-smollm2-135m-q4_1.gguf");
    if !path.is_file() {
        write_synthetic("smollm2-135m", GgmlType::Q4_1, 0x5EED, &path)?;
    }
    Ok((path, ModelOrigin::Synthetic))
}

/// Parses a `gen-model --quant` name.
pub fn parse_quant(name: &str) -> Result<GgmlType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlType::Q4_0,
        "q4_1" => GgmlType::Q4_1,
        "q8_0" => GgmlType::Q8_0,
        "q5_0" => GgmlType::Q5_0,
        "q5_1" => GgmlType::Q5_1,
        "q4_k" | "q4_k_m" => GgmlType::Q4K,
        "q5_k" | "q5_k_m" => GgmlType::Q5K,
        "q6_k" => GgmlType::Q6K,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::BF16,
        other => {
            return Err(BenchError::InvalidArgument(format!(
                "unknown quant `{other}` (choose q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16 or bf16)"
            )))
        }
    })
}

/// Writes a synthetic model of a preset shape (`smollm2-135m`, `tinyllama-1.1b`, `llama2-7b`,
/// `llama3-8b`, `gemma3-270m`) with deterministic random weights; the output matrix is Q6_K for `Q4_K`
/// and `Q5_K` (as in llama.cpp's Q4_K_M and Q5_K_M) and otherwise tied to the embeddings.
pub fn write_synthetic(shape: &str, quant: GgmlType, seed: u64, out: &Path) -> Result<()> {
    let names: Vec<&str> = LlamaShape::PRESETS.iter().map(|s| s.name).collect();
    let shape = LlamaShape::preset(shape).ok_or_else(|| {
        BenchError::InvalidArgument(format!(
            "unknown shape `{shape}` (choose {})",
            names.join(", ")
        ))
    })?;
    // Gemma ties its output to the embeddings at every size.
    let output = (matches!(quant, GgmlType::Q4K | GgmlType::Q5K)
        && shape.arch == rocforge_runtime::model::Architecture::Llama)
        .then_some(GgmlType::Q6K);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // Write beside the target and rename, so an interrupted run leaves no half file behind.
    let tmp = out.with_extension("gguf.partial");
    synthetic::writer(&SyntheticSpec {
        shape,
        quant,
        output,
        seed,
    })
    .write_file(&tmp)
    .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io_err(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gen_model_quant_parses_and_unknown_names_are_refused() {
        for (name, ty) in [
            ("q4_0", GgmlType::Q4_0),
            ("Q4_1", GgmlType::Q4_1),
            ("q5_0", GgmlType::Q5_0),
            ("q5_1", GgmlType::Q5_1),
            ("q8_0", GgmlType::Q8_0),
            ("q4_k_m", GgmlType::Q4K),
            ("q5_k", GgmlType::Q5K),
            ("q6_k", GgmlType::Q6K),
            ("f16", GgmlType::F16),
            ("bf16", GgmlType::BF16),
        ] {
            assert_eq!(parse_quant(name).unwrap(), ty, "{name}");
        }
        let err = parse_quant("q3_k").unwrap_err().to_string();
        assert!(
            err.contains("unknown quant `q3_k`") && err.contains("q5_k"),
            "{err}"
        );
    }
}
