//! The MoE token dispatcher over an expert-parallel (EP) group, forward and backward.
//!
//! Forward, per layer and rank:
//! ```text
//! x (N,C), Routing ─► plan: drop / pad per expert (capacity modes) ─► permute: rows (R,C),
//!   expert-major, R = Σ_e rows_e
//! ─► all_to_all_v over EP: rank d receives the rows of its experts d·L..(d+1)·L (L = E/EP),
//!   source-major [src][local expert]
//! ─► regroup to [local expert][src] ─► experts (one call per local expert) ─► back to [src][le]
//! ─► inverse all_to_all_v ─► y (R,C) in the local permuted layout
//! ─► unpermute: out[token] += gate · y[row]   (out (N,C); dropped tokens get nothing)
//! ```
//! Backward runs the same path on `gate · d_out[token]`, calls the expert backward closures in the
//! same row order as the forward, and scatter-adds the returned input gradients into `d_x`;
//! `d_gate[slot] = ⟨d_out[token], y[row]⟩` needs only the saved `y`.
//!
//! Because the permuted layout and the unpermute order depend only on local data, the output is
//! bit-identical for every EP size (given row-wise experts); the tests hold that.
//!
//! Not covered here: ETP > 1 (an all-gather of the received rows over the ETP group before the
//! experts, and a reduce-scatter after); each EP rank holds its experts whole.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::backend::PeerChunk;
use crate::model::routing::{Capped, Routing};
use crate::parallel::comm::Communicator;
use crate::{Error, Result};

/// Which tokens an over-full expert keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// The highest router probabilities for that expert; ties keep the lower token index.
    Probs,
    /// The earliest tokens (lowest index).
    Position,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DispatchMode {
    /// Every routed token is processed; shapes vary with the routing.
    Dropless,
    /// At most `cap` tokens per expert (see [`expert_capacity`]); the rest are dropped and
    /// contribute zero to the output (the residual carries them).
    Capacity { factor: f64, policy: DropPolicy },
    /// As `Capacity`, then padded with zero rows (gate 0) to exactly `cap` rows per expert, so
    /// every exchange and expert call has a static shape.
    PadToCapacity { factor: f64, policy: DropPolicy },
}

/// `ceil(n_tokens · k / E · factor)` per expert, computed on this rank's tokens before the
/// exchange. `n_tokens · k` is the number of routed slots: with top-k routing that is exactly
/// `N·k`, and with top-p (a varying number of experts per token) it uses the mean number of
/// experts per token as k, so the capacity tracks the actual load. The arithmetic is in f64 in
/// the same order as Megatron's `get_capacity`, so both agree on the rounding.
pub fn expert_capacity(n_slots: usize, n_experts: usize, factor: f64) -> usize {
    ((n_slots as f64 / n_experts as f64) * factor).ceil() as usize
}

/// The experts EP rank `rank` of `ep_size` holds: a contiguous share of `n_experts` (a multiple
/// of `ep_size`). The one place that decides expert placement (dispatch, parameters, gathering).
pub fn expert_shard(n_experts: usize, ep_size: usize, rank: usize) -> Range<usize> {
    let l = n_experts / ep_size;
    rank * l..(rank + 1) * l
}

/// The rows this rank sends, expert-major: for each row, the routing slot it carries.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotPlan {
    /// Expert `e` has rows `offsets[e]..offsets[e + 1]`; `offsets.len() == E + 1`.
    pub offsets: Vec<usize>,
    /// Routing slot of each row, ascending within an expert; `None` for a padding row.
    pub source: Vec<Option<usize>>,
    /// The per-expert capacity in the capacity modes.
    pub capacity: Option<usize>,
}

impl SlotPlan {
    pub fn n_rows(&self) -> usize {
        self.source.len()
    }

    /// Rows sent to each expert.
    pub fn rows_per_expert(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// Checks the `Routing` invariants the dispatcher relies on.
fn check_routing(r: &Routing, n_experts: usize) -> Result<()> {
    if r.n_experts != n_experts || r.offsets.len() != n_experts + 1 {
        return Err(Error::config(
            "routing.n_experts",
            format!("{} (offsets {})", r.n_experts, r.offsets.len()),
            format!("{n_experts} experts with {} offsets", n_experts + 1),
        ));
    }
    if r.offsets[0] != 0 || r.offsets.windows(2).any(|w| w[0] > w[1]) || r.offsets[n_experts] != r.token.len() {
        return Err(Error::Invalid(format!(
            "routing.offsets {:?} must rise from 0 to the {} slots",
            r.offsets,
            r.token.len()
        )));
    }
    if r.gate.len() != r.token.len() {
        return Err(Error::config("routing.gate.len()", r.gate.len(), format!("one gate per slot ({})", r.token.len())));
    }
    for e in 0..n_experts {
        let tokens = &r.token[r.slots_of(e)];
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= r.n_tokens) {
            return Err(Error::config("routing.token", t, format!("a token below n_tokens = {}", r.n_tokens)));
        }
        if tokens.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid(format!("routing: tokens of expert {e} must be strictly ascending")));
        }
    }
    Ok(())
}

/// Chooses the rows to send: all slots (dropless), or at most `cap` per expert by `policy`,
/// padded to exactly `cap` in pad mode. `probs` (N,E) are the router probabilities that rank the
/// tokens of an expert under [`DropPolicy::Probs`].
pub fn plan_slots(routing: &Routing, probs: &[f32], mode: DispatchMode) -> Result<SlotPlan> {
    let n_experts = routing.n_experts;
    check_routing(routing, n_experts)?;
    let (factor, policy, pad) = match mode {
        DispatchMode::Dropless => {
            let source = (0..routing.n_slots()).map(Some).collect();
            return Ok(SlotPlan { offsets: routing.offsets.clone(), source, capacity: None });
        }
        DispatchMode::Capacity { factor, policy } => (factor, policy, false),
        DispatchMode::PadToCapacity { factor, policy } => (factor, policy, true),
    };
    check_factor(factor)?;
    if policy == DropPolicy::Probs {
        if probs.len() != routing.n_tokens * n_experts {
            return Err(Error::config(
                "probs.len()",
                probs.len(),
                format!("n_tokens·n_experts = {}·{}", routing.n_tokens, n_experts),
            ));
        }
        if let Some(p) = probs.iter().find(|p| !p.is_finite()) {
            return Err(Error::config("probs", p, "finite router probabilities"));
        }
    }
    let cap = expert_capacity(routing.n_slots(), n_experts, factor);
    let mut offsets = vec![0];
    let mut source = Vec::new();
    for e in 0..n_experts {
        let mut kept: Vec<usize> = routing.slots_of(e).collect();
        if kept.len() > cap {
            if policy == DropPolicy::Probs {
                let p = |s: usize| probs[routing.token[s] as usize * n_experts + e];
                // Slots ascend by token, so a stable sort keeps the lower token first on ties.
                kept.sort_by(|&a, &b| p(b).total_cmp(&p(a)));
            }
            kept.truncate(cap);
            kept.sort_unstable();
        }
        let n_kept = kept.len();
        source.extend(kept.into_iter().map(Some));
        if pad {
            source.extend(std::iter::repeat_n(None, cap - n_kept));
        }
        offsets.push(source.len());
    }
    Ok(SlotPlan { offsets, source, capacity: Some(cap) })
}

/// The capacity limit of a model's MoE layer, on one rank or before the expert-parallel
/// exchange: `routing`'s slots split into those the experts run and those past capacity, by
/// `mode` (the capacity computed on this rank's tokens; `probs` as [`plan_slots`] takes them).
/// Dropless keeps every slot. Pad-to-capacity is refused: its padding rows only buy static
/// shapes, which motley's backends do not need, at the price of running them.
pub fn apply_capacity(routing: Routing, probs: &[f32], mode: DispatchMode) -> Result<Capped> {
    check_model_mode(mode)?;
    if mode == DispatchMode::Dropless {
        return Ok(Capped::dropless(routing));
    }
    let plan = plan_slots(&routing, probs, mode)?;
    if plan.n_rows() == routing.n_slots() {
        return Ok(Capped::dropless(routing));
    }
    let mut kept = vec![false; routing.n_slots()];
    plan.source.iter().flatten().for_each(|&s| kept[s] = true);
    let (mut keep, mut drop) = (vec![(Vec::new(), Vec::new()); routing.n_experts], vec![(Vec::new(), Vec::new()); routing.n_experts]);
    for e in 0..routing.n_experts {
        for s in routing.slots_of(e) {
            let (tokens, gates) = if kept[s] { &mut keep[e] } else { &mut drop[e] };
            tokens.push(routing.token[s]);
            gates.push(routing.gate[s]);
        }
    }
    let (n, e) = (routing.n_tokens, routing.n_experts);
    Ok(Capped { kept: Routing::from_expert_lists(n, e, &[keep]), dropped: Routing::from_expert_lists(n, e, &[drop]) })
}

/// Whether a model's MoE layers can run under `mode` ([`apply_capacity`]): dropless, or a
/// capacity with a finite factor above 0.
pub fn check_model_mode(mode: DispatchMode) -> Result<()> {
    match mode {
        DispatchMode::Dropless => Ok(()),
        DispatchMode::Capacity { factor, .. } => check_factor(factor),
        DispatchMode::PadToCapacity { .. } => Err(Error::config("dispatch mode", "pad to capacity", "dropless or capacity (padding rows would run for nothing)")),
    }
}

fn check_factor(factor: f64) -> Result<()> {
    if !(factor.is_finite() && factor > 0.0) {
        return Err(Error::config("capacity_factor", factor, "a finite number above 0"));
    }
    Ok(())
}

/// Tokens routed to each expert before any dropping, summed over `comm` (the attention TP×CP
/// group, whose ranks together hold the tokens of one sequence) — the `count_i` of the Switch
/// aux loss. Returned as f32 for the loss; exact while a count stays below 2^24.
pub fn tokens_per_expert(routing: &Routing, comm: &dyn Communicator) -> Result<Vec<f32>> {
    let mut counts: Vec<f32> = routing.counts().into_iter().map(|c| c as f32).collect();
    comm.all_reduce_sum(&mut counts)?;
    Ok(counts)
}

/// What the backward needs from the forward.
#[derive(Clone, Debug)]
pub struct DispatchSaved {
    routing: Routing,
    plan: SlotPlan,
    /// Rows received from each source for each local expert: `recv_rows[src·L + le]`.
    recv_rows: Vec<usize>,
    /// Expert outputs back in the local permuted layout (R,C).
    y: Vec<f32>,
}

impl DispatchSaved {
    pub fn plan(&self) -> &SlotPlan {
        &self.plan
    }
}

/// Gradients of the dispatcher's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchGrads {
    /// (N,C)
    pub d_x: Vec<f32>,
    /// One per routing slot; zero for dropped slots.
    pub d_gate: Vec<f32>,
}

/// Token dispatcher over one EP group. Experts are sharded contiguously: EP rank r owns experts
/// `r·E/EP .. (r+1)·E/EP`, and the expert closures receive the local index `0..E/EP`.
pub struct TokenDispatcher<'a> {
    ep: &'a dyn Communicator,
    n_experts: usize,
    hidden: usize,
    mode: DispatchMode,
}

impl<'a> TokenDispatcher<'a> {
    pub fn new(ep: &'a dyn Communicator, n_experts: usize, hidden: usize, mode: DispatchMode) -> Result<Self> {
        if n_experts == 0 || !n_experts.is_multiple_of(ep.size()) {
            return Err(Error::config(
                "n_experts",
                n_experts,
                format!("a positive multiple of the expert-parallel size {}", ep.size()),
            ));
        }
        if hidden == 0 {
            return Err(Error::config("hidden", 0, "at least 1"));
        }
        if let DispatchMode::Capacity { factor, .. } | DispatchMode::PadToCapacity { factor, .. } = mode {
            check_factor(factor)?;
        }
        Ok(TokenDispatcher { ep, n_experts, hidden, mode })
    }

    fn n_local(&self) -> usize {
        self.n_experts / self.ep.size()
    }

    /// Global ids of the experts this rank runs.
    pub fn local_experts(&self) -> Range<usize> {
        expert_shard(self.n_experts, self.ep.size(), self.ep.rank())
    }

    /// Runs the MoE layer's expert part: returns `out` (N,C) and what the backward needs.
    ///
    /// `x` (N,C) are this rank's tokens, `probs` (N,E) the router probabilities (used only by the
    /// `Probs` drop policy). `expert(le, rows, n)` gets the `n` rows (n,C) of local expert `le`,
    /// is called once per local expert in order (also with n = 0), and returns its outputs (n,C).
    pub fn forward<F>(&self, x: &[f32], routing: &Routing, probs: &[f32], mut expert: F) -> Result<(Vec<f32>, DispatchSaved)>
    where
        F: FnMut(usize, &[f32], usize) -> Result<Vec<f32>>,
    {
        let c = self.hidden;
        if routing.n_experts != self.n_experts {
            return Err(Error::config("routing.n_experts", routing.n_experts, format!("{} experts", self.n_experts)));
        }
        if x.len() != routing.n_tokens * c {
            return Err(Error::config("x.len()", x.len(), format!("n_tokens·hidden = {}·{c}", routing.n_tokens)));
        }
        let plan = plan_slots(routing, probs, self.mode)?;
        // permute: rows (R,C); padding rows stay zero.
        let mut rows = vec![0f32; plan.n_rows() * c];
        for (i, src) in plan.source.iter().enumerate() {
            if let Some(s) = *src {
                let t = routing.token[s] as usize;
                rows[i * c..(i + 1) * c].copy_from_slice(&x[t * c..(t + 1) * c]);
            }
        }
        let recv_rows = self.receive_counts(&plan)?;
        let y = self.through_experts(&rows, &plan, &recv_rows, &mut expert)?;
        // unpermute: out[token] += gate · y[row].
        let mut out = vec![0f32; routing.n_tokens * c];
        for (i, src) in plan.source.iter().enumerate() {
            if let Some(s) = *src {
                let (t, g) = (routing.token[s] as usize, routing.gate[s]);
                out[t * c..(t + 1) * c].iter_mut().zip(&y[i * c..(i + 1) * c]).for_each(|(o, v)| *o += g * v);
            }
        }
        Ok((out, DispatchSaved { routing: routing.clone(), plan, recv_rows, y }))
    }

    /// Backward of [`TokenDispatcher::forward`] for `d_out` (N,C). `expert_backward(le, d_rows, n)`
    /// gets the output gradients (n,C) of local expert `le` in the same row order its forward
    /// saw, accumulates its own parameter gradients, and returns the input gradients (n,C).
    pub fn backward<F>(&self, saved: &DispatchSaved, d_out: &[f32], mut expert_backward: F) -> Result<DispatchGrads>
    where
        F: FnMut(usize, &[f32], usize) -> Result<Vec<f32>>,
    {
        let c = self.hidden;
        let (routing, plan) = (&saved.routing, &saved.plan);
        if d_out.len() != routing.n_tokens * c {
            return Err(Error::config("d_out.len()", d_out.len(), format!("n_tokens·hidden = {}·{c}", routing.n_tokens)));
        }
        // d_y[row] = gate · d_out[token]; d_gate[slot] = ⟨d_out[token], y[row]⟩.
        let mut d_y = vec![0f32; plan.n_rows() * c];
        let mut d_gate = vec![0f32; routing.n_slots()];
        for (i, src) in plan.source.iter().enumerate() {
            if let Some(s) = *src {
                let (t, g) = (routing.token[s] as usize, routing.gate[s]);
                let d_o = &d_out[t * c..(t + 1) * c];
                d_y[i * c..(i + 1) * c].iter_mut().zip(d_o).for_each(|(d, v)| *d = g * v);
                d_gate[s] = d_o.iter().zip(&saved.y[i * c..(i + 1) * c]).map(|(a, b)| a * b).sum();
            }
        }
        let d_rows = self.through_experts(&d_y, plan, &saved.recv_rows, &mut expert_backward)?;
        // The permute gathered rows of x, so its backward scatter-adds them.
        let mut d_x = vec![0f32; routing.n_tokens * c];
        for (i, src) in plan.source.iter().enumerate() {
            if let Some(s) = *src {
                let t = routing.token[s] as usize;
                d_x[t * c..(t + 1) * c].iter_mut().zip(&d_rows[i * c..(i + 1) * c]).for_each(|(d, v)| *d += v);
            }
        }
        Ok(DispatchGrads { d_x, d_gate })
    }

    /// Rows each local expert receives from each EP rank, `recv_rows[src·L + le]`, for the rows
    /// this rank sends under `plan` (one count exchange per layer; the forward and the backward
    /// reuse it).
    pub fn receive_counts(&self, plan: &SlotPlan) -> Result<Vec<usize>> {
        self.counts_from_sources(&plan.rows_per_expert())
    }

    /// Per-expert counts of this rank's (`per_expert[e]`, E of them) as this rank's local
    /// experts receive them from every EP rank, `[src·L + le]`.
    pub fn counts_from_sources(&self, per_expert: &[usize]) -> Result<Vec<usize>> {
        self.ep.all_to_all_counts(per_expert)
    }

    /// Row ranges of each local expert in the expert-major layout [`Self::to_experts`] returns.
    pub fn local_spans(&self, recv_rows: &[usize]) -> Vec<Range<usize>> {
        let chunks = Chunks::new(recv_rows, self.ep.size(), self.n_local());
        (0..self.n_local()).map(|le| chunks.expert_span(le)).collect()
    }

    /// Sends rows (R,C) in the local permuted layout to the ranks of their experts; returns the
    /// rows this rank's experts received, expert-major (see [`Self::local_spans`]).
    pub fn to_experts(&self, rows: &[f32], plan: &SlotPlan, recv_rows: &[usize]) -> Result<Vec<f32>> {
        let (c, l) = (self.hidden, self.n_local());
        let send_counts: Vec<usize> = plan.rows_per_expert().chunks(l).map(|ch| ch.iter().sum::<usize>() * c).collect();
        let (recv, _) = self.ep.all_to_all_v(rows, &send_counts)?;
        Ok(Chunks::new(recv_rows, self.ep.size(), l).regroup(&recv, c, true))
    }

    /// The chunks [`Self::to_experts`] moves, for an exchange on the devices
    /// (`DeviceGroup::exchange`), as `(EP rank, element range)`: `outbound`, what this rank sends
    /// each rank (ranges of its rows, laid out as `plan` lays them out), and `inbound`, where
    /// what it receives from each rank lands (ranges of the expert-major layout
    /// [`Self::local_spans`] describes). [`Self::from_experts`] moves the same chunks back:
    /// `inbound` are then its sends and `outbound` its receives.
    pub fn exchange_chunks(&self, plan: &SlotPlan, recv_rows: &[usize]) -> (Vec<PeerChunk>, Vec<PeerChunk>) {
        let (c, l) = (self.hidden, self.n_local());
        let mut at = 0;
        let outbound = plan
            .rows_per_expert()
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                at += n;
                (e / l, (at - n) * c..at * c)
            })
            .collect();
        let chunks = Chunks::new(recv_rows, self.ep.size(), l);
        let inbound = recv_rows.iter().enumerate().map(|(k, &n)| (k / l, chunks.expert_major[k] * c..(chunks.expert_major[k] + n) * c)).collect();
        (outbound, inbound)
    }

    /// The inverse of [`Self::to_experts`]: per-row results of the local experts (expert-major)
    /// go back to the ranks that sent the rows; returns (R,C) in the local permuted layout.
    pub fn from_experts(&self, outputs: &[f32], recv_rows: &[usize]) -> Result<Vec<f32>> {
        let (c, l) = (self.hidden, self.n_local());
        let back = Chunks::new(recv_rows, self.ep.size(), l).regroup(outputs, c, false);
        let return_counts: Vec<usize> = recv_rows.chunks(l).map(|ch| ch.iter().sum::<usize>() * c).collect();
        let (y, _) = self.ep.all_to_all_v(&back, &return_counts)?;
        Ok(y)
    }

    /// rows (R,C) in the local permuted layout → exchange → per-local-expert `f` → exchange back
    /// → (R,C) in the same layout. Shared by the forward (inputs) and the backward (gradients).
    fn through_experts<F>(&self, rows: &[f32], plan: &SlotPlan, recv_rows: &[usize], f: &mut F) -> Result<Vec<f32>>
    where
        F: FnMut(usize, &[f32], usize) -> Result<Vec<f32>>,
    {
        let c = self.hidden;
        let grouped = self.to_experts(rows, plan, recv_rows)?;
        let mut outputs = Vec::with_capacity(grouped.len());
        for (le, span) in self.local_spans(recv_rows).into_iter().enumerate() {
            let n = span.len();
            let out = f(le, &grouped[span.start * c..span.end * c], n)?;
            if out.len() != n * c {
                return Err(Error::config(
                    "expert output length",
                    out.len(),
                    format!("n_rows·hidden = {n}·{c} for local expert {le}"),
                ));
            }
            outputs.extend_from_slice(&out);
        }
        self.from_experts(&outputs, recv_rows)
    }
}

/// The received rows as chunks `rows[src·L + le]`, in two layouts: source-major (as the
/// all-to-all delivers them) and expert-major `[le][src]` (as the experts consume them).
struct Chunks<'r> {
    rows: &'r [usize],
    n_src: usize,
    n_local: usize,
    /// Row offset of chunk (src, le) in the source-major layout.
    src_major: Vec<usize>,
    /// Row offset of chunk (src, le) in the expert-major layout.
    expert_major: Vec<usize>,
}

impl<'r> Chunks<'r> {
    fn new(rows: &'r [usize], n_src: usize, n_local: usize) -> Self {
        let idx = |src: usize, le: usize| src * n_local + le;
        let mut src_major = vec![0; rows.len()];
        let mut acc = 0;
        for src in 0..n_src {
            for le in 0..n_local {
                src_major[idx(src, le)] = acc;
                acc += rows[idx(src, le)];
            }
        }
        let mut expert_major = vec![0; rows.len()];
        acc = 0;
        for le in 0..n_local {
            for src in 0..n_src {
                expert_major[idx(src, le)] = acc;
                acc += rows[idx(src, le)];
            }
        }
        Chunks { rows, n_src, n_local, src_major, expert_major }
    }

    /// Rows of local expert `le` in the expert-major layout.
    fn expert_span(&self, le: usize) -> Range<usize> {
        let start = self.expert_major[le];
        start..start + (0..self.n_src).map(|src| self.rows[src * self.n_local + le]).sum::<usize>()
    }

    /// Copies `buf` (rows of width `c`) from source-major to expert-major, or back.
    fn regroup(&self, buf: &[f32], c: usize, to_expert_major: bool) -> Vec<f32> {
        let mut out = vec![0f32; buf.len()];
        for (k, &n) in self.rows.iter().enumerate() {
            let (from, to) = if to_expert_major {
                (self.src_major[k], self.expert_major[k])
            } else {
                (self.expert_major[k], self.src_major[k])
            };
            out[to * c..(to + n) * c].copy_from_slice(&buf[from * c..(from + n) * c]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::routing::Choice;
    use crate::parallel::comm::{LocalGroup, SingleProcess};
    use crate::rng::Rng;

    /// Random top-k routing of `n` tokens over `e` experts with the given gate, and random probs.
    fn random_routing(rng: &mut Rng, n: usize, e: usize, k: usize, gate: Option<f32>) -> (Routing, Vec<f32>) {
        let mut choices = Vec::new();
        for t in 0..n {
            for &x in &rng.permutation(e)[..k] {
                let g = gate.unwrap_or_else(|| 0.5 + 0.5 * rng.sym());
                choices.push(Choice { token: t as u32, expert: x as u32, gate: g });
            }
        }
        let probs = (0..n * e).map(|_| 0.5 + 0.5 * rng.sym()).collect();
        (Routing::from_choices(n, e, &choices), probs)
    }

    /// Linear experts y = W_g x with W_g (C,C) per global expert g; each row is computed alone,
    /// so results do not depend on how rows are batched (this is what makes EP sizes comparable).
    struct Linear {
        c: usize,
        w: Vec<Vec<f32>>,
    }

    impl Linear {
        fn new(rng: &mut Rng, e: usize, c: usize) -> Self {
            Linear { c, w: (0..e).map(|_| (0..c * c).map(|_| rng.sym()).collect()).collect() }
        }
        /// rows (n,C) · W_gᵀ, or with `transpose`, rows · W_g (the input gradient).
        fn apply(&self, g: usize, rows: &[f32], transpose: bool) -> Vec<f32> {
            let (c, w) = (self.c, &self.w[g]);
            let mut out = vec![0f32; rows.len()];
            for (o, r) in out.chunks_mut(c).zip(rows.chunks(c)) {
                for i in 0..c {
                    o[i] = (0..c).map(|j| r[j] * if transpose { w[j * c + i] } else { w[i * c + j] }).sum();
                }
            }
            out
        }
    }

    /// One forward + backward on `comm` with linear experts; returns (out, d_x, d_gate, dW per
    /// local expert) for the loss Σ out·r.
    fn run_linear(
        comm: &dyn Communicator,
        lin: &Linear,
        mode: DispatchMode,
        x: &[f32],
        routing: &Routing,
        probs: &[f32],
        r: &[f32],
    ) -> Result<(Vec<f32>, DispatchGrads, Vec<Vec<f32>>)> {
        let c = lin.c;
        let d = TokenDispatcher::new(comm, lin.w.len(), c, mode)?;
        let base = d.local_experts().start;
        let mut inputs: Vec<Vec<f32>> = vec![Vec::new(); d.local_experts().len()];
        let (out, saved) = d.forward(x, routing, probs, |le, rows, _| {
            inputs[le] = rows.to_vec();
            Ok(lin.apply(base + le, rows, false))
        })?;
        let mut d_w = vec![vec![0f32; c * c]; inputs.len()];
        let grads = d.backward(&saved, r, |le, d_rows, _| {
            // dW_g += d_yᵀ x over the rows the forward saw, in the same order.
            for (dy, xr) in d_rows.chunks(c).zip(inputs[le].chunks(c)) {
                for i in 0..c {
                    for j in 0..c {
                        d_w[le][i * c + j] += dy[i] * xr[j];
                    }
                }
            }
            Ok(lin.apply(base + le, d_rows, true))
        })?;
        Ok((out, grads, d_w))
    }

    const DROPPY: [DispatchMode; 3] = [
        DispatchMode::Dropless,
        DispatchMode::Capacity { factor: 0.6, policy: DropPolicy::Probs },
        DispatchMode::PadToCapacity { factor: 0.6, policy: DropPolicy::Position },
    ];

    #[test]
    fn dropless_identity_round_trip_restores_the_input() {
        let mut rng = Rng::new(1);
        for (k, ep) in [(1, 1), (2, 2), (4, 4), (2, 1)] {
            let (n, e, c) = (9, 8, 3);
            let per_rank: Vec<_> = (0..ep)
                .map(|_| {
                    let x: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
                    let (routing, probs) = random_routing(&mut rng, n, e, k, Some(1.0 / k as f32));
                    (x, routing, probs)
                })
                .collect();
            let outs = LocalGroup::run(ep, |comm| {
                let (x, routing, probs) = &per_rank[comm.rank()];
                let d = TokenDispatcher::new(&comm, e, c, DispatchMode::Dropless)?;
                d.forward(x, routing, probs, |_, rows, _| Ok(rows.to_vec())).map(|(out, _)| out)
            })
            .unwrap();
            for (out, (x, ..)) in outs.into_iter().zip(&per_rank) {
                assert_eq!(&out.unwrap(), x, "k {k} ep {ep}");
            }
        }
    }

    /// Central differences of the loss Σ out·r against the analytic d_x, d_gate and dW, in every
    /// mode (with drops: dropped slots must get zero gradient).
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(2);
        let (n, e, c, k) = (5, 4, 3, 2);
        let lin = Linear::new(&mut rng, e, c);
        let x: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
        let r: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
        let (routing, probs) = random_routing(&mut rng, n, e, k, None);
        let loss = |lin: &Linear, x: &[f32], routing: &Routing, mode| -> f64 {
            let (out, ..) = run_linear(&SingleProcess, lin, mode, x, routing, &probs, &r).unwrap();
            out.iter().zip(&r).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
        };
        let h = 1e-2f32;
        let close = |num: f64, ana: f32, what: &str| {
            assert!((num - ana as f64).abs() < 2e-3 * (1.0 + num.abs()), "{what}: numeric {num} analytic {ana}");
        };
        for mode in DROPPY {
            let (_, grads, d_w) = run_linear(&SingleProcess, &lin, mode, &x, &routing, &probs, &r).unwrap();
            for i in 0..x.len() {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let num = (loss(&lin, &xp, &routing, mode) - loss(&lin, &xm, &routing, mode)) / (2.0 * h as f64);
                close(num, grads.d_x[i], &format!("{mode:?} d_x[{i}]"));
            }
            for s in 0..routing.n_slots() {
                let (mut rp, mut rm) = (routing.clone(), routing.clone());
                rp.gate[s] += h;
                rm.gate[s] -= h;
                let num = (loss(&lin, &x, &rp, mode) - loss(&lin, &x, &rm, mode)) / (2.0 * h as f64);
                close(num, grads.d_gate[s], &format!("{mode:?} d_gate[{s}]"));
            }
            for (g, d_w_g) in d_w.iter().enumerate() {
                for (i, &ana) in d_w_g.iter().enumerate() {
                    let (mut lp, mut lm) = (Linear { c, w: lin.w.clone() }, Linear { c, w: lin.w.clone() });
                    lp.w[g][i] += h;
                    lm.w[g][i] -= h;
                    let num = (loss(&lp, &x, &routing, mode) - loss(&lm, &x, &routing, mode)) / (2.0 * h as f64);
                    close(num, ana, &format!("{mode:?} dW[{g}][{i}]"));
                }
            }
        }
        // The capacity modes above really dropped something, so the zero gradients were tested.
        let plan = plan_slots(&routing, &probs, DROPPY[1]).unwrap();
        assert!(plan.n_rows() < routing.n_slots());
    }

    /// Six tokens, top-1, two experts: expert 0 gets tokens 0..5, expert 1 gets token 5.
    /// cap = ceil(6/2 · 1.0) = 3. Expert 0's probs: t0 .9, t1 .2, t2 .9, t3 .9, t4 .95.
    #[test]
    fn capacity_keeps_the_right_tokens_per_policy() {
        let choices: Vec<Choice> =
            (0..6).map(|t| Choice { token: t, expert: if t < 5 { 0 } else { 1 }, gate: 1.0 }).collect();
        let routing = Routing::from_choices(6, 2, &choices);
        let p0 = [0.9, 0.2, 0.9, 0.9, 0.95, 0.1];
        let probs: Vec<f32> = p0.iter().flat_map(|&p| [p, 1.0 - p]).collect();
        let kept_tokens = |policy| {
            let plan = plan_slots(&routing, &probs, DispatchMode::Capacity { factor: 1.0, policy }).unwrap();
            assert_eq!(plan.capacity, Some(3));
            plan.source.iter().map(|s| routing.token[s.unwrap()]).collect::<Vec<_>>()
        };
        // Probs: 0.95 (t4), then the .9 tie resolved to the lower tokens t0, t2; t3 is dropped.
        assert_eq!(kept_tokens(DropPolicy::Probs), vec![0, 2, 4, 5]);
        assert_eq!(kept_tokens(DropPolicy::Position), vec![0, 1, 2, 5]);

        // Dropped tokens contribute zero; kept ones pass through the identity expert.
        let x: Vec<f32> = (0..6).map(|t| t as f32 + 1.0).collect();
        let mode = DispatchMode::Capacity { factor: 1.0, policy: DropPolicy::Probs };
        let d = TokenDispatcher::new(&SingleProcess, 2, 1, mode).unwrap();
        let (out, _) = d.forward(&x, &routing, &probs, |_, rows, _| Ok(rows.to_vec())).unwrap();
        assert_eq!(out, vec![1.0, 0.0, 3.0, 0.0, 5.0, 6.0]);
    }

    /// The training path's split: the kept slots are the plan's, the dropped ones the rest, both
    /// laid out as routings (expert-major, ascending tokens, gates carried along).
    #[test]
    fn apply_capacity_splits_the_routing_as_the_plan_does() {
        let mut rng = Rng::new(8);
        let (n, e) = (30, 4);
        let (routing, probs) = random_routing(&mut rng, n, e, 2, None);
        for policy in [DropPolicy::Probs, DropPolicy::Position] {
            let mode = DispatchMode::Capacity { factor: 0.75, policy };
            let plan = plan_slots(&routing, &probs, mode).unwrap();
            let capped = apply_capacity(routing.clone(), &probs, mode).unwrap();
            let kept: Vec<usize> = plan.source.iter().map(|s| s.unwrap()).collect();
            assert!(!capped.dropped.token.is_empty(), "{policy:?}: nothing dropped");
            assert_eq!(capped.kept.counts(), plan.rows_per_expert(), "{policy:?}");
            assert_eq!(capped.kept.token, kept.iter().map(|&s| routing.token[s]).collect::<Vec<_>>());
            assert_eq!(capped.kept.gate, kept.iter().map(|&s| routing.gate[s]).collect::<Vec<_>>());
            let dropped: Vec<usize> = (0..routing.n_slots()).filter(|s| !kept.contains(s)).collect();
            assert_eq!(capped.dropped.token, dropped.iter().map(|&s| routing.token[s]).collect::<Vec<_>>());
            assert_eq!(capped.dropped.gate, dropped.iter().map(|&s| routing.gate[s]).collect::<Vec<_>>());
            assert_eq!(capped.chosen_counts(), routing.counts());
        }
        let all = apply_capacity(routing.clone(), &[], DispatchMode::Dropless).unwrap();
        assert_eq!((all.kept, all.dropped.n_slots()), (routing.clone(), 0));
        let e = apply_capacity(routing, &probs, DispatchMode::PadToCapacity { factor: 1.0, policy: DropPolicy::Probs }).unwrap_err();
        assert!(e.to_string().contains("pad to capacity"), "{e}");
    }

    #[test]
    fn random_capacity_plans_respect_cap_and_policy() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let (n, e) = (1 + rng.below(20), rng.pick(&[2, 4, 8]));
            let k = 1 + rng.below(e.min(3));
            let (routing, probs) = random_routing(&mut rng, n, e, k, None);
            let factor = rng.pick(&[0.25, 0.5, 1.0, 1.25, 2.0]);
            let policy = rng.pick(&[DropPolicy::Probs, DropPolicy::Position]);
            let cap = expert_capacity(routing.n_slots(), e, factor);
            assert_eq!(cap, ((n * k) as f64 / e as f64 * factor).ceil() as usize);
            let plan = plan_slots(&routing, &probs, DispatchMode::Capacity { factor, policy }).unwrap();
            let padded = plan_slots(&routing, &probs, DispatchMode::PadToCapacity { factor, policy }).unwrap();
            for x in 0..e {
                let kept: Vec<usize> = plan.source[plan.offsets[x]..plan.offsets[x + 1]].iter().map(|s| s.unwrap()).collect();
                let all: Vec<usize> = routing.slots_of(x).collect();
                assert_eq!(kept.len(), all.len().min(cap));
                assert!(kept.windows(2).all(|w| w[0] < w[1]));
                let p = |s: usize| probs[routing.token[s] as usize * e + x];
                match policy {
                    DropPolicy::Position => assert_eq!(kept, all[..kept.len()]),
                    DropPolicy::Probs => {
                        for &d in all.iter().filter(|s| !kept.contains(s)) {
                            assert!(kept.iter().all(|&s| p(s) > p(d) || (p(s) == p(d) && s < d)));
                        }
                    }
                }
                // Pad mode: the same kept slots, then padding to exactly cap rows.
                let prow = &padded.source[padded.offsets[x]..padded.offsets[x + 1]];
                assert_eq!(prow.len(), cap);
                assert!(prow[kept.len()..].iter().all(Option::is_none));
                assert!(prow[..kept.len()].iter().map(|s| s.unwrap()).eq(kept.iter().copied()));
            }
        }
    }

    #[test]
    fn padded_mode_matches_capacity_mode() {
        let mut rng = Rng::new(4);
        let (n, e, c, k) = (11, 4, 3, 2);
        let lin = Linear::new(&mut rng, e, c);
        let x: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
        let r: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
        let (routing, probs) = random_routing(&mut rng, n, e, k, None);
        for policy in [DropPolicy::Probs, DropPolicy::Position] {
            let cap = run_linear(&SingleProcess, &lin, DispatchMode::Capacity { factor: 0.8, policy }, &x, &routing, &probs, &r);
            let pad =
                run_linear(&SingleProcess, &lin, DispatchMode::PadToCapacity { factor: 0.8, policy }, &x, &routing, &probs, &r);
            assert_eq!(cap.unwrap(), pad.unwrap());
        }
        // And every expert saw exactly cap rows.
        let d = TokenDispatcher::new(&SingleProcess, e, c, DispatchMode::PadToCapacity { factor: 0.8, policy: DropPolicy::Probs })
            .unwrap();
        let want = expert_capacity(n * k, e, 0.8);
        let mut seen = Vec::new();
        d.forward(&x, &routing, &probs, |_, rows, m| {
            seen.push(m);
            Ok(rows.to_vec())
        })
        .unwrap();
        assert_eq!(seen, vec![want; e]);
    }

    /// Four ranks with their own tokens; EP = 2 (two groups) and EP = 4 must reproduce, bit for
    /// bit, what each rank computes alone with all experts (EP = 1), forward and backward.
    #[test]
    fn expert_parallel_matches_single_rank() {
        let mut rng = Rng::new(5);
        let (n, e, c, k) = (7, 8, 4, 2);
        let lin = Linear::new(&mut rng, e, c);
        let data: Vec<_> = (0..4)
            .map(|_| {
                let x: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
                let r: Vec<f32> = (0..n * c).map(|_| rng.sym()).collect();
                let (routing, probs) = random_routing(&mut rng, n, e, k, None);
                (x, r, routing, probs)
            })
            .collect();
        for mode in DROPPY {
            let single: Vec<_> = data
                .iter()
                .map(|(x, r, routing, probs)| {
                    let (out, grads, _) = run_linear(&SingleProcess, &lin, mode, x, routing, probs, r).unwrap();
                    (out, grads)
                })
                .collect();
            for groups in [vec![vec![0, 1], vec![2, 3]], vec![vec![0, 1, 2, 3]]] {
                let got = LocalGroup::run(4, |world| -> Result<_> {
                    let ep = world.split(&groups)?;
                    let (x, r, routing, probs) = &data[world.rank()];
                    let (out, grads, _) = run_linear(ep.as_ref(), &lin, mode, x, routing, probs, r)?;
                    Ok((out, grads))
                })
                .unwrap();
                for (rank, (g, s)) in got.into_iter().zip(&single).enumerate() {
                    assert_eq!(&g.unwrap(), s, "{mode:?} EP groups {groups:?} rank {rank}");
                }
            }
        }
    }

    /// The chunks of `exchange_chunks`, moved as a device exchange moves them (the k-th chunk a
    /// rank sends a peer is the k-th that peer receives from it), give what `to_experts` gives,
    /// and moved back what `from_experts` gives.
    #[test]
    fn exchange_chunks_move_what_the_host_exchange_moves() {
        let (e, c, n, ranks) = (8, 3, 40, 4);
        let per_rank = LocalGroup::run(ranks, |comm| {
            let mut rng = Rng::new(10 + comm.rank() as u64);
            let (routing, _) = random_routing(&mut rng, n, e, 2, None);
            let d = TokenDispatcher::new(&comm, e, c, DispatchMode::Dropless)?;
            let plan = plan_slots(&routing, &[], DispatchMode::Dropless)?;
            let recv = d.receive_counts(&plan)?;
            let rows: Vec<f32> = (0..plan.n_rows() * c).map(|_| rng.sym()).collect();
            let grouped = d.to_experts(&rows, &plan, &recv)?;
            let outputs: Vec<f32> = (0..grouped.len()).map(|_| rng.sym()).collect();
            let back = d.from_experts(&outputs, &recv)?;
            let (outbound, inbound) = d.exchange_chunks(&plan, &recv);
            Ok((rows, grouped, outputs, back, outbound, inbound))
        })
        .unwrap();
        let per_rank: Vec<_> = per_rank.into_iter().map(Result::unwrap).collect();
        // Moves `sends[r]` of every rank r's `src[r]` into `recvs` of the receivers' buffers.
        fn exchange(src: &[&[f32]], sends: &[&[PeerChunk]], recvs: &[&[PeerChunk]], lens: &[usize]) -> Vec<Vec<f32>> {
            (0..src.len())
                .map(|me| {
                    let mut dst = vec![f32::NAN; lens[me]];
                    for peer in 0..src.len() {
                        let sent: Vec<&Range<usize>> = sends[peer].iter().filter(|(to, _)| *to == me).map(|(_, r)| r).collect();
                        let got: Vec<&Range<usize>> = recvs[me].iter().filter(|(from, _)| *from == peer).map(|(_, r)| r).collect();
                        assert_eq!(sent.len(), got.len(), "{peer} → {me}: chunks");
                        for (s, r) in sent.into_iter().zip(got) {
                            assert_eq!(s.len(), r.len(), "{peer} → {me}: a chunk's length");
                            dst[r.clone()].copy_from_slice(&src[peer][s.clone()]);
                        }
                    }
                    dst
                })
                .collect()
        }
        let rows: Vec<&[f32]> = per_rank.iter().map(|p| &p.0[..]).collect();
        let outputs: Vec<&[f32]> = per_rank.iter().map(|p| &p.2[..]).collect();
        let outbound: Vec<&[PeerChunk]> = per_rank.iter().map(|p| &p.4[..]).collect();
        let inbound: Vec<&[PeerChunk]> = per_rank.iter().map(|p| &p.5[..]).collect();
        let there = exchange(&rows, &outbound, &inbound, &per_rank.iter().map(|p| p.1.len()).collect::<Vec<_>>());
        let back = exchange(&outputs, &inbound, &outbound, &per_rank.iter().map(|p| p.3.len()).collect::<Vec<_>>());
        for r in 0..ranks {
            assert_eq!(there[r], per_rank[r].1, "rank {r}: to the experts");
            assert_eq!(back[r], per_rank[r].3, "rank {r}: back from the experts");
        }
    }

    #[test]
    fn aux_counts_are_before_dropping_and_summed_over_the_group() {
        let mut rng = Rng::new(6);
        let routings: Vec<_> = (0..2).map(|_| random_routing(&mut rng, 6, 4, 2, None).0).collect();
        let got = LocalGroup::run(2, |comm| tokens_per_expert(&routings[comm.rank()], &comm)).unwrap();
        let want: Vec<f32> = (0..4).map(|x| (routings[0].counts()[x] + routings[1].counts()[x]) as f32).collect();
        for g in got {
            assert_eq!(g.unwrap(), want);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = Rng::new(7);
        let (routing, probs) = random_routing(&mut rng, 4, 4, 2, None);
        let ok = |_: usize, rows: &[f32], _: usize| Ok(rows.to_vec());
        let err = |r: Result<Vec<f32>>| r.unwrap_err().to_string();
        let drop = DispatchMode::Capacity { factor: 1.0, policy: DropPolicy::Probs };
        let fwd = |mode, x: &[f32], routing: &Routing, probs: &[f32]| {
            TokenDispatcher::new(&SingleProcess, 4, 2, mode)?.forward(x, routing, probs, ok).map(|(o, _)| o)
        };
        let x = vec![0f32; 8];
        assert!(err(fwd(drop, &x[..7], &routing, &probs)).contains("x.len()"));
        assert!(err(fwd(drop, &x, &routing, &probs[..15])).contains("probs.len()"));
        let mut bad = routing.clone();
        bad.token[0] = 9;
        assert!(err(fwd(drop, &x, &bad, &probs)).contains("routing.token"));
        let e = TokenDispatcher::new(&SingleProcess, 4, 2, DispatchMode::Capacity { factor: f64::NAN, policy: DropPolicy::Probs });
        assert!(e.err().unwrap().to_string().contains("capacity_factor"));
        let e = LocalGroup::run(3, |comm| TokenDispatcher::new(&comm, 4, 2, DispatchMode::Dropless).err().map(|e| e.to_string()));
        assert!(e.unwrap().iter().all(|m| m.as_ref().unwrap().contains("n_experts")));
        let d = TokenDispatcher::new(&SingleProcess, 4, 2, DispatchMode::Dropless).unwrap();
        let e = d.forward(&x, &routing, &probs, |_, _, _| Ok(vec![0.0; 1])).err().unwrap().to_string();
        assert!(e.contains("expert output length"), "{e}");
    }
}
