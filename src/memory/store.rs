//! The activation store: every tensor a layer's backward needs is saved here, under a name the
//! layer declared in its inventory, and here MEMO's per-layer policies act.
//!
//! - `Keep`: everything stays on the device until the backward.
//! - `Offload { alpha }`: after the forward ([`ActivationStore::seal`]) the `Whole` tensors go to
//!   the host tier whole; of every `TokenSplit` tensor the rows of the first ⌈α·N⌉ tokens follow
//!   them and the rest are dropped. The copies may run while the next layer computes (a GPU's
//!   copy stream): the buffers stay in flight until the next seal or restore. Before the
//!   backward ([`ActivationStore::restore`]) the host rows come back and the layer recomputes
//!   the dropped ones.
//! - `Recompute`: the `Whole` tensors stay on the device and every `TokenSplit` tensor is dropped
//!   (α = 0 without the copies). Attention is not recomputed: by MEMO's rule its output (and the
//!   softmax statistics) are `Whole`, so "full recompute" here means everything but attention.
//!
//! Rows are token-major: a per-token tensor has one row per token; a per-slot tensor has, per
//! expert, one row per routed slot in ascending token order, so a token prefix is a row prefix of
//! every expert's block.

use super::arena::Arena;
use super::host::{HostSeg, HostTier};
use crate::backend::{Backend, Precision};
use crate::model::config::{ModelConfig, MoeConfig};
use crate::model::routing::{Capped, Routing};
use crate::{Error, Result};

/// Row width of a saved tensor, named by what it is a width of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Width {
    /// `d_model`.
    Model,
    /// The fused q, k, v row: `(H + 2·Hkv)·D`.
    Qkv,
    /// The attention output row: `H·D`.
    AttnOut,
    /// One entry per expert (router logits and probabilities).
    Experts,
    /// A single element (per-row statistics such as RMSNorm's rstd).
    One,
}

/// How many rows a saved tensor has and how wide they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Extent {
    /// One row of the width per token.
    PerToken(Width),
    /// One element per (sequence, head, position), independent of routing.
    PerHeadToken,
    /// One row of the width per routed slot (token copy sent to an expert).
    PerSlot(Width),
    /// `n · h_e` elements per slot routed to expert `e` of width `h_e`.
    PerSlotExpertWidth(usize),
}

/// MEMO's tensor rule: the layer input and the attention output (with its softmax statistics)
/// are kept or offloaded whole; every other tensor is per token and may be split and recomputed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Class {
    Whole,
    TokenSplit,
}

/// One entry of a layer's skeletal inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TensorSpec {
    pub name: &'static str,
    pub extent: Extent,
    pub class: Class,
    /// The allocation it takes when the store brings it back from the host.
    #[serde(skip)]
    pub precision: Precision,
}

/// The dimensions that turn an [`Extent`] into element counts for one block call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDims {
    pub batch: usize,
    pub seq: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub qkv_width: usize,
    pub attn_width: usize,
    pub expert_widths: Vec<usize>,
}

impl BlockDims {
    pub fn new(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize) -> Self {
        let d = model.head_dim();
        BlockDims {
            batch,
            seq,
            d_model: model.d_model,
            n_heads: model.n_heads,
            qkv_width: (model.n_heads + 2 * model.n_kv_heads) * d,
            attn_width: model.n_heads * d,
            expert_widths: moe.expert_widths.clone(),
        }
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    pub fn width(&self, w: Width) -> usize {
        match w {
            Width::Model => self.d_model,
            Width::Qkv => self.qkv_width,
            Width::AttnOut => self.attn_width,
            Width::Experts => self.expert_widths.len(),
            Width::One => 1,
        }
    }

    /// Elements of `spec` with `slots[e]` slots routed to expert `e`.
    pub fn elements(&self, spec: &TensorSpec, slots: &[usize]) -> usize {
        match spec.extent {
            Extent::PerToken(w) => self.tokens() * self.width(w),
            Extent::PerHeadToken => self.tokens() * self.n_heads,
            Extent::PerSlot(w) => slots.iter().sum::<usize>() * self.width(w),
            Extent::PerSlotExpertWidth(k) => slots.iter().zip(&self.expert_widths).map(|(&s, &h)| s * k * h).sum(),
        }
    }
}

/// A block of rows inside a saved tensor, rows in ascending token order: `rows` rows of `width`
/// elements starting at element `start`, of which the first `kept` belong to tokens below the
/// split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRun {
    pub start: usize,
    pub rows: usize,
    pub width: usize,
    pub kept: usize,
}

/// Where expert parallelism put a layer's gate/up rows: on the experts' rank, one chunk per
/// (local expert, source rank), expert-major, each chunk's rows in its source's token order.
/// Each chunk is `(rows, kept, width)`: its rows, how many of them belong to tokens below the
/// layer's split on their source, and the row width (2h of its expert).
pub type ExchangedRows = Vec<(usize, usize, usize)>;

/// The row runs of a `TokenSplit` tensor for a split at token `split` (tokens `< split` kept);
/// the gate/up product's in the `exchanged` layout where the rows were exchanged.
pub fn row_runs(spec: &TensorSpec, dims: &BlockDims, routing: &Routing, split: usize, exchanged: Option<&ExchangedRows>) -> Vec<RowRun> {
    let per_expert = |row_width: &dyn Fn(usize) -> usize| {
        let mut start = 0;
        let below = routing.slots_below(split);
        (0..routing.n_experts)
            .map(|e| {
                let slots = routing.slots_of(e);
                let run = RowRun { start, rows: slots.len(), width: row_width(e), kept: below[e] };
                start += slots.len() * run.width;
                run
            })
            .collect()
    };
    match spec.extent {
        Extent::PerToken(w) => vec![RowRun { start: 0, rows: dims.tokens(), width: dims.width(w), kept: split.min(dims.tokens()) }],
        Extent::PerHeadToken => vec![RowRun { start: 0, rows: dims.tokens() * dims.n_heads, width: 1, kept: dims.tokens() * dims.n_heads }],
        Extent::PerSlot(w) => per_expert(&|_| dims.width(w)),
        Extent::PerSlotExpertWidth(k) => match exchanged {
            None => per_expert(&|e| k * dims.expert_widths[e]),
            Some(chunks) => {
                let mut start = 0;
                chunks
                    .iter()
                    .map(|&(rows, kept, width)| {
                        start += rows * width;
                        RowRun { start: start - rows * width, rows, width, kept }
                    })
                    .collect()
            }
        },
    }
}

/// What happens to one layer's skeletal activations between its forward and its backward.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LayerPolicy {
    Keep,
    Offload { alpha: f32 },
    Recompute,
}

/// Per-layer policies in short, runs of equal ones counted: `keep ×12`, `offload α=0.62 ×10,
/// keep ×2`.
pub fn policy_label(policies: &[LayerPolicy]) -> String {
    let name = |p: &LayerPolicy| match p {
        LayerPolicy::Keep => "keep".to_string(),
        LayerPolicy::Recompute => "recompute".to_string(),
        LayerPolicy::Offload { alpha } => format!("offload α={alpha:.2}"),
    };
    let mut runs: Vec<(String, usize)> = Vec::new();
    for p in policies.iter().map(name) {
        match runs.last_mut() {
            Some((last, n)) if *last == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs.iter().map(|(p, n)| format!("{p} ×{n}")).collect::<Vec<_>>().join(", ")
}

impl LayerPolicy {
    /// First token whose `TokenSplit` rows are dropped, or `None` when nothing is.
    pub fn split_token(&self, tokens: usize) -> Option<usize> {
        match *self {
            LayerPolicy::Keep => None,
            LayerPolicy::Recompute => Some(0),
            LayerPolicy::Offload { alpha } => Some(((alpha as f64 * tokens as f64).ceil() as usize).min(tokens)),
        }
    }

    /// Bytes of a layer's `TokenSplit` tensors, `others` in all, that go to the host.
    pub fn offloaded_others(&self, others: u64, tokens: usize) -> u64 {
        match self {
            LayerPolicy::Offload { .. } => (others as u128 * self.split_token(tokens).unwrap_or(0) as u128 / tokens.max(1) as u128) as u64,
            LayerPolicy::Keep | LayerPolicy::Recompute => 0,
        }
    }

    fn check(&self, layer: usize) -> Result<()> {
        match *self {
            LayerPolicy::Offload { alpha } if !(0.0..=1.0).contains(&alpha) => {
                Err(Error::config(format!("layer {layer} alpha"), alpha, "a number in [0, 1]"))
            }
            _ => Ok(()),
        }
    }
}

/// Bytes of one layer's skeletal activations by where they spend the time between forward and
/// backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerTraffic {
    /// Stayed on the device.
    pub kept: u64,
    /// Copied to the host tier and back.
    pub offloaded: u64,
    /// Dropped and recomputed before the backward.
    pub recomputed: u64,
}

/// The saved state of one layer.
struct LayerSlots<B: Backend> {
    tensors: Vec<Option<B::Buf>>,
    /// Length of each saved tensor, kept while its device buffer is dropped.
    lens: Vec<usize>,
    /// Host segment of each offloaded tensor (whole, or its kept rows run after run).
    host: Vec<Option<HostSeg>>,
    /// The layer's routing: the slots its experts ran, and any its capacity dropped.
    routing: Option<Capped>,
    /// With expert parallelism: rows each local expert received from each EP rank.
    received: Option<Vec<usize>>,
    /// With expert parallelism, a saved gate/up product and a split: its rows' layout.
    exchanged: Option<ExchangedRows>,
    /// Set by `seal` when rows were dropped: the first dropped token.
    split: Option<usize>,
    traffic: LayerTraffic,
}

/// A layer being brought back ahead of its backward: its new buffers by inventory index, and
/// the mark after their copies.
struct Prefetch<B: Backend> {
    layer: usize,
    bufs: Vec<(usize, B::Buf)>,
    mark: B::CopyMark,
}

/// Saved activations of every layer, checked against the declared inventory.
pub struct ActivationStore<B: Backend> {
    inventory: &'static [TensorSpec],
    layers: Vec<LayerSlots<B>>,
    policies: Vec<LayerPolicy>,
    host: HostTier,
    /// The host tier's memory, allocated at the first offload.
    host_mem: Option<B::HostBuf>,
    /// Offloaded device buffers whose copies may still be running (until the next wait).
    in_flight: Vec<B::Buf>,
    /// A layer being brought back ahead of its backward.
    prefetched: Option<Prefetch<B>>,
    device_bytes: u64,
    device_peak: u64,
    /// The blocks' transient memory, kept across steps (planned by default).
    arena: Arena<B>,
}

impl<B: Backend> ActivationStore<B> {
    /// A store that keeps everything on the device.
    pub fn new(inventory: &'static [TensorSpec], n_layers: usize) -> Self {
        let layers = (0..n_layers)
            .map(|_| LayerSlots {
                tensors: (0..inventory.len()).map(|_| None).collect(),
                lens: vec![0; inventory.len()],
                host: vec![None; inventory.len()],
                routing: None,
                received: None,
                exchanged: None,
                split: None,
                traffic: LayerTraffic::default(),
            })
            .collect();
        ActivationStore {
            inventory,
            layers,
            policies: vec![LayerPolicy::Keep; n_layers],
            host: HostTier::new(0),
            host_mem: None,
            in_flight: Vec::new(),
            prefetched: None,
            device_bytes: 0,
            device_peak: 0,
            arena: Arena::planned(),
        }
    }

    /// A store applying `policies` (one per layer) with `host_bytes` of host tier.
    pub fn with_policies(inventory: &'static [TensorSpec], policies: Vec<LayerPolicy>, host_bytes: u64) -> Result<Self> {
        for (l, p) in policies.iter().enumerate() {
            p.check(l)?;
        }
        let mut store = Self::new(inventory, policies.len());
        store.policies = policies;
        store.host = HostTier::new(host_bytes);
        Ok(store)
    }

    /// Where the blocks' transients live (one planned buffer, or one buffer each).
    pub fn set_arena(&mut self, arena: Arena<B>) {
        self.arena = arena;
    }

    pub fn arena(&self) -> &Arena<B> {
        &self.arena
    }

    /// Moves the arena out for a step (the blocks borrow it next to the store); give it back
    /// with [`Self::set_arena`].
    pub fn take_arena(&mut self) -> Arena<B> {
        std::mem::take(&mut self.arena)
    }

    pub fn inventory(&self) -> &'static [TensorSpec] {
        self.inventory
    }

    /// Whether `name` is in the inventory (a block saves only what its store declares).
    pub fn declares(&self, name: &str) -> bool {
        self.inventory.iter().any(|s| s.name == name)
    }

    pub fn policies(&self) -> &[LayerPolicy] {
        &self.policies
    }

    fn index(&self, name: &str) -> usize {
        self.inventory
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("activation `{name}` is not in the layer inventory"))
    }

    fn track(&mut self, added: u64, removed: u64) {
        self.device_bytes = self.device_bytes + added - removed;
        self.device_peak = self.device_peak.max(self.device_bytes);
    }

    pub fn save(&mut self, layer: usize, name: &str, buf: B::Buf) {
        let i = self.index(name);
        let added = B::buf_bytes(&buf);
        let slots = &mut self.layers[layer];
        slots.lens[i] = B::len(&buf);
        let old = slots.tensors[i].replace(buf).map_or(0, |b| B::buf_bytes(&b));
        self.track(added, old);
    }

    pub fn load(&self, layer: usize, name: &str) -> &B::Buf {
        let i = self.index(name);
        self.layers[layer].tensors[i].as_ref().unwrap_or_else(|| panic!("activation `{name}` of layer {layer} is not on the device"))
    }

    /// Moves a saved tensor out (to fill rows in place); give it back with [`Self::save`].
    pub fn take(&mut self, layer: usize, name: &str) -> B::Buf {
        let i = self.index(name);
        let buf = self.layers[layer].tensors[i].take().unwrap_or_else(|| panic!("activation `{name}` of layer {layer} is not on the device"));
        self.track(0, B::buf_bytes(&buf));
        buf
    }

    pub fn save_routing(&mut self, layer: usize, routing: Capped) {
        self.layers[layer].routing = Some(routing);
    }

    /// The slots the layer's experts ran.
    pub fn routing(&self, layer: usize) -> &Routing {
        &self.routed(layer).kept
    }

    /// The layer's routing with the slots its capacity dropped.
    pub fn routed(&self, layer: usize) -> &Capped {
        self.layers[layer].routing.as_ref().unwrap_or_else(|| panic!("routing of layer {layer} was not saved"))
    }

    /// Saves the row counts of the expert-parallel exchange (the backward exchanges the same rows)
    /// and, where the layer saves the gate/up product and splits its tokens, that product's row
    /// layout (the policy splits it there, not by the local routing).
    pub fn save_received(&mut self, layer: usize, recv_rows: Vec<usize>, exchanged: Option<ExchangedRows>) {
        self.layers[layer].received = Some(recv_rows);
        self.layers[layer].exchanged = exchanged;
    }

    /// The gate/up product's exchanged row layout, where [`Self::save_received`] got one.
    pub fn exchanged(&self, layer: usize) -> Option<&ExchangedRows> {
        self.layers[layer].exchanged.as_ref()
    }

    pub fn received(&self, layer: usize) -> &[usize] {
        self.layers[layer].received.as_deref().unwrap_or_else(|| panic!("expert-parallel row counts of layer {layer} were not saved"))
    }

    /// Applies the layer's policy once its forward has saved everything: offloads to the host
    /// tier and drops what will be recomputed. Errors when the host tier is full.
    ///
    /// The copies run while the next layer computes (on a GPU): the offloaded buffers stay
    /// alive, in flight, until the next seal, restore or [`Self::settle`] puts a fence after
    /// them. So at most two layers' offloaded tensors are on the device at once, MEMO's two
    /// rotating skeletal buffers.
    pub fn seal(&mut self, be: &B, layer: usize, dims: &BlockDims) -> Result<()> {
        self.settle(be);
        if let Some(stale) = self.prefetched.take() {
            // Left by a step that stopped before its backward reached the layer.
            be.copy_wait(stale.mark);
            self.track(0, stale.bufs.iter().map(|(_, b)| B::buf_bytes(b)).sum());
        }
        self.free_host(layer);
        let policy = self.policies[layer];
        let split = policy.split_token(dims.tokens());
        let mut traffic = LayerTraffic::default();
        let routing = self.layers[layer].routing.take().unwrap_or_else(|| panic!("routing of layer {layer} was not saved"));
        for (i, spec) in self.inventory.iter().enumerate() {
            let elem = spec.precision.bytes(be.activation_bytes());
            let bytes = self.layers[layer].lens[i] as u64 * elem;
            let (to_host, dropped): (Vec<(usize, usize)>, u64) = match (policy, spec.class, split) {
                (LayerPolicy::Keep, ..) | (LayerPolicy::Recompute, Class::Whole, _) | (_, _, None) => {
                    traffic.kept += bytes;
                    continue;
                }
                (_, Class::Whole, _) => (vec![(0, self.layers[layer].lens[i])], 0),
                (_, Class::TokenSplit, Some(a)) => {
                    let runs = row_runs(spec, dims, &routing.kept, a, self.layers[layer].exchanged.as_ref());
                    let kept: Vec<(usize, usize)> = runs.iter().map(|r| (r.start, r.kept * r.width)).filter(|&(_, n)| n > 0).collect();
                    let dropped = runs.iter().map(|r| ((r.rows - r.kept) * r.width) as u64).sum::<u64>() * elem;
                    (kept, dropped)
                }
            };
            let buf = self.take(layer, spec.name);
            let total: usize = to_host.iter().map(|&(_, n)| n).sum();
            if total > 0 {
                let seg = self.host.push(total as u64 * elem)?;
                let limit = self.host.limit_bytes();
                let pool = self.host_mem.get_or_insert_with(|| be.alloc_host(limit));
                // Rows are dropped: gather the offloaded ones into a buffer of their own first,
                // so that only they, not the whole tensor, stay on the device while the copy
                // runs beside the next layer's forward.
                let from = if dropped > 0 {
                    let mut rows = be.alloc_scratch(total, spec.precision); // written whole below
                    let mut at = 0;
                    for &(start, n) in &to_host {
                        be.copy(B::view_mut(&mut rows, at..at + n), B::view(&buf, start..start + n));
                        at += n;
                    }
                    rows
                } else {
                    buf
                };
                be.offload(pool, seg.start, B::full(&from), spec.precision);
                self.layers[layer].host[i] = Some(seg);
                // Still being read by the copy: counted on the device until the next wait.
                self.track(B::buf_bytes(&from), 0);
                self.in_flight.push(from);
            }
            traffic.offloaded += total as u64 * elem;
            traffic.recomputed += dropped;
        }
        let slots = &mut self.layers[layer];
        slots.routing = Some(routing);
        slots.split = split;
        slots.traffic = traffic;
        Ok(())
    }

    /// Waits (on the device) for every offload started so far and frees the buffers they read.
    /// Seal and restore do it; call it after a forward that no backward follows.
    pub fn settle(&mut self, be: &B) {
        if self.in_flight.is_empty() {
            return;
        }
        be.copy_wait(be.copy_mark());
        let freed: u64 = self.in_flight.drain(..).map(|b| B::buf_bytes(&b)).sum();
        self.track(0, freed);
    }

    /// Brings a sealed layer back onto the device before its backward: host rows are copied
    /// back, into full-size buffers. Returns the first token whose rows the layer must recompute
    /// (through `N`), or `None` when nothing was dropped.
    ///
    /// It also starts bringing back the layer before it (the next backward), whose copies then
    /// run while this layer's backward computes: MEMO's prefetch. The prefetch lands in buffers
    /// the size of the host rows, spread into full-size ones only here, so while a layer is
    /// differentiated the one before it holds its offloaded bytes, not a whole layer.
    pub fn restore(&mut self, be: &B, layer: usize, dims: &BlockDims) -> Option<usize> {
        self.settle(be);
        let staged = match self.prefetched.take() {
            Some(p) if p.layer == layer => {
                be.copy_wait(p.mark);
                p.bufs
            }
            other => {
                assert!(other.is_none(), "layer {} was prefetched, but layer {layer} is restored", other.map_or(0, |p| p.layer));
                let staged = self.stage_layer(be, layer);
                be.copy_wait(be.copy_mark());
                staged
            }
        };
        self.unstage(be, layer, dims, staged);
        if let Some(prev) = layer.checked_sub(1).filter(|&l| self.layers[l].host.iter().any(Option::is_some)) {
            let bufs = self.stage_layer(be, prev);
            self.prefetched = Some(Prefetch { layer: prev, bufs, mark: be.copy_mark() });
        }
        self.layers[layer].split.take()
    }

    /// Starts copying `layer`'s host segments back, each into a buffer of its own size (usable
    /// after a wait on a later mark); frees the segments.
    fn stage_layer(&mut self, be: &B, layer: usize) -> Vec<(usize, B::Buf)> {
        let mut staged = Vec::new();
        for (i, spec) in self.inventory.iter().enumerate() {
            let Some(seg) = self.layers[layer].host[i].take() else { continue };
            let elem = spec.precision.bytes(be.activation_bytes());
            // Written whole by the copy.
            let mut buf = be.alloc_scratch((seg.len / elem) as usize, spec.precision);
            let pool = self.host_mem.as_ref().expect("an offloaded tensor has a host pool");
            be.reload(B::full_mut(&mut buf), pool, seg.start, spec.precision);
            // Reused only by offloads, which queue behind these copies on the same stream.
            self.host.free(seg);
            self.track(B::buf_bytes(&buf), 0);
            staged.push((i, buf));
        }
        staged
    }

    /// Makes every tensor of `layer` whole on the device again: a staged buffer that holds a
    /// whole tensor becomes it, staged rows are spread, run by run, into a full-size buffer
    /// (whose dropped rows the recompute fills), and a dropped tensor gets a full-size buffer.
    /// One tensor at a time, so at most one tensor is held both ways.
    fn unstage(&mut self, be: &B, layer: usize, dims: &BlockDims, staged: Vec<(usize, B::Buf)>) {
        let split = self.layers[layer].split;
        let routing = self.layers[layer].routing.take().unwrap_or_else(|| panic!("routing of layer {layer} was not saved"));
        let mut staged: Vec<Option<B::Buf>> = {
            let mut by_index: Vec<Option<B::Buf>> = (0..self.inventory.len()).map(|_| None).collect();
            staged.into_iter().for_each(|(i, b)| by_index[i] = Some(b));
            by_index
        };
        for (i, spec) in self.inventory.iter().enumerate() {
            if self.layers[layer].tensors[i].is_some() {
                continue;
            }
            let len = self.layers[layer].lens[i];
            let buf = match (staged[i].take(), spec.class, split) {
                (Some(whole), Class::Whole, _) | (Some(whole), _, None) => whole,
                (rows, _, _) => {
                    // Written whole: staged rows here, the dropped ones by the recompute.
                    let mut buf = be.alloc_scratch(len, spec.precision);
                    self.track(B::buf_bytes(&buf), 0);
                    if let (Some(rows), Some(a)) = (rows, split) {
                        let mut at = 0;
                        for r in row_runs(spec, dims, &routing.kept, a, self.layers[layer].exchanged.as_ref()) {
                            let n = r.kept * r.width;
                            be.copy(B::view_mut(&mut buf, r.start..r.start + n), B::view(&rows, at..at + n));
                            at += n;
                        }
                        self.track(0, B::buf_bytes(&rows));
                    }
                    buf
                }
            };
            self.layers[layer].tensors[i] = Some(buf); // counted when staged or allocated
        }
        self.layers[layer].routing = Some(routing);
    }

    fn free_host(&mut self, layer: usize) {
        for i in 0..self.inventory.len() {
            if let Some(seg) = self.layers[layer].host[i].take() {
                self.host.free(seg);
            }
        }
    }

    /// Frees a layer's activations once its backward is done.
    pub fn release(&mut self, layer: usize) {
        self.free_host(layer);
        let freed: u64 = self.layers[layer].tensors.iter_mut().filter_map(|t| t.take()).map(|b| B::buf_bytes(&b)).sum();
        self.track(0, freed);
        let slots = &mut self.layers[layer];
        slots.routing = None;
        slots.received = None;
        slots.exchanged = None;
        slots.split = None;
    }

    /// Bytes currently held on the device for `layer`.
    pub fn held_bytes(&self, layer: usize) -> u64 {
        self.layers[layer].tensors.iter().flatten().map(B::buf_bytes).sum()
    }

    /// Where the layer's bytes went at its last seal (all kept for an unsealed layer).
    pub fn traffic(&self, layer: usize) -> LayerTraffic {
        self.layers[layer].traffic
    }

    /// Most bytes the store has held on the device at once, and the host tier's peak.
    pub fn peaks(&self) -> (u64, u64) {
        (self.device_peak, self.host.peak_bytes())
    }

    /// Forgets the peaks (e.g. between a warm-up and a measured step).
    pub fn reset_peaks(&mut self) {
        self.device_peak = self.device_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store offloads ⌈α·tokens⌉ rows (the α planner rounds its α to match, `policy.rs`).
    #[test]
    fn an_offload_split_rounds_the_offloaded_rows_up() {
        let off = |alpha| LayerPolicy::Offload { alpha }.split_token(7);
        assert_eq!([off(0.0), off(0.5), off(0.9), off(1.0)], [Some(0), Some(4), Some(7), Some(7)]);
        assert_eq!((LayerPolicy::Keep.split_token(7), LayerPolicy::Recompute.split_token(7)), (None, Some(0)));
        assert_eq!(LayerPolicy::Offload { alpha: 0.5 }.offloaded_others(700, 7), 400);
    }
    use crate::backend::cpu::Cpu;
    use crate::model::config::Routing as Kind;
    use crate::model::Model;

    /// Where the rows were exchanged, the gate/up product's runs are the exchanged chunks, one
    /// after another; every other tensor's follow the local routing.
    #[test]
    fn exchanged_gate_up_rows_run_chunk_by_chunk() {
        let m = ModelConfig { vocab_size: 64, d_model: 8, n_layers: 1, n_heads: 2, n_kv_heads: 2, seq_len: 4, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![2, 4], routing: Kind::TopK, top_k: 1, top_p: 1.0, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        let dims = BlockDims::new(&m, &moe, 1, 4);
        let c = |token, expert| crate::model::routing::Choice { token, expert, gate: 1.0 };
        let routing = Routing::from_choices(4, 2, &[c(0, 1), c(1, 0), c(2, 1), c(3, 1)]);
        let spec = |name| *crate::model::block::INVENTORY.iter().find(|s| s.name == name).unwrap();
        let exchanged: ExchangedRows = vec![(3, 1, 4), (0, 0, 4), (2, 2, 8)];
        let runs = row_runs(&spec(crate::model::block::GATE_UP), &dims, &routing, 2, Some(&exchanged));
        assert_eq!(runs, vec![RowRun { start: 0, rows: 3, width: 4, kept: 1 }, RowRun { start: 12, rows: 0, width: 4, kept: 0 }, RowRun { start: 12, rows: 2, width: 8, kept: 2 }]);
        // expert_out (per slot, on this rank) by the local routing: expert 0 has token 1, expert 1 tokens 0, 2, 3.
        let runs = row_runs(&spec("expert_out"), &dims, &routing, 2, Some(&exchanged));
        assert_eq!(runs, vec![RowRun { start: 0, rows: 1, width: 8, kept: 1 }, RowRun { start: 8, rows: 3, width: 8, kept: 1 }]);
    }

    /// Restoring a layer starts bringing back the one before it, and restoring that one takes
    /// the prefetched buffers (the values are checked bitwise by tests/memo.rs).
    #[test]
    fn restore_prefetches_the_previous_layer() {
        let be = Cpu::new(1);
        let m = ModelConfig { vocab_size: 64, d_model: 32, n_layers: 3, n_heads: 4, n_kv_heads: 2, seq_len: 24, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![8, 16, 24, 40], routing: Kind::TopK, top_k: 2, top_p: 0.6, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        let model = Model::new(&be, m.clone(), moe.clone(), 1).unwrap();
        let mut store = model.new_store_with(vec![LayerPolicy::Offload { alpha: 0.5 }; 3], 1 << 30, crate::config::GateUp::Save).unwrap();
        let inputs: Vec<u32> = (0..24).map(|i| (i * 7 % 64) as u32).collect();
        model.forward_saving(&be, &mut store, &inputs, 1, 24).unwrap();
        let dims = BlockDims::new(&m, &moe, 1, 24);
        assert_eq!(store.restore(&be, 2, &dims), Some(12), "α = 0.5 of 24 tokens");
        assert_eq!(store.prefetched.as_ref().map(|p| p.layer), Some(1));
        assert!(store.layers[1].host.iter().all(Option::is_none), "layer 1's host rows are on their way back");
        store.release(2);
        assert_eq!(store.restore(&be, 1, &dims), Some(12));
        assert_eq!(store.prefetched.as_ref().map(|p| p.layer), Some(0));
        assert!(store.inventory.iter().all(|spec| store.layers[1].tensors[store.index(spec.name)].is_some()), "layer 1 is whole again");
    }
}
