//! Device memory the CUDA backend holds besides the tensors the memory plan places: the
//! cuBLASLt workspace, the fused classifier's chunk of logits and the attention backward's
//! scratch. Here, outside the `cuda` feature, so that `plan-memory` counts them with the same
//! numbers the backend uses (`tests/cuda_memory.rs` holds the plan to the measured device peak).

use super::AttnShape;

/// Most logits alive at once in the fused classifier (elements, in activation storage: 256 MiB
/// of bf16, their gradient written over them). Every chunk reads and writes the whole f32 dW
/// (V × C), so chunks must be large: at V = 32768 this is 4096 rows, 8 chunks for H100-ref's
/// 32768-token step.
pub const LOGITS_BUDGET: usize = 1 << 27;

/// cuBLASLt's workspace: its recommended size on Hopper (32 MiB; 4 MiB suffices before it).
pub const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Rows of one classifier chunk for `rows` rows over `vocab` classes.
pub fn classifier_chunk_rows(rows: usize, vocab: usize) -> usize {
    (LOGITS_BUDGET / vocab.max(1)).clamp(1, rows.max(1))
}

/// Bytes of one classifier chunk at `tokens` × `vocab`: its logits, `act_bytes` each (their
/// gradient overwrites them).
pub fn classifier_chunk_bytes(tokens: usize, vocab: usize, act_bytes: u64) -> u64 {
    (classifier_chunk_rows(tokens, vocab) * vocab) as u64 * act_bytes
}

/// Bytes of the attention backward's scratch, live during it: Δ (B·H·T f32), the dQ
/// accumulator (B·T·H·D f32) and the counters (u32: B·Hkv launch tickets, and B·H per query
/// tile, counted at the smallest tile, 32 rows).
pub fn attention_bwd_bytes(s: AttnShape) -> u64 {
    let delta = s.batch * s.n_heads * s.seq;
    let turns = s.batch * (s.n_kv_heads + s.n_heads * s.seq.div_ceil(32));
    4 * (delta + s.tokens() * s.out_width() + turns) as u64
}
