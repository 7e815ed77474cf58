//! The CUDA backend: kernels compiled with NVRTC at start-up, matmuls on cuBLASLt, one stream.
//!
//! **Status: compiled, never executed.** Every kernel compiles for `sm_90a` in CI
//! (`tests/cuda_nvrtc.rs`) and this Rust code type-checks against cudarc 0.19, but no line of it
//! has run on a GPU yet; `tests/cuda_parity.rs` holds the checks for the first GPU session.
//! See `docs/cuda.md`.
//!
//! Storage: the `Backend` trait has a single buffer type for parameters, gradients, moments and
//! activations, and AdamW needs f32 master weights and moments, so `Buf` is f32 device memory.
//! bf16 appears where it pays: attention tiles are converted to bf16 in shared memory for the
//! tensor cores (f32 accumulation), and matmuls run on TF32 tensor cores. The kernels are written
//! over a storage type `act_t`; their bf16-storage variant compiles in CI and becomes live once
//! the trait separates activation buffers from parameter buffers.
//!
//! Index data (tokens, routing slots) arrives as host slices, as the trait says, and is uploaded
//! per call; scratch (row-chunk partials, attention Δ) is allocated per call from the stream's
//! memory pool. Both are hidden allocations the memory planner does not see yet.
//!
//! Errors: trait ops cannot return errors; a failed launch or copy means the device state is
//! unknown, so they panic with the driver's message. Anything decided by user input (device
//! presence, libraries, attention shape) is checked up front with a `Result`:
//! [`cuda_available`], [`CudaBackend::new`], [`CudaBackend::check_attention`].

mod attention;
mod blas;
mod detect;
mod kernels;
pub mod nvrtc;

use std::ops::Range;
use std::sync::Arc;

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

pub use detect::cuda_available;
use kernels::Kernels;

use super::{AdamW, AttnShape, Backend, TokenSlots};
use crate::{Error, Result};

/// Threads per block for row and grid-stride kernels.
const THREADS: u32 = 256;
/// Rows per partial sum in the deterministic column reductions (RMSNorm dw), as on the CPU.
const ROW_CHUNK: usize = 64;
/// Blocks of the first pass of `sum_squares`; fixed so the summation order depends only on n.
const SUMSQ_BLOCKS: usize = 256;
/// Most logits alive at once in the fused classifier (elements).
const LOGITS_BUDGET: usize = 1 << 24;

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    k: Kernels,
    device: String,
}

/// A read-only range of a device buffer. `Copy`, as the trait requires (cudarc's views are not).
#[derive(Clone, Copy)]
pub struct DevView<'a> {
    buf: &'a CudaSlice<f32>,
    range: (usize, usize),
}

/// A writable range of a device buffer.
pub struct DevViewMut<'a> {
    buf: &'a mut CudaSlice<f32>,
    range: (usize, usize),
}

impl<'a> DevView<'a> {
    fn cu(&self) -> CudaView<'a, f32> {
        self.buf.slice(self.range.0..self.range.1)
    }
    fn len(&self) -> usize {
        self.range.1 - self.range.0
    }
}

impl DevViewMut<'_> {
    fn cu(&mut self) -> CudaViewMut<'_, f32> {
        self.buf.slice_mut(self.range.0..self.range.1)
    }
    fn len(&self) -> usize {
        self.range.1 - self.range.0
    }
}

/// Unwraps a driver result; see the module doc for why a device error panics.
fn ok<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e:?}"))
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32
}

/// Grid-stride launch over `n` elements.
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks_for(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `THREADS` per row (`rows ≥ 1`).
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row, `THREADS / 32` rows per block.
fn warp_per_row(rows: usize) -> LaunchConfig {
    let per_block = THREADS as usize / 32;
    LaunchConfig { grid_dim: (rows.div_ceil(per_block) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the PTX cache) every kernel and creates the
    /// cuBLASLt handle. Needs a GPU of compute capability 8.0 or newer (bf16 tensor cores).
    pub fn new(ordinal: usize) -> Result<Self> {
        cuda_available().map_err(Error::Invalid)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Invalid(format!("cannot open GPU {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::Invalid(format!("GPU {ordinal}: {e:?}")))?;
        if major < 8 {
            return Err(Error::Invalid(format!("GPU {ordinal} has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer (bf16 tensor cores)")));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let k = Kernels::load(&ctx, major, minor)?;
        let stream = ctx.default_stream();
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| Error::Invalid(format!("cuBLASLt init failed: {e:?}")))?;
        Ok(CudaBackend { stream, blas, k, device: format!("{name} (sm_{major}{minor})") })
    }

    /// The GPU's name and architecture, for logs.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Whether the attention kernels support `shape`: head_dim a multiple of 16 and at most
    /// 128, query heads a multiple of kv heads. Call before training; the ops assert it.
    pub fn check_attention(shape: AttnShape) -> Result<()> {
        attention::check(shape)
    }

    /// Waits for all queued work (timings, tests).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::Invalid(format!("CUDA synchronize failed: {e:?}")))
    }

    fn upload_u32(&self, host: &[u32]) -> CudaSlice<u32> {
        ok(self.stream.clone_htod(host), "index upload")
    }
    fn upload_f32(&self, host: &[f32]) -> CudaSlice<f32> {
        ok(self.stream.clone_htod(host), "weight upload")
    }
    fn scratch_f32(&self, len: usize) -> CudaSlice<f32> {
        ok(self.stream.alloc_zeros::<f32>(len.max(1)), "scratch alloc")
    }

    /// The row gather shared by `gather_rows` and `gather_rows_scaled`.
    fn gather(&self, mut out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], weight: Option<&[f32]>, c: usize) {
        if index.is_empty() || c == 0 {
            return;
        }
        assert_eq!(out.len(), index.len() * c, "gather_rows out");
        let idx = self.upload_u32(index);
        let w = weight.map(|w| self.upload_f32(w));
        let (mut o, x) = (out.cu(), x.cu());
        let c = c as i32;
        let mut l = self.stream.launch_builder(&self.k.gather_rows);
        l.arg(&mut o).arg(&x).arg(&idx);
        let null = 0u64;
        match &w {
            Some(w) => l.arg(w),
            None => l.arg(&null),
        };
        l.arg(&c);
        // SAFETY: argument types match `gather_rows` in permute.cu; sizes asserted above.
        ok(unsafe { l.launch(per_row(index.len())) }, "gather_rows");
    }

    /// Most bytes allocated from the device's memory pool at once since the pool was created or
    /// [`Self::reset_peak_device_bytes`] last ran: every buffer and scratch of this backend (they
    /// come from the stream's pool), not the context, kernels or cuBLASLt's own workspace.
    pub fn peak_device_bytes(&self) -> Result<u64> {
        let mut high = 0u64;
        // SAFETY: the attribute is a u64 (cuuint64_t); the pool is the device's current one.
        self.mem_pool_attribute(|pool, attr| unsafe { cudarc::driver::result::mem_pool::get_attribute(pool, attr, (&mut high as *mut u64).cast()) })?;
        Ok(high)
    }

    /// Starts a new high-water mark for [`Self::peak_device_bytes`] (the driver accepts only 0).
    pub fn reset_peak_device_bytes(&self) -> Result<()> {
        let mut zero = 0u64;
        // SAFETY: as above; setting USED_MEM_HIGH to 0 resets it to the current use.
        self.mem_pool_attribute(|pool, attr| unsafe { cudarc::driver::result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast()) })
    }

    /// Runs `f` on the device's current memory pool (the one the stream allocates from) and its
    /// used-memory high-water attribute.
    fn mem_pool_attribute(&self, f: impl FnOnce(PoolHandle, PoolAttribute) -> std::result::Result<(), DriverError>) -> Result<()> {
        let ctx = self.stream.context();
        let fail = |e: DriverError| Error::Invalid(format!("CUDA memory pool query failed: {e:?}"));
        ctx.bind_to_thread().map_err(fail)?;
        // SAFETY: the device handle comes from the live context.
        let pool = unsafe { cudarc::driver::result::device::get_mem_pool(ctx.cu_device()) }.map_err(fail)?;
        f(pool, PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH).map_err(fail)
    }
}

type PoolHandle = cudarc::driver::sys::CUmemoryPool;
type PoolAttribute = cudarc::driver::sys::CUmemPool_attribute;
type DriverError = cudarc::driver::result::DriverError;

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, len: usize) -> CudaSlice<f32> {
        ok(self.stream.alloc_zeros::<f32>(len), "alloc")
    }
    fn len(buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn view(buf: &CudaSlice<f32>, range: Range<usize>) -> DevView<'_> {
        assert!(range.start <= range.end && range.end <= buf.len(), "view {range:?} of {}", buf.len());
        DevView { buf, range: (range.start, range.end) }
    }
    fn view_mut(buf: &mut CudaSlice<f32>, range: Range<usize>) -> DevViewMut<'_> {
        assert!(range.start <= range.end && range.end <= buf.len(), "view {range:?} of {}", buf.len());
        DevViewMut { buf, range: (range.start, range.end) }
    }
    fn as_view<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        DevView { buf: v.buf, range: v.range }
    }
    fn reborrow_mut<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        DevViewMut { buf: v.buf, range: v.range }
    }
    fn subview<'b>(v: Self::View<'b>, range: Range<usize>) -> Self::View<'b> {
        assert!(range.start <= range.end && range.end <= v.len(), "subview {range:?} of {}", v.len());
        DevView { buf: v.buf, range: (v.range.0 + range.start, v.range.0 + range.end) }
    }
    fn subview_mut<'b>(v: &'b mut DevViewMut<'_>, range: Range<usize>) -> DevViewMut<'b> {
        assert!(range.start <= range.end && range.end <= v.len(), "subview {range:?} of {}", v.len());
        DevViewMut { buf: v.buf, range: (v.range.0 + range.start, v.range.0 + range.end) }
    }
    /// A `DevViewMut` borrows the whole `CudaSlice` mutably, so two cannot coexist; disjoint
    /// views need pointer-based views (cudarc's `CudaViewMut` splits only by borrowing).
    fn disjoint_views_mut<'a>(_buf: &'a mut CudaSlice<f32>, _ranges: &[Range<usize>]) -> Option<Vec<DevViewMut<'a>>> {
        None
    }
    fn upload(&self, mut dst: DevViewMut<'_>, src: &[f32]) {
        assert_eq!(dst.len(), src.len(), "upload");
        ok(self.stream.memcpy_htod(src, &mut dst.cu()), "upload");
    }
    fn download(&self, src: DevView<'_>) -> Vec<f32> {
        ok(self.stream.clone_dtoh(&src.cu()), "download")
    }
    fn fill(&self, mut dst: DevViewMut<'_>, value: f32) {
        let n = dst.len();
        if n == 0 {
            return;
        }
        let mut d = dst.cu();
        // SAFETY: `fill(float*, float, size_t)` in elementwise.cu.
        ok(unsafe { self.stream.launch_builder(&self.k.fill).arg(&mut d).arg(&value).arg(&n).launch(grid_stride(n)) }, "fill");
    }
    fn copy(&self, mut dst: DevViewMut<'_>, src: DevView<'_>) {
        assert_eq!(dst.len(), src.len(), "copy");
        ok(self.stream.memcpy_dtod(&src.cu(), &mut dst.cu()), "copy");
    }

    fn add_assign(&self, mut dst: DevViewMut<'_>, src: DevView<'_>) {
        let n = dst.len();
        assert_eq!(n, src.len(), "add_assign");
        if n == 0 {
            return;
        }
        let (mut d, s) = (dst.cu(), src.cu());
        // SAFETY: `add_assign(float*, const float*, size_t)`.
        ok(unsafe { self.stream.launch_builder(&self.k.add_assign).arg(&mut d).arg(&s).arg(&n).launch(grid_stride(n)) }, "add_assign");
    }
    fn add(&self, mut out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
        let n = out.len();
        assert!(a.len() == n && b.len() == n, "add");
        if n == 0 {
            return;
        }
        let (mut o, a, b) = (out.cu(), a.cu(), b.cu());
        // SAFETY: `add(float*, const float*, const float*, size_t)`.
        ok(unsafe { self.stream.launch_builder(&self.k.add).arg(&mut o).arg(&a).arg(&b).arg(&n).launch(grid_stride(n)) }, "add");
    }
    fn scale(&self, mut dst: DevViewMut<'_>, s: f32) {
        let n = dst.len();
        if n == 0 {
            return;
        }
        let mut d = dst.cu();
        // SAFETY: `scale(float*, float, size_t)`.
        ok(unsafe { self.stream.launch_builder(&self.k.scale).arg(&mut d).arg(&s).arg(&n).launch(grid_stride(n)) }, "scale");
    }
    fn sum_squares(&self, x: DevView<'_>) -> f64 {
        let n = x.len();
        let mut partial = ok(self.stream.alloc_zeros::<f64>(SUMSQ_BLOCKS), "scratch alloc");
        let mut total = ok(self.stream.alloc_zeros::<f64>(1), "scratch alloc");
        let xv = x.cu();
        let cfg = LaunchConfig { grid_dim: (SUMSQ_BLOCKS as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let count = SUMSQ_BLOCKS as i32;
        // SAFETY: `sum_squares_partial(double*, const float*, size_t)` with SUMSQ_BLOCKS blocks,
        // then `sum_squares_final(double*, const double*, int)` on one warp.
        unsafe {
            ok(self.stream.launch_builder(&self.k.sum_squares_partial).arg(&mut partial).arg(&xv).arg(&n).launch(cfg), "sum_squares");
            let one_warp = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            ok(self.stream.launch_builder(&self.k.sum_squares_final).arg(&mut total).arg(&partial).arg(&count).launch(one_warp), "sum_squares");
        }
        ok(self.stream.clone_dtoh(&total), "download")[0]
    }

    fn matmul(&self, mut out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>, m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                self.fill(out, 0.0);
            }
            return;
        }
        blas::matmul(&self.blas, &mut out.cu(), &a.cu(), &b.cu(), m, k, n, ta, tb, accumulate);
    }

    fn embedding_fwd(&self, mut out: DevViewMut<'_>, table: DevView<'_>, tokens: &[u32], c: usize) {
        if tokens.is_empty() || c == 0 {
            return;
        }
        assert_eq!(out.len(), tokens.len() * c, "embedding out");
        let t = self.upload_u32(tokens);
        let (mut o, tab, c) = (out.cu(), table.cu(), c as i32);
        // SAFETY: `embedding_fwd(float*, const float*, const unsigned*, int)`, one block per token.
        ok(unsafe { self.stream.launch_builder(&self.k.embedding_fwd).arg(&mut o).arg(&tab).arg(&t).arg(&c).launch(per_row(tokens.len())) }, "embedding_fwd");
    }
    fn embedding_bwd(&self, mut dtable: DevViewMut<'_>, dout: DevView<'_>, tokens: &[u32], c: usize) {
        if tokens.is_empty() || c == 0 {
            return;
        }
        let groups = kernels::group_positions(tokens);
        let (ids, offsets, pos) = (self.upload_u32(&groups.ids), self.upload_u32(&groups.offsets), self.upload_u32(&groups.positions));
        let (mut d, g, c) = (dtable.cu(), dout.cu(), c as i32);
        // SAFETY: `embedding_bwd(float*, const float*, const unsigned* ids, offsets, pos, int)`,
        // one block per distinct token, so no two blocks write the same row.
        ok(
            unsafe { self.stream.launch_builder(&self.k.embedding_bwd).arg(&mut d).arg(&g).arg(&ids).arg(&offsets).arg(&pos).arg(&c).launch(per_row(groups.ids.len())) },
            "embedding_bwd",
        );
    }

    fn rmsnorm_fwd(&self, mut out: DevViewMut<'_>, mut rstd: DevViewMut<'_>, x: DevView<'_>, w: DevView<'_>, n: usize, c: usize, eps: f32) {
        if n == 0 {
            return;
        }
        assert!(x.len() == n * c && out.len() == n * c && rstd.len() == n, "rmsnorm_fwd shapes");
        let (mut o, mut r, x, w, c) = (out.cu(), rstd.cu(), x.cu(), w.cu(), c as i32);
        // SAFETY: `rmsnorm_fwd(float* out, float* rstd, const float* x, const float* w, int, float)`.
        ok(unsafe { self.stream.launch_builder(&self.k.rmsnorm_fwd).arg(&mut o).arg(&mut r).arg(&x).arg(&w).arg(&c).arg(&eps).launch(per_row(n)) }, "rmsnorm_fwd");
    }
    fn rmsnorm_bwd(&self, mut dx: DevViewMut<'_>, mut dw: DevViewMut<'_>, dout: DevView<'_>, x: DevView<'_>, w: DevView<'_>, rstd: DevView<'_>, n: usize, c: usize) {
        if n == 0 || c == 0 {
            return;
        }
        assert!(dx.len() == n * c && dout.len() == n * c && x.len() == n * c && dw.len() == c && rstd.len() == n, "rmsnorm_bwd shapes");
        let chunks = n.div_ceil(ROW_CHUNK);
        let mut part = self.scratch_f32(chunks * c);
        let (mut dxv, mut dwv, g, xv, wv, r) = (dx.cu(), dw.cu(), dout.cu(), x.cu(), w.cu(), rstd.cu());
        let (ni, ci, rows, ch) = (n as i32, c as i32, ROW_CHUNK as i32, chunks as i32);
        let col_blocks = c.div_ceil(THREADS as usize) as u32;
        // SAFETY: signatures of rmsnorm_bwd_dx, rmsnorm_dw_partial, rmsnorm_dw_reduce in norm.cu;
        // `part` holds chunks × c floats.
        unsafe {
            ok(self.stream.launch_builder(&self.k.rmsnorm_bwd_dx).arg(&mut dxv).arg(&g).arg(&xv).arg(&wv).arg(&r).arg(&ci).launch(per_row(n)), "rmsnorm_bwd_dx");
            let cfg = LaunchConfig { grid_dim: (chunks as u32, col_blocks, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            ok(self.stream.launch_builder(&self.k.rmsnorm_dw_partial).arg(&mut part).arg(&g).arg(&xv).arg(&r).arg(&ni).arg(&ci).arg(&rows).launch(cfg), "rmsnorm_dw_partial");
            ok(self.stream.launch_builder(&self.k.rmsnorm_dw_reduce).arg(&mut dwv).arg(&part).arg(&ch).arg(&ci).launch(grid_stride(c)), "rmsnorm_dw_reduce");
        }
    }

    fn rope(&self, mut qkv: DevViewMut<'_>, table: DevView<'_>, shape: AttnShape, first_row: usize, inverse: bool) {
        let n = qkv.len() / shape.qkv_width();
        assert_eq!(qkv.len(), n * shape.qkv_width(), "rope qkv");
        let rotated = shape.n_heads + shape.n_kv_heads;
        let total = n * rotated * shape.head_dim / 2;
        if total == 0 {
            return;
        }
        let (mut q, t) = (qkv.cu(), table.cu());
        let (ni, fr, seq, rh, hd, wd) = (n as i32, first_row as i32, shape.seq as i32, rotated as i32, shape.head_dim as i32, shape.qkv_width() as i32);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        // SAFETY: `rope(float*, const float*, int n, int first_row, int seq, int rotated_heads, int head_dim, int row_width, float)`.
        ok(
            unsafe { self.stream.launch_builder(&self.k.rope).arg(&mut q).arg(&t).arg(&ni).arg(&fr).arg(&seq).arg(&rh).arg(&hd).arg(&wd).arg(&sign).launch(grid_stride(total)) },
            "rope",
        );
    }

    fn attention_fwd(&self, out: DevViewMut<'_>, lse: DevViewMut<'_>, qkv: DevView<'_>, shape: AttnShape) {
        attention::forward(self, out, lse, qkv, shape)
    }
    fn attention_bwd(&self, dqkv: DevViewMut<'_>, dout: DevView<'_>, out: DevView<'_>, lse: DevView<'_>, qkv: DevView<'_>, shape: AttnShape) {
        attention::backward(self, dqkv, dout, out, lse, qkv, shape)
    }

    fn swiglu_fwd(&self, mut out: DevViewMut<'_>, gu: DevView<'_>, rows: usize, h: usize) {
        if rows * h == 0 {
            return;
        }
        assert!(out.len() == rows * h && gu.len() == rows * 2 * h, "swiglu_fwd shapes");
        let (mut o, g, hi) = (out.cu(), gu.cu(), h as i32);
        // SAFETY: `swiglu_fwd(float*, const float*, size_t rows, int h)`.
        ok(unsafe { self.stream.launch_builder(&self.k.swiglu_fwd).arg(&mut o).arg(&g).arg(&rows).arg(&hi).launch(grid_stride(rows * h)) }, "swiglu_fwd");
    }
    fn swiglu_bwd(&self, mut dgu: DevViewMut<'_>, dout: DevView<'_>, gu: DevView<'_>, rows: usize, h: usize) {
        if rows * h == 0 {
            return;
        }
        assert!(dgu.len() == rows * 2 * h && dout.len() == rows * h && gu.len() == rows * 2 * h, "swiglu_bwd shapes");
        let (mut d, g, u, hi) = (dgu.cu(), dout.cu(), gu.cu(), h as i32);
        // SAFETY: `swiglu_bwd(float* dgu, const float* dout, const float* gu, size_t, int)`.
        ok(unsafe { self.stream.launch_builder(&self.k.swiglu_bwd).arg(&mut d).arg(&g).arg(&u).arg(&rows).arg(&hi).launch(grid_stride(rows * h)) }, "swiglu_bwd");
    }

    fn softmax_rows(&self, mut out: DevViewMut<'_>, logits: DevView<'_>, rows: usize, cols: usize) {
        if rows == 0 {
            return;
        }
        assert!(out.len() == rows * cols && logits.len() == rows * cols, "softmax_rows shapes");
        let (mut o, z, r, c) = (out.cu(), logits.cu(), rows as i32, cols as i32);
        // SAFETY: `softmax_rows_fwd(float*, const float*, int rows, int cols)`.
        ok(unsafe { self.stream.launch_builder(&self.k.softmax_rows_fwd).arg(&mut o).arg(&z).arg(&r).arg(&c).launch(warp_per_row(rows)) }, "softmax_rows");
    }
    fn softmax_rows_bwd(&self, mut dlogits: DevViewMut<'_>, dprobs: DevView<'_>, probs: DevView<'_>, rows: usize, cols: usize) {
        if rows == 0 {
            return;
        }
        assert!(dlogits.len() == rows * cols && dprobs.len() == rows * cols && probs.len() == rows * cols, "softmax_rows_bwd shapes");
        let (mut d, dp, p, r, c) = (dlogits.cu(), dprobs.cu(), probs.cu(), rows as i32, cols as i32);
        // SAFETY: `softmax_rows_bwd(float*, const float*, const float*, int, int)`.
        ok(unsafe { self.stream.launch_builder(&self.k.softmax_rows_bwd).arg(&mut d).arg(&dp).arg(&p).arg(&r).arg(&c).launch(warp_per_row(rows)) }, "softmax_rows_bwd");
    }

    fn gather_rows(&self, out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], c: usize) {
        self.gather(out, x, index, None, c)
    }
    fn combine_rows(&self, mut out: DevViewMut<'_>, y: DevView<'_>, by_token: TokenSlots<'_>, weight: Option<&[f32]>, c: usize) {
        let tokens = by_token.offsets.len().saturating_sub(1);
        if tokens == 0 || c == 0 {
            return;
        }
        assert_eq!(out.len(), tokens * c, "combine_rows out");
        let (offsets, slots) = (self.upload_u32(by_token.offsets), self.upload_u32(by_token.slots));
        let w = weight.map(|w| self.upload_f32(w));
        let (mut o, yv, ci) = (out.cu(), y.cu(), c as i32);
        let null = 0u64;
        let mut l = self.stream.launch_builder(&self.k.combine_rows);
        l.arg(&mut o).arg(&yv).arg(&offsets).arg(&slots);
        match &w {
            Some(w) => l.arg(w),
            None => l.arg(&null),
        };
        l.arg(&ci);
        // SAFETY: `combine_rows(float*, const float*, const unsigned*, const unsigned*, const float* /*nullable*/, int)`.
        ok(unsafe { l.launch(per_row(tokens)) }, "combine_rows");
    }
    fn gathered_dots(&self, a: DevView<'_>, b: DevView<'_>, index: &[u32], c: usize) -> Vec<f32> {
        if index.is_empty() {
            return Vec::new();
        }
        assert_eq!(b.len(), index.len() * c, "gathered_dots b");
        let idx = self.upload_u32(index);
        let mut dots = self.scratch_f32(index.len());
        let (av, bv, s, ci) = (a.cu(), b.cu(), index.len() as i32, c as i32);
        // SAFETY: `gathered_dots(float*, const float*, const float*, const unsigned*, int slots, int c)`.
        ok(unsafe { self.stream.launch_builder(&self.k.gathered_dots).arg(&mut dots).arg(&av).arg(&bv).arg(&idx).arg(&s).arg(&ci).launch(warp_per_row(index.len())) }, "gathered_dots");
        let mut v = ok(self.stream.clone_dtoh(&dots), "download");
        v.truncate(index.len());
        v
    }
    fn gather_rows_scaled(&self, out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], weight: &[f32], c: usize) {
        self.gather(out, x, index, Some(weight), c)
    }

    fn classifier(&self, x: DevView<'_>, w: DevView<'_>, targets: &[u32], n: usize, c: usize, v: usize, mut grads: Option<(DevViewMut<'_>, DevViewMut<'_>, f32)>) -> Vec<f32> {
        if n == 0 {
            return Vec::new();
        }
        assert!(x.len() == n * c && w.len() == v * c && targets.len() == n, "classifier shapes");
        let rows_per_chunk = (LOGITS_BUDGET / v.max(1)).clamp(1, n);
        let mut logits = self.scratch_f32(rows_per_chunk * v);
        let mut losses = self.scratch_f32(n);
        let t = self.upload_u32(targets);
        let grad_scale = grads.as_ref().map_or(0.0, |g| g.2 / n as f32);
        let (xv, wv) = (x.cu(), w.cu());
        for r0 in (0..n).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(n - r0);
            let xs = xv.slice(r0 * c..(r0 + rows) * c);
            let mut lg = logits.slice_mut(..rows * v);
            blas::matmul(&self.blas, &mut lg, &xs, &wv, rows, c, v, false, true, false);
            let (mut ls, ts, vi) = (losses.slice_mut(r0..r0 + rows), t.slice(r0..r0 + rows), v as i32);
            // SAFETY: `softmax_xent(float* logits, float* losses, const unsigned* targets, int v, float)`,
            // one block per row of this chunk.
            ok(
                unsafe { self.stream.launch_builder(&self.k.softmax_xent).arg(&mut lg).arg(&mut ls).arg(&ts).arg(&vi).arg(&grad_scale).launch(per_row(rows)) },
                "softmax_xent",
            );
            if let Some((dx, dw, _)) = grads.as_mut() {
                let lg = logits.slice(..rows * v);
                let mut dxv = dx.cu();
                let mut dxs = dxv.slice_mut(r0 * c..(r0 + rows) * c);
                blas::matmul(&self.blas, &mut dxs, &lg, &wv, rows, v, c, false, false, false);
                blas::matmul(&self.blas, &mut dw.cu(), &lg, &xs, v, rows, c, true, false, true);
            }
        }
        ok(self.stream.clone_dtoh(&losses), "download")
    }

    fn adamw(&self, mut p: DevViewMut<'_>, mut m: DevViewMut<'_>, mut v: DevViewMut<'_>, g: DevView<'_>, hp: AdamW, grad_scale: f32, decay: bool) {
        let n = p.len();
        assert!(m.len() == n && v.len() == n && g.len() == n, "adamw shapes");
        if n == 0 {
            return;
        }
        let args = kernels::AdamWArgs::new(hp, decay);
        let (mut pv, mut mv, mut vv, gv) = (p.cu(), m.cu(), v.cu(), g.cu());
        let no_working_copy = 0u64;
        // SAFETY: `adamw(float* master, act_t* work /*null*/, float* m, float* v, const float* g,
        // size_t n, AdamW, float)`; AdamWArgs is #[repr(C)] and matches `struct AdamW`.
        ok(
            unsafe {
                self.stream
                    .launch_builder(&self.k.adamw)
                    .arg(&mut pv)
                    .arg(&no_working_copy)
                    .arg(&mut mv)
                    .arg(&mut vv)
                    .arg(&gv)
                    .arg(&n)
                    .arg(&args)
                    .arg(&grad_scale)
                    .launch(grid_stride(n))
            },
            "adamw",
        );
    }
}
