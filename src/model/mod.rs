//! The heterogeneous-MoE decoder (HMoE): embedding → blocks (attention + MoE FFN with experts of
//! unequal widths) → final RMSNorm → output head with a fused cross-entropy.

pub mod block;
pub mod config;
pub mod grads;
pub mod params;
pub mod router;
pub mod routing;
pub mod weights;

use block::{BlockCtx, BlockStats, INVENTORY};
use config::{ModelConfig, MoeConfig};
use grads::{GradLedger, Grads};
use params::ParamLayout;
use router::AuxLosses;
use weights::Weights;

use crate::backend::{AttnShape, Backend, DeviceGroup, Precision};
use crate::config::GateUp;
use crate::memory::arena::Arena;
use crate::memory::store::{ActivationStore, BlockDims, LayerPolicy};
use crate::memory::transients::{head_phase, EXPERT_CHUNK_ROWS};
use crate::parallel::comm::Communicator;
use crate::parallel::dispatch::DispatchMode;
use crate::{Error, Result};

/// What one forward (and backward) reports.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    pub tokens: usize,
    /// Mean next-token cross-entropy.
    pub lm_loss: f64,
    /// Unweighted aux losses summed over layers.
    pub aux: AuxLosses,
    /// Weighted aux losses summed over layers (what enters `loss`).
    pub aux_loss: f64,
    /// `lm_loss + aux_loss`, the trained objective.
    pub loss: f64,
    /// Tokens each expert ran, per layer.
    pub counts: Vec<Vec<usize>>,
    /// Chosen slots the experts' capacity dropped, over all layers.
    pub dropped: usize,
    /// Mean parameters activated per token (all but the embedding table).
    pub activated_params: f64,
    /// Matmul + attention FLOPs of a training step on these tokens (3× forward, routed counts).
    pub train_flops: f64,
}

/// What [`Model::forward_backward_with`] calls with a range of the gradient buffer as soon as
/// the backward has finished it (no later op of the step touches it), so that a caller can
/// start summing it over ranks while the backward goes on: the final norm and the head at the
/// turn, each block after its backward (the last first), the embedding at the end. The
/// ranges tile the buffer, once each a step.
pub type GradsReady<'a, B> = dyn FnMut(&mut <B as Backend>::Buf, std::ops::Range<usize>) -> Result<()> + 'a;

impl StepStats {
    /// A step's statistics from those of its micro-batches (each a mean over as many tokens):
    /// losses and activated parameters averaged; tokens, counts, drops and FLOPs added.
    pub fn of_micro_batches(parts: Vec<StepStats>) -> StepStats {
        let m = parts.len();
        let mut parts = parts.into_iter();
        let mut s = parts.next().expect("a step runs at least one micro-batch");
        for p in parts {
            s.tokens += p.tokens;
            s.lm_loss += p.lm_loss;
            s.aux.add(&p.aux);
            s.aux_loss += p.aux_loss;
            s.loss += p.loss;
            for (layer, more) in s.counts.iter_mut().zip(&p.counts) {
                layer.iter_mut().zip(more).for_each(|(k, more)| *k += more);
            }
            s.dropped += p.dropped;
            s.activated_params += p.activated_params;
            s.train_flops += p.train_flops;
        }
        if m > 1 {
            let mean = |v: &mut f64| *v /= m as f64;
            [&mut s.lm_loss, &mut s.aux_loss, &mut s.loss, &mut s.activated_params].into_iter().for_each(mean);
            s.aux.scale(1.0 / m as f32);
        }
        s
    }
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub moe: MoeConfig,
    pub layout: ParamLayout,
    pub params: Weights<B>,
    /// Gradients of the f32 master values (f32 on every backend).
    pub grads: B::Buf,
    /// Which of `grads` this step has written (see [`grads::GradLedger`]).
    ledger: GradLedger,
    /// `(seq_len, head_dim/2, 2)` cos/sin of the rotary angles.
    rope: B::Buf,
    /// The expert-parallel group this rank's experts are sharded over (MoE Parallel Folding's
    /// EP); `None` when this model holds every expert.
    ep: Option<Box<dyn Communicator>>,
    /// The same group on the devices, where [`Model::exchange_on_device`] opened it: the token
    /// dispatcher's rows then move without the host.
    ep_device: Option<Box<dyn DeviceGroup<B>>>,
    /// Most routed rows the experts run on at once.
    expert_chunk_rows: usize,
    /// Dropless, or each expert's capacity on this rank's tokens.
    dispatch: DispatchMode,
}

fn rope_table(m: &ModelConfig) -> Vec<f32> {
    let (d, half) = (m.head_dim(), m.head_dim() / 2);
    let mut t = vec![0f32; m.seq_len * d];
    for pos in 0..m.seq_len {
        for i in 0..half {
            let freq = (m.rope_theta as f64).powf(-((2 * i) as f64) / d as f64);
            let angle = pos as f64 * freq;
            t[pos * d + 2 * i] = angle.cos() as f32;
            t[pos * d + 2 * i + 1] = angle.sin() as f32;
        }
    }
    t
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (deterministic in `seed`).
    pub fn new(be: &B, config: ModelConfig, moe: MoeConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        moe.validate()?;
        let layout = ParamLayout::new(&config, &moe);
        let values = layout.init_values(seed);
        Self::from_values(be, config, moe, &values)
    }

    /// This rank's share of a model whose experts are sharded contiguously over the ranks of
    /// `ep`: the dense parameters and experts `r·E/EP .. (r+1)·E/EP` for EP rank `r`, with the
    /// values `Model::new` gives them (every tensor has its own random stream). Its forward and
    /// backward are collectives over `ep`.
    pub fn new_expert_parallel(be: &B, config: ModelConfig, moe: MoeConfig, seed: u64, ep: Box<dyn Communicator>) -> Result<Self> {
        config.validate()?;
        moe.validate()?;
        let (e, size) = (moe.n_experts(), ep.size());
        if !e.is_multiple_of(size) {
            return Err(Error::config("parallel.ep", size, format!("a divisor of the number of experts ({e})")));
        }
        let layout = ParamLayout::sharded(&config, &moe, crate::parallel::dispatch::expert_shard(e, size, ep.rank()));
        let values = layout.init_values(seed);
        let mut model = Self::with_layout(be, config, moe, layout, &values)?;
        model.ep = (size > 1).then_some(ep);
        Ok(model)
    }

    /// A model with the given parameter values (layout order).
    pub fn from_values(be: &B, config: ModelConfig, moe: MoeConfig, values: &[f32]) -> Result<Self> {
        let layout = ParamLayout::new(&config, &moe);
        Self::with_layout(be, config, moe, layout, values)
    }

    fn with_layout(be: &B, config: ModelConfig, moe: MoeConfig, layout: ParamLayout, values: &[f32]) -> Result<Self> {
        if values.len() != layout.total {
            return Err(Error::Invalid(format!("expected {} parameter values, got {}", layout.total, values.len())));
        }
        let params = Weights::new(be, values);
        let grads = be.alloc_f32(layout.total);
        let mut rope = be.alloc_f32(config.seq_len * config.head_dim());
        be.upload(B::full_mut(&mut rope), &rope_table(&config));
        let ledger = GradLedger::new(&layout);
        Ok(Model { config, moe, layout, params, grads, ledger, rope, ep: None, ep_device: None, expert_chunk_rows: EXPERT_CHUNK_ROWS, dispatch: DispatchMode::Dropless })
    }

    /// Runs the experts on at most `rows` routed rows at a time (default
    /// `transients::EXPERT_CHUNK_ROWS`): smaller bounds their transient memory, larger makes
    /// bigger GEMMs. The forward is bitwise the same for any value; weight gradients are summed
    /// over the chunks, so they round differently.
    pub fn with_expert_chunk_rows(mut self, rows: usize) -> Self {
        self.expert_chunk_rows = rows.max(1);
        self
    }

    /// Limits each expert to `Capacity`'s share of a step's routed slots (per rank, before the
    /// expert-parallel exchange; the default is dropless): in every forward, training or not.
    /// Pad-to-capacity is refused (see `dispatch::apply_capacity`).
    pub fn with_dispatch(mut self, mode: DispatchMode) -> Result<Self> {
        crate::parallel::dispatch::check_model_mode(mode)?;
        self.dispatch = mode;
        Ok(self)
    }

    pub fn dispatch(&self) -> DispatchMode {
        self.dispatch
    }

    pub fn n_params(&self) -> usize {
        self.layout.total
    }

    /// Moves the expert-parallel rows on the devices where `be` can (NCCL over the EP group:
    /// `Backend::device_group`) instead of through host memory; says how they move (`None`: this
    /// model holds every expert). A collective over the EP group.
    pub fn exchange_on_device(&mut self, be: &B) -> Result<Option<String>> {
        let Some(ep) = self.ep.as_deref() else { return Ok(None) };
        let (what, group) = be.device_group(ep)?.into_parts(ep.size());
        self.ep_device = group;
        Ok(Some(what))
    }

    /// The expert-parallel group, when this model holds a shard of the experts.
    pub fn expert_parallel(&self) -> Option<&dyn Communicator> {
        self.ep.as_deref()
    }

    /// A store sized for this model's blocks that keeps everything on the device.
    pub fn new_store(&self) -> ActivationStore<B> {
        ActivationStore::new(INVENTORY, self.config.n_layers)
    }

    /// A store applying one policy per block, with `host_bytes` of host tier for offloads,
    /// declaring the experts' gate/up product where `gate_up` saves it (the blocks save, and
    /// their backward recomputes, by what the store declares).
    pub fn new_store_with(&self, policies: Vec<LayerPolicy>, host_bytes: u64, gate_up: GateUp) -> Result<ActivationStore<B>> {
        if policies.len() != self.config.n_layers {
            return Err(Error::Invalid(format!("{} layer policies for a model of {} layers", policies.len(), self.config.n_layers)));
        }
        ActivationStore::with_policies(block::inventory(gate_up), policies, host_bytes)
    }

    /// Starts a step's gradients: zeroes those ops add into; the block matrices' first
    /// products write theirs (see [`grads::GradLedger`]).
    pub fn zero_grads(&mut self, be: &B) {
        for r in self.ledger.start_step() {
            be.fill(B::view_mut(&mut self.grads, r.clone()), 0.0);
        }
    }

    fn block_ctx<'a>(&'a self, be: &'a B, shape: AttnShape) -> BlockCtx<'a, B> {
        BlockCtx { be, model: &self.config, moe: &self.moe, shape, params: self.params.compute(), rope: &self.rope, ep: self.ep.as_deref(), ep_device: self.ep_device.as_deref(), chunk_rows: self.expert_chunk_rows, dispatch: self.dispatch }
    }

    fn shape(&self, batch: usize, seq: usize) -> Result<AttnShape> {
        if seq == 0 || seq > self.config.seq_len {
            return Err(Error::Invalid(format!("sequence length {seq} outside 1..={} (model.seq_len)", self.config.seq_len)));
        }
        Ok(AttnShape { batch, seq, n_heads: self.config.n_heads, n_kv_heads: self.config.n_kv_heads, head_dim: self.config.head_dim() })
    }

    fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(t) => Err(Error::Invalid(format!("{what} token {t} is outside the vocabulary (model.vocab_size = {})", self.config.vocab_size))),
            None => Ok(()),
        }
    }

    /// Forward through embedding and blocks; returns the last hidden state `(N, C)`.
    /// With a store, each block's activations are sealed (its policy applied) right after its
    /// forward, as MEMO's executor offloads layer `i` while layer `i + 1` computes.
    #[allow(clippy::too_many_arguments)]
    fn hidden(&self, be: &B, inputs: &[u32], shape: AttnShape, mut store: Option<&mut ActivationStore<B>>, tx: &mut Arena<B>, stats: &mut StepStats) -> Result<B::Buf> {
        let (n, c) = (shape.tokens(), self.config.d_model);
        let ctx = self.block_ctx(be, shape);
        let dims = BlockDims::new(&self.config, &self.moe, shape.batch, shape.seq);
        let mut x = be.alloc_scratch(n * c, Precision::Activation);
        be.embedding_fwd(B::full_mut(&mut x), B::view(self.params.compute(), self.layout.embedding..self.layout.embedding + self.config.vocab_size * c), inputs, c);
        for (l, bp) in self.layout.blocks.iter().enumerate() {
            let mut out = be.alloc_scratch(n * c, Precision::Activation); // the block writes it whole
            let s: BlockStats = ctx.forward(bp, x, &mut out, store.as_deref_mut().map(|st| (st, l)), tx)?;
            if let Some(st) = store.as_deref_mut() {
                st.seal(be, l, &dims)?;
            }
            stats.aux.add(&s.aux);
            stats.aux_loss += s.aux_weighted as f64;
            stats.activated_params += s.expert_params_per_token;
            stats.counts.push(s.counts);
            stats.dropped += s.dropped;
            x = out;
        }
        Ok(x)
    }

    /// Non-expert parameters a token always activates (attention, norms, routers, head).
    fn dense_params_per_token(&self) -> f64 {
        let c = self.config.d_model;
        let w = (self.config.n_heads + 2 * self.config.n_kv_heads) * self.config.head_dim();
        let a = self.config.n_heads * self.config.head_dim();
        let per_layer = 2 * c + w * c + c * a + self.moe.n_experts() * c;
        (self.config.n_layers * per_layer + c + self.config.vocab_size * c) as f64
    }

    fn finish_stats(&self, stats: &mut StepStats, shape: AttnShape, losses: &[f32]) {
        let n = shape.tokens();
        stats.tokens = n;
        stats.lm_loss = losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        stats.loss = stats.lm_loss + stats.aux_loss;
        stats.activated_params += self.dense_params_per_token();
        stats.train_flops = 3.0 * self.forward_flops(shape, &stats.counts);
    }

    /// Forward matmul and attention FLOPs with the experts' real token counts.
    pub fn forward_flops(&self, shape: AttnShape, counts: &[Vec<usize>]) -> f64 {
        let (n, c) = (shape.tokens() as f64, self.config.d_model as f64);
        let (w, a) = (shape.qkv_width() as f64, shape.out_width() as f64);
        let per_layer = 2.0 * n * c * (w + a) + shape.causal_attention_flops() + 2.0 * n * c * self.moe.n_experts() as f64;
        let experts: f64 = counts.iter().map(|cnt| cnt.iter().zip(&self.moe.expert_widths).map(|(&k, &h)| 6.0 * c * h as f64 * k as f64).sum::<f64>()).sum();
        self.config.n_layers as f64 * per_layer + experts + 2.0 * n * c * self.config.vocab_size as f64
    }

    /// One training forward and backward over `inputs`/`targets` (`batch × seq`, row-major).
    /// Gradients of `loss` are added to `self.grads` (after `zero_grads`, as to zeros: the first
    /// product into a block matrix's gradient writes it, see [`grads::GradLedger`]); transients
    /// live in the store's arena.
    pub fn forward_backward(&mut self, be: &B, store: &mut ActivationStore<B>, inputs: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<StepStats> {
        self.forward_backward_with(be, store, inputs, targets, batch, seq, &mut |_, _| Ok(()))
    }

    /// [`Model::forward_backward`], handing `ready` each range of the gradients as soon as the
    /// backward has finished it (see [`GradsReady`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_with(&mut self, be: &B, store: &mut ActivationStore<B>, inputs: &[u32], targets: &[u32], batch: usize, seq: usize, ready: &mut GradsReady<'_, B>) -> Result<StepStats> {
        let mut tx = store.take_arena();
        let stats = self.forward_backward_in(be, store, &mut tx, inputs, targets, batch, seq, ready);
        store.set_arena(tx);
        stats
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_backward_in(&mut self, be: &B, store: &mut ActivationStore<B>, tx: &mut Arena<B>, inputs: &[u32], targets: &[u32], batch: usize, seq: usize, ready: &mut GradsReady<'_, B>) -> Result<StepStats> {
        let shape = self.shape(batch, seq)?;
        self.check_tokens(inputs, "input")?;
        self.check_tokens(targets, "target")?;
        let (n, c, v) = (shape.tokens(), self.config.d_model, self.config.vocab_size);
        let mut stats = StepStats::default();
        let x = self.hidden(be, inputs, shape, Some(store), tx, &mut stats)?;

        // Final norm and fused head: loss, dxf and dW_head in one pass.
        let (fnorm, head) = (self.layout.final_norm, self.layout.lm_head);
        let mut xf = be.alloc_scratch(n * c, Precision::Activation);
        let mut rstd = be.alloc_scratch(n, Precision::F32);
        be.rmsnorm_fwd(B::full_mut(&mut xf), B::full_mut(&mut rstd), B::full(&x), B::view(self.params.compute(), fnorm..fnorm + c), n, c, self.config.norm_eps);
        let mut dxf = be.alloc_scratch(n * c, Precision::Activation);
        // The classifier's scratch from the arena, which no block holds at the turn.
        let scratch_len = be.classifier_scratch_len(n, v);
        tx.begin(be, head_phase(scratch_len).requests);
        let losses = {
            let [scratch] = tx.views(be, [(0, scratch_len)]);
            be.classifier(B::full(&xf), B::view(self.params.compute(), head..head + v * c), targets, n, c, v, Some((B::full_mut(&mut dxf), B::view_mut(&mut self.grads, head..head + v * c), 1.0)), scratch)
        };
        self.finish_stats(&mut stats, shape, &losses);

        let mut dx = be.alloc_scratch(n * c, Precision::Activation);
        be.rmsnorm_bwd(B::full_mut(&mut dx), B::view_mut(&mut self.grads, fnorm..fnorm + c), B::full(&dxf), B::full(&x), B::view(self.params.compute(), fnorm..fnorm + c), B::full(&rstd), None, n, c);
        ready(&mut self.grads, fnorm..self.layout.total)?; // the final norm and the head
        // Not needed by the blocks' backward: three activations less beside the layers'.
        drop((x, xf, dxf, rstd));
        let ctx = BlockCtx { be, model: &self.config, moe: &self.moe, shape, params: self.params.compute(), rope: &self.rope, ep: self.ep.as_deref(), ep_device: self.ep_device.as_deref(), chunk_rows: self.expert_chunk_rows, dispatch: self.dispatch };
        let dims = BlockDims::new(&self.config, &self.moe, batch, seq);
        for (l, bp) in self.layout.blocks.iter().enumerate().rev() {
            if let Some(from) = store.restore(be, l, &dims) {
                ctx.recompute(bp, store, l, from, tx)?;
            }
            let mut dprev = be.alloc_scratch(n * c, Precision::Activation); // the block writes it whole
            ctx.backward(bp, &mut Grads { buf: &mut self.grads, ledger: &mut self.ledger }, store, l, &dx, &mut dprev, tx)?;
            store.release(l);
            dx = dprev;
            let block = self.layout.block_range(l);
            for r in self.ledger.close(block.clone()) {
                be.fill(B::view_mut(&mut self.grads, r), 0.0); // matrices no product wrote (an expert without tokens)
            }
            ready(&mut self.grads, block)?;
        }
        let emb = self.layout.embedding;
        be.embedding_bwd(B::view_mut(&mut self.grads, emb..emb + v * c), B::full(&dx), inputs, c);
        ready(&mut self.grads, emb..self.layout.block_range(0).start)?;
        Ok(stats)
    }

    /// Forward only, saving every block's inventory into `store` (for calibration and memory
    /// profiling); returns the statistics without a loss.
    pub fn forward_saving(&self, be: &B, store: &mut ActivationStore<B>, inputs: &[u32], batch: usize, seq: usize) -> Result<StepStats> {
        let shape = self.shape(batch, seq)?;
        self.check_tokens(inputs, "input")?;
        let mut stats = StepStats::default();
        let mut tx = store.take_arena();
        let hidden = self.hidden(be, inputs, shape, Some(&mut *store), &mut tx, &mut stats);
        store.set_arena(tx);
        store.settle(be); // no backward follows to wait for the last offloads
        hidden.map(|_| stats)
    }

    /// Forward only: the loss and statistics, no gradients.
    pub fn evaluate(&self, be: &B, inputs: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<StepStats> {
        let shape = self.shape(batch, seq)?;
        self.check_tokens(inputs, "input")?;
        self.check_tokens(targets, "target")?;
        let (n, c, v) = (shape.tokens(), self.config.d_model, self.config.vocab_size);
        let mut stats = StepStats::default();
        let xf = self.final_hidden(be, inputs, shape, &mut stats)?;
        let head = self.layout.lm_head;
        let mut scratch = be.alloc_scratch(be.classifier_scratch_len(n, v), Precision::F32);
        let losses = be.classifier(B::full(&xf), B::view(self.params.compute(), head..head + v * c), targets, n, c, v, None, B::full_mut(&mut scratch));
        self.finish_stats(&mut stats, shape, &losses);
        Ok(stats)
    }

    fn final_hidden(&self, be: &B, inputs: &[u32], shape: AttnShape, stats: &mut StepStats) -> Result<B::Buf> {
        let (n, c) = (shape.tokens(), self.config.d_model);
        let x = self.hidden(be, inputs, shape, None, &mut Arena::planned(), stats)?;
        let fnorm = self.layout.final_norm;
        let mut xf = be.alloc(n * c);
        let mut rstd = be.alloc_f32(n);
        be.rmsnorm_fwd(B::full_mut(&mut xf), B::full_mut(&mut rstd), B::full(&x), B::view(self.params.compute(), fnorm..fnorm + c), n, c, self.config.norm_eps);
        Ok(xf)
    }

    /// Logits `(V)` of the token that follows `context` (the last `seq_len` tokens are used).
    pub fn next_token_logits(&self, be: &B, context: &[u32]) -> Result<Vec<f32>> {
        let ctx = &context[context.len().saturating_sub(self.config.seq_len)..];
        self.check_tokens(ctx, "context")?;
        let shape = self.shape(1, ctx.len())?;
        let (c, v) = (self.config.d_model, self.config.vocab_size);
        let xf = self.final_hidden(be, ctx, shape, &mut StepStats::default())?;
        let last = (ctx.len() - 1) * c;
        let mut out = be.alloc(v);
        let head = self.layout.lm_head;
        be.logits(B::full_mut(&mut out), B::view(&xf, last..last + c), B::view(self.params.compute(), head..head + v * c), 1, c, v);
        Ok(be.download(B::full(&out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RoPE's angles (Su et al.): position t, pair i of a head of d rotates by t · θ^(−2i/d).
    /// At d = 4, θ = 10⁴ the pairs' frequencies are 1 and 10⁻², so position 3 turns by 3 and
    /// 0.03 radians.
    #[test]
    fn rope_table_turns_pair_i_by_theta_to_the_minus_2i_over_d() {
        let m = ModelConfig { vocab_size: 8, d_model: 8, n_layers: 1, n_heads: 2, n_kv_heads: 2, seq_len: 4, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let t = rope_table(&m);
        let want = [3f64.cos(), 3f64.sin(), 0.03f64.cos(), 0.03f64.sin()];
        for (i, w) in want.iter().enumerate() {
            assert!((t[3 * 4 + i] as f64 - w).abs() < 1e-6, "entry {i} of position 3: {} want {w}", t[3 * 4 + i]);
        }
        assert_eq!(&t[..4], &[1.0, 0.0, 1.0, 0.0], "position 0 does not turn");
    }
}
