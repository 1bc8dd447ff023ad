//! GGUF files: a bounds-checked reader over a memory map, typed metadata, and a writer.
mod reader;
mod value;
mod writer;

pub use reader::{GgufError, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
pub use value::{MetaArray, MetaValue, ValueType};
pub use writer::{FillFn, GgufWriter};
