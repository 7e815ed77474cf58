//! One decoder block: pre-norm causal attention, then a pre-norm heterogeneous MoE FFN.
//! Forward and backward side by side; every tensor the backward reads is saved through the
//! activation store under a name declared in [`INVENTORY`].
//!
//! Shapes: N tokens, C = d_model, W = (H + 2·Hkv)·D (fused qkv), A = H·D, E experts,
//! S routed slots, h_e the width of expert e.

use std::ops::Range;

use super::config::{ModelConfig, MoeConfig};
use super::grads::Grads;
use super::params::BlockParams;
use super::router::{self, AuxLosses};
use super::routing::{Capped, Routing};
use crate::backend::{AttnShape, Backend, DeviceGroup, Gemm, Pick, Precision, SwiGluBwdGemm, SwiGluGemm, TokenSlots};
use crate::config::GateUp;
use crate::memory::arena::Arena;
use crate::memory::plan::Phase;
use crate::memory::store::{ActivationStore, Class, ExchangedRows, Extent, TensorSpec, Width};
use crate::memory::transients::{block_phases, bwd, expert_act_elements, fwd, BackendTransients};
use crate::parallel::comm::Communicator;
use crate::parallel::dispatch::{apply_capacity, expert_shard, plan_slots, DispatchMode, DropPolicy, SlotPlan, TokenDispatcher};
use crate::Result;

/// The skeletal activations of a block: what its backward reads.
pub const INVENTORY: &[TensorSpec] = &[
    TensorSpec { name: "input", extent: Extent::PerToken(Width::Model), class: Class::Whole, precision: Precision::Activation },
    TensorSpec { name: "attn_out", extent: Extent::PerToken(Width::AttnOut), class: Class::Whole, precision: Precision::Activation },
    TensorSpec { name: "attn_lse", extent: Extent::PerHeadToken, class: Class::Whole, precision: Precision::F32 },
    TensorSpec { name: "attn_norm_out", extent: Extent::PerToken(Width::Model), class: Class::TokenSplit, precision: Precision::Activation },
    TensorSpec { name: "attn_norm_rstd", extent: Extent::PerToken(Width::One), class: Class::TokenSplit, precision: Precision::F32 },
    TensorSpec { name: "qkv", extent: Extent::PerToken(Width::Qkv), class: Class::TokenSplit, precision: Precision::Activation },
    TensorSpec { name: "resid_mid", extent: Extent::PerToken(Width::Model), class: Class::TokenSplit, precision: Precision::Activation },
    TensorSpec { name: "ffn_norm_out", extent: Extent::PerToken(Width::Model), class: Class::TokenSplit, precision: Precision::Activation },
    TensorSpec { name: "ffn_norm_rstd", extent: Extent::PerToken(Width::One), class: Class::TokenSplit, precision: Precision::F32 },
    TensorSpec { name: "router_logits", extent: Extent::PerToken(Width::Experts), class: Class::TokenSplit, precision: Precision::F32 },
    TensorSpec { name: "router_probs", extent: Extent::PerToken(Width::Experts), class: Class::TokenSplit, precision: Precision::F32 },
    TensorSpec { name: "expert_out", extent: Extent::PerSlot(Width::Model), class: Class::TokenSplit, precision: Precision::Activation },
    // Last, so that the inventory without it is a prefix (`inventory`).
    TensorSpec { name: GATE_UP, extent: Extent::PerSlotExpertWidth(2), class: Class::TokenSplit, precision: Precision::Activation },
];

/// The experts' gate/up product's name: saved, or recomputed by the backward (`memory.gate_up`).
pub const GATE_UP: &str = "expert_gate_up";

/// The inventory of a block whose gate/up product is saved or recomputed (`memory.gate_up`).
pub fn inventory(gate_up: GateUp) -> &'static [TensorSpec] {
    match gate_up {
        GateUp::Save => INVENTORY,
        GateUp::Recompute => &INVENTORY[..INVENTORY.len() - 1],
    }
}

/// Everything a block needs besides its parameters.
pub struct BlockCtx<'a, B: Backend> {
    pub be: &'a B,
    pub model: &'a ModelConfig,
    pub moe: &'a MoeConfig,
    pub shape: AttnShape,
    pub params: &'a B::Buf,
    pub rope: &'a B::Buf,
    /// The expert-parallel group when experts are sharded over ranks (`params` then holds this
    /// rank's experts only, see `ParamLayout::sharded`); `None` when every expert is local.
    pub ep: Option<&'a dyn Communicator>,
    /// The same group on the devices, where it opened there: the dispatcher's rows move without
    /// the host.
    pub ep_device: Option<&'a dyn DeviceGroup<B>>,
    /// Most routed rows the experts run on at once (see `transients::EXPERT_CHUNK_ROWS`).
    pub chunk_rows: usize,
    /// Dropless, or each expert's capacity on this rank's tokens (`moe.capacity_factor`).
    pub dispatch: DispatchMode,
}

/// What one block's forward reports.
#[derive(Clone, Debug, Default)]
pub struct BlockStats {
    /// Tokens each expert ran.
    pub counts: Vec<usize>,
    /// Chosen slots past their expert's capacity.
    pub dropped: usize,
    pub aux: AuxLosses,
    /// Weighted aux loss that entered the training loss.
    pub aux_weighted: f32,
    /// Mean expert parameters activated per token.
    pub expert_params_per_token: f64,
}

/// Rows `from..n` of a row-major buffer of `width`-element rows.
fn tail<B: Backend>(buf: &B::Buf, from: usize, n: usize, width: usize) -> B::View<'_> {
    B::view(buf, from * width..n * width)
}

fn tail_mut<B: Backend>(buf: &mut B::Buf, from: usize, n: usize, width: usize) -> B::ViewMut<'_> {
    B::view_mut(buf, from * width..n * width)
}

/// One expert's share of a grouped expert call: `rows` rows of expert `ex`, read from row
/// `x_row` on of the routed-row buffers (`xe`, `dy`, `dxe`), written from row `y_row` on of the
/// output rows, with its blocks at element `gu` of the concatenated `(rows, 2h)` gate/up
/// buffers and at element `act` of the concatenated `(rows, h)` ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    ex: usize,
    rows: usize,
    x_row: usize,
    y_row: usize,
    gu: usize,
    act: usize,
}

/// Experts `first..` with `counts[i]` rows each, laid out one after another in every buffer
/// (rows in expert-major slot order); experts without rows are left out. Also returns the
/// elements of the concatenated gate/up buffer.
fn segments(first: usize, counts: &[usize], widths: &[usize]) -> (Vec<Segment>, usize) {
    let (mut segs, mut row, mut gu, mut act) = (Vec::new(), 0, 0, 0);
    for (i, &rows) in counts.iter().enumerate() {
        let h = widths[first + i];
        if rows > 0 {
            segs.push(Segment { ex: first + i, rows, x_row: row, y_row: row, gu, act });
        }
        (row, gu, act) = (row + rows, gu + rows * 2 * h, act + rows * h);
    }
    (segs, gu)
}

/// `segs` cut into chunks of at most `max_rows` rows in row order (an expert may straddle two),
/// their `act` offsets restarting in every chunk: the chunked expert passes of
/// `transients::EXPERT_CHUNK_ROWS`.
fn chunked(segs: &[Segment], max_rows: usize, widths: &[usize]) -> Vec<Vec<Segment>> {
    let mut chunks: Vec<Vec<Segment>> = Vec::new();
    let (mut rows_in, mut act) = (max_rows, 0);
    for s in segs {
        let h = widths[s.ex];
        let mut done = 0;
        while done < s.rows {
            if rows_in == max_rows {
                chunks.push(Vec::new());
                (rows_in, act) = (0, 0);
            }
            let rows = (s.rows - done).min(max_rows - rows_in);
            let part = Segment { ex: s.ex, rows, x_row: s.x_row + done, y_row: s.y_row + done, gu: s.gu + done * 2 * h, act };
            chunks.last_mut().expect("pushed above").push(part);
            (done, rows_in, act) = (done + rows, rows_in + rows, act + rows * h);
        }
    }
    chunks
}

/// `chunk` with its gate/up blocks in a buffer of the chunk's own (laid out like `act` with rows
/// twice as wide) instead of the layer's saved one: where the gate/up product is a transient.
fn chunk_local_gate_up(chunk: &[Segment]) -> Vec<Segment> {
    chunk.iter().map(|s| Segment { gu: 2 * s.act, ..*s }).collect()
}

/// The gate/up rows' layout on the experts' rank (`memory::store::ExchangedRows`): chunks
/// `[local expert][source]` of `recv[src·L + le]` rows, `kept[src·L + le]` of them below the split.
fn exchanged_rows(recv: &[usize], kept: &[usize], local: Range<usize>, widths: &[usize]) -> ExchangedRows {
    let l = local.len();
    local.enumerate().flat_map(|(le, ex)| (0..recv.len() / l).map(move |src| (src * l + le, 2 * widths[ex]))).map(|(k, width)| (recv[k], kept[k], width)).collect()
}

/// The rows the expert-parallel exchange moves: every slot the experts run (the capacity, if
/// any, has already dropped the others).
fn dropless_plan(routing: &Routing) -> Result<SlotPlan> {
    plan_slots(routing, &[], DispatchMode::Dropless)
}

impl<B: Backend> BlockCtx<'_, B> {
    /// The experts of one chunk `segs` on their routed rows `xe` (`x`, or the rows its [`Pick`]
    /// picks from it, gathered by the call): `gu = xe W_guᵀ` (saved, or the chunk's) and
    /// `act = SwiGLU(gu)` (the chunk's transient) in one grouped call over the experts. The
    /// forward's, the recompute of dropped slots' and, where gu is not saved, the backward's.
    fn experts_up(&self, p: &BlockParams, segs: &[Segment], x: (B::View<'_>, Option<Pick<'_>>), gu: B::ViewMut<'_>, act: B::ViewMut<'_>) {
        let (c, widths) = (self.c(), &self.moe.expert_widths);
        let up: Vec<SwiGluGemm> = segs
            .iter()
            .map(|s| SwiGluGemm { gemm: Gemm { m: s.rows, k: c, n: 2 * widths[s.ex], out: s.gu, a: s.x_row * c, b: self.expert_params(p, s.ex).0 }, act: s.act })
            .collect();
        self.be.grouped_matmul_swiglu(gu, act, x, B::full(self.params), &up);
    }

    /// [`Self::experts_up`], then `y = act W_downᵀ` (one grouped call). Shared by the forward
    /// and the recompute of dropped slots.
    fn experts_forward(&self, p: &BlockParams, segs: &[Segment], x: (B::View<'_>, Option<Pick<'_>>), gu: B::ViewMut<'_>, mut act: B::ViewMut<'_>, y: B::ViewMut<'_>) {
        let (c, widths) = (self.c(), &self.moe.expert_widths);
        self.experts_up(p, segs, x, gu, B::reborrow_mut(&mut act));
        let down: Vec<Gemm> = segs.iter().map(|s| Gemm { m: s.rows, k: widths[s.ex], n: c, out: s.y_row * c, a: s.act, b: self.expert_params(p, s.ex).1 }).collect();
        self.be.grouped_matmul(y, B::as_view(&act), B::full(self.params), &down, false, true, false);
    }

    /// Backward of [`Self::experts_forward`] on one chunk: `dact = dy W_down` and SwiGLU's
    /// backward in one call, which also recomputes SwiGLU's output from the saved `gu` (for the
    /// down projection's weight gradient); then the chunk's rows of the input gradient `dxe` and
    /// the experts' weight gradients (adding where an earlier chunk wrote them), the gate/up
    /// one from the routed rows `xe`. `dy` and `xe` are each a view, or the rows a [`Pick`]
    /// picks from it (read in place by the calls that take them). `[act, dact, dgu]` are its
    /// transients, `act` and `dact` laid out as `segs` says and `dgu` likewise with rows twice
    /// as wide (`dact` only the unfused path writes). Every projection is one grouped call.
    #[allow(clippy::too_many_arguments)]
    fn experts_backward(&self, p: &BlockParams, segs: &[Segment], gu: B::View<'_>, dy: (B::View<'_>, Option<Pick<'_>>), xe: (B::View<'_>, Option<Pick<'_>>), dxe: B::ViewMut<'_>, grads: &mut Grads<'_, B>, [mut act, mut dact, mut dgu]: [B::ViewMut<'_>; 3]) {
        let (be, c, params) = (self.be, self.c(), B::full(self.params));
        let widths = &self.moe.expert_widths;
        let (rw, ro) = (B::reborrow_mut, B::as_view);
        let h = |s: &Segment| widths[s.ex];
        let w_down = |s: &Segment| self.expert_params(p, s.ex).1;
        let w_gu = |s: &Segment| self.expert_params(p, s.ex).0;
        // dact and act share a layout; dgu is laid out like them with rows twice as wide.
        let through_swiglu: Vec<SwiGluBwdGemm> =
            segs.iter().map(|s| SwiGluBwdGemm { gemm: Gemm { m: s.rows, k: c, n: h(s), out: s.act, a: s.x_row * c, b: w_down(s) }, gu: s.gu, dgu: 2 * s.act, act: s.act }).collect();
        be.grouped_matmul_swiglu_bwd(rw(&mut dgu), rw(&mut act), rw(&mut dact), dy, params, gu, &through_swiglu);
        let dw_down: Vec<Gemm> = segs.iter().map(|s| Gemm { m: c, k: s.rows, n: h(s), out: w_down(s), a: s.x_row * c, b: s.act }).collect();
        grads.grouped_weight_grad(be, dy, (ro(&act), None), &dw_down);
        let dx_of: Vec<Gemm> = segs.iter().map(|s| Gemm { m: s.rows, k: 2 * h(s), n: c, out: s.x_row * c, a: 2 * s.act, b: w_gu(s) }).collect();
        be.grouped_matmul(dxe, ro(&dgu), params, &dx_of, false, false, false);
        let dw_gu: Vec<Gemm> = segs.iter().map(|s| Gemm { m: 2 * h(s), k: s.rows, n: c, out: w_gu(s), a: 2 * s.act, b: s.x_row * c }).collect();
        grads.grouped_weight_grad(be, (ro(&dgu), None), xe, &dw_gu);
    }

    /// The block's `(forward, backward)` transient requests under `routing`, the gate/up
    /// product saved or not.
    fn phases(&self, routing: &Routing, gate_up: GateUp) -> (Phase, Phase) {
        let (s, be) = (self.shape, self.be);
        let backend = BackendTransients { act_bytes: be.activation_bytes(), fused_gather: self.fused_gather(), attention_scratch: 4 * be.attention_bwd_scratch_len(s) as u64 };
        block_phases(self.model, self.moe, s.batch, s.seq, &routing.counts(), self.chunk_rows, gate_up, backend)
    }

    /// Whether the experts read their routed rows through the slots' token index (the gathers
    /// into xe and dy fused into their operand loads, where the backend can and the rows stay on
    /// this rank), so that no gathered copy is made; their kernels then keep dact on the chip.
    fn fused_gather(&self) -> bool {
        self.be.fuses_expert_gather(self.c(), &self.moe.expert_widths) && self.ep.is_none()
    }

    /// Elements of a gathered copy of `rows` routed rows (`xe`, `dy`): none where the experts
    /// read the rows in place.
    fn gathered_len(&self, rows: usize) -> usize {
        if self.fused_gather() { 0 } else { rows * self.c() }
    }

    /// The experts' operand of routed rows: `x`'s rows picked through the slots' `tokens` (each
    /// times its gate where `gates` are given) where the experts read them in place
    /// ([`Self::fused_gather`]), else `gathered`, the copy made of them.
    fn routed<'a>(&self, x: B::View<'a>, tokens: &'a [u32], gates: Option<&'a [f32]>, gathered: B::View<'a>) -> (B::View<'a>, Option<Pick<'a>>) {
        if self.fused_gather() { (x, Some(Pick { rows: tokens, scale: gates })) } else { (gathered, None) }
    }

    /// `routing` under the dispatch mode: the slots past each expert's capacity (on this rank's
    /// tokens) dropped, ranked by the router probabilities `probs` (read back for it) under the
    /// `probs` policy.
    fn cap(&self, routing: Routing, probs: &B::Buf) -> Result<Capped> {
        let probs = match self.dispatch {
            DispatchMode::Capacity { policy: DropPolicy::Probs, .. } => self.be.download(B::full(probs)),
            _ => Vec::new(),
        };
        apply_capacity(routing, &probs, self.dispatch)
    }

    /// The dispatcher over the expert-parallel group, if experts are sharded.
    fn dispatcher(&self) -> Result<Option<TokenDispatcher<'_>>> {
        self.ep.map(|ep| TokenDispatcher::new(ep, self.moe.n_experts(), self.c(), DispatchMode::Dropless)).transpose()
    }

    /// The first expert whose parameters `params` holds.
    fn first_local_expert(&self) -> usize {
        self.ep.map_or(0, |ep| expert_shard(self.moe.n_experts(), ep.size(), ep.rank()).start)
    }

    /// Expert `ex`'s (gate_up, down) parameter offsets.
    fn expert_params(&self, p: &BlockParams, ex: usize) -> (usize, usize) {
        p.experts[ex - self.first_local_expert()]
    }

    /// Rows laid out as `plan` lays them out, sent to their experts' ranks: what this rank's
    /// experts received, expert-major (`TokenDispatcher::to_experts`). On the devices where
    /// the EP group opened there, else through host memory.
    fn send_to_experts(&self, d: &TokenDispatcher, rows: B::View<'_>, plan: &SlotPlan, recv: &[usize]) -> Result<B::Buf> {
        let be = self.be;
        if let Some(group) = self.ep_device {
            let (outbound, inbound) = d.exchange_chunks(plan, recv);
            let mut got = be.alloc_scratch(recv.iter().sum::<usize>() * self.c(), Precision::Activation);
            group.exchange(rows, &outbound, B::full_mut(&mut got), &inbound)?;
            return Ok(got);
        }
        let values = d.to_experts(&be.download(rows), plan, recv)?;
        let mut got = be.alloc_scratch(values.len(), Precision::Activation);
        be.upload(B::full_mut(&mut got), &values);
        Ok(got)
    }

    /// The inverse of [`Self::send_to_experts`]: the experts' per-row results back to the ranks
    /// that sent the rows, into `out` (laid out as `plan` lays them out).
    fn return_from_experts(&self, d: &TokenDispatcher, outputs: B::View<'_>, plan: &SlotPlan, recv: &[usize], out: B::ViewMut<'_>) -> Result<()> {
        match self.ep_device {
            Some(group) => {
                let (outbound, inbound) = d.exchange_chunks(plan, recv);
                group.exchange(outputs, &inbound, out, &outbound)
            }
            None => {
                self.be.upload(out, &d.from_experts(&self.be.download(outputs), recv)?);
                Ok(())
            }
        }
    }

    fn n(&self) -> usize {
        self.shape.tokens()
    }
    fn c(&self) -> usize {
        self.model.d_model
    }
    fn w(&self, offset: usize, len: usize) -> B::View<'_> {
        B::view(self.params, offset..offset + len)
    }

    /// Forward of one block: `out = x2 + MoE(norm(x2))`, `x2 = x + Attn(norm(x))`.
    /// Saves the inventory into `store` under `layer` when given (training); transients come
    /// from `tx`. With expert parallelism it is a collective over the EP group (rows are
    /// exchanged; the exchanged rows and the local experts' transients are allocated per op).
    pub fn forward(&self, p: &BlockParams, x: B::Buf, out: &mut B::Buf, store: Option<(&mut ActivationStore<B>, usize)>, tx: &mut Arena<B>) -> Result<BlockStats> {
        let (be, s, n, c) = (self.be, self.shape, self.n(), self.c());
        let (wq, a, e) = (s.qkv_width(), s.out_width(), self.moe.n_experts());
        let eps = self.model.norm_eps;

        // Attention: xn1 = norm(x); qkv = rope(xn1 Wqkvᵀ); att = attn(qkv); x2 = x + att Woᵀ.
        // Every tensor of the forward is written whole by its first op: no zeroing.
        let scratch = |len| be.alloc_scratch(len, Precision::Activation);
        let stat = |len| be.alloc_scratch(len, Precision::F32);
        let mut xn1 = scratch(n * c);
        let mut rstd1 = stat(n);
        be.rmsnorm_fwd(B::full_mut(&mut xn1), B::full_mut(&mut rstd1), B::full(&x), self.w(p.attn_norm, c), n, c, eps);
        let mut qkv = scratch(n * wq);
        be.matmul(B::full_mut(&mut qkv), B::full(&xn1), self.w(p.wqkv, wq * c), n, c, wq, false, true, false);
        be.rope(B::full_mut(&mut qkv), B::full(self.rope), s, 0, false);
        let mut att = scratch(n * a);
        let mut lse = stat(s.batch * s.n_heads * s.seq);
        be.attention_fwd(B::full_mut(&mut att), B::full_mut(&mut lse), B::full(&qkv), s);
        let mut x2 = scratch(n * c);
        be.matmul_residual(B::full_mut(&mut x2), B::full(&x), B::full(&att), self.w(p.wo, c * a), n, a, c, true);

        // MoE: xn2 = norm(x2); P = softmax(xn2 Wrᵀ); route; experts; out = x2 + Σ gate · expert.
        let mut xn2 = scratch(n * c);
        let mut rstd2 = stat(n);
        be.rmsnorm_fwd(B::full_mut(&mut xn2), B::full_mut(&mut rstd2), B::full(&x2), self.w(p.ffn_norm, c), n, c, eps);
        let mut logits = stat(n * e);
        be.matmul(B::full_mut(&mut logits), B::full(&xn2), self.w(p.router, e * c), n, c, e, false, true, false);
        let mut probs = stat(n * e);
        be.softmax_rows(B::full_mut(&mut probs), B::full(&logits), n, e);
        let (chosen, aux) = router::route(be, B::full(&probs), B::full(&logits), n, e, self.moe, tx);
        let capped = self.cap(chosen, &probs)?;
        let routing = &capped.kept;

        let widths = &self.moe.expert_widths;
        let sc = routing.n_slots() * c;
        // gu is saved where the store declares it; else (and without a store) each chunk's is a
        // transient.
        let gate_up = match &store {
            Some((st, _)) if st.declares(GATE_UP) => GateUp::Save,
            _ => GateUp::Recompute,
        };
        // Where this layer's policy splits its tokens (MEMO), and the gate/up product is saved
        // on the experts' ranks, the split travels with the rows (`ExchangedRows`).
        let split = store.as_ref().and_then(|(st, l)| st.policies()[*l].split_token(n));
        let (forward, backward) = self.phases(routing, gate_up);
        if store.is_some() {
            // Training: room for this routing's backward now, so a step allocates once.
            tx.reserve(be, &backward.requests);
        }
        tx.begin(be, forward.requests);
        // The experts' up projection gathers its rows itself where the backend can (and the
        // rows stay on this rank); else they are gathered into xe here.
        let (fused_gather, xe_len) = (self.fused_gather(), self.gathered_len(routing.n_slots()));
        if !fused_gather {
            let [mut xe] = tx.views(be, [(fwd::XE, sc)]);
            be.gather_rows(B::reborrow_mut(&mut xe), B::full(&xn2), &routing.token, c);
        }
        // Every slot row is written by its expert's down projection.
        let mut y = scratch(routing.n_slots() * c);
        let (gu, received) = match self.dispatcher()? {
            None => {
                let counts = routing.counts();
                let (segs, gu_len) = segments(0, &counts, widths);
                let act_len = expert_act_elements(&counts, widths, self.chunk_rows) as usize;
                let mut saved_gu = (gate_up == GateUp::Save).then(|| scratch(gu_len));
                for chunk in chunked(&segs, self.chunk_rows, widths) {
                    match saved_gu.as_mut() {
                        Some(gu) => {
                            let [xe, act] = tx.views(be, [(fwd::XE, xe_len), (fwd::ACT, act_len)]);
                            self.experts_forward(p, &chunk, self.routed(B::full(&xn2), &routing.token, None, B::as_view(&xe)), B::full_mut(gu), act, B::full_mut(&mut y));
                        }
                        None => {
                            let [xe, act, gu] = tx.views(be, [(fwd::XE, xe_len), (fwd::ACT, act_len), (fwd::GU, 2 * act_len)]);
                            self.experts_forward(p, &chunk_local_gate_up(&chunk), self.routed(B::full(&xn2), &routing.token, None, B::as_view(&xe)), gu, act, B::full_mut(&mut y));
                        }
                    }
                }
                (saved_gu, None)
            }
            Some(d) => {
                // Rows travel to their experts' ranks, the local experts run on what arrived
                // (expert-major), and the outputs travel back into the same slot layout.
                let plan = dropless_plan(routing)?;
                let recv = d.receive_counts(&plan)?;
                let local = d.local_experts();
                let counts: Vec<usize> = d.local_spans(&recv).iter().map(|s| s.len()).collect();
                let (segs, gu_len) = segments(local.start, &counts, widths);
                let act_len = expert_act_elements(&counts, &widths[local.clone()], self.chunk_rows) as usize;
                // Beside the arena (the exchanged rows' counts are not the plan's): the saved gu
                // whole, or a chunk's.
                let mut gu = scratch(if gate_up == GateUp::Save { gu_len } else { 2 * act_len });
                let mut act = scratch(act_len);
                let [xe] = tx.views(be, [(fwd::XE, sc)]);
                let xg = self.send_to_experts(&d, B::as_view(&xe), &plan, &recv)?;
                let mut yg = scratch(B::len(&xg));
                for chunk in chunked(&segs, self.chunk_rows, widths) {
                    let chunk = if gate_up == GateUp::Save { chunk } else { chunk_local_gate_up(&chunk) };
                    self.experts_forward(p, &chunk, (B::full(&xg), None), B::full_mut(&mut gu), B::full_mut(&mut act), B::full_mut(&mut yg));
                }
                self.return_from_experts(&d, B::full(&yg), &plan, &recv, B::full_mut(&mut y))?;
                let exchanged = match (gate_up, split) {
                    (GateUp::Save, Some(a)) => Some(exchanged_rows(&recv, &d.counts_from_sources(&routing.slots_below(a))?, local, widths)),
                    _ => None,
                };
                ((gate_up == GateUp::Save).then_some(gu), Some((recv, exchanged)))
            }
        };
        let (tok_off, tok_slots) = routing.by_token();
        be.combine_rows(B::full_mut(out), B::full(&y), TokenSlots { offsets: &tok_off, slots: &tok_slots }, Some(&routing.gate), Some(B::full(&x2)), c);

        let counts = routing.counts();
        let expert_params: f64 = counts.iter().zip(widths).map(|(&k, &h)| (k * 3 * c * h) as f64).sum();
        let stats = BlockStats {
            aux_weighted: aux.weighted(self.moe),
            aux,
            expert_params_per_token: expert_params / n as f64,
            counts,
            dropped: capped.n_dropped(),
        };
        if let Some((store, l)) = store {
            if let Some(gu) = gu {
                store.save(l, GATE_UP, gu);
            }
            for (name, buf) in [
                ("input", x),
                ("attn_out", att),
                ("attn_lse", lse),
                ("attn_norm_out", xn1),
                ("attn_norm_rstd", rstd1),
                ("qkv", qkv),
                ("resid_mid", x2),
                ("ffn_norm_out", xn2),
                ("ffn_norm_rstd", rstd2),
                ("router_logits", logits),
                ("router_probs", probs),
                ("expert_out", y),
            ] {
                store.save(l, name, buf);
            }
            store.save_routing(l, capped);
            if let Some((recv, exchanged)) = received {
                store.save_received(l, recv, exchanged);
            }
        }
        Ok(stats)
    }

    /// Recomputes the rows of tokens `from..N` of every `TokenSplit` tensor of `layer` from the
    /// kept input and attention output, through the same ops as [`Self::forward`]. Every op on
    /// the way is per row and bitwise independent of how many rows it is given (matmul's row
    /// stability, see `Backend::matmul`), so the rows come out exactly as the forward wrote them.
    /// The routing stays in the store (host index data needed for the kept tokens' slots and the
    /// aux losses over all tokens; the experts' capacity is not applied again); each expert's
    /// slots of tokens `from..N` are the tail of its slot range because slots are in ascending
    /// token order within an expert. With expert parallelism those rows run on their experts'
    /// ranks: a collective over the EP group.
    pub fn recompute(&self, p: &BlockParams, store: &mut ActivationStore<B>, layer: usize, from: usize, tx: &mut Arena<B>) -> Result<()> {
        let (be, s, n, c) = (self.be, self.shape, self.n(), self.c());
        if from >= n {
            return Ok(());
        }
        let (wq, a, e, m) = (s.qkv_width(), s.out_width(), self.moe.n_experts(), n - from);
        let eps = self.model.norm_eps;
        // The gate/up product last: only where the store declares it.
        let gate_up = if store.declares(GATE_UP) { GateUp::Save } else { GateUp::Recompute };
        let all = ["attn_norm_out", "attn_norm_rstd", "qkv", "resid_mid", "ffn_norm_out", "ffn_norm_rstd", "router_logits", "router_probs", "expert_out", GATE_UP];
        let names = if gate_up == GateUp::Save { &all[..] } else { &all[..all.len() - 1] };
        let mut t: Vec<B::Buf> = names.iter().map(|name| store.take(layer, name)).collect();
        let (always, saved_gu) = t.split_at_mut(all.len() - 1);
        let [xn1, rstd1, qkv, x2, xn2, rstd2, logits, probs, y] = always else { unreachable!("nine names") };
        let mut saved_gu = saved_gu.first_mut();
        let (x, att) = (store.load(layer, "input"), store.load(layer, "attn_out"));

        be.rmsnorm_fwd(tail_mut::<B>(xn1, from, n, c), tail_mut::<B>(rstd1, from, n, 1), tail::<B>(x, from, n, c), self.w(p.attn_norm, c), m, c, eps);
        be.matmul(tail_mut::<B>(qkv, from, n, wq), tail::<B>(xn1, from, n, c), self.w(p.wqkv, wq * c), m, c, wq, false, true, false);
        be.rope(tail_mut::<B>(qkv, from, n, wq), B::full(self.rope), s, from, false);
        be.matmul_residual(tail_mut::<B>(x2, from, n, c), tail::<B>(x, from, n, c), tail::<B>(att, from, n, a), self.w(p.wo, c * a), m, a, c, true);
        be.rmsnorm_fwd(tail_mut::<B>(xn2, from, n, c), tail_mut::<B>(rstd2, from, n, 1), tail::<B>(x2, from, n, c), self.w(p.ffn_norm, c), m, c, eps);
        be.matmul(tail_mut::<B>(logits, from, n, e), tail::<B>(xn2, from, n, c), self.w(p.router, e * c), m, c, e, false, true, false);
        be.softmax_rows(tail_mut::<B>(probs, from, n, e), tail::<B>(logits, from, n, e), m, e);

        let exchanged = store.exchanged(layer).cloned();
        let routing = store.routing(layer);
        // Each expert's slots to recompute are the tail of its slot range: gather them into one
        // block of rows and run the experts grouped, writing into the saved gu and y in place.
        let widths = &self.moe.expert_widths;
        let (mut segs, mut tokens, mut tail_offsets, mut gu_base) = (Vec::new(), Vec::new(), vec![0], 0);
        for ((ex, &h), kept) in widths.iter().enumerate().zip(routing.slots_below(from)) {
            let sl = routing.slots_of(ex);
            let rows = sl.len() - kept;
            if rows > 0 {
                segs.push(Segment { ex, rows, x_row: tokens.len(), y_row: sl.start + kept, gu: gu_base + kept * 2 * h, act: 0 });
                tokens.extend_from_slice(&routing.token[sl.start + kept..sl.end]);
            }
            tail_offsets.push(tokens.len());
            gu_base += sl.len() * 2 * h;
        }
        tx.begin(be, self.phases(routing, gate_up).1.requests);
        let (fused_gather, xe_len) = (self.fused_gather(), self.gathered_len(tokens.len()));
        if !fused_gather {
            let [mut xe] = tx.views(be, [(bwd::XE, xe_len)]);
            be.gather_rows(B::reborrow_mut(&mut xe), B::full(xn2), &tokens, c);
        }
        match self.dispatcher()? {
            None => {
                let act_len = expert_act_elements(&routing.counts(), widths, self.chunk_rows) as usize;
                for chunk in chunked(&segs, self.chunk_rows, widths) {
                    match saved_gu.as_deref_mut() {
                        Some(gu) => {
                            let [xe, act] = tx.views(be, [(bwd::XE, xe_len), (bwd::ACT, act_len)]);
                            self.experts_forward(p, &chunk, self.routed(B::full(xn2), &tokens, None, B::as_view(&xe)), B::full_mut(gu), act, B::full_mut(y));
                        }
                        None => {
                            // Only expert_out's rows are wanted; gu is the chunk's transient.
                            let [xe, act, gu] = tx.views(be, [(bwd::XE, xe_len), (bwd::ACT, act_len), (bwd::GU, 2 * act_len)]);
                            self.experts_forward(p, &chunk_local_gate_up(&chunk), self.routed(B::full(xn2), &tokens, None, B::as_view(&xe)), gu, act, B::full_mut(y));
                        }
                    }
                }
            }
            Some(d) => {
                // The tails travel to their experts' ranks, run there and come back, as in the
                // forward: a collective, which every EP rank reaches for this layer (the same
                // policies and shapes split every rank's tokens at the same place).
                let plan = SlotPlan { offsets: tail_offsets, source: (0..tokens.len()).map(Some).collect(), capacity: None };
                let recv = d.receive_counts(&plan)?;
                let local = d.local_experts();
                let counts: Vec<usize> = d.local_spans(&recv).iter().map(|s| s.len()).collect();
                let act_len = expert_act_elements(&counts, &widths[local.clone()], self.chunk_rows) as usize;
                // A saved gate/up product lies in the forward's exchanged layout: one segment
                // per (local expert, source) chunk, its rows after the chunk's kept ones.
                let local_segs = match (&saved_gu, &exchanged) {
                    (Some(_), Some(chunks)) => {
                        let (mut segs, mut x_row, mut gu_at, sources) = (Vec::new(), 0, 0, recv.len() / local.len());
                        for (i, &(rows, kept, width)) in chunks.iter().enumerate() {
                            let (le, src) = (i / sources, i % sources);
                            assert_eq!(rows - kept, recv[src * local.len() + le], "layer {layer}: rank {src}'s recomputed rows of expert {} are not the rows its forward split off", local.start + le);
                            if rows > kept {
                                segs.push(Segment { ex: local.start + le, rows: rows - kept, x_row, y_row: x_row, gu: gu_at + kept * width, act: 0 });
                            }
                            (x_row, gu_at) = (x_row + rows - kept, gu_at + rows * width);
                        }
                        segs
                    }
                    (Some(_), None) => unreachable!("the forward saves the gate/up rows' layout where the layer splits its tokens"),
                    (None, _) => segments(local.start, &counts, widths).0,
                };
                let scratch = |len| be.alloc_scratch(len, Precision::Activation);
                let xg = {
                    let [xe] = tx.views(be, [(bwd::XE, xe_len)]);
                    self.send_to_experts(&d, B::as_view(&xe), &plan, &recv)?
                };
                let (mut act, mut yg) = (scratch(act_len), scratch(B::len(&xg)));
                let mut chunk_gu = saved_gu.is_none().then(|| scratch(2 * act_len));
                for chunk in chunked(&local_segs, self.chunk_rows, widths) {
                    match (saved_gu.as_deref_mut(), chunk_gu.as_mut()) {
                        (Some(gu), _) => self.experts_forward(p, &chunk, (B::full(&xg), None), B::full_mut(gu), B::full_mut(&mut act), B::full_mut(&mut yg)),
                        (None, Some(gu)) => self.experts_forward(p, &chunk_local_gate_up(&chunk), (B::full(&xg), None), B::full_mut(gu), B::full_mut(&mut act), B::full_mut(&mut yg)),
                        (None, None) => unreachable!("allocated where gu is not saved"),
                    }
                }
                let mut back = scratch(tokens.len() * c);
                self.return_from_experts(&d, B::full(&yg), &plan, &recv, B::full_mut(&mut back))?;
                // Back in the tails' order: each expert's rows after its kept ones in y.
                for s in &segs {
                    be.copy(B::view_mut(y, s.y_row * c..(s.y_row + s.rows) * c), B::view(&back, s.x_row * c..(s.x_row + s.rows) * c));
                }
            }
        }
        for (name, buf) in names.iter().zip(t) {
            store.save(layer, name, buf);
        }
        Ok(())
    }

    /// Backward of one block: `dx` (overwritten) from `dout`, parameter gradients into `grads`
    /// (same layout as the parameters; written or added to as its ledger says); transients come
    /// from `tx`, a group of views at a time (each group in its own scope). A collective with
    /// expert parallelism.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &BlockParams, grads: &mut Grads<'_, B>, store: &ActivationStore<B>, layer: usize, dout: &B::Buf, dx: &mut B::Buf, tx: &mut Arena<B>) -> Result<()> {
        let (be, s, n, c) = (self.be, self.shape, self.n(), self.c());
        let (wq, a, e) = (s.qkv_width(), s.out_width(), self.moe.n_experts());
        let saved = |name: &str| B::full(store.load(layer, name));
        let (routed, routing) = (store.routed(layer), store.routing(layer));
        // The router's backward takes every chosen slot; the combines the kept ones, the same
        // incidence where nothing was dropped.
        let router_args = router::BackwardArgs::new(routed, self.moe);
        let kept_incidence = (routed.n_dropped() > 0).then(|| routing.by_token());
        let by_token = match &kept_incidence {
            Some((offsets, slots)) => TokenSlots { offsets, slots },
            None => router_args.grad().by_token,
        };
        let widths = &self.moe.expert_widths;
        let sc = routing.n_slots() * c;
        let saved_gu = store.declares(GATE_UP).then(|| store.load(layer, GATE_UP));
        tx.begin(be, self.phases(routing, if saved_gu.is_some() { GateUp::Save } else { GateUp::Recompute }).1.requests);
        let (rw, ro) = (B::reborrow_mut, B::as_view);

        // Combine: out[t] = x2[t] + Σ gate_s y_s  →  dy_s = gate_s dout[t], dgate_s = ⟨dout[t], y_s⟩.
        // Experts, each on its own rows: dy and xe gathered here, or read in place through the
        // slots' tokens (dy's rows times their gates).
        let (fused_gather, gathered_len, xn2) = (self.fused_gather(), self.gathered_len(routing.n_slots()), store.load(layer, "ffn_norm_out"));
        if !fused_gather {
            let [mut dy, mut xe] = tx.views(be, [(bwd::DY, gathered_len), (bwd::XE, gathered_len)]);
            be.gather_rows_scaled(rw(&mut dy), B::full(dout), &routing.token, &routing.gate, c);
            be.gather_rows(rw(&mut xe), B::full(xn2), &routing.token, c);
        }
        {
            let [mut dgate] = tx.views(be, [(bwd::DGATE, routing.n_slots())]);
            be.gathered_dots(rw(&mut dgate), B::full(dout), saved("expert_out"), &routing.token, c);
        }
        match self.dispatcher()? {
            None => {
                let counts = routing.counts();
                let (segs, _) = segments(0, &counts, widths);
                let act_len = expert_act_elements(&counts, widths, self.chunk_rows) as usize;
                for chunk in chunked(&segs, self.chunk_rows, widths) {
                    // SwiGLU's backward keeps dact on the chip where the experts read rows in place.
                    let dact_len = if fused_gather { 0 } else { act_len };
                    let views = [(bwd::DY, gathered_len), (bwd::XE, gathered_len), (bwd::DXE, sc), (bwd::ACT, act_len), (bwd::DACT, dact_len), (bwd::DGU, 2 * act_len)];
                    let routed = |dy, xe| (self.routed(B::full(dout), &routing.token, Some(&routing.gate), dy), self.routed(B::full(xn2), &routing.token, None, xe));
                    match saved_gu {
                        Some(gu) => {
                            let [dy, xe, dxe, act, dact, dgu] = tx.views(be, views);
                            let (dy, xe) = routed(ro(&dy), ro(&xe));
                            self.experts_backward(p, &chunk, B::full(gu), dy, xe, dxe, grads, [act, dact, dgu]);
                        }
                        None => {
                            let [dy, xe, dxe, mut act, dact, dgu, mut gu] = tx.views(be, [views[0], views[1], views[2], views[3], views[4], views[5], (bwd::GU, 2 * act_len)]);
                            let local = chunk_local_gate_up(&chunk);
                            let (dy, xe) = routed(ro(&dy), ro(&xe));
                            self.experts_up(p, &local, xe, rw(&mut gu), rw(&mut act));
                            self.experts_backward(p, &local, ro(&gu), dy, xe, dxe, grads, [act, dact, dgu]);
                        }
                    }
                }
            }
            Some(d) => {
                // The experts' inputs and output gradients travel to the experts' ranks (the
                // inputs again rather than kept there), the input gradients travel back.
                let plan = dropless_plan(routing)?;
                let recv = store.received(layer);
                let local = d.local_experts();
                let counts: Vec<usize> = d.local_spans(recv).iter().map(|s| s.len()).collect();
                let (segs, _) = segments(local.start, &counts, widths);
                let act_len = expert_act_elements(&counts, &widths[local], self.chunk_rows) as usize;
                let (xg, dyg) = {
                    let [dy, xe] = tx.views(be, [(bwd::DY, sc), (bwd::XE, sc)]);
                    (self.send_to_experts(&d, ro(&xe), &plan, recv)?, self.send_to_experts(&d, ro(&dy), &plan, recv)?)
                };
                let mut dxg = be.alloc_scratch(B::len(&xg), Precision::Activation);
                let mut scratch = [act_len, act_len, 2 * act_len].map(|len| be.alloc_scratch(len, Precision::Activation));
                let mut local_gu = saved_gu.is_none().then(|| be.alloc_scratch(2 * act_len, Precision::Activation));
                for chunk in chunked(&segs, self.chunk_rows, widths) {
                    let [mut act, dact, dgu] = scratch.each_mut().map(B::full_mut);
                    let (chunk, gu) = match (saved_gu, local_gu.as_mut()) {
                        (Some(gu), _) => (chunk, gu),
                        (None, Some(gu)) => {
                            let local = chunk_local_gate_up(&chunk);
                            self.experts_up(p, &local, (B::full(&xg), None), B::full_mut(gu), rw(&mut act));
                            (local, &*gu)
                        }
                        (None, None) => unreachable!("allocated where gu is not saved"),
                    };
                    self.experts_backward(p, &chunk, B::full(gu), (B::full(&dyg), None), (B::full(&xg), None), B::full_mut(&mut dxg), grads, [act, dact, dgu]);
                }
                let [mut dxe] = tx.views(be, [(bwd::DXE, sc)]);
                self.return_from_experts(&d, B::full(&dxg), &plan, recv, rw(&mut dxe))?;
            }
        }
        {
            let [dxe, mut dxn2] = tx.views(be, [(bwd::DXE, sc), (bwd::DXN2, n * c)]);
            be.combine_rows(rw(&mut dxn2), ro(&dxe), by_token, None, None, c);
        }

        // Router: gate path and aux losses → dlogits (through the softmax, + z-loss) → dxn2, dWr.
        {
            // Over every chosen slot: those the capacity dropped got no gate gradient.
            let [dgate, mut dxn2, mut dlogits] = tx.views(be, [(bwd::DGATE, routing.n_slots()), (bwd::DXN2, n * c), (bwd::DLOGITS, n * e)]);
            be.router_bwd(rw(&mut dlogits), ro(&dgate), saved("router_probs"), saved("router_logits"), router_args.grad());
            be.matmul(rw(&mut dxn2), ro(&dlogits), self.w(p.router, e * c), n, e, c, false, false, true);
            let (dwr, add) = grads.product(p.router, e * c);
            be.matmul(dwr, ro(&dlogits), saved("ffn_norm_out"), e, n, c, true, false, add);
        }

        // FFN norm and residual: dx2 = dout + norm_bwd(dxn2).
        {
            let [dxn2, mut dx2] = tx.views(be, [(bwd::DXN2, n * c), (bwd::DX2, n * c)]);
            be.rmsnorm_bwd(rw(&mut dx2), grads.accumulated(p.ffn_norm, c), ro(&dxn2), saved("resid_mid"), self.w(p.ffn_norm, c), saved("ffn_norm_rstd"), Some(B::full(dout)), n, c);
        }

        // Attention: datt = dx2 Wo, dWo += dx2ᵀ att; dqkv; un-rotate; dxn1; dWqkv.
        {
            let [dx2, mut datt] = tx.views(be, [(bwd::DX2, n * c), (bwd::DATT, n * a)]);
            be.matmul(rw(&mut datt), ro(&dx2), self.w(p.wo, c * a), n, c, a, false, false, false);
            let (dwo, add) = grads.product(p.wo, c * a);
            be.matmul(dwo, ro(&dx2), saved("attn_out"), c, n, a, true, false, add);
        }
        {
            let [datt, mut dqkv, mut scratch] = tx.views(be, [(bwd::DATT, n * a), (bwd::DQKV, n * wq), (bwd::ATTN, be.attention_bwd_scratch_len(s))]);
            be.attention_bwd(rw(&mut dqkv), ro(&datt), saved("attn_out"), saved("attn_lse"), saved("qkv"), s, rw(&mut scratch));
            be.rope(rw(&mut dqkv), B::full(self.rope), s, 0, true);
        }
        {
            let [dqkv, mut dxn1] = tx.views(be, [(bwd::DQKV, n * wq), (bwd::DXN1, n * c)]);
            be.matmul(rw(&mut dxn1), ro(&dqkv), self.w(p.wqkv, wq * c), n, wq, c, false, false, false);
            let (dwqkv, add) = grads.product(p.wqkv, wq * c);
            be.matmul(dwqkv, ro(&dqkv), saved("attn_norm_out"), wq, n, c, true, false, add);
        }

        // Attention norm and residual: dx = dx2 + norm_bwd(dxn1).
        let [dx2, dxn1] = tx.views(be, [(bwd::DX2, n * c), (bwd::DXN1, n * c)]);
        be.rmsnorm_bwd(B::full_mut(dx), grads.accumulated(p.attn_norm, c), ro(&dxn1), saved("input"), self.w(p.attn_norm, c), saved("attn_norm_rstd"), Some(ro(&dx2)), n, c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{chunked, segments, Segment};

    #[test]
    fn segments_lay_experts_out_one_after_another_and_skip_empty_ones() {
        let widths = [8, 16, 24, 40];
        let (segs, gu) = segments(1, &[3, 0, 2], &widths);
        assert_eq!(
            segs,
            [Segment { ex: 1, rows: 3, x_row: 0, y_row: 0, gu: 0, act: 0 }, Segment { ex: 3, rows: 2, x_row: 3, y_row: 3, gu: 3 * 32, act: 3 * 16 }]
        );
        assert_eq!(gu, 3 * 32 + 2 * 80);
    }

    /// Chunks cover every row once, in order, hold at most `max_rows` rows, restart `act`, and
    /// never need more than `expert_act_elements` plans.
    #[test]
    fn chunks_split_experts_at_row_boundaries_within_the_planned_act() {
        use crate::memory::transients::expert_act_elements;
        let widths = [8, 16, 24, 40];
        let counts = [5, 0, 7, 4];
        let (segs, _) = segments(0, &counts, &widths);
        let chunks = chunked(&segs, 6, &widths);
        assert_eq!(chunks.len(), 3);
        let rows: Vec<(usize, usize, usize)> = chunks.iter().flatten().map(|s| (s.ex, s.x_row, s.rows)).collect();
        assert_eq!(rows, [(0, 0, 5), (2, 5, 1), (2, 6, 6), (3, 12, 4)]);
        assert_eq!(chunks[1][0], Segment { ex: 2, rows: 6, x_row: 6, y_row: 6, gu: 5 * 16 + 48, act: 0 });
        for chunk in &chunks {
            assert!(chunk.iter().map(|s| s.rows).sum::<usize>() <= 6);
            let need: usize = chunk.iter().map(|s| s.rows * widths[s.ex]).sum();
            assert_eq!(chunk.last().map(|s| s.act + s.rows * widths[s.ex]), Some(need));
            assert!(need as u64 <= 6 * 40, "bounded by rows × the widest expert");
        }
        assert_eq!(expert_act_elements(&counts, &widths, 6), 6 * 40, "a chunk of the widest");
        assert_eq!(expert_act_elements(&counts, &widths, 100), 5 * 8 + 7 * 24 + 4 * 40, "everything");
    }
}
