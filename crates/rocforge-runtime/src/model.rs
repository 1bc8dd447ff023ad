//! A loaded model: hyperparameters from GGUF metadata, weights as views into the mapped
//! file (kept in their quantized layout), and the tokenizer.
//!
//! Everything is validated here, once: architecture, hyperparameters, every expected tensor's
//! presence, type and shape. Backends can then trust the shapes.

use std::path::Path;
use std::sync::Arc;

use rocforge_kernels::GgmlType;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::tokenizer::{Tokenizer, TokenizerSpec};

/// Architectures whose forward pass ROCforge implements (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &str = "llama, gemma3";

/// A supported `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama and its family (SmolLM2, TinyLlama, Mistral, Llama 2/3).
    Llama,
    /// Gemma 3 (text): sandwich norms, q/k norms, GeGLU, interleaved sliding-window layers.
    Gemma3,
}

impl Architecture {
    /// The GGUF name, which is also the metadata key prefix.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }

    fn from_gguf(name: &str) -> Option<Self> {
        [Self::Llama, Self::Gemma3]
            .into_iter()
            .find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How RoPE pairs a head's dims (llama.cpp's rope types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: `llama` GGUFs (the converter permutes q/k for it).
    Normal,
    /// Pairs half a rotation apart, `(x[i], x[i + rope_dim/2])`: Gemma.
    Neox,
}

/// Hyperparameters of a model, from `{arch}.*` metadata keys.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// `{arch}.block_count`
    pub n_layer: usize,
    /// `{arch}.embedding_length`
    pub n_embd: usize,
    /// `{arch}.attention.head_count`
    pub n_head: usize,
    /// `{arch}.attention.head_count_kv` (defaults to n_head)
    pub n_head_kv: usize,
    /// `{arch}.attention.key_length` (defaults to n_embd / n_head)
    pub head_dim: usize,
    /// `{arch}.feed_forward_length`
    pub n_ff: usize,
    /// `{arch}.vocab_size`, else the token list's length, else `token_embd`'s rows.
    pub n_vocab: usize,
    /// `{arch}.context_length`
    pub n_ctx_train: usize,
    /// `{arch}.rope.dimension_count` (defaults to head_dim)
    pub rope_dim: usize,
    /// `{arch}.rope.freq_base` (defaults to 10000)
    pub rope_base: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`
    pub rms_eps: f32,
    /// Pairing of the rotated dims: Normal for Llama, Neox for Gemma.
    pub rope_style: RopeStyle,
    /// Position scale of the global RoPE table: `1 / {arch}.rope.scaling.factor` when
    /// `rope.scaling.type` is `linear`, else 1.
    pub rope_freq_scale: f32,
    /// RoPE base of the sliding-window layers. Not in the metadata: llama.cpp fixes it at
    /// 10000 for Gemma 3 (unscaled). Equal to `rope_base` where every layer is global.
    pub rope_base_local: f32,
    /// `{arch}.attention.sliding_window`: keys a local layer's query sees (itself included).
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global, the others local (Gemma 3: 6, as llama.cpp's
    /// `set_swa_pattern(6)`); 0 when there is no sliding window.
    pub swa_pattern: usize,
    /// The embeddings are multiplied by this after the lookup (Gemma: sqrt(n_embd)).
    pub embd_scale: f32,
}

impl ModelConfig {
    /// Query heads sharing one KV head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
    /// Width of the K and V projections.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Width of the Q projection.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Whether `layer` attends through the sliding window with the local RoPE base.
    pub fn is_local_layer(&self, layer: usize) -> bool {
        self.sliding_window.is_some()
            && self.swa_pattern > 0
            && layer % self.swa_pattern < self.swa_pattern - 1
    }
    /// The attention window of `layer` in keys (`None`: full causal).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_local_layer(layer))
    }
}

/// A weight tensor: its GGUF description; its bytes live in the mapped file.
#[derive(Debug, Clone)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    /// Rows (output features) for a matrix, 1 for a vector.
    pub rows: usize,
    /// Row length (input features).
    pub cols: usize,
    info: TensorInfo,
}

/// One transformer block's weights, GGUF names, shapes as (rows, cols) = (out, in).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>, // (n_embd)
    pub attn_q: Weight,      // (n_head*head_dim, n_embd)
    pub attn_k: Weight,      // (n_head_kv*head_dim, n_embd)
    pub attn_v: Weight,      // (n_head_kv*head_dim, n_embd)
    pub attn_output: Weight, // (n_embd, n_head*head_dim)
    pub ffn_norm: Vec<f32>,  // (n_embd)
    pub ffn_gate: Weight,    // (n_ff, n_embd)
    pub ffn_up: Weight,      // (n_ff, n_embd)
    pub ffn_down: Weight,    // (n_embd, n_ff)
    // Gemma 3 only (required there, absent for Llama):
    pub attn_q_norm: Option<Vec<f32>>, // (head_dim), shared by every head
    pub attn_k_norm: Option<Vec<f32>>, // (head_dim)
    pub post_attention_norm: Option<Vec<f32>>, // (n_embd)
    pub post_ffw_norm: Option<Vec<f32>>, // (n_embd)
}

impl LayerWeights {
    /// The layer's seven projection matrices, in GGUF order of use.
    pub fn matrices(&self) -> [&Weight; 7] {
        [
            &self.attn_q,
            &self.attn_k,
            &self.attn_v,
            &self.attn_output,
            &self.ffn_gate,
            &self.ffn_up,
            &self.ffn_down,
        ]
    }
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    pub token_embd: Weight,        // (n_vocab, n_embd)
    pub layers: Vec<LayerWeights>, // n_layer
    pub output_norm: Vec<f32>,     // (n_embd)
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    pub output: Weight, // (n_vocab, n_embd)
    pub tied_output: bool,
    /// Llama-3.1-style RoPE frequency factors (`rope_freqs.weight`), (rope_dim/2).
    pub rope_freqs: Option<Vec<f32>>,
}

/// How [`Model::load_with`] reads the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Map the file (the default; weights are paged in on use) instead of copying it into memory.
    pub mmap: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { mmap: true }
    }
}

/// A model ready to run: the mapped file, its configuration, weights and tokenizer.
pub struct Model {
    file: GgufFile,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.file.path())
            .field("config", &self.config)
            .finish()
    }
}

impl Model {
    /// Opens, validates and maps a GGUF model.
    ///
    /// ```no_run
    /// let model = rocforge_runtime::Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// println!("{} layers, vocab {}", model.config.n_layer, model.config.n_vocab);
    /// # Ok::<(), rocforge_runtime::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Model>> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// [`Model::load`] with options: `mmap: false` reads the file into memory, so replacing
    /// or truncating it while the model is in use cannot raise SIGBUS.
    pub fn load_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Arc<Model>> {
        let file = if opts.mmap {
            GgufFile::open(path.as_ref())?
        } else {
            GgufFile::read(path.as_ref())?
        };
        Self::from_gguf(file).map(Arc::new)
    }

    /// Builds a model from an already opened GGUF file.
    pub fn from_gguf(file: GgufFile) -> Result<Model> {
        let config = read_config(&file)?;
        let weights = read_weights(&file, &config)?;
        // The tokenizer keeps several tables per token: check the list's length before building it.
        let n_tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len());
        if n_tokens > 0 && n_tokens != config.n_vocab {
            return Err(vocab_mismatch(&file, n_tokens, config.n_vocab));
        }
        let spec = TokenizerSpec::from_gguf(&file);
        let tokenizer = Tokenizer::from_spec(&spec).map_err(|source| Error::Tokenizer {
            path: file.path().to_path_buf(),
            source,
        })?;
        if tokenizer.vocab_size() != config.n_vocab {
            return Err(vocab_mismatch(
                &file,
                tokenizer.vocab_size(),
                config.n_vocab,
            ));
        }
        Ok(Model {
            file,
            config,
            weights,
            tokenizer,
        })
    }

    /// The GGUF file the model was loaded from.
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// The bytes of a weight, in its GGUF layout.
    pub fn bytes(&self, w: &Weight) -> &[u8] {
        self.file.tensor_data(&w.info)
    }

    /// Bytes of all weights in the file.
    pub fn weights_bytes(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.size).sum()
    }

    /// Number of parameters (elements of all tensors).
    pub fn n_params(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.n_elements()).sum()
    }
}

fn vocab_mismatch(file: &GgufFile, tokens: usize, n_vocab: usize) -> Error {
    meta_err(
        file,
        "tokenizer.ggml.tokens",
        format!("{tokens} tokens, but the model's vocabulary has {n_vocab} rows"),
    )
}

fn meta_err(file: &GgufFile, key: &str, problem: impl Into<String>) -> Error {
    Error::Metadata {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// Upper bound for any single dimension read from metadata: far above real models, far
/// below anything that could make an allocation absurd.
const MAX_DIM: u64 = 1 << 20;

fn read_config(file: &GgufFile) -> Result<ModelConfig> {
    let arch_key = "general.architecture";
    let arch_name = file
        .get(arch_key)
        .ok_or_else(|| meta_err(file, arch_key, "missing"))?
        .as_str()
        .ok_or_else(|| meta_err(file, arch_key, "is not a string"))?;
    let Some(architecture) = Architecture::from_gguf(arch_name) else {
        return Err(Error::UnsupportedArchitecture {
            path: file.path().to_path_buf(),
            arch: arch_name.to_string(),
            supported: SUPPORTED_ARCHITECTURES,
        });
    };
    let arch = architecture.as_str();
    let int = |suffix: &str, default: Option<u64>| -> Result<usize> {
        let key = format!("{arch}.{suffix}");
        let v = match file.get(&key) {
            Some(v) => v.as_u64().ok_or_else(|| {
                meta_err(
                    file,
                    &key,
                    format!("expected an integer, found {}", v.summary()),
                )
            })?,
            None => default.ok_or_else(|| meta_err(file, &key, "missing"))?,
        };
        if v == 0 || v > MAX_DIM {
            return Err(meta_err(
                file,
                &key,
                format!("{v} is out of range (1 to {MAX_DIM})"),
            ));
        }
        Ok(v as usize)
    };
    let float = |suffix: &str, default: Option<f64>| -> Result<f32> {
        let key = format!("{arch}.{suffix}");
        let v = match file.get(&key) {
            Some(v) => v.as_f64().ok_or_else(|| {
                meta_err(
                    file,
                    &key,
                    format!("expected a number, found {}", v.summary()),
                )
            })?,
            None => default.ok_or_else(|| meta_err(file, &key, "missing"))?,
        };
        if !v.is_finite() || v <= 0.0 {
            return Err(meta_err(
                file,
                &key,
                format!("{v} must be finite and positive"),
            ));
        }
        Ok(v as f32)
    };

    let n_layer = int("block_count", None)?;
    let n_embd = int("embedding_length", None)?;
    let n_head = int("attention.head_count", None)?;
    let n_head_kv = int("attention.head_count_kv", Some(n_head as u64))?;
    let head_dim = int(
        "attention.key_length",
        Some((n_embd / n_head).max(1) as u64),
    )?;
    let n_ff = int("feed_forward_length", None)?;
    let n_ctx_train = int("context_length", Some(2048))?;
    let rope_dim = int("rope.dimension_count", Some(head_dim as u64))?;
    let rope_base = float("rope.freq_base", Some(10000.0))?;
    let rms_eps = float("attention.layer_norm_rms_epsilon", Some(1e-5))?;
    let n_vocab = match file.get(&format!("{arch}.vocab_size")) {
        Some(_) => int("vocab_size", None)?,
        None => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            // Capped like every dimension before the tokenizer builds its tables from the list.
            Some(a) if a.len() as u64 > MAX_DIM => {
                return Err(meta_err(
                    file,
                    "tokenizer.ggml.tokens",
                    format!("{} tokens, more than {MAX_DIM}", a.len()),
                ))
            }
            Some(a) if !a.is_empty() => a.len(),
            _ => file
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| {
                    meta_err(
                        file,
                        &format!("{arch}.vocab_size"),
                        "missing, and no token list",
                    )
                })? as usize,
        },
    };

    let key = |s: &str| format!("{arch}.{s}");
    if let Some(v) = file.get(&key("attention.value_length")) {
        if v.as_u64() != Some(head_dim as u64) {
            return Err(meta_err(
                file,
                &key("attention.value_length"),
                format!("{} differs from the key length {head_dim}", v.summary()),
            ));
        }
    }
    let rope_freq_scale = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => 1.0,
        Some("linear") => 1.0 / float("rope.scaling.factor", Some(1.0))?,
        // Llama files were always run unscaled by other types (Llama 3.1 scales through
        // `rope_freqs`); a Gemma file with one would run wrong, so it is refused.
        Some(other) if architecture == Architecture::Gemma3 => {
            return Err(meta_err(
                file,
                &key("rope.scaling.type"),
                format!("`{other}` is not supported (none, linear)"),
            ))
        }
        Some(_) => 1.0,
    };
    let (rope_style, rope_base_local, sliding_window, swa_pattern, embd_scale) = match architecture
    {
        Architecture::Llama => (RopeStyle::Normal, rope_base, None, 0, 1.0),
        Architecture::Gemma3 => {
            let window = int("attention.sliding_window", None)?;
            (
                RopeStyle::Neox,
                10000.0,
                Some(window),
                6,
                (n_embd as f32).sqrt(),
            )
        }
    };
    if n_head % n_head_kv != 0 {
        return Err(meta_err(
            file,
            &key("attention.head_count_kv"),
            format!("{n_head} heads are not a multiple of {n_head_kv} KV heads"),
        ));
    }
    if head_dim % 2 != 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
        return Err(meta_err(
            file,
            &key("rope.dimension_count"),
            format!(
                "rope dim {rope_dim} must be even and at most the head dim {head_dim} (also even)"
            ),
        ));
    }
    Ok(ModelConfig {
        architecture,
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        head_dim,
        n_ff,
        n_vocab,
        n_ctx_train,
        rope_dim,
        rope_base,
        rms_eps,
        rope_style,
        rope_freq_scale,
        rope_base_local,
        sliding_window,
        swa_pattern,
        embd_scale,
    })
}

fn read_weights(file: &GgufFile, c: &ModelConfig) -> Result<Weights> {
    let tensor_err = |name: &str, problem: String| Error::Tensor {
        path: file.path().to_path_buf(),
        name: name.to_string(),
        problem,
    };
    // A matrix (rows, cols) is stored with dims [cols, rows].
    let matrix = |name: &str, rows: usize, cols: usize| -> Result<Weight> {
        let info = file
            .tensor(name)
            .ok_or_else(|| tensor_err(name, "missing from the file".into()))?;
        let want = [cols as u64, rows as u64];
        let dims_ok = info.dims.len() >= 2
            && info.dims[..2] == want
            && info.dims[2..].iter().all(|&d| d == 1);
        if !dims_ok {
            return Err(tensor_err(
                name,
                format!("shape {:?}, expected {:?}", info.dims, want),
            ));
        }
        if !info.ty.is_supported_weight() {
            return Err(tensor_err(
                name,
                format!("type {} is not supported for weights", info.ty),
            ));
        }
        Ok(Weight {
            name: name.to_string(),
            ty: info.ty,
            rows,
            cols,
            info: info.clone(),
        })
    };
    let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
        let info = file
            .tensor(name)
            .ok_or_else(|| tensor_err(name, "missing from the file".into()))?;
        if info.n_elements() != len as u64 || info.dims[0] != len as u64 {
            return Err(tensor_err(
                name,
                format!("shape {:?}, expected [{len}]", info.dims),
            ));
        }
        if !matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(tensor_err(
                name,
                format!(
                    "type {} (norm and factor vectors must be f32, f16 or bf16)",
                    info.ty
                ),
            ));
        }
        let mut out = vec![0.0f32; len];
        rocforge_kernels::quant::dequantize_row(info.ty, file.tensor_data(info), &mut out)
            .map_err(|e| tensor_err(name, e.to_string()))?;
        Ok(out)
    };

    let (d, q, kv, ff, v) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.n_vocab);
    let gemma = c.architecture == Architecture::Gemma3;
    // Gemma's extra norms: required for Gemma 3, not read for Llama.
    let gemma_norm = |name: &str, len: usize| -> Result<Option<Vec<f32>>> {
        if gemma {
            vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    };
    let token_embd = matrix("token_embd.weight", v, d)?;
    let layers = (0..c.n_layer)
        .map(|i| {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            Ok(LayerWeights {
                attn_norm: vector(&n("attn_norm"), d)?,
                attn_q: matrix(&n("attn_q"), q, d)?,
                attn_k: matrix(&n("attn_k"), kv, d)?,
                attn_v: matrix(&n("attn_v"), kv, d)?,
                attn_output: matrix(&n("attn_output"), d, q)?,
                ffn_norm: vector(&n("ffn_norm"), d)?,
                ffn_gate: matrix(&n("ffn_gate"), ff, d)?,
                ffn_up: matrix(&n("ffn_up"), ff, d)?,
                ffn_down: matrix(&n("ffn_down"), d, ff)?,
                attn_q_norm: gemma_norm(&n("attn_q_norm"), c.head_dim)?,
                attn_k_norm: gemma_norm(&n("attn_k_norm"), c.head_dim)?,
                post_attention_norm: gemma_norm(&n("post_attention_norm"), d)?,
                post_ffw_norm: gemma_norm(&n("post_ffw_norm"), d)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let output_norm = vector("output_norm.weight", d)?;
    let (output, tied_output) = match file.tensor("output.weight") {
        Some(_) => (matrix("output.weight", v, d)?, false),
        None => (token_embd.clone(), true),
    };
    let rope_freqs = match file.tensor("rope_freqs.weight") {
        Some(_) => Some(vector("rope_freqs.weight", c.rope_dim / 2)?),
        None => None,
    };
    Ok(Weights {
        token_embd,
        layers,
        output_norm,
        output,
        tied_output,
        rope_freqs,
    })
}
