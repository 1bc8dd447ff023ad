//! Reading a [`TokenizerSpec`] from GGUF metadata (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`). Missing or mistyped keys are left empty here;
//! `Tokenizer::from_spec` decides what is required.

use crate::gguf::{GgufFile, MetaArray};

use super::TokenizerSpec;

impl TokenizerSpec {
    pub fn from_gguf(file: &GgufFile) -> Self {
        let string = |k: &str| file.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let id = |k: &str| {
            file.get(k)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let flag = |k: &str| file.get(k).and_then(|v| v.as_bool());
        let array = |k: &str| file.get(k).and_then(|v| v.as_array());
        let strings = |k: &str| match array(k) {
            Some(MetaArray::String(v)) => v.clone(),
            _ => Vec::new(),
        };
        TokenizerSpec {
            model: string("tokenizer.ggml.model").unwrap_or_default(),
            pre: string("tokenizer.ggml.pre"),
            tokens: strings("tokenizer.ggml.tokens"),
            token_types: match array("tokenizer.ggml.token_type") {
                Some(MetaArray::I32(v)) => v.clone(),
                Some(MetaArray::U32(v)) => v.iter().map(|&x| x as i32).collect(),
                _ => Vec::new(),
            },
            scores: match array("tokenizer.ggml.scores") {
                Some(MetaArray::F32(v)) => v.clone(),
                _ => Vec::new(),
            },
            merges: strings("tokenizer.ggml.merges"),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            eot_id: id("tokenizer.ggml.eot_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_eos: flag("tokenizer.ggml.add_eos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            chat_template: string("tokenizer.chat_template"),
        }
    }
}
