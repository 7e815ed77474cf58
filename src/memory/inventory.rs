//! Skeletal bytes of one decoder block, per inventory tensor, from the model shape — what the α LP
//! and the memory report size their decisions with, before any step has run.
//!
//! MoE-aware: routed-expert tensors scale with the slots each expert receives and its width. The
//! slot count is an input ([`Slots`]): measured per-expert counts, a capacity-factor static bound,
//! or the dropless expectation.

use serde::Serialize;

use super::store::{BlockDims, Class, TensorSpec};
use crate::config::GateUp;
use crate::model::block;
use crate::model::config::{ModelConfig, MoeConfig, Routing};
use crate::parallel::dispatch::{expert_capacity, DispatchMode};

/// How many slots each expert receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Slots {
    /// Counts measured on a step (per expert).
    Measured(Vec<usize>),
    /// A capacity factor: every expert holds at most `ceil(k·N/E · factor)` slots, the static
    /// bound a capacity-mode dispatcher allocates.
    Capacity(f64),
    /// Dropless expectation: `k·N` slots spread evenly, `k·N/E` per expert (rounded up). With
    /// Top-P routing `k` is `top_k` here, an estimate of the mean experts per token — measure for
    /// a real number.
    Expected,
    /// The expectation under an expert capacity of this factor: `Expected`, at most
    /// `Capacity`'s bound per expert.
    ExpectedWithin(f64),
}

impl Slots {
    /// Slots per expert for `tokens` tokens.
    pub fn per_expert(&self, moe: &MoeConfig, tokens: usize) -> Vec<usize> {
        let e = moe.n_experts();
        let k = match moe.routing {
            Routing::TopK => moe.top_k.min(e),
            Routing::TopP => moe.top_k.clamp(1, e),
        };
        match self {
            Slots::Measured(c) => c.clone(),
            Slots::Capacity(f) => vec![expert_capacity(tokens * k, e, *f); e],
            Slots::Expected => vec![(tokens * k).div_ceil(e); e],
            Slots::ExpectedWithin(f) => vec![(tokens * k).div_ceil(e).min(expert_capacity(tokens * k, e, *f)); e],
        }
    }

    /// The expectation a plan sizes routed tensors by under `dispatch`.
    pub fn expected(dispatch: DispatchMode) -> Self {
        match dispatch {
            DispatchMode::Capacity { factor, .. } | DispatchMode::PadToCapacity { factor, .. } => Slots::ExpectedWithin(factor),
            DispatchMode::Dropless => Slots::Expected,
        }
    }
}

/// One tensor of the inventory with its size for a given shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorBytes {
    pub name: &'static str,
    pub class: Class,
    pub bytes: u64,
}

/// Bytes of every inventory tensor of one block (the gate/up product only where `gate_up`
/// saves it), with activations of `act_bytes` bytes per element (statistics are f32).
#[allow(clippy::too_many_arguments)]
pub fn block_inventory(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, slots: &[usize], act_bytes: u64, gate_up: GateUp) -> Vec<TensorBytes> {
    let dims = BlockDims::new(model, moe, batch, seq);
    block::inventory(gate_up)
        .iter()
        .map(|spec: &TensorSpec| TensorBytes { name: spec.name, class: spec.class, bytes: dims.elements(spec, slots) as u64 * spec.precision.bytes(act_bytes) })
        .collect()
}

/// MEMO's split of a block's bytes: input, attention output (with its statistics), the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Skeletal {
    pub input: u64,
    pub attn: u64,
    pub others: u64,
}

impl Skeletal {
    pub fn of(tensors: &[TensorBytes]) -> Self {
        let mut s = Skeletal::default();
        for t in tensors {
            match (t.class, t.name) {
                (Class::Whole, "input") => s.input += t.bytes,
                (Class::Whole, _) => s.attn += t.bytes,
                (Class::TokenSplit, _) => s.others += t.bytes,
            }
        }
        s
    }

    pub fn total(&self) -> u64 {
        self.input + self.attn + self.others
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::store::LayerPolicy;

    fn tiny() -> (ModelConfig, MoeConfig) {
        let m = ModelConfig { vocab_size: 64, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, seq_len: 24, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![8, 16, 24, 40], routing: Routing::TopK, top_k: 2, top_p: 0.6, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        (m, moe)
    }

    /// The computed sizes equal what the block really saves, on a real step's routed counts.
    #[test]
    fn inventory_matches_a_real_forward() {
        use crate::backend::cpu::Cpu;
        use crate::model::Model;
        let (m, moe) = tiny();
        let be = Cpu::new(1);
        let model = Model::new(&be, m.clone(), moe.clone(), 1).unwrap();
        let inputs: Vec<u32> = (0..2 * 12).map(|i| (i * 7 % 64) as u32).collect();
        let mut stats = None;
        for gate_up in [GateUp::Save, GateUp::Recompute] {
            let mut store = model.new_store_with(vec![LayerPolicy::Keep; 2], 0, gate_up).unwrap();
            let s = model.forward_saving(&be, &mut store, &inputs, 2, 12).unwrap();
            for l in 0..2 {
                let inv = block_inventory(&m, &moe, 2, 12, &s.counts[l], 4, gate_up);
                let total: u64 = inv.iter().map(|t| t.bytes).sum();
                assert_eq!(total, store.held_bytes(l), "layer {l}, {gate_up:?}");
            }
            stats = Some(s);
        }
        let stats = stats.expect("ran");
        // Capacity bounds the measured counts from above when the factor covers the imbalance.
        let cap = Slots::Capacity(4.0).per_expert(&moe, 24);
        assert!(stats.counts.iter().all(|c| c.iter().zip(&cap).all(|(a, b)| a <= b)));
        assert_eq!(Slots::Expected.per_expert(&moe, 24), vec![12; 4]);
        // An expert capacity below the even spread bounds it; one above leaves it.
        let policy = crate::parallel::dispatch::DropPolicy::Probs;
        assert_eq!(Slots::expected(DispatchMode::Capacity { factor: 0.5, policy }).per_expert(&moe, 24), vec![6; 4]);
        assert_eq!(Slots::expected(DispatchMode::Capacity { factor: 1.5, policy }).per_expert(&moe, 24), vec![12; 4]);
        assert_eq!(Slots::expected(DispatchMode::Dropless), Slots::Expected);
    }
}
