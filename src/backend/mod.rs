//! The `Backend` trait: every op the model needs, each as a forward/backward pair over views
//! into buffers the caller owns (no hidden allocation on the hot path).
//!
//! Layout conventions (row-major everywhere):
//! - token activations are `(N, C)` with `N = B·T` tokens, row `b·T + t`;
//! - a linear layer's weight is `(out, in)` and computes `y = x Wᵀ`;
//! - the fused attention input `qkv` is `(N, (H + 2·Hkv)·D)`: q heads, then k heads, then v heads.
//!
//! Index data (tokens, routing slots) is passed as host slices: routing decisions are made on the
//! host from the router probabilities, which are small (`N × E`).
//!
//! Ops whose doc says "accumulates" add into their output (`+=`); all others overwrite it.
//!
//! Precision: a buffer is either in activation storage ([`Backend::alloc`]: f32 on the CPU, bf16
//! on CUDA in mixed precision) or f32 everywhere ([`Backend::alloc_f32`]). The roles are fixed:
//! weights are read from the working copy (activation storage, see
//! [`Backend::uses_working_copy`]); weight gradients are f32 (`rmsnorm_bwd`'s `dw`,
//! `embedding_bwd`'s `dtable`, the classifier's `dw`, and `matmul` outputs into gradients);
//! statistics are f32 (`rstd`, `lse`, the rotary table, router logits and probabilities, the
//! slot gates' gradient); everything else is activation storage, the router logits' gradient
//! included (two GEMMs read it). `matmul`'s operands share one kind; it writes either kind.

pub mod cpu;
pub mod cuda_scratch;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::ops::Range;

use crate::parallel::comm::Communicator;

/// One op's row of a backend profile (`with_profile` on either backend): calls, time, and the
/// least it had to move and compute (every operand read once, every result written once; the
/// multiply-add FLOPs of matmuls and attention), zero where the backend does not count them
/// (the CPU) or they mean no device work (uploads, host work). Bytes or FLOPs over seconds, set
/// beside the GPU's bandwidth and tensor rate, say how far an op is from its bound.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub seconds: f64,
    pub bytes: f64,
    pub flops: f64,
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Width of one attention-output row.
    pub fn out_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
    /// Matmul FLOPs of a causal attention forward, `QKᵀ` and `PV` over the lower triangle:
    /// `2 · 2 · B · H · T² · D / 2`. MFU counts this (the PyTorch peer's and FlashAttention's
    /// convention); the attention benchmark takes the backward as 2.5× this.
    pub fn causal_attention_flops(&self) -> f64 {
        2.0 * 2.0 * self.batch as f64 * self.n_heads as f64 * (self.seq as f64).powi(2) * self.head_dim as f64 / 2.0
    }
}

/// AdamW hyper-parameters for one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u64,
}

/// Token-to-slot incidence of a routing, by token: token `t` owns slots
/// `slots[offsets[t]..offsets[t + 1]]` in ascending slot order. Used to combine expert outputs
/// (and gradients) per token deterministically, without atomics.
#[derive(Clone, Copy, Debug)]
pub struct TokenSlots<'a> {
    pub offsets: &'a [u32],
    pub slots: &'a [u32],
}

/// Which experts a token takes ([`Backend::route`]): Top-K, or Top-P's smallest prefix of the
/// descending order whose mass reaches `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouteRule {
    TopK(usize),
    TopP(f32),
}

/// What [`Backend::route`] reads back: the slots in expert-major order (ascending token within
/// an expert) with their renormalised gates, the tokens each expert took, and the aux losses'
/// sums over tokens: `Σ_t P_ti` per expert, `Σ_t (lse_t − ⟨P_t, z_t⟩)` (entropy) and
/// `Σ_t lse_t²` (z-loss).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutedSlots {
    pub token: Vec<u32>,
    pub gate: Vec<f32>,
    pub counts: Vec<usize>,
    pub sum_probs: Vec<f64>,
    pub entropy: f64,
    pub z: f64,
}

/// The routing and aux-loss weights [`Backend::router_bwd`] needs: host data, like every index.
#[derive(Clone, Copy, Debug)]
pub struct RouterGrad<'a> {
    /// Each token's slots, ascending (experts ascending).
    pub by_token: TokenSlots<'a>,
    /// Expert of each slot.
    pub slot_expert: &'a [u32],
    /// Renormalised gate of each slot.
    pub gate: &'a [f32],
    /// `∂/∂P_i` of the weighted load-balance and P-Penalty losses per expert (the same for every
    /// token: they depend on the routing counts, not on the token).
    pub load_balance: &'a [f32],
    pub p_penalty: &'a [f32],
    /// Weights of the entropy and z-loss terms, each a mean over the N tokens.
    pub entropy: f32,
    pub z_loss: f32,
}

impl RouterGrad<'_> {
    pub fn tokens(&self) -> usize {
        self.by_token.offsets.len().saturating_sub(1)
    }
    pub fn experts(&self) -> usize {
        self.load_balance.len()
    }
}

/// Which allocation a tensor takes (see the module doc on precision).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// [`Backend::alloc`]: the backend's activation storage.
    #[default]
    Activation,
    /// [`Backend::alloc_f32`].
    F32,
}

/// One product of a grouped matmul: `out (m×n) [+]= op(a) (m×k) · op(b) (k×n)`, each matrix
/// dense and row-major, starting at element `out`, `a`, `b` of the call's views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub out: usize,
    pub a: usize,
    pub b: usize,
}

/// [`Backend::grouped_matmul`] as one `matmul` per product.
#[allow(clippy::too_many_arguments)]
pub fn matmul_each<B: Backend + ?Sized>(be: &B, mut out: B::ViewMut<'_>, a: B::View<'_>, b: B::View<'_>, gemms: &[Gemm], ta: bool, tb: bool, accumulate: bool) {
    for g in gemms {
        let o = B::subview_mut(&mut out, g.out..g.out + g.m * g.n);
        be.matmul(o, B::subview(a, g.a..g.a + g.m * g.k), B::subview(b, g.b..g.b + g.k * g.n), g.m, g.k, g.n, ta, tb, accumulate);
    }
}

/// [`Backend::matmul_residual`] as a copy of the residual into `out` and an accumulating matmul.
#[allow(clippy::too_many_arguments)]
pub fn copy_then_matmul<B: Backend + ?Sized>(be: &B, mut out: B::ViewMut<'_>, residual: B::View<'_>, a: B::View<'_>, b: B::View<'_>, m: usize, k: usize, n: usize, tb: bool) {
    be.copy(B::reborrow_mut(&mut out), residual);
    be.matmul(out, a, b, m, k, n, false, tb, true);
}

/// One expert of [`Backend::grouped_matmul_swiglu`]: its up projection `gemm` (`gemm.n` = 2h,
/// gate then up columns; `b` the (2h × k) weight, used transposed) and `act`, the element offset
/// of its SwiGLU output (m × h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwiGluGemm {
    pub gemm: Gemm,
    pub act: usize,
}

/// A product operand's rows picked from a view through an index (the routed slots' tokens), each
/// multiplied by its weight where `scale` is given: row i is `scale[i] · x[rows[i]]`, rounded to
/// the storage as [`Backend::gather_rows_scaled`] rounds it (as [`Backend::gather_rows`] copies
/// it without `scale`). The products' offsets into such an operand count in picked rows, as if
/// they had been gathered into a matrix of their own.
#[derive(Clone, Copy, Debug)]
pub struct Pick<'a> {
    pub rows: &'a [u32],
    pub scale: Option<&'a [f32]>,
}

impl<'a> Pick<'a> {
    /// The rows `rows` as they are.
    pub fn rows(rows: &'a [u32]) -> Self {
        Pick { rows, scale: None }
    }

    /// The rows `rows`, row i times `scale[i]`.
    pub fn scaled(rows: &'a [u32], scale: &'a [f32]) -> Self {
        assert_eq!(rows.len(), scale.len(), "a pick's rows and weights");
        Pick { rows, scale: Some(scale) }
    }
}

/// Calls `f` with `x`, or with the rows `pick` picks from it in a buffer of their own (the
/// default of the ops that take picked operands). Every product of `widths` must read rows of
/// that one width.
fn with_picked<B: Backend + ?Sized, R>(be: &B, x: B::View<'_>, pick: Option<Pick<'_>>, widths: impl Iterator<Item = usize>, op: &str, f: impl FnOnce(B::View<'_>) -> R) -> R {
    let Some(pick) = pick else { return f(x) };
    let widths: Vec<usize> = widths.collect();
    let width = widths.first().copied().unwrap_or(0);
    assert!(widths.iter().all(|&w| w == width), "{op}: picked rows need one width");
    let mut gathered = be.alloc_scratch(pick.rows.len() * width, Precision::Activation); // the gather writes it all
    match pick.scale {
        Some(scale) => be.gather_rows_scaled(B::full_mut(&mut gathered), x, pick.rows, scale, width),
        None => be.gather_rows(B::full_mut(&mut gathered), x, pick.rows, width),
    }
    f(B::full(&gathered))
}

/// [`Backend::grouped_matmul_swiglu`] as the grouped matmul (after gathering `a`'s rows into a
/// buffer of their own where `pick` picks them), then `swiglu_fwd` per expert.
pub fn swiglu_each<B: Backend + ?Sized>(be: &B, mut gu: B::ViewMut<'_>, mut act: B::ViewMut<'_>, (a, pick): (B::View<'_>, Option<Pick<'_>>), b: B::View<'_>, gemms: &[SwiGluGemm]) {
    let up: Vec<Gemm> = gemms.iter().map(|g| g.gemm).collect();
    with_picked(be, a, pick, up.iter().map(|g| g.k), "grouped_matmul_swiglu", |a| be.grouped_matmul(B::reborrow_mut(&mut gu), a, b, &up, false, true, false));
    for g in gemms {
        let (rows, h) = (g.gemm.m, g.gemm.n / 2);
        be.swiglu_fwd(B::subview_mut(&mut act, g.act..g.act + rows * h), B::subview(B::as_view(&gu), g.gemm.out..g.gemm.out + rows * 2 * h), rows, h);
    }
}

/// [`Backend::grouped_weight_grad`] as the grouped matmul, after gathering each picked
/// operand's rows into a buffer of their own.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_gathering<B: Backend + ?Sized>(be: &B, out: B::ViewMut<'_>, (a, a_pick): (B::View<'_>, Option<Pick<'_>>), (b, b_pick): (B::View<'_>, Option<Pick<'_>>), gemms: &[Gemm], accumulate: bool) {
    let op = "grouped_weight_grad";
    with_picked(be, a, a_pick, gemms.iter().map(|g| g.m), op, |a| with_picked(be, b, b_pick, gemms.iter().map(|g| g.n), op, |b| be.grouped_matmul(out, a, b, gemms, true, false, accumulate)))
}

/// One expert of [`Backend::grouped_matmul_swiglu_bwd`]: its product `gemm`, `dact (m × h) =
/// dy (m × k) · W_down (k × h)` (`gemm.out` in the call's `dact`), and the element offsets of
/// its saved `gu` (m × 2h), its `dgu` (m × 2h) and its recomputed SwiGLU output `act` (m × h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwiGluBwdGemm {
    pub gemm: Gemm,
    pub gu: usize,
    pub dgu: usize,
    pub act: usize,
}

/// [`Backend::grouped_matmul_swiglu_bwd`] as the grouped matmul into `dact` (after gathering
/// `dy`'s rows into a buffer of their own where `pick` picks them), then `swiglu_bwd` per expert.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_bwd_each<B: Backend + ?Sized>(be: &B, mut dgu: B::ViewMut<'_>, mut act: B::ViewMut<'_>, mut dact: B::ViewMut<'_>, (dy, pick): (B::View<'_>, Option<Pick<'_>>), b: B::View<'_>, gu: B::View<'_>, gemms: &[SwiGluBwdGemm]) {
    let products: Vec<Gemm> = gemms.iter().map(|g| g.gemm).collect();
    with_picked(be, dy, pick, products.iter().map(|g| g.k), "grouped_matmul_swiglu_bwd", |dy| be.grouped_matmul(B::reborrow_mut(&mut dact), dy, b, &products, false, false, false));
    for g in gemms {
        let (rows, h) = (g.gemm.m, g.gemm.n);
        let dact = B::subview(B::as_view(&dact), g.gemm.out..g.gemm.out + rows * h);
        be.swiglu_bwd(B::subview_mut(&mut dgu, g.dgu..g.dgu + rows * 2 * h), Some(B::subview_mut(&mut act, g.act..g.act + rows * h)), dact, B::subview(gu, g.gu..g.gu + rows * 2 * h), rows, h);
    }
}

impl Precision {
    /// Bytes per element, given the backend's activation storage size.
    pub fn bytes(self, activation_bytes: u64) -> u64 {
        match self {
            Precision::Activation => activation_bytes,
            Precision::F32 => 4,
        }
    }
}

/// One view of the planned transient arena: `len` elements of kind `precision` from byte `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaPart {
    pub at: u64,
    pub len: usize,
    pub precision: Precision,
}

/// Keeps freed host memory in the heap instead of handing it back to the kernel: transient
/// tensors (CPU backend) and the router's per-layer vectors (every backend) are allocated and
/// freed every step, and glibc serves large blocks with fresh `mmap`s that page-fault on first
/// touch (~10% of a tiny CPU step). Process-wide, set once.
pub(crate) fn keep_freed_host_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only adjusts allocator thresholds; called once, before heavy allocation.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

/// What [`Backend::device_group`] chose.
pub enum GroupOnDevice<B: Backend> {
    /// Collectives on the devices, queued in the backend's stream order.
    Opened(Box<dyn DeviceGroup<B>>),
    /// Through host memory; why not on the devices.
    Host(String),
}

impl<B: Backend> GroupOnDevice<B> {
    /// How a group of `ranks` runs its collectives, for the run's log, and the device group
    /// where one opened.
    pub fn into_parts(self, ranks: usize) -> (String, Option<Box<dyn DeviceGroup<B>>>) {
        match self {
            GroupOnDevice::Opened(g) => (g.describe(), Some(g)),
            GroupOnDevice::Host(why) => (format!("through host memory over {ranks} ranks ({why})"), None),
        }
    }
}

/// A chunk of a point-to-point exchange: the peer rank and an element range of a buffer.
pub type PeerChunk = (usize, Range<usize>);

/// Collectives over the ranks of a group on device buffers, without the host (NCCL on GPUs).
/// Every rank of the group makes the same calls in the same order.
pub trait DeviceGroup<B: Backend> {
    /// Queues `buf` (f32) ← Σ over the group's ranks of `buf` (every rank passes the same
    /// length) after every op queued so far, beside the ops queued after it: nothing may
    /// touch `buf` until [`DeviceGroup::join`].
    fn all_reduce_sum(&self, buf: B::ViewMut<'_>) -> crate::Result<()>;
    /// Makes the ops queued from now on wait for every sum queued before.
    fn join(&self) -> crate::Result<()>;
    /// Sends each `(peer, range)` of `sends` (elements of `src`) to `peer`, and receives each
    /// `(peer, range)` of `recvs` from `peer` into that range of `dst`, `src` and `dst` of one
    /// element type; the k-th chunk a rank sends a peer is the k-th that peer receives from it,
    /// of the same length. A rank may send to itself.
    fn exchange(&self, src: B::View<'_>, sends: &[PeerChunk], dst: B::ViewMut<'_>, recvs: &[PeerChunk]) -> crate::Result<()>;
    /// What runs them, for the run's log ("by NCCL 2.27.3 over 8 GPUs").
    fn describe(&self) -> String;
}

pub trait Backend: Send + Sync {
    /// Device memory holding activation-typed elements.
    type Buf: Send + Sync;
    type View<'a>: Copy
    where
        Self: 'a;
    type ViewMut<'a>
    where
        Self: 'a;
    /// Host memory of the activation store's host tier (see [`Backend::alloc_host`]).
    type HostBuf: Send + Sync;
    /// A point in the stream of host-tier copies (see [`Backend::copy_mark`]).
    type CopyMark: Send;

    fn name(&self) -> &'static str;

    /// Runs `f`, the model's host work between ops (the router's selection, aux losses and
    /// backward), on the threads this backend computes with, profiled as `op`: the CPU
    /// backend's pool, so that its thread count bounds this work too; by default rayon's global
    /// pool (every core).
    fn host_work<R: Send>(&self, op: &'static str, f: impl FnOnce() -> R + Send) -> R {
        let _ = op;
        f()
    }

    // ---- memory -------------------------------------------------------------------------------
    /// A zeroed buffer of `len` elements in activation storage (bf16 on a GPU in mixed precision).
    fn alloc(&self, len: usize) -> Self::Buf;
    /// A zeroed buffer of `len` elements that is f32 on every backend: master weights, gradients,
    /// optimizer moments and statistics (RMSNorm `rstd`, attention `lse`, router logits and
    /// probabilities, the rotary table). Which ops read or write which kind is stated per op.
    fn alloc_f32(&self, len: usize) -> Self::Buf;
    /// Bytes per element of activation storage (4 for f32, 2 for bf16).
    fn activation_bytes(&self) -> u64;
    /// Device memory a run may plan within (`memory.policy = "auto"`): what the device has free
    /// and what this backend already holds; `None` where memory is the host's (the CPU).
    fn memory_budget(&self) -> crate::Result<Option<u64>> {
        Ok(None)
    }
    /// Bytes a buffer occupies.
    fn buf_bytes(buf: &Self::Buf) -> u64;
    /// A buffer of `len` elements of kind `precision` whose values are unspecified, for a tensor
    /// the caller overwrites whole before reading any of it: it skips `alloc`'s zeroing (a
    /// memset per buffer on a GPU). The CPU backend fills it with NaN instead, so that a read
    /// before the write shows in every CPU test.
    fn alloc_scratch(&self, len: usize, precision: Precision) -> Self::Buf;
    fn alloc_as(&self, len: usize, precision: Precision) -> Self::Buf {
        match precision {
            Precision::Activation => self.alloc(len),
            Precision::F32 => self.alloc_f32(len),
        }
    }
    fn len(buf: &Self::Buf) -> usize;
    fn view(buf: &Self::Buf, range: Range<usize>) -> Self::View<'_>;
    fn view_mut(buf: &mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'_>;
    fn full(buf: &Self::Buf) -> Self::View<'_> {
        Self::view(buf, 0..Self::len(buf))
    }
    fn full_mut(buf: &mut Self::Buf) -> Self::ViewMut<'_> {
        let n = Self::len(buf);
        Self::view_mut(buf, 0..n)
    }
    /// The whole of a writable view, read-only (a reborrow).
    fn as_view<'b>(v: &'b Self::ViewMut<'_>) -> Self::View<'b>;
    /// The whole of a writable view, writable again for a shorter time (a reborrow).
    fn reborrow_mut<'b>(v: &'b mut Self::ViewMut<'_>) -> Self::ViewMut<'b>;
    /// Elements `range` of a view.
    fn subview<'b>(v: Self::View<'b>, range: Range<usize>) -> Self::View<'b>;
    fn subview_mut<'b>(v: &'b mut Self::ViewMut<'_>, range: Range<usize>) -> Self::ViewMut<'b>;
    /// Writable views of `parts` of one buffer from `alloc_f32` (raw memory in 4-byte units),
    /// each of its part's element type, in the order given and all usable at once: how the
    /// planned transient arena hands out the tensors live at the same time. Panics when two
    /// non-empty parts overlap or one leaves the buffer. `None` where the backend's views cannot
    /// share a buffer; the arena then gives every transient a buffer of its own.
    fn arena_views<'a>(&self, buf: &'a mut Self::Buf, parts: &[ArenaPart]) -> Option<Vec<Self::ViewMut<'a>>>;
    fn upload(&self, dst: Self::ViewMut<'_>, src: &[f32]);
    fn download(&self, src: Self::View<'_>) -> Vec<f32>;

    // ---- the host tier (MEMO's offloads) --------------------------------------------------------
    /// `bytes` of host memory for offloaded activations: page-locked on a GPU, so that copies
    /// run asynchronously at full PCIe bandwidth. Values are kept in their device element type.
    fn alloc_host(&self, bytes: u64) -> Self::HostBuf;
    /// Starts copying `src` (elements of kind `precision`) into `dst` from byte `at`. The copy
    /// may still be running when this returns (on a GPU it runs on a copy stream, after the work
    /// queued so far, overlapping what comes next): the buffer `src` views must live until a
    /// [`Backend::copy_wait`] on a later mark.
    fn offload(&self, dst: &mut Self::HostBuf, at: u64, src: Self::View<'_>, precision: Precision);
    /// Starts copying `dst`'s elements (of kind `precision`) back from `src` at byte `at`, on the
    /// same copy stream, after the work queued so far; `dst` is usable after a
    /// [`Backend::copy_wait`] on a later mark.
    fn reload(&self, dst: Self::ViewMut<'_>, src: &Self::HostBuf, at: u64, precision: Precision);
    /// Marks every copy started so far.
    fn copy_mark(&self) -> Self::CopyMark;
    /// Orders everything queued after it after the copies up to `mark`: offloaded buffers may
    /// be freed, reloaded ones read.
    fn copy_wait(&self, mark: Self::CopyMark);
    /// The buffer itself as host memory, when it lives there (the CPU backend), so host-side
    /// collectives work on it in place; `None` for device memory.
    fn host_mut(_buf: &mut Self::Buf) -> Option<&mut [f32]> {
        None
    }
    /// Collectives over the ranks of `group` (more than one) on this backend's buffers: on the
    /// devices (NCCL on GPUs) where every rank holds a device of its own and the library loads
    /// everywhere, else through host memory by `group` itself, with the reason. A collective
    /// over `group`: every rank decides the same.
    fn device_group(&self, group: &dyn Communicator) -> crate::Result<GroupOnDevice<Self>>
    where
        Self: Sized,
    {
        let _ = group;
        Ok(GroupOnDevice::Host("the buffers live there".into()))
    }
    fn fill(&self, dst: Self::ViewMut<'_>, value: f32);
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);

    // ---- elementwise ----------------------------------------------------------------------------
    /// `dst += src`.
    fn add_assign(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);
    /// `out = a + b`.
    fn add(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);
    /// `dst *= s`.
    fn scale(&self, dst: Self::ViewMut<'_>, s: f32);
    /// Σ x², summed in a fixed order (f64) so the result does not depend on thread count.
    fn sum_squares(&self, x: Self::View<'_>) -> f64;

    // ---- matmul ---------------------------------------------------------------------------------
    /// `out (m×n) [+]= op(a) (m×k) · op(b) (k×n)`; `op` transposes when `ta`/`tb`;
    /// accumulates when `accumulate`. Row stability: when `!ta`, every output row must be
    /// bitwise the same whatever `m` and wherever the row sits, so that recomputing a subset of
    /// rows (MEMO's dropped tokens) reproduces the full call.
    #[allow(clippy::too_many_arguments)]
    fn matmul(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>, m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool);

    /// `out (m×n) = residual + a (m×k) · op(b) (k×n)` (`op` transposes when `tb`): a residual
    /// joined in the product instead of copied into `out` first (a GPU reads it in the GEMM's
    /// epilogue). Row-stable like `matmul`. By default the copy and an accumulating `matmul`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_residual(&self, out: Self::ViewMut<'_>, residual: Self::View<'_>, a: Self::View<'_>, b: Self::View<'_>, m: usize, k: usize, n: usize, tb: bool) {
        copy_then_matmul(self, out, residual, a, b, m, k, n, tb)
    }

    /// Independent matmuls sharing `ta`, `tb` and `accumulate`, their operands at offsets into
    /// one view each: the experts of one projection, every one with its own rows and width, in
    /// one call (one launch on a GPU). The outputs must not overlap. Same rules as `matmul`;
    /// by default one `matmul` per product.
    #[allow(clippy::too_many_arguments)]
    fn grouped_matmul(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>, gemms: &[Gemm], ta: bool, tb: bool, accumulate: bool) {
        matmul_each(self, out, a, b, gemms, ta, tb, accumulate)
    }

    /// The experts' up projection and SwiGLU: for every expert, `gu = a · bᵀ` (m × 2h, which
    /// the backward reads) and `act = SwiGLU(gu)` (m × h) from `gu` as stored, so `act` is
    /// bitwise what `swiglu_fwd` computes from it; `a`'s rows picked where a [`Pick`] is given.
    /// Row-stable like `matmul`. By default [`swiglu_each`]; a GPU may do it all in one pass
    /// (the CUDA backend's Hopper kernel).
    fn grouped_matmul_swiglu(&self, gu: Self::ViewMut<'_>, act: Self::ViewMut<'_>, a: (Self::View<'_>, Option<Pick<'_>>), b: Self::View<'_>, gemms: &[SwiGluGemm]) {
        swiglu_each(self, gu, act, a, b, gemms)
    }
    /// Whether [`Self::grouped_matmul_swiglu`], [`Self::grouped_matmul_swiglu_bwd`] and
    /// [`Self::grouped_weight_grad`] read picked rows in place for experts of `widths` at
    /// `d_model`, so that the model should hand them the [`Pick`] instead of gathering the
    /// rows (which the defaults would do into a buffer of their own, outside the memory plan).
    /// Where they do, `grouped_matmul_swiglu_bwd` also leaves `dact` unwritten (the model hands
    /// it an empty one).
    fn fuses_expert_gather(&self, d_model: usize, widths: &[usize]) -> bool {
        let _ = (d_model, widths);
        false
    }
    /// The experts' weight gradients: [`Self::grouped_matmul`] with `ta` and not `tb` into an
    /// f32 `out` (written, or added to with `accumulate`), `a`'s and `b`'s rows (the k summed
    /// over) picked where a [`Pick`] is given (every product's m the same where `a`'s are, its
    /// n where `b`'s are). By default [`weight_grad_gathering`].
    fn grouped_weight_grad(&self, out: Self::ViewMut<'_>, a: (Self::View<'_>, Option<Pick<'_>>), b: (Self::View<'_>, Option<Pick<'_>>), gemms: &[Gemm], accumulate: bool) {
        weight_grad_gathering(self, out, a, b, gemms, accumulate)
    }

    /// SwiGLU's backward through the experts' down projection: for every expert, `dact = dy ·
    /// b` (`b` read as it lies, k × h; `dy`'s rows picked where a [`Pick`] is given), then from
    /// the saved `gu` the gradient `dgu` and SwiGLU's output `act` again (the down projection's
    /// weight gradient reads it), each bitwise what `swiglu_bwd` computes from `dact` as
    /// stored. `dact` is room for the product: the default, [`swiglu_bwd_each`], computes into
    /// it; a GPU may keep it in registers (the CUDA backend's Hopper kernel) and leave `dact` as
    /// it was.
    #[allow(clippy::too_many_arguments)]
    fn grouped_matmul_swiglu_bwd(&self, dgu: Self::ViewMut<'_>, act: Self::ViewMut<'_>, dact: Self::ViewMut<'_>, dy: (Self::View<'_>, Option<Pick<'_>>), b: Self::View<'_>, gu: Self::View<'_>, gemms: &[SwiGluBwdGemm]) {
        swiglu_bwd_each(self, dgu, act, dact, dy, b, gu, gemms)
    }

    // ---- embedding ------------------------------------------------------------------------------
    /// `out (N, C) = table[tokens]`.
    fn embedding_fwd(&self, out: Self::ViewMut<'_>, table: Self::View<'_>, tokens: &[u32], c: usize);
    /// Accumulates `dtable[tokens[i]] += dout[i]`.
    fn embedding_bwd(&self, dtable: Self::ViewMut<'_>, dout: Self::View<'_>, tokens: &[u32], c: usize);

    // ---- RMSNorm --------------------------------------------------------------------------------
    /// `out = x · rstd · w` per row, `rstd = 1/sqrt(mean(x²) + eps)` saved per row (N).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(&self, out: Self::ViewMut<'_>, rstd: Self::ViewMut<'_>, x: Self::View<'_>, w: Self::View<'_>, n: usize, c: usize, eps: f32);
    /// `dx = residual + ∂out/∂x · dout` (the residual branch's gradient joins in the same pass;
    /// zero when `None`); accumulates into `dw`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(&self, dx: Self::ViewMut<'_>, dw: Self::ViewMut<'_>, dout: Self::View<'_>, x: Self::View<'_>, w: Self::View<'_>, rstd: Self::View<'_>, residual: Option<Self::View<'_>>, n: usize, c: usize);

    // ---- rotary position embedding --------------------------------------------------------------
    /// Rotates the q and k heads of `qkv` in place by the angles of `table` (`seq × head_dim/2`
    /// pairs of cos, sin); `inverse` rotates back (the backward of a rotation). `qkv`'s first row
    /// is token `first_row` of the `(B·T)` layout, so a token range can be recomputed alone.
    fn rope(&self, qkv: Self::ViewMut<'_>, table: Self::View<'_>, shape: AttnShape, first_row: usize, inverse: bool);

    // ---- causal attention -----------------------------------------------------------------------
    /// Tiled causal attention with an online softmax: `out (N, H·D)`, `lse (B·H·T)` saved.
    fn attention_fwd(&self, out: Self::ViewMut<'_>, lse: Self::ViewMut<'_>, qkv: Self::View<'_>, shape: AttnShape);
    /// Overwrites `dqkv`; recomputes the probabilities tile by tile from `lse`. `scratch` (f32,
    /// at least [`Backend::attention_bwd_scratch_len`] elements, contents ignored) holds what
    /// the backend keeps during the op.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(&self, dqkv: Self::ViewMut<'_>, dout: Self::View<'_>, out: Self::View<'_>, lse: Self::View<'_>, qkv: Self::View<'_>, shape: AttnShape, scratch: Self::ViewMut<'_>);
    /// f32 elements of scratch [`Backend::attention_bwd`] takes at `shape`; 0 where it needs
    /// none (the default: the CPU). The block takes it from the transient arena, so the memory
    /// plan places it (`memory::transients::block_phases`).
    fn attention_bwd_scratch_len(&self, shape: AttnShape) -> usize {
        let _ = shape;
        0
    }

    // ---- SwiGLU ---------------------------------------------------------------------------------
    /// `out (rows, h) = SiLU(g) ⊙ u` where each `gu` row is `[g (h) | u (h)]`.
    fn swiglu_fwd(&self, out: Self::ViewMut<'_>, gu: Self::View<'_>, rows: usize, h: usize);
    /// `dgu (rows, 2h)` from `dout = ∂L/∂out`; with `out`, also writes the forward's output
    /// again, bitwise as `swiglu_fwd` does, from the same read of `gu` (the backward needs it
    /// for the down projection's weight gradient and would otherwise recompute it apart).
    fn swiglu_bwd(&self, dgu: Self::ViewMut<'_>, out: Option<Self::ViewMut<'_>>, dout: Self::View<'_>, gu: Self::View<'_>, rows: usize, h: usize);

    // ---- router ---------------------------------------------------------------------------------
    /// Row-wise softmax, `(rows, cols)`.
    fn softmax_rows(&self, out: Self::ViewMut<'_>, logits: Self::View<'_>, rows: usize, cols: usize);
    /// The router's backward through its softmax: overwrites `dlogits (N, E)`, activation
    /// storage (the GEMMs into dx and dW_router read it), from the slot gates' gradient
    /// `dgate` of the first slots (the ones the experts ran; slots past `dgate`'s length were
    /// chosen but dropped by the experts' capacity, so their gate gradient is 0), the saved `probs` and `logits` (f32) and the routing in `grad`, in f32. Per token, with `g_s = P_e(s) / Σ_{s' ∈ slots(t)} P_e(s')`, `lse = ln Σ exp z`:
    /// `dP_i = Σ_{s: e(s) = i} (dgate_s − Σ_s' dgate_s' g_s') / Σ_s' P_e(s') + lb_i + pp_i
    ///  − entropy · (ln P_i + 1) / N` (the entropy term only where `P_i > 0`), then
    /// `dlogits = P ⊙ (dP − ⟨dP, P⟩) + z_loss · 2 · lse · P / N`. Runs on the device, so the
    /// backward needs no host round trip.
    fn router_bwd(&self, dlogits: Self::ViewMut<'_>, dgate: Self::View<'_>, probs: Self::View<'_>, logits: Self::View<'_>, grad: RouterGrad<'_>);
    /// f32 elements of scratch [`Backend::route`] takes for `n` tokens over `e` experts; 0 where
    /// the backend leaves routing to the host (the default: the CPU, whose host is where the
    /// probabilities lie). The block takes it from the transient arena, so the memory plan
    /// places it (`memory::transients::router_phase`).
    fn route_scratch_len(&self, n: usize, e: usize, rule: RouteRule) -> usize {
        let _ = (n, e, rule);
        0
    }
    /// Routes the `n` tokens of router `probs` / `logits` (`(n, e)`, f32) where they lie, with
    /// the selection `model::router::select` makes (bitwise: the same order and f32 sums), and
    /// reads back the slots and the aux losses' sums; `scratch` is at least
    /// [`Backend::route_scratch_len`] f32 elements. `None` where the backend leaves it to the
    /// host (the default).
    fn route(&self, probs: Self::View<'_>, logits: Self::View<'_>, n: usize, e: usize, rule: RouteRule, scratch: Self::ViewMut<'_>) -> Option<RoutedSlots> {
        let _ = (probs, logits, n, e, rule, scratch);
        None
    }

    // ---- permute / unpermute --------------------------------------------------------------------
    /// Permute: `out[s] = x[index[s]]` (rows of width `c`).
    fn gather_rows(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, index: &[u32], c: usize);
    /// Unpermute: `out[t] = residual[t] + Σ_{s ∈ slots(t)} weight[s] · y[s]` (weight 1 and
    /// residual 0 when `None`), summing each token's slots in ascending order after the residual.
    fn combine_rows(&self, out: Self::ViewMut<'_>, y: Self::View<'_>, by_token: TokenSlots<'_>, weight: Option<&[f32]>, residual: Option<Self::View<'_>>, c: usize);
    /// `dots[s] = ⟨a[index[s]], b[s]⟩` (f32): the gradient of each slot's gate.
    fn gathered_dots(&self, dots: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>, index: &[u32], c: usize);
    /// `out[s] = weight[s] · x[index[s]]`: gradient of the expert outputs from the combined one.
    fn gather_rows_scaled(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, index: &[u32], weight: &[f32], c: usize);

    // ---- output head + cross-entropy ------------------------------------------------------------
    /// Fused classifier: logits `x Wᵀ` are formed a chunk of rows at a time, never the whole
    /// `(N, V)`. Returns the per-token losses. With `grads = Some((dx, dw))` it also writes
    /// `dx = dloss · ∂L/∂x` and accumulates `dw += dloss · ∂L/∂W`, `L = mean loss`. `scratch`
    /// (f32, at least [`Backend::classifier_scratch_len`] elements, contents ignored) holds the
    /// chunk of logits and whatever else the backend keeps during the op.
    #[allow(clippy::too_many_arguments)]
    fn classifier(&self, x: Self::View<'_>, w: Self::View<'_>, targets: &[u32], n: usize, c: usize, v: usize, grads: Option<(Self::ViewMut<'_>, Self::ViewMut<'_>, f32)>, scratch: Self::ViewMut<'_>) -> Vec<f32>;
    /// f32 elements of scratch [`Backend::classifier`] takes for `n` rows over `v` classes. The
    /// model takes it from the transient arena at the turn between forward and backward, so the
    /// memory plan places it (`memory::transients::head_phase`).
    fn classifier_scratch_len(&self, n: usize, v: usize) -> usize;
    /// Logits of a few rows `(rows, V)` for generation.
    fn logits(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, w: Self::View<'_>, rows: usize, c: usize, v: usize) {
        self.matmul(out, x, w, rows, c, v, false, true, false);
    }

    // ---- weights and optimizer ------------------------------------------------------------------
    /// Whether ops read the weights from a working copy in activation precision (bf16) instead
    /// of the f32 master; the model then keeps one, written by [`Backend::adamw`] and
    /// [`Backend::refresh_working_copy`].
    fn uses_working_copy(&self) -> bool;
    /// `work = master`, rounded to the working precision.
    fn refresh_working_copy(&self, work: Self::ViewMut<'_>, master: Self::View<'_>);
    /// One AdamW step over a parameter range: `m, v` updated, the f32 master `p` moved and, when
    /// given, its working copy `work` rewritten; the gradient is scaled by `grad_scale` first
    /// (global-norm clipping); decay applied when `decay`. All but `work` are f32 buffers.
    #[allow(clippy::too_many_arguments)]
    fn adamw(&self, p: Self::ViewMut<'_>, work: Option<Self::ViewMut<'_>>, m: Self::ViewMut<'_>, v: Self::ViewMut<'_>, g: Self::View<'_>, hp: AdamW, grad_scale: f32, decay: bool);
}
