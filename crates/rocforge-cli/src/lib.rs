//! The `rocforge` command line as a library, so that tests and the fuzzer parse flags exactly
//! as the binary does: raw flags (clap, [`RawCli`]) are turned once into typed, validated
//! [`Settings`] by [`parse`]; the binary then only runs them.
//!
//! ```
//! let s = rocforge_cli::parse(["rocforge", "generate", "-m", "m.gguf", "-p", "hi", "--temperature", "nan"]);
//! assert!(s.unwrap_err().to_string().contains("--temperature NaN is out of range"));
//! ```

mod settings;

pub use settings::{
    one_line, parse, Generate, Inspect, ParseError, Perplexity, RawCli, Run, Settings,
};
