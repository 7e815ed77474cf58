//! The transient buffers of one block's forward and backward as planner requests, read off the
//! op sequence of `model/block.rs` (each buffer's size and the ops during which it is live).
//!
//! Skeletal tensors are not here: they belong to the store (kept, or in MEMO's two rotating
//! skeletal buffers while they are copied). Neither are the block's boundary tensors (input,
//! output, incoming and outgoing gradient), which cross layers. The recompute before a backward
//! needs a gather and an activation buffer for the dropped slots only, smaller than the
//! backward's own: it runs from the backward phase's `xe` and `act`.
//!
//! Keep this in step with `block.rs`: a new temporary there is a new request here. The block
//! takes its transients from the arena by these requests' indices, and the arena checks that
//! what it asks for is live and large enough by this description (`memory/arena.rs`).

use super::plan::{Phase, Request};
use crate::config::GateUp;
use crate::model::config::{ModelConfig, MoeConfig};

/// Offsets in the transient arena are multiples of this many bytes (a GPU allocator's granule;
/// on the CPU it keeps every transient on its own cache lines).
pub const ALIGNMENT: u64 = 512;

/// Indices of the forward phase's requests, for the arena.
pub mod fwd {
    /// The routed copies of the normalised tokens, `(S, C)`.
    pub const XE: usize = 0;
    /// The SwiGLU output of a chunk of rows, `(rows, h_e)` blocks one after another.
    pub const ACT: usize = 1;
    /// A chunk's gate/up product, `(rows, 2h_e)` blocks, where it is not saved
    /// (`memory.gate_up = "recompute"`).
    pub const GU: usize = 2;
}

/// Indices of the backward phase's requests (also used by the recompute before it).
pub mod bwd {
    pub const DY: usize = 0;
    pub const XE: usize = 1;
    pub const DXE: usize = 2;
    pub const DXN2: usize = 3;
    /// The slot gates' gradient, `(S)` f32.
    pub const DGATE: usize = 4;
    pub const DLOGITS: usize = 5;
    pub const DX2: usize = 6;
    pub const DATT: usize = 7;
    pub const DQKV: usize = 8;
    pub const DXN1: usize = 9;
    /// A chunk's SwiGLU output, its gradient (`(rows, h_e)` blocks; none where the experts'
    /// kernels keep it on the chip) and the gate/up gradient (`(rows, 2h_e)` blocks).
    pub const ACT: usize = 10;
    pub const DACT: usize = 11;
    pub const DGU: usize = 12;
    /// The attention backward's scratch (`Backend::attention_bwd_scratch_len`, f32; none on
    /// the CPU).
    pub const ATTN: usize = 13;
    /// A chunk's gate/up product, recomputed where it is not saved (`(rows, 2h_e)` blocks).
    pub const GU: usize = 14;
}

/// What the backend decides of a block's transients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendTransients {
    /// Bytes of an activation element (statistics are f32).
    pub act_bytes: u64,
    /// Whether the experts read their rows through the slots' tokens
    /// (`Backend::fuses_expert_gather`, without expert parallelism): then no gathered copies are
    /// made and SwiGLU's backward keeps its input gradient on the chip (the Hopper kernels
    /// that read rows in place take every expert product then).
    pub fused_gather: bool,
    /// Bytes of the attention backward's scratch (`Backend::attention_bwd_scratch_len`).
    pub attention_scratch: u64,
}

/// The phase of a MoE layer's routing, before its forward phase (whose sizes the routing
/// decides): one request, `route`, of `words` f32 elements (`Backend::route_scratch_len`: the
/// device router's scratch, dead once the slots are read back). Empty where routing runs on
/// the host.
pub fn router_phase(words: usize) -> Phase {
    let requests = if words > 0 { vec![Request::new("route", 4 * words as u64, 0, 1).f32()] } else { Vec::new() };
    Phase { name: "block router".into(), ops: 1, requests }
}

/// The phase of the head, at the turn between the last block's forward and the first one's
/// backward: one request, `classifier`, of `elements` f32 elements
/// (`Backend::classifier_scratch_len`: a chunk of logits and what else the fused classifier
/// keeps).
pub fn head_phase(elements: usize) -> Phase {
    Phase { name: "head".into(), ops: 1, requests: vec![Request::new("classifier", 4 * elements as u64, 0, 1).f32()] }
}

/// By default the experts run on at most this many routed rows at a time (chunks of their
/// expert-major rows, each chunk a grouped matmul per projection), so the SwiGLU output and its
/// gradients stay bounded at long context instead of growing with every routed token; large
/// enough that a chunk's per-expert GEMMs stay efficient on a GPU.
pub const EXPERT_CHUNK_ROWS: usize = 16384;

/// Elements of the per-chunk SwiGLU buffer (`act`; `dgu` takes twice as many) for `slots[e]`
/// rows of width `widths[e]`: a chunk holds at most `chunk_rows` rows, none wider than the
/// widest expert with rows, and no more than all of them.
pub fn expert_act_elements(slots: &[usize], widths: &[usize], chunk_rows: usize) -> u64 {
    let all: u64 = slots.iter().zip(widths).map(|(&s, &h)| s as u64 * h as u64).sum();
    let widest = slots.iter().zip(widths).filter(|(&s, _)| s > 0).map(|(_, &h)| h as u64).max().unwrap_or(0);
    all.min(chunk_rows as u64 * widest)
}

/// `(forward, backward)` phases of one block with `slots[e]` slots routed to expert `e`, sized
/// for `backend` and experts run on `chunk_rows` rows at a time; requests are in the order of
/// the [`fwd`] and [`bwd`] indices. The experts of a projection run as one grouped matmul per
/// chunk of rows, so a chunk's blocks of every expert are live together. Where the gate/up
/// product is not saved (`gate_up` `Recompute`) it is a chunk's transient in both phases (the
/// last request of each). Where the experts read their rows through the slots' tokens
/// (`backend.fused_gather`) the requests of `xe`, and of the backward's `dy` and `dact`, take no
/// bytes; where the attention backward needs no scratch, `attn` takes none.
#[allow(clippy::too_many_arguments)]
pub fn block_phases(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, slots: &[usize], chunk_rows: usize, gate_up: GateUp, backend: BackendTransients) -> (Phase, Phase) {
    let BackendTransients { act_bytes, fused_gather, attention_scratch } = backend;
    let n = (batch * seq) as u64;
    let c = model.d_model as u64;
    let d = model.head_dim() as u64;
    let (w, a, e) = ((model.n_heads + 2 * model.n_kv_heads) as u64 * d, model.n_heads as u64 * d, moe.n_experts() as u64);
    let s: u64 = slots.iter().map(|&x| x as u64).sum();
    let sh = expert_act_elements(slots, &moe.expert_widths, chunk_rows);
    let b = |elems: u64| elems * act_bytes;
    // The routed rows gathered (xe), and their output gradients (dy), where they are copied.
    let gathered = if fused_gather { 0 } else { b(s * c) };

    // Forward: 0 norm, 1 qkv, 2 rope, 3 attention, 4 copy, 5 wo, 6 norm, 7 router, 8 softmax,
    // 9 gather xe, 10 gate_up (grouped), 11 SwiGLU, 12 down (grouped), 13 copy out, 14 combine.
    let mut fwd = vec![Request::new("xe", gathered, 9, 13).routed(), Request::new("act", b(sh), 11, 13).routed()];
    let recompute = gate_up == GateUp::Recompute;
    if recompute {
        fwd.push(Request::new("gu", b(2 * sh), 10, 12).routed());
    }
    let forward = Phase { name: "block forward".into(), ops: 15, requests: fwd };

    // Backward: 0 dy, 1 dgate, 2 gather xe; experts: 3 SwiGLU again (act), 4 dact, 5 dW_down,
    // 6 dgu, 7 dxe, 8 dW_gate_up (each matmul grouped over the experts); then x: combine dxn2,
    // router bwd (dgate → dlogits), dxn2 +=, dWr, dx2, ffn norm bwd, datt, dWo, attention bwd,
    // rope, dxn1, dWqkv, copy dx, attn norm bwd.
    let x = 9;
    let mut bwd = vec![
        Request::new("dy", gathered, 0, x).routed(),
        Request::new("xe", gathered, 2, x).routed(),
        Request::new("dxe", b(s * c), 2, x + 1).routed(),
        Request::new("dxn2", b(n * c), x, x + 6),
        Request::new("dgate", 4 * s, 1, x + 2).f32().routed(),
        Request::new("dlogits", b(n * e), x + 1, x + 4),
        Request::new("dx2", b(n * c), x + 4, x + 14),
        Request::new("datt", b(n * a), x + 6, x + 9),
        Request::new("dqkv", b(n * w), x + 8, x + 12),
        Request::new("dxn1", b(n * c), x + 10, x + 14),
        Request::new("act", b(sh), 3, x).routed(),
        Request::new("dact", if fused_gather { 0 } else { b(sh) }, 3, x).routed(),
        Request::new("dgu", b(2 * sh), 3, x).routed(),
        Request::new("attn", attention_scratch, x + 8, x + 9).f32(),
    ];
    if recompute {
        // Recomputed from xe at the chunk's start (op 3), read by SwiGLU's backward.
        bwd.push(Request::new("gu", b(2 * sh), 3, x).routed());
    }
    let backward = Phase { name: "block backward".into(), ops: x + 14, requests: bwd };
    (forward, backward)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::plan::{plan, verify, Strategy};
    use crate::model::config::Routing;

    /// What the CPU backend decides: f32 activations, rows gathered, no attention scratch.
    const CPU: BackendTransients = BackendTransients { act_bytes: 4, fused_gather: false, attention_scratch: 0 };

    #[test]
    fn phases_are_well_formed_and_plannable() {
        let m = ModelConfig { vocab_size: 64, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, seq_len: 24, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![8, 16, 24, 40], routing: Routing::TopK, top_k: 2, top_p: 0.6, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        // As a GPU's: an attention scratch.
        let be = BackendTransients { attention_scratch: 4096, ..CPU };
        let (f, b) = block_phases(&m, &moe, 2, 12, &[12, 12, 12, 12], EXPERT_CHUNK_ROWS, GateUp::Save, be);
        let (fr, br) = block_phases(&m, &moe, 2, 12, &[12, 12, 12, 12], EXPERT_CHUNK_ROWS, GateUp::Recompute, be);
        assert_eq!((fr.requests[fwd::GU].name.as_str(), br.requests[bwd::GU].name.as_str()), ("gu", "gu"));
        assert_eq!((fr.requests.len(), br.requests.len()), (f.requests.len() + 1, b.requests.len() + 1));
        assert_eq!((b.requests[bwd::ATTN].name.as_str(), b.requests[bwd::ATTN].size), ("attn", 4096));
        let (_, cpu) = block_phases(&m, &moe, 2, 12, &[12, 12, 12, 12], EXPERT_CHUNK_ROWS, GateUp::Save, CPU);
        assert_eq!(cpu.requests[bwd::ATTN].size, 0, "the CPU's attention backward takes no scratch");
        for phase in [&f, &b, &fr, &br] {
            assert!(phase.requests.iter().all(|r| r.start < r.end && r.end <= phase.ops && r.size > 0), "{}", phase.name);
            let p = plan(&phase.requests, 64, Strategy::Heuristic).unwrap();
            verify(&p, &phase.requests).unwrap();
            assert!(p.peak >= p.lower_bound);
        }
        // The backward's widest moment holds dx2 with dxn2 (norm backward): at least 2·N·C floats.
        let lb = crate::memory::plan::lower_bound(&b.requests, 1).unwrap();
        assert!(lb >= 2 * 24 * 32 * 4);
        // Rows read through the slots' tokens: no xe in either phase, no dy and no dact, the
        // rest as before.
        let (ff, bf) = block_phases(&m, &moe, 2, 12, &[12, 12, 12, 12], EXPERT_CHUNK_ROWS, GateUp::Save, BackendTransients { fused_gather: true, ..be });
        assert_eq!((ff.requests[fwd::XE].size, bf.requests[bwd::XE].size, bf.requests[bwd::DY].size, bf.requests[bwd::DACT].size), (0, 0, 0, 0));
        for (fused, plain) in [(&ff, &f), (&bf, &b)] {
            assert!(fused.requests.iter().zip(&plain.requests).all(|(x, y)| x.size == y.size || ["xe", "dy", "dact"].contains(&x.name.as_str())), "{}: only xe, dy and dact differ", fused.name);
            let (pf, pp) = (plan(&fused.requests, 64, Strategy::Heuristic).unwrap(), plan(&plain.requests, 64, Strategy::Heuristic).unwrap());
            verify(&pf, &fused.requests).unwrap();
            assert!(pf.peak <= pp.peak, "{}: {} > {}", fused.name, pf.peak, pp.peak);
        }
    }
}
