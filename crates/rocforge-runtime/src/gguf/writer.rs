//! A GGUF (version 3) writer: tiny test models, the benchmark's synthetic models, and the
//! corpus of deliberately broken files. Tensor data can be given as bytes or produced on
//! demand while writing, so multi-GiB synthetic models never sit in memory whole.

use std::io::{self, Write};

use rocforge_kernels::GgmlType;

use super::reader::DEFAULT_ALIGNMENT;
use super::value::{MetaArray, MetaValue};

/// Produces a tensor's bytes into the buffer it is given (exactly the tensor's size).
pub type FillFn = Box<dyn Fn(&mut [u8]) + Send + Sync>;

enum Data {
    Bytes(Vec<u8>),
    Fill(FillFn),
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data,
}

/// Builds a GGUF file in memory order: metadata, tensor table, aligned data.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }
    pub fn meta_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.meta(key, MetaValue::U32(v))
    }
    pub fn meta_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.meta(key, MetaValue::F32(v))
    }
    pub fn meta_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.meta(key, MetaValue::String(v.to_string()))
    }
    pub fn meta_bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.meta(key, MetaValue::Bool(v))
    }
    pub fn meta_strings(&mut self, key: &str, v: Vec<String>) -> &mut Self {
        self.meta(key, MetaValue::Array(MetaArray::String(v)))
    }

    /// Adds a tensor from its bytes (in the GGUF layout of `ty`). `dims[0]` is the row length.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data: Data::Bytes(bytes),
        });
        self
    }

    /// Adds a tensor whose bytes are produced while the file is written.
    pub fn tensor_fill(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        fill: FillFn,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data: Data::Fill(fill),
        });
        self
    }

    fn tensor_size(t: &PendingTensor) -> u64 {
        let n: u64 = t.dims.iter().product();
        t.ty.row_bytes(n).unwrap_or_else(|| {
            panic!(
                "tensor {}: {} elements are not whole {} blocks",
                t.name, n, t.ty
            )
        })
    }

    /// Writes the file. Panics if a tensor's given bytes do not match its shape (a caller bug).
    pub fn write(&self, mut w: impl Write) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut header, k);
            header.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut header, v);
        }
        let align = DEFAULT_ALIGNMENT;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + Self::tensor_size(t)).div_ceil(align) * align;
        }
        let pad = (header.len() as u64).div_ceil(align) * align - header.len() as u64;
        header.resize(header.len() + pad as usize, 0);
        w.write_all(&header)?;

        let mut written = 0u64;
        let mut buf = Vec::new();
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            w.write_all(&vec![0u8; (off - written) as usize])?;
            let size = Self::tensor_size(t);
            match &t.data {
                Data::Bytes(b) => {
                    assert_eq!(
                        b.len() as u64,
                        size,
                        "tensor {}: byte length does not match its shape",
                        t.name
                    );
                    w.write_all(b)?;
                }
                Data::Fill(f) => {
                    buf.clear();
                    buf.resize(size as usize, 0);
                    f(&mut buf);
                    w.write_all(&buf)?;
                }
            }
            written = off + size;
        }
        w.flush()
    }

    /// The whole file as bytes (for small test files).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write(&mut v).expect("writing to a Vec cannot fail");
        v
    }

    /// Writes the file to `path` through a buffered writer.
    pub fn write_file(&self, path: &std::path::Path) -> io::Result<()> {
        let f = std::fs::File::create(path)?;
        self.write(io::BufWriter::with_capacity(1 << 20, f))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    macro_rules! each {
        ($ty:expr, $v:expr, |$x:ident| $body:expr) => {{
            out.extend_from_slice(&($ty as u32).to_le_bytes());
            out.extend_from_slice(&($v.len() as u64).to_le_bytes());
            for $x in $v {
                $body;
            }
        }};
    }
    match a {
        MetaArray::U8(v) => each!(0, v, |x| out.push(*x)),
        MetaArray::I8(v) => each!(1, v, |x| out.push(*x as u8)),
        MetaArray::U16(v) => each!(2, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I16(v) => each!(3, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::U32(v) => each!(4, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I32(v) => each!(5, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F32(v) => each!(6, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::Bool(v) => each!(7, v, |x| out.push(*x as u8)),
        MetaArray::String(v) => each!(8, v, |x| put_str(out, x)),
        MetaArray::Array(v) => each!(9, v, |x| put_array(out, x)),
        MetaArray::U64(v) => each!(10, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::I64(v) => each!(11, v, |x| out.extend_from_slice(&x.to_le_bytes())),
        MetaArray::F64(v) => each!(12, v, |x| out.extend_from_slice(&x.to_le_bytes())),
    }
}
