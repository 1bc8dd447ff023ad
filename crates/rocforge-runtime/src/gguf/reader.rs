//! A bounds-checked GGUF reader (versions 2 and 3).
//!
//! Every count and length read from the file is checked against the bytes that remain
//! *before* anything is allocated from it, so a hostile or truncated file yields a
//! [`GgufError`] and never a panic, an abort or an allocation larger than the file justifies.
//! Tensor data is not copied: [`GgufFile`] keeps the file memory-mapped and hands out slices
//! ([`GgufFile::open`]), or owns a copy of the bytes ([`GgufFile::read`], [`GgufFile::from_bytes`]),
//! which a file replaced or truncated while in use cannot turn into SIGBUS.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rocforge_kernels::GgmlType;

use super::value::{MetaArray, MetaValue, ValueType};

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// At most this many dimensions per tensor (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Nesting limit for arrays of arrays (real files use none).
const MAX_ARRAY_DEPTH: u32 = 4;

/// What is wrong with a GGUF file. Always carries the file's path.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (the first bytes are {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (ROCforge reads versions 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated file: {what} needs {needed} bytes at offset {offset}, but the file has {file_len} bytes")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{path}: {what} is {count}, more than a file of {file_len} bytes can hold (truncated or corrupt)")]
    AbsurdCount {
        path: PathBuf,
        what: String,
        count: u64,
        file_len: u64,
    },
    #[error("{path}: metadata: {problem}")]
    Metadata { path: PathBuf, problem: String },
    #[error("{path}: tensor `{name}`: {problem}")]
    Tensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
}

/// One tensor's description from the GGUF header, already validated against the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Where the file's bytes live.
enum Storage {
    Mapped(Mmap),
    /// 64-byte aligned chunks, so tensor data keeps the alignment a page-aligned map gives it
    /// for every `general.alignment` up to 64.
    Owned {
        chunks: Vec<Align64>,
        len: usize,
    },
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl Storage {
    fn owned(bytes: &[u8]) -> Self {
        let mut chunks = vec![Align64([0; 64]); bytes.len().div_ceil(64)];
        for (c, b) in chunks.iter_mut().zip(bytes.chunks(64)) {
            c.0[..b.len()].copy_from_slice(b);
        }
        Storage::Owned {
            chunks,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned { chunks, len } => {
                // SAFETY: `Align64` is 64 plain bytes without padding, so the chunks are
                // `chunks.len() * 64 >= len` initialized bytes.
                unsafe { std::slice::from_raw_parts(chunks.as_ptr().cast::<u8>(), *len) }
            }
        }
    }
}

/// An open, validated GGUF file: metadata parsed, tensor data memory-mapped or in memory.
pub struct GgufFile {
    path: PathBuf,
    data: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. Reads only the header eagerly; tensor data stays mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 4 {
            return Err(GgufError::Truncated {
                path,
                what: "the magic number".into(),
                offset: 0,
                needed: 4,
                file_len: len,
            });
        }
        // SAFETY: the map is read-only. A file truncated underneath us while open raises
        // SIGBUS on the next read of the lost pages; `GgufFile::read` avoids that
        // (docs/architecture.md, "Inputs we distrust").
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Storage::Mapped(mmap))
    }

    /// Like [`GgufFile::open`], but reads the whole file into memory instead of mapping it.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| GgufError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Validates a GGUF file given as bytes (copied); `path` only names it in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: &[u8]) -> Result<Self, GgufError> {
        Self::parse(path.into(), Storage::owned(bytes))
    }

    /// Whether the tensor data is a memory map of the file (else a copy in memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Storage::Mapped(_))
    }

    fn parse(path: PathBuf, data: Storage) -> Result<Self, GgufError> {
        let buf = data.bytes();
        if buf.len() < 4 {
            return Err(GgufError::Truncated {
                path,
                what: "the magic number".into(),
                offset: 0,
                needed: 4,
                file_len: buf.len() as u64,
            });
        }
        let mut r = Reader {
            buf,
            pos: 0,
            path: &path,
        };
        let magic = r.bytes(4, "the magic number")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = r.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // Smallest possible records: a KV is key length (8) + 1 key byte + type (4) + 1 value byte;
        // a tensor info is name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
        r.check_count(n_kv, 14, "the metadata count")?;
        r.check_count(n_tensors, 32, "the tensor count")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut metadata_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("the type of metadata `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(r.meta_err(format!("key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index
            .get("general.alignment")
            .map(|&i| &metadata[i].1)
        {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(r.meta_err(format!(
                    "`general.alignment` must be a power-of-two u32, found {v:?}"
                )))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor #{i}"))?;
            let terr = |problem: String| GgufError::Tensor {
                path: path.clone(),
                name: name.clone(),
                problem,
            };
            let n_dims = r.u32(&format!("the rank of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(terr(format!("rank {n_dims} (must be 1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the shape of tensor `{name}`"))?);
            }
            let type_id = r.u32(&format!("the type of tensor `{name}`"))?;
            let offset = r.u64(&format!("the offset of tensor `{name}`"))?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| terr(format!("unknown tensor type id {type_id}")))?;
            if dims.contains(&0) {
                return Err(terr(format!("shape {dims:?} has a zero dimension")));
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| terr(format!("shape {dims:?} overflows")))?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(terr(format!(
                    "row length {} is not a multiple of the {} block size {}",
                    dims[0],
                    ty,
                    ty.block_size()
                )));
            }
            let size = ty
                .row_bytes(n_elements)
                .ok_or_else(|| terr(format!("shape {dims:?} overflows")))?;
            if offset % alignment != 0 {
                return Err(terr(format!(
                    "data offset {offset} is not aligned to {alignment} bytes"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(terr("appears twice in the tensor table".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }

        let data_offset = align_up(r.pos as u64, alignment);
        let file_len = buf.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.clone(),
                        what: format!("the data of tensor `{}` ({} {:?})", t.name, t.ty, t.dims),
                        offset: data_offset.saturating_add(t.offset),
                        needed: t.size,
                        file_len,
                    })
                }
            }
        }

        // llama.cpp's rule (gguf_init_from_file_impl): tensors lie in table order, each at the
        // running size of those before it padded to the alignment. So no two overlap and the
        // data section holds nothing else (a small file cannot name many large tensors).
        let mut expected = 0u64;
        for t in &tensors {
            if t.offset != expected {
                return Err(GgufError::Tensor {
                    path: path.clone(),
                    name: t.name.clone(),
                    problem: format!(
                        "data offset {} overlaps or leaves a gap: tensors must be stored in table order, this one at offset {expected}",
                        t.offset
                    ),
                });
            }
            expected = t
                .size
                .checked_next_multiple_of(alignment)
                .and_then(|padded| expected.checked_add(padded))
                .ok_or_else(|| GgufError::Tensor {
                    path: path.clone(),
                    name: t.name.clone(),
                    problem: "the data section size overflows".into(),
                })?;
        }

        Ok(GgufFile {
            path,
            data,
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.data.bytes().len() as u64
    }
    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }
    /// One metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// One tensor's description by GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The bytes of a tensor, in its GGUF layout (bounds were checked at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.data.bytes()[start..start + info.size as usize]
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A cursor over the mapped header that turns every short read into [`GgufError::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self
            .bytes(N as u64, what)?
            .try_into()
            .expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count whose smallest encoding (`min_bytes` each) would not fit in the rest of the file.
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count.saturating_mul(min_bytes) > self.remaining() {
            return Err(GgufError::AbsurdCount {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                count,
                file_len: self.buf.len() as u64,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::AbsurdCount {
                path: self.path.to_path_buf(),
                what: format!("the length of {what}"),
                count: len,
                file_len: self.buf.len() as u64,
            });
        }
        let bytes = self.bytes(len, what)?;
        // Tokenizer vocabularies can hold invalid UTF-8 pieces; keep them losslessly readable.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn meta_err(&self, problem: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.to_path_buf(),
            problem,
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        let ty = ValueType::from_id(ty)
            .ok_or_else(|| self.meta_err(format!("`{key}` has unknown value type {ty}")))?;
        let w = format!("the value of `{key}`");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.array::<1>(&w)?[0]),
            ValueType::I8 => MetaValue::I8(self.array::<1>(&w)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&w)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&w)?)),
            ValueType::U32 => MetaValue::U32(self.u32(&w)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&w)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&w)?)),
            ValueType::Bool => match self.array::<1>(&w)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.meta_err(format!("`{key}` is a bool with byte {b}"))),
            },
            ValueType::String => MetaValue::String(self.string(&w)?),
            ValueType::U64 => MetaValue::U64(self.u64(&w)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&w)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&w)?)),
            ValueType::Array => MetaValue::Array(self.array_value(key, depth)?),
        })
    }

    fn array_value(&mut self, key: &str, depth: u32) -> Result<MetaArray, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.meta_err(format!(
                "`{key}` nests arrays deeper than {MAX_ARRAY_DEPTH}"
            )));
        }
        let elem_id = self.u32(&format!("the element type of `{key}`"))?;
        let elem = ValueType::from_id(elem_id).ok_or_else(|| {
            self.meta_err(format!("`{key}` is an array of unknown type {elem_id}"))
        })?;
        let count = self.u64(&format!("the length of `{key}`"))?;
        self.check_count(
            count,
            elem.min_encoded_size(),
            &format!("the length of array `{key}`"),
        )?;
        let n = count as usize;
        let w = format!("the elements of `{key}`");
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let raw = self.bytes(count * std::mem::size_of::<$t>() as u64, &w)?;
                MetaArray::$variant(
                    raw.chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            ValueType::U8 => MetaArray::U8(self.bytes(count, &w)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let raw = self.bytes(count, &w)?;
                if let Some(b) = raw.iter().find(|&&b| b > 1) {
                    return Err(self.meta_err(format!("`{key}` holds a bool with byte {b}")));
                }
                MetaArray::Bool(raw.iter().map(|&b| b == 1).collect())
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&format!("element {i} of `{key}`"))?);
                }
                MetaArray::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                MetaArray::Array(v)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_model;

    fn tiny() -> Vec<u8> {
        tiny_model(GgmlType::Q8_0, 1).to_bytes()
    }

    /// Offset field of tensor `name` (rank 2) in the header.
    fn offset_at(bytes: &[u8], name: &[u8]) -> usize {
        bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16 + 4
    }

    #[test]
    fn bytes_and_file_read_the_same() {
        let bytes = tiny();
        let dir = std::env::temp_dir().join(format!("rocforge-reader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let (mapped, read) = (GgufFile::open(&p).unwrap(), GgufFile::read(&p).unwrap());
        let owned = GgufFile::from_bytes("mem", &bytes).unwrap();
        assert!(mapped.is_mapped() && !read.is_mapped() && !owned.is_mapped());
        for f in [&read, &owned] {
            assert_eq!(f.tensors().len(), mapped.tensors().len());
            for (a, b) in f.tensors().iter().zip(mapped.tensors()) {
                assert_eq!(f.tensor_data(a), mapped.tensor_data(b));
                // In-memory data keeps the alignment the map gives.
                assert_eq!(f.tensor_data(a).as_ptr() as usize % 32, 0, "{}", a.name);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tensors_must_follow_each_other_like_llama_cpp() {
        let good = tiny();
        let first = GgufFile::from_bytes("t", &good).unwrap();
        let k = first.tensor("blk.0.attn_k.weight").unwrap().offset;
        // Pointing at another tensor's bytes (overlap) and leaving a gap are both refused.
        for bad in [0, k + 32, k - 32] {
            let mut v = good.clone();
            let at = offset_at(&v, b"blk.0.attn_k.weight");
            v[at..at + 8].copy_from_slice(&bad.to_le_bytes());
            let err = GgufFile::from_bytes("t", &v).unwrap_err().to_string();
            assert!(
                err.contains("blk.0.attn_k.weight") && err.contains("overlaps or leaves a gap"),
                "{bad}: {err}"
            );
        }
    }
}
