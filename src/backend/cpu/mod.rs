//! The CPU backend: f32, multi-threaded with rayon, matmuls on the `gemm` crate.
//!
//! Every reduction runs over fixed-size chunks whose partial results are combined in a fixed
//! order, so results are bitwise identical whatever the thread count.

mod attention;
mod elementwise;
mod embed;
mod loss;
pub use loss::scratch_len as classifier_scratch_elements;
mod mathfn;
mod matmul;
mod norm;
mod optim;
mod permute;
mod rope;
pub(crate) mod router;
mod softmax;
mod swiglu;

use std::ops::Range;

use super::{AdamW, ArenaPart, AttnShape, Backend, OpTime, Precision, RouterGrad, TokenSlots};

/// Rows handled by one task in row-parallel ops; fixed so reductions do not depend on threads.
pub(crate) const ROW_CHUNK: usize = 64;

pub struct Cpu {
    pool: rayon::ThreadPool,
    /// Ops read bf16-rounded weights from a working copy, as the CUDA backend's mixed precision
    /// does (activations stay f32).
    bf16_weights: bool,
    /// Per-op call counts and wall time, when profiling.
    profile: Option<std::sync::Mutex<std::collections::BTreeMap<&'static str, (u64, std::time::Duration)>>>,
}

impl Cpu {
    /// A backend on `threads` worker threads (0 = one per core).
    pub fn new(threads: usize) -> Self {
        super::keep_freed_host_memory();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("motley-cpu-{i}"))
            .build()
            .expect("rayon thread pool");
        Cpu { pool, bf16_weights: false, profile: None }
    }

    /// Ops read the weights from a bf16-rounded working copy of the f32 master, like the CUDA
    /// backend in mixed precision: shows on the CPU what bf16 weights do to training, and lets
    /// tests check that every op reads the working copy.
    pub fn with_bf16_weights(mut self) -> Self {
        self.bf16_weights = true;
        self
    }

    /// Records the wall time of every op (see [`Cpu::profile`]).
    pub fn with_profile(mut self) -> Self {
        self.profile = Some(Default::default());
        self
    }

    /// Per op since the start or the last call (wall time; bytes and FLOPs are not counted on
    /// the CPU), slowest first; empty when not profiling.
    pub fn take_profile(&self) -> Vec<OpTime> {
        let Some(p) = &self.profile else { return Vec::new() };
        let taken = std::mem::take(&mut *p.lock().expect("profile lock"));
        let mut rows: Vec<OpTime> = taken.into_iter().map(|(op, (calls, d))| OpTime { op, calls, seconds: d.as_secs_f64(), bytes: 0.0, flops: 0.0 }).collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }

    /// `work = master` in the working precision (bf16-rounded with `with_bf16_weights`).
    fn write_working_copy(&self, work: &mut [f32], master: &[f32]) {
        if self.bf16_weights {
            optim::round_to_bf16(work, master);
        } else {
            work.copy_from_slice(master);
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn run<R: Send>(&self, op: &'static str, f: impl FnOnce() -> R + Send) -> R {
        let Some(p) = &self.profile else { return self.pool.install(f) };
        let start = std::time::Instant::now();
        let r = self.pool.install(f);
        let mut p = p.lock().expect("profile lock");
        let e = p.entry(op).or_default();
        e.0 += 1;
        e.1 += start.elapsed();
        r
    }
}

/// A raw pointer that parallel tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `i` elements on. A method rather than `.0` so that closures capture the
    /// `Sync` wrapper, not the raw pointer field (edition 2021 captures fields disjointly).
    pub(crate) fn add(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];
    type HostBuf = Vec<f32>;
    type CopyMark = ();

    fn host_work<R: Send>(&self, op: &'static str, f: impl FnOnce() -> R + Send) -> R {
        self.run(op, f)
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn alloc_scratch(&self, len: usize, _: Precision) -> Vec<f32> {
        vec![f32::NAN; len]
    }
    fn alloc_f32(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn activation_bytes(&self) -> u64 {
        4
    }
    fn buf_bytes(buf: &Vec<f32>) -> u64 {
        buf.len() as u64 * 4
    }
    fn len(buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view(buf: &Vec<f32>, range: Range<usize>) -> &[f32] {
        &buf[range]
    }
    fn view_mut(buf: &mut Vec<f32>, range: Range<usize>) -> &mut [f32] {
        &mut buf[range]
    }
    fn as_view<'b>(v: &'b &mut [f32]) -> &'b [f32] {
        v
    }
    fn reborrow_mut<'b>(v: &'b mut &mut [f32]) -> &'b mut [f32] {
        v
    }
    fn subview<'b>(v: Self::View<'b>, range: Range<usize>) -> Self::View<'b> {
        &v[range]
    }
    fn subview_mut<'b>(v: &'b mut &mut [f32], range: Range<usize>) -> &'b mut [f32] {
        &mut v[range]
    }
    /// Every kind of tensor is f32 here, so a part's bytes are 4 per element.
    fn arena_views<'a>(&self, buf: &'a mut Vec<f32>, parts: &[ArenaPart]) -> Option<Vec<&'a mut [f32]>> {
        let ranges: Vec<Range<usize>> = parts
            .iter()
            .map(|p| {
                assert!(p.at.is_multiple_of(4), "arena part at byte {} is not f32-aligned", p.at);
                let start = (p.at / 4) as usize;
                start..start + p.len
            })
            .collect();
        let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| !ranges[i].is_empty()).collect();
        order.sort_by_key(|&i| ranges[i].start);
        let mut out: Vec<&'a mut [f32]> = ranges.iter().map(|_| Default::default()).collect();
        // Walk the ranges in address order, splitting each off the rest of the buffer.
        let (mut rest, mut at): (&'a mut [f32], usize) = (buf.as_mut_slice(), 0);
        for i in order {
            let r = &ranges[i];
            assert!(r.start >= at, "view {i} {r:?} overlaps another view ending at {at}");
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
            let (view, tail) = tail.split_at_mut(r.len());
            (out[i], rest, at) = (view, tail, r.end);
        }
        Some(out)
    }
    /// Plain memory: every kind of tensor is f32 here, 4 bytes per element. Zeroed lazily by the
    /// OS, so a large limit costs only what is used.
    fn alloc_host(&self, bytes: u64) -> Vec<f32> {
        vec![0.0; bytes.div_ceil(4) as usize]
    }
    fn offload(&self, dst: &mut Vec<f32>, at: u64, src: &[f32], _precision: Precision) {
        let at = (at / 4) as usize;
        dst[at..at + src.len()].copy_from_slice(src);
    }
    /// Copies are done when `offload` and `reload` return.
    fn copy_mark(&self) {}
    fn copy_wait(&self, _mark: ()) {}
    fn reload(&self, dst: &mut [f32], src: &Vec<f32>, at: u64, _precision: Precision) {
        let at = (at / 4) as usize;
        dst.copy_from_slice(&src[at..at + dst.len()]);
    }
    fn upload(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn host_mut(buf: &mut Vec<f32>) -> Option<&mut [f32]> {
        Some(buf)
    }
    fn download(&self, src: &[f32]) -> Vec<f32> {
        src.to_vec()
    }
    fn fill(&self, dst: &mut [f32], value: f32) {
        dst.fill(value);
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    fn add_assign(&self, dst: &mut [f32], src: &[f32]) {
        self.run("add_assign", || elementwise::add_assign(dst, src))
    }
    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        self.run("add", || elementwise::add(out, a, b))
    }
    fn scale(&self, dst: &mut [f32], s: f32) {
        self.run("scale", || elementwise::scale(dst, s))
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        self.run("sum_squares", || elementwise::sum_squares(x))
    }

    fn matmul(&self, out: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) {
        let threads = self.threads();
        self.run("matmul", || matmul::matmul(out, a, b, m, k, n, ta, tb, accumulate, threads))
    }

    fn embedding_fwd(&self, out: &mut [f32], table: &[f32], tokens: &[u32], c: usize) {
        self.run("embedding_fwd", || embed::forward(out, table, tokens, c))
    }
    fn embedding_bwd(&self, dtable: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
        self.run("embedding_bwd", || embed::backward(dtable, dout, tokens, c))
    }

    fn rmsnorm_fwd(&self, out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], n: usize, c: usize, eps: f32) {
        self.run("rmsnorm_fwd", || norm::forward(out, rstd, x, w, n, c, eps))
    }
    fn rmsnorm_bwd(&self, dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], residual: Option<&[f32]>, n: usize, c: usize) {
        self.run("rmsnorm_bwd", || norm::backward(dx, dw, dout, x, w, rstd, residual, n, c))
    }

    fn rope(&self, qkv: &mut [f32], table: &[f32], shape: AttnShape, first_row: usize, inverse: bool) {
        self.run("rope", || rope::apply(qkv, table, shape, first_row, inverse))
    }

    fn attention_fwd(&self, out: &mut [f32], lse: &mut [f32], qkv: &[f32], shape: AttnShape) {
        self.run("attention_fwd", || attention::forward(out, lse, qkv, shape))
    }
    fn attention_bwd(&self, dqkv: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], qkv: &[f32], shape: AttnShape, _scratch: &mut [f32]) {
        self.run("attention_bwd", || attention::backward(dqkv, dout, out, lse, qkv, shape))
    }

    fn swiglu_fwd(&self, out: &mut [f32], gu: &[f32], rows: usize, h: usize) {
        self.run("swiglu_fwd", || swiglu::forward(out, gu, rows, h))
    }
    fn swiglu_bwd(&self, dgu: &mut [f32], out: Option<&mut [f32]>, dout: &[f32], gu: &[f32], rows: usize, h: usize) {
        self.run("swiglu_bwd", || swiglu::backward(dgu, out, dout, gu, rows, h))
    }

    fn softmax_rows(&self, out: &mut [f32], logits: &[f32], rows: usize, cols: usize) {
        self.run("softmax_rows", || softmax::forward(out, logits, rows, cols))
    }
    fn router_bwd(&self, dlogits: &mut [f32], dgate: &[f32], probs: &[f32], logits: &[f32], grad: RouterGrad<'_>) {
        let (n, e) = (grad.tokens(), grad.experts());
        assert!(dlogits.len() == n * e && probs.len() == n * e && logits.len() == n * e, "router_bwd: dlogits, probs and logits must be (N = {n}, E = {e})");
        assert!(dgate.len() <= grad.gate.len() && grad.slot_expert.len() == grad.gate.len() && grad.p_penalty.len() == e, "router_bwd: slot and expert lengths");
        self.run("router_bwd", || router::backward(dlogits, dgate, probs, logits, grad))
    }

    fn gather_rows(&self, out: &mut [f32], x: &[f32], index: &[u32], c: usize) {
        self.run("gather_rows", || permute::gather(out, x, index, None, c))
    }
    fn combine_rows(&self, out: &mut [f32], y: &[f32], by_token: TokenSlots<'_>, weight: Option<&[f32]>, residual: Option<&[f32]>, c: usize) {
        self.run("combine_rows", || permute::combine(out, y, by_token, weight, residual, c))
    }
    fn gathered_dots(&self, dots: &mut [f32], a: &[f32], b: &[f32], index: &[u32], c: usize) {
        assert_eq!(dots.len(), index.len(), "gathered_dots dots");
        self.run("gathered_dots", || permute::gathered_dots(dots, a, b, index, c))
    }
    fn gather_rows_scaled(&self, out: &mut [f32], x: &[f32], index: &[u32], weight: &[f32], c: usize) {
        self.run("gather_rows_scaled", || permute::gather(out, x, index, Some(weight), c))
    }

    fn classifier(&self, x: &[f32], w: &[f32], targets: &[u32], n: usize, c: usize, v: usize, grads: Option<(&mut [f32], &mut [f32], f32)>, scratch: &mut [f32]) -> Vec<f32> {
        let threads = self.threads();
        self.run("classifier", || loss::classifier(x, w, targets, n, c, v, grads, scratch, threads))
    }
    fn classifier_scratch_len(&self, n: usize, v: usize) -> usize {
        loss::scratch_len(n, v)
    }

    fn uses_working_copy(&self) -> bool {
        self.bf16_weights
    }
    fn refresh_working_copy(&self, work: &mut [f32], master: &[f32]) {
        assert_eq!(work.len(), master.len(), "refresh_working_copy");
        self.run("refresh_working_copy", || self.write_working_copy(work, master))
    }
    fn adamw(&self, p: &mut [f32], work: Option<&mut [f32]>, m: &mut [f32], v: &mut [f32], g: &[f32], hp: AdamW, grad_scale: f32, decay: bool) {
        self.run("adamw", || {
            optim::adamw(&mut *p, m, v, g, hp, grad_scale, decay);
            if let Some(work) = work {
                self.write_working_copy(work, p);
            }
        })
    }
}
