//! Data: the embedded corpora, tokenizers, llm.c-format token shards and the batch loader.

pub mod corpus;
pub mod loader;
pub mod prepare;
pub mod shard;
pub mod tokenizer;
