//! Device memory the CUDA backend needs besides the model's tensors: the cuBLASLt workspace, the
//! reductions' scratch and the upload ring, which it holds beside the memory plan, and the scratch of the device
//! router, the attention backward and the fused classifier, which the plan places in the
//! transient arena (a phase of its own, a request of the block's backward, the head's phase).
//! Here, outside the `cuda` feature, so that `plan-memory` counts them with the same numbers the
//! backend uses (`tests/cuda_memory.rs` holds the plan to the measured device peak).

use super::{AttnShape, RouteRule};

/// Most logits alive at once in the fused classifier (elements, in activation storage: 256 MiB
/// of bf16, their gradient written over them). Every chunk reads and writes the whole f32 dW
/// (V × C), so chunks must be large: at V = 32768 this is 4096 rows, 8 chunks for H100-ref's
/// 32768-token step.
pub const LOGITS_BUDGET: usize = 1 << 27;

/// cuBLASLt's workspace: its recommended size on Hopper (32 MiB; 4 MiB suffices before it).
pub const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The reductions' scratch: the partial sums an op writes and reads back within one call
/// (RMSNorm's weight gradient, Σx² for the gradient norm). Every op runs on one stream, so one
/// buffer serves them all. 2 MiB: RMSNorm's partials at d = 1024 for 32,768 rows in one pass.
pub const REDUCTION_BYTES: usize = 2 << 20;

/// Device memory the backend allocates once, when it opens: cuBLASLt's workspace and the
/// reductions' scratch.
pub const FIXED_BYTES: usize = BLAS_WORKSPACE_BYTES + REDUCTION_BYTES;

/// The device upload ring (`cuda::staging`): each op copies its host data (indices, gates,
/// pointer and segment tables) into it for its own launches. Every upload starts at a multiple
/// of this.
pub const UPLOAD_ALIGN: usize = 256;
/// The smallest upload ring.
pub const MIN_UPLOAD_RING_BYTES: usize = 4 << 20;

/// Bytes an upload of `bytes` takes in the ring.
pub fn upload_share(bytes: usize) -> usize {
    bytes.next_multiple_of(UPLOAD_ALIGN)
}

/// The ring's length where ops hold up to `held` bytes of it at once: twice that, so that an
/// op's uploads never wrap onto each other.
pub fn upload_ring_len(held: usize) -> usize {
    (2 * held).max(MIN_UPLOAD_RING_BYTES).next_power_of_two()
}

/// The upload ring a step grows to, from the largest set of uploads an op holds: the router's
/// backward, `tokens` + 1 offsets, three arrays of a word per slot (the slots by token, their
/// experts, their gates) and the two aux losses' weights. (The experts' calls hold at most two
/// words a slot and a table of segments, the combine two words a slot and a token's offsets,
/// the embedding's backward three words a token; the others a word a token or a slot. Every
/// routing puts at least one slot per token.)
pub fn upload_ring_bytes(tokens: usize, slots: usize) -> u64 {
    upload_ring_len(upload_share(4 * (tokens + 1)) + 3 * upload_share(4 * slots) + upload_share(8)) as u64
}

/// Rows of one classifier chunk for `rows` rows over `vocab` classes.
pub fn classifier_chunk_rows(rows: usize, vocab: usize) -> usize {
    (LOGITS_BUDGET / vocab.max(1)).clamp(1, rows.max(1))
}

/// Bytes of one classifier chunk at `tokens` × `vocab`: its logits, `act_bytes` each (their
/// gradient overwrites them).
pub fn classifier_chunk_bytes(tokens: usize, vocab: usize, act_bytes: u64) -> u64 {
    (classifier_chunk_rows(tokens, vocab) * vocab) as u64 * act_bytes
}

/// f32 elements of the classifier's scratch (`Backend::classifier_scratch_len`): a chunk of
/// logits, rounded up to whole 16-byte lines so that what follows stays aligned, then the f32
/// losses of all `tokens` rows.
pub fn classifier_scratch_len(tokens: usize, vocab: usize, act_bytes: u64) -> usize {
    classifier_chunk_bytes(tokens, vocab, act_bytes).next_multiple_of(16) as usize / 4 + tokens
}

/// Bytes of the attention backward's scratch, live during it: Δ (B·H·T f32), the dQ
/// accumulator (B·T·H·D f32) and the counters (u32: B·Hkv launch tickets, and B·H per query
/// tile, counted at the smallest tile, 32 rows).
pub fn attention_bwd_bytes(s: AttnShape) -> u64 {
    let delta = s.batch * s.n_heads * s.seq;
    let turns = s.batch * (s.n_kv_heads + s.n_heads * s.seq.div_ceil(32));
    4 * (delta + s.tokens() * s.out_width() + turns) as u64
}

/// Whether the Hopper expert kernels take every product that reads picked rows, for every
/// width: the up projection (`xe W_guᵀ`: k = d_model, n = 2h), SwiGLU's backward through the
/// down projection (`dy W_down`: k = d_model, n = h) and the weight gradients (`dguᵀ xe`: m = 2h,
/// n = d_model; `dyᵀ act`: m = d_model, n = h). Then no gathered copy of the routed rows or of
/// their output gradients is made (`Backend::fuses_expert_gather`), and `plan-memory` plans
/// none. They take d_model and widths that are multiples of 128.
pub fn expert_kernels_gather(d_model: usize, widths: &[usize]) -> bool {
    d_model.is_multiple_of(128) && widths.iter().all(|h| h.is_multiple_of(128))
}

/// Tokens a thread of the routing kernels takes in order (`route_group_sums`, `route_layout`
/// in softmax.cu): few enough to keep them parallel, enough that `route_scan`'s lanes each
/// take few groups.
pub const ROUTE_GROUP: usize = 32;

/// Most experts the device router takes: the kernels keep a token's chosen experts in 64 bits.
pub const ROUTE_MAX_EXPERTS: usize = 64;

/// The device router's scratch for `n` tokens over `e` experts: one buffer of 32-bit words in
/// nine parts, each a whole number of words. First what the host reads back, so that one read
/// (Top-K) or three (Top-P: the counts first) fetch it: the e + 2 sums (f64, at the buffer's
/// 8-byte aligned start), the e counts, `capacity` tokens and as many gates (plus a word where
/// that count is odd, so that the f64 part after starts 8-byte aligned). Then the groups' f64
/// sums, the tokens' chosen masks and entropy / z-loss terms (2n words each), the groups'
/// counts and offsets (e · groups each). `None` where routing stays on the host (no tokens, no
/// experts, or more than [`ROUTE_MAX_EXPERTS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteScratch {
    /// Words of each part, in the order above.
    pub parts: [usize; 9],
    /// Most slots the routing can make: Top-K's count is known; Top-P's is at most every
    /// expert of every token.
    pub capacity: usize,
    /// Groups of [`ROUTE_GROUP`] tokens.
    pub groups: usize,
}

impl RouteScratch {
    pub fn new(n: usize, e: usize, rule: RouteRule) -> Option<Self> {
        if n == 0 || e == 0 || e > ROUTE_MAX_EXPERTS {
            return None;
        }
        let groups = n.div_ceil(ROUTE_GROUP);
        let capacity = match rule {
            RouteRule::TopK(k) => n * k.min(e),
            RouteRule::TopP(_) => n * e,
        };
        let header = 2 * (e + 2) + e;
        let read = header + 2 * capacity + (header + 2 * capacity) % 2;
        let parts = [2 * (e + 2), e, capacity, read - header - capacity, 2 * (e + 2) * groups, 2 * n, 2 * n, e * groups, e * groups];
        Some(RouteScratch { parts, capacity, groups })
    }

    /// Words of the sums and counts the host reads first.
    pub fn header(&self) -> usize {
        self.parts[0] + self.parts[1]
    }

    pub fn words(&self) -> usize {
        self.parts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 parts (the sums the host reads first, the groups' sums) start on 8-byte
    /// boundaries whatever the expert count's parity; the header is the sums and counts; the
    /// parts hold what the kernels index; no scratch where routing stays on the host.
    #[test]
    fn route_scratch_keeps_its_f64_parts_aligned() {
        for e in [1, 6, 7, 40, 63, 64] {
            for rule in [RouteRule::TopK(2), RouteRule::TopP(0.6)] {
                let n = 1000;
                let r = RouteScratch::new(n, e, rule).unwrap();
                let starts: Vec<usize> = r.parts.iter().scan(0, |at, &w| Some(std::mem::replace(at, *at + w))).collect();
                assert!(starts[0].is_multiple_of(2) && starts[4].is_multiple_of(2), "e {e}, {rule:?}: f64 parts at words {} and {}", starts[0], starts[4]);
                assert_eq!(r.header(), 2 * (e + 2) + e);
                assert_eq!((r.parts[2], r.groups), (r.capacity, n.div_ceil(ROUTE_GROUP)));
                assert_eq!(r.capacity, if let RouteRule::TopK(k) = rule { n * k.min(e) } else { n * e });
                assert_eq!(r.words(), r.parts.iter().sum::<usize>());
            }
        }
        assert_eq!(RouteScratch::new(10, 65, RouteRule::TopK(2)), None);
        assert_eq!(RouteScratch::new(0, 8, RouteRule::TopK(2)), None);
    }

    /// The upload ring for H100-ref's shapes, by hand: at B=8, T=4096 (32,768 tokens, 65,536
    /// slots) the router backward holds 131,328 + 3 · 262,144 + 256 = 918,016 bytes, twice of
    /// which fits the smallest ring; at 1M tokens (2M slots) 4,194,560 + 3 · 8,388,608 + 256 =
    /// 29,360,640, twice of which rounds up to 64 MiB.
    #[test]
    fn the_upload_ring_holds_twice_the_router_backwards_uploads() {
        assert_eq!(upload_share(4 * 32_769), 131_328);
        assert_eq!(upload_ring_bytes(32_768, 65_536), 4 << 20);
        assert_eq!(upload_share(4 * 1_048_577), 4_194_560);
        assert_eq!(upload_ring_bytes(1 << 20, 2 << 20), 64 << 20);
        assert_eq!(upload_ring_len(0), MIN_UPLOAD_RING_BYTES);
        assert_eq!(upload_ring_len((MIN_UPLOAD_RING_BYTES / 2) + 1), 2 * MIN_UPLOAD_RING_BYTES);
    }
}
