//! What a GGUF file holds, in words: the quant format (`general.file_type` and a histogram of
//! tensor types, falling back to the file name) and a tensor table. Used by
//! `rocforge inspect` and by the benchmark reports.

use std::collections::BTreeMap;

use crate::gguf::GgufFile;

/// llama.cpp's `llama_ftype` names, by `general.file_type` value.
pub fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// The quant format of a model file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QuantSummary {
    /// Format name (`Q4_1`, `Q4_K_M`, ...), or `unknown`.
    pub format: String,
    /// Where `format` came from: `general.file_type`, `tensor types` or `file name`.
    pub source: &'static str,
    /// `general.file_type` if present.
    pub file_type: Option<u64>,
    /// Number of tensors of each type (`q4_1` → 210, ...).
    pub tensor_types: BTreeMap<String, usize>,
}

/// Summarises the quant format of `file`.
pub fn quant_summary(file: &GgufFile) -> QuantSummary {
    let mut tensor_types = BTreeMap::new();
    for t in file.tensors() {
        *tensor_types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    let file_type = file.get("general.file_type").and_then(|v| v.as_u64());
    let (format, source) = if let Some(name) = file_type.and_then(file_type_name) {
        (name.to_string(), "general.file_type")
    } else if let Some(name) = format_from_file_name(file.path()) {
        (name, "file name")
    } else if let Some((ty, _)) = file
        .tensors()
        .iter()
        .filter(|t| t.dims.len() >= 2)
        .fold(BTreeMap::<String, u64>::new(), |mut m, t| {
            *m.entry(t.ty.name().to_uppercase()).or_insert(0) += t.size;
            m
        })
        .into_iter()
        .max_by_key(|(_, bytes)| *bytes)
    {
        (ty, "tensor types")
    } else {
        ("unknown".to_string(), "tensor types")
    };
    QuantSummary {
        format,
        source,
        file_type,
        tensor_types,
    }
}

/// `model-q4_k_m.gguf` → `Q4_K_M`.
pub fn format_from_file_name(path: &std::path::Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?.to_ascii_uppercase();
    const NAMES: [&str; 16] = [
        "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "Q6_K",
        "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16",
    ];
    NAMES
        .iter()
        .find(|n| stem.ends_with(*n) || stem.contains(&format!("{n}.")))
        .map(|n| n.to_string())
        .or_else(|| stem.ends_with("F32").then(|| "F32".to_string()))
}

/// One row of the tensor table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorRow {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub shape: Vec<u64>,
    pub bytes: u64,
}

/// The tensor table of `file`, in file order.
pub fn tensor_table(file: &GgufFile) -> Vec<TensorRow> {
    file.tensors()
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            ty: t.ty.name().to_string(),
            shape: t.dims.clone(),
            bytes: t.size,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn names_from_file_names() {
        assert_eq!(
            format_from_file_name(Path::new("/m/gemma-3-270m-q4_k_m.gguf")).as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(
            format_from_file_name(Path::new("SmolLM2-135M-Instruct.Q4_1.gguf")).as_deref(),
            Some("Q4_1")
        );
        assert_eq!(format_from_file_name(Path::new("model.gguf")), None);
    }
}
