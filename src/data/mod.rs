//! Data: tokenizer and token shards.
