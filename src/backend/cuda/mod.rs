//! The CUDA backend: kernels compiled with NVRTC at start-up, matmuls on cuBLASLt, one stream.
//!
//! **Status: runs on an emulated GPU, never yet on a real one.** Every kernel compiles for
//! `sm_90a` in CI (`tests/cuda_nvrtc.rs`) and runs on a CPU emulator against the CPU backend
//! (`tests/cuda_emu.rs`); this whole backend runs unchanged on an emulated device (CPU stand-ins
//! for the driver, NVRTC and cuBLAS(Lt), `tests/cuda_emu/device/`), where `tests/cuda_parity.rs`
//! passes in CI. It has not run on a GPU yet. See `docs/cuda.md`.
//!
//! Storage: every buffer knows its element type. The backend is built for one activation
//! storage ([`Storage::Bf16`] for mixed-precision training, [`Storage::F32`] for checking against
//! the CPU): `alloc` gives that type, `alloc_f32` always f32, and each op checks that its
//! arguments have the types of their roles (the trait's module doc). With bf16 storage the
//! weights are read from a bf16 working copy that AdamW writes next to the f32 master.
//!
//! Views are device addresses with a length, an element type and the lifetime of the buffer
//! they borrow (not cudarc's views, which borrow the whole buffer mutably), so several
//! writable views of one buffer can coexist when they do not overlap.
//!
//! Index data (tokens, routing slots) arrives as host slices, as the trait says, and is uploaded
//! per call through a page-locked ring into a device ring (`staging.rs`), which the memory plan
//! counts (`cuda_scratch`). The scratch of the router, the attention backward and the
//! classifier is the caller's (arena views: the plan places them); the reductions' partial sums
//! (RMSNorm's weight gradient, Σx²) live in one buffer allocated when the backend opens, which
//! the plan counts beside cuBLASLt's workspace. No op allocates scratch of its own per call.
//!
//! Errors: trait ops cannot return errors; a failed launch or copy means the device state is
//! unknown, so they panic with the driver's message, and so does an argument of the wrong
//! element type (a bug in the caller, named in the message). Anything decided by user input
//! (device presence, libraries, attention shape) is checked up front with a `Result`:
//! [`cuda_available`], [`CudaBackend::new`], [`CudaBackend::check_attention`].

pub mod attention;
mod blas;
mod detect;
pub mod experts;
mod grouped;
mod kernels;
pub mod launch;
mod nccl;
pub mod nvrtc;
mod offload;
mod profile;
mod staging;
pub mod tma;
use staging::Staged;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{result as drv, CudaContext, CudaSlice, CudaStream, DevicePtr, PushKernelArg};
use half::bf16;

use blas::Operand;
pub use detect::cuda_available;
pub use kernels::{group_positions, AdamWArgs};
use kernels::Kernels;
use launch::{grid_stride, per_row, vec_width, warp_per_row, ROUTE_GROUP, SUMSQ_BLOCKS};
use profile::Work;
pub use nvrtc::Storage;

use super::{copy_then_matmul, matmul_each, swiglu_bwd_each, swiglu_each, weight_grad_gathering, AdamW, ArenaPart, AttnShape, Backend, Gemm, OpTime, Pick, Precision, RoutedSlots, RouteRule, RouterGrad, SwiGluBwdGemm, SwiGluGemm, TokenSlots};
use super::cuda_scratch::{self, RouteScratch};
use crate::{Error, Result};

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: blas::Lt,
    /// One cuBLAS call per grouped matmul; `None`: one cuBLASLt matmul per product.
    grouped: Option<grouped::Grouped>,
    /// MEMO's copy stream and host tier.
    offload: offload::Offloader,
    /// Index and pointer uploads through page-locked memory.
    staging: staging::Staging,
    /// Downloads through page-locked memory.
    readback: staging::Readback,
    /// The reductions' partial sums (`cuda_scratch::REDUCTION_BYTES`), allocated once: every op
    /// runs on the one stream, so each call's use follows the last.
    reduction: DevBuf,
    /// Attention at head_dim 64 runs the Hopper (wgmma) kernels.
    hopper_attention: bool,
    /// The experts' grouped GEMMs run on our Hopper kernels, SwiGLU fused into them.
    hopper_experts: bool,
    /// Whether a product the expert kernels do not take has been reported.
    fallback_said: std::sync::atomic::AtomicBool,
    /// The device's multiprocessors: the expert kernels' persistent grid (`experts::Fused::config`).
    sms: usize,
    k: Kernels,
    device: String,
    /// GPU time per op, when asked for ([`CudaBackend::with_profile`]).
    profile: Option<profile::Profiler>,
}

/// A device buffer of `len` elements of type `storage`.
pub struct DevBuf {
    /// Owns the memory at `ptr`.
    _mem: CudaSlice<u8>,
    ptr: u64,
    len: usize,
    storage: Storage,
}

/// A read-only range of a device buffer.
#[derive(Clone, Copy)]
pub struct DevView<'a> {
    ptr: u64,
    len: usize,
    storage: Storage,
    _buf: PhantomData<&'a DevBuf>,
}

/// A writable range of a device buffer.
pub struct DevViewMut<'a> {
    ptr: u64,
    len: usize,
    storage: Storage,
    _buf: PhantomData<&'a mut DevBuf>,
}

impl DevView<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> usize {
        self.len * self.storage.bytes()
    }
    fn operand(&self) -> Operand {
        Operand { ptr: self.ptr, storage: self.storage }
    }
}

impl DevViewMut<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> usize {
        self.len * self.storage.bytes()
    }
    fn operand(&self) -> Operand {
        Operand { ptr: self.ptr, storage: self.storage }
    }
}

/// Elements of an operand as its products count them: its picked rows, `width` each (every one
/// inside `x`, and as many weights as rows), or `x`'s own.
fn picked_len(x: DevView<'_>, pick: Option<Pick<'_>>, width: usize, op: &str) -> usize {
    let Some(pick) = pick else { return x.len() };
    assert!(pick.rows.iter().all(|&r| (r as usize + 1) * width <= x.len()), "{op}: a picked row past its operand");
    assert!(pick.scale.is_none_or(|w| w.len() == pick.rows.len()), "{op}: {} picked rows, another number of weights", pick.rows.len());
    pick.rows.len() * width
}

/// The picked rows that products of `(first row, rows)` read, together (empty where none reads).
fn row_stretch(products: impl Iterator<Item = (usize, usize)>) -> Range<usize> {
    let (start, end) = products.filter(|&(_, rows)| rows > 0).fold((usize::MAX, 0), |(start, end), (first, rows)| (start.min(first), end.max(first + rows)));
    start.min(end)..end
}

/// A grouped matmul's products and operands, each product's parts of `a`, `b` and `out`.
fn grouped_work(out: &DevViewMut<'_>, a: &DevView<'_>, b: &DevView<'_>, gemms: &[Gemm], accumulate: bool) -> Work {
    let (sa, sb, so) = (a.storage.bytes(), b.storage.bytes(), out.storage.bytes() * (1 + accumulate as usize));
    let flops = gemms.iter().map(|g| 2.0 * (g.m * g.k * g.n) as f64).sum();
    Work::computing(flops, gemms.iter().map(|g| g.m * g.k * sa + g.k * g.n * sb + g.m * g.n * so).sum())
}

/// A fused expert kernel's least work (bf16 operands): its products' FLOPs and operands, and
/// `per_output` elements moved by the epilogue per output of the product.
fn fused_work(products: impl Iterator<Item = Gemm>, per_output: f64) -> Work {
    let e = Storage::Bf16.bytes() as f64;
    let (flops, bytes) = products.fold((0.0, 0.0), |(f, b), g| {
        let (m, k, n) = (g.m as f64, g.k as f64, g.n as f64);
        (f + 2.0 * m * k * n, b + e * (m * k + k * n + per_output * m * n))
    });
    Work { flops, bytes }
}

/// The classifier's products (logits; with gradients, dx and dW too) over x, W, dx and dW (read
/// and written): the logits and their gradient are transient, not counted.
fn classifier_work(x: &DevView<'_>, w: &DevView<'_>, grads: &Option<(DevViewMut<'_>, DevViewMut<'_>, f32)>, n: usize, c: usize, v: usize) -> Work {
    let products = if grads.is_some() { 3.0 } else { 1.0 };
    let grad_bytes = grads.as_ref().map_or(0, |(dx, dw, _)| dx.bytes() + 2 * dw.bytes());
    Work::computing(products * 2.0 * (n * c * v) as f64, x.bytes() + w.bytes() + grad_bytes)
}

/// Address of element `at` of a buffer starting at `ptr`.
fn offset(ptr: u64, at: usize, storage: Storage) -> u64 {
    ptr + (at * storage.bytes()) as u64
}

/// Panics unless an argument has the element type of its role: a caller bug, named.
fn expect(op: &str, arg: &str, got: Storage, want: Storage) {
    assert!(got == want, "CUDA {op}: `{arg}` must be {want:?}, got {got:?} (see the precision roles in src/backend/mod.rs)");
}

/// `len` elements of `storage` from the stream's pool, not initialised: callers write every
/// element before reading it (see each call).
fn uninit_buffer(stream: &Arc<CudaStream>, len: usize, storage: Storage) -> DevBuf {
    // SAFETY: uninitialised device memory of (len × element size) bytes, written before read.
    let mem = ok(unsafe { stream.alloc::<u8>((len * storage.bytes()).max(1)) }, "alloc");
    let ptr = mem.device_ptr(stream).0;
    DevBuf { _mem: mem, ptr, len, storage }
}

/// Unwraps a driver result; see the module doc for why a device error panics.
fn ok<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e:?}"))
}

impl CudaBackend {
    /// Opens GPU `ordinal` with activations stored as `storage`, compiles (or loads from the PTX
    /// cache) every kernel and creates the cuBLASLt handle. Needs a GPU of compute capability
    /// 8.0 or newer (bf16 tensor cores).
    pub fn new(ordinal: usize, storage: Storage) -> Result<Self> {
        cuda_available().map_err(Error::Invalid)?;
        Self::open(ordinal, storage)
    }

    /// The GPU of this node's `local_rank`-th rank (the ranks take the GPUs in turn), opened as
    /// [`CudaBackend::new`] opens one.
    pub fn for_local_rank(local_rank: usize, storage: Storage) -> Result<Self> {
        cuda_available().map_err(Error::Invalid)?;
        let count = CudaContext::device_count().map_err(|e| Error::Invalid(format!("counting GPUs: {e:?}")))?;
        Self::open(local_rank % count.max(1) as usize, storage)
    }

    fn open(ordinal: usize, storage: Storage) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Invalid(format!("cannot open GPU {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::Invalid(format!("GPU {ordinal}: {e:?}")))?;
        if major < 8 {
            return Err(Error::Invalid(format!("GPU {ordinal} has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer (bf16 tensor cores)")));
        }
        // cudarc's per-allocation events order buffers across streams; the raw-pointer views
        // bypass them anyway, so they are pure overhead.
        // SAFETY: compute runs on one stream; the only other, MEMO's copy stream (offload.rs),
        // is ordered by its own events (`Offloader::after`, `mark`, `wait`), and the store keeps
        // an offloaded buffer alive until a later `copy_wait`.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| Error::Invalid(format!("GPU {ordinal}: {e:?}")))? as usize;
        let k = Kernels::load(&ctx, major, minor, storage)?;
        let stream = ctx.default_stream();
        let blas = blas::Lt::new(stream.clone()).map_err(Error::Invalid)?;
        let grouped = Some(grouped::Grouped::new(stream.clone()).map_err(Error::Invalid)?);
        let offload = offload::Offloader::new(&ctx).map_err(Error::Invalid)?;
        let staging = staging::Staging::new(stream.clone());
        let readback = staging::Readback::new(stream.clone());
        let reduction = uninit_buffer(&stream, cuda_scratch::REDUCTION_BYTES / 4, Storage::F32);
        let be = CudaBackend { stream, blas, grouped, offload, staging, readback, reduction, hopper_attention: false, hopper_experts: false, fallback_said: Default::default(), sms, k, device: format!("{name} (sm_{major}{minor}, {storage:?} activations)"), profile: None };
        be.keep_freed_memory()?;
        super::keep_freed_host_memory();
        Ok(be)
    }

    /// Makes this backend's context current on the calling thread: calls that bypass cudarc's
    /// wrappers (raw copies, cuBLAS) need it, and a rank's thread may not have it yet.
    fn bind(&self) {
        ok(self.stream.context().bind_to_thread(), "binding the context");
    }

    /// Runs grouped matmuls as one cuBLASLt call per product instead of one grouped cuBLAS
    /// call (to compare the two).
    pub fn without_grouped_gemm(mut self) -> Self {
        self.grouped = None;
        self
    }

    /// Runs attention at head_dim 64 on the Hopper kernels (wgmma: `attn_fwd_wgmma_d64`,
    /// `attn_bwd_wgmma_d64`) instead of the mma.sync ones; an error where they were not compiled
    /// (a GPU other than Hopper). Opt-in until they have been measured and checked on a GPU.
    pub fn with_hopper_attention(mut self) -> Result<Self> {
        if self.k.attn_hopper.is_none() {
            return Err(Error::Invalid(format!("{}: the Hopper attention kernels need an sm_90 GPU (H100, H200)", self.device)));
        }
        self.hopper_attention = true;
        Ok(self)
    }

    /// Runs the experts' grouped GEMMs on Hopper kernels of our own, with bf16 storage: the up
    /// projection with SwiGLU in its epilogue (`grouped_matmul_swiglu`, `expert_up_wgmma`),
    /// SwiGLU's backward in the epilogue of `dact = dy W_down` (`grouped_matmul_swiglu_bwd`,
    /// `expert_dact_wgmma`), and the grouped matmuls that write untransposed products (the down
    /// projection and the input gradient: `grouped_nt_wgmma`, `grouped_nn_wgmma`), instead of
    /// the grouped cuBLAS call and a SwiGLU kernel per expert; an error where they were not
    /// compiled (a GPU other than Hopper). Opt-in until they have been measured and checked on
    /// a GPU.
    pub fn with_hopper_experts(mut self) -> Result<Self> {
        if self.k.experts.is_none() {
            return Err(Error::Invalid(format!("{}: the Hopper expert kernels need an sm_90 GPU (H100, H200)", self.device)));
        }
        if self.storage() != Storage::Bf16 {
            return Err(Error::Invalid(format!("{}: the Hopper expert kernels run with bf16 activations (CudaBackend::new(_, Storage::Bf16))", self.device)));
        }
        self.hopper_experts = true;
        Ok(self)
    }

    /// Both of the above: every Hopper kernel motley has.
    pub fn with_hopper_kernels(self) -> Result<Self> {
        self.with_hopper_attention()?.with_hopper_experts()
    }

    /// The expert kernels' launch for operands of `storages`, when they are turned on, every
    /// operand is bf16 and `call` says the kernel takes the products.
    ///
    /// Products the kernels do not take run on cuBLAS, saying so once: a model whose widths are
    /// not whole tiles would otherwise measure cuBLAS under the kernels' name.
    fn fused_call(&self, storages: &[Storage], call: impl FnOnce() -> Option<experts::Call>) -> Option<experts::Call> {
        // `with_hopper_experts` checked that the kernels exist and the storage is bf16.
        if !self.hopper_experts || storages.iter().any(|&s| s != Storage::Bf16) {
            return None;
        }
        let call = call();
        if call.is_none() && !self.fallback_said.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "motley: the Hopper expert kernels take expert widths and d_model that are multiples of 128 (64 suffice for the up projection's widths) and 16-byte aligned operands; products that are not run on cuBLAS instead (said once)"
            );
        }
        call
    }

    /// Uploads the stretch `[stretch]` of a picked operand's row index (and weights, where it
    /// has them) that `call`'s products read (a chunk of the experts reads a chunk of the
    /// slots) and points the segments' pick of `side` into them: their addresses set back by
    /// the stretch's start, so that the products' row offsets, which count from the whole
    /// index, land in them. Keep the uploads until the launch is queued.
    fn place_pick(&self, call: &mut experts::Call, side: experts::Side, pick: Pick<'_>, stretch: Range<usize>) -> Option<(Staged<'_>, Option<Staged<'_>>)> {
        (call.tiles > 0 && !stretch.is_empty()).then(|| {
            let back = |ptr: u64| ptr.wrapping_sub(4 * stretch.start as u64);
            let index = self.upload_u32(&pick.rows[stretch.clone()]);
            let weights = pick.scale.map(|w| self.upload_f32(&w[stretch.clone()]));
            call.place_pick(side, back(index.ptr), weights.as_ref().map(|w| back(w.ptr)));
            (index, weights)
        })
    }

    /// Launches the expert kernel of `call` over its tiles on a persistent grid, its segments'
    /// table uploaded first.
    fn launch_fused(&self, call: &experts::Call) {
        if call.tiles == 0 {
            return;
        }
        let f = &self.k.experts.as_ref().expect("with_hopper_experts checked the kernels")[call.kernel as usize];
        let table = self.staging.upload(&call.segments, "expert segment upload");
        let count = call.segments.len() as i32;
        let tiles = call.tiles as i32;
        // SAFETY: every kernel of experts.cu is `(const Segment*, int count, int tiles)`; every
        // segment's operands lie inside the views (checked by the caller), aligned and whole
        // tiles (`experts::up_call`, `dact_call`, `gemm_call`); the blocks loop over the tiles.
        ok(unsafe { self.stream.launch_builder(f).arg(&table.ptr).arg(&count).arg(&tiles).launch(call.kernel.config(call, self.sms)) }, call.kernel.function());
    }

    /// Records the GPU time of every op (see [`CudaBackend::take_profile`]).
    pub fn with_profile(mut self) -> Self {
        self.profile = Some(profile::Profiler::default());
        self
    }

    /// Per op since the start or the last call (stream time, least bytes and FLOPs), slowest
    /// first; empty when not profiling. Waits for the recorded work to finish.
    pub fn take_profile(&self) -> Vec<OpTime> {
        self.profile.as_ref().map_or_else(Vec::new, |p| p.take())
    }

    /// Brackets an op doing `work` for the profile; a no-op (`work` not evaluated) when not
    /// profiling.
    fn span(&self, op: &'static str, work: impl FnOnce() -> Work) -> Option<profile::Span<'_>> {
        self.profile.as_ref().map(|p| p.span(&self.stream, op, work))
    }

    /// The GPU's name, architecture and activation storage, for logs.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The activation storage this backend was built for.
    pub fn storage(&self) -> Storage {
        self.k.storage
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

    /// The element type of a tensor of kind `p`.
    fn storage_of(&self, p: Precision) -> Storage {
        if p == Precision::F32 {
            Storage::F32
        } else {
            self.storage()
        }
    }

    fn alloc_storage(&self, len: usize, storage: Storage) -> DevBuf {
        // alloc_zeros queues a memset: the profile shows what zeroing costs.
        let _span = self.span("alloc", || Work::moving(len * storage.bytes()));
        // At least one byte: a zero-byte allocation has no address to hand out.
        let mem = ok(self.stream.alloc_zeros::<u8>((len * storage.bytes()).max(1)), "alloc");
        let ptr = mem.device_ptr(&self.stream).0;
        DevBuf { _mem: mem, ptr, len, storage }
    }

    /// A buffer whose every element the caller overwrites before reading: not zeroed (the
    /// trait's `alloc` promises zeros, so it pays a memset this skips).
    fn scratch_storage(&self, len: usize, storage: Storage) -> DevBuf {
        let _span = self.span("alloc", || Work::NONE);
        uninit_buffer(&self.stream, len, storage)
    }

    fn upload_u32(&self, host: &[u32]) -> Staged<'_> {
        self.staging.upload(host, "index upload")
    }
    fn upload_f32(&self, host: &[f32]) -> Staged<'_> {
        self.staging.upload(host, "weight upload")
    }

    /// `dst = src` converted between f32 and activation storage (`f32_to_act` / `act_to_f32`).
    fn convert(&self, dst: u64, dst_storage: Storage, src: u64, n: usize) {
        if n == 0 {
            return;
        }
        let f = if dst_storage == Storage::F32 { &self.k.act_to_f32 } else { &self.k.f32_to_act };
        // SAFETY: `f32_to_act(act_t*, const float*, size_t)` / `act_to_f32(float*, const act_t*,
        // size_t)`; both ranges hold n elements of their types.
        ok(unsafe { self.stream.launch_builder(f).arg(&dst).arg(&src).arg(&n).launch(grid_stride(n)) }, "convert");
    }

    /// The row gather shared by `gather_rows` and `gather_rows_scaled`.
    fn gather(&self, out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], weight: Option<&[f32]>, c: usize) {
        if index.is_empty() || c == 0 {
            return;
        }
        assert_eq!(out.len(), index.len() * c, "gather_rows out");
        expect("gather_rows", "out", out.storage, self.storage());
        expect("gather_rows", "x", x.storage, self.storage());
        let idx = self.upload_u32(index);
        let w = weight.map(|w| self.upload_f32(w));
        let vec = vec_width(c, &[out.ptr, x.ptr]);
        let c = c as i32;
        let mut l = self.stream.launch_builder(&self.k.gather_rows);
        l.arg(&out.ptr).arg(&x.ptr).arg(&idx.ptr);
        let null = 0u64;
        match &w {
            Some(w) => l.arg(&w.ptr),
            None => l.arg(&null),
        };
        l.arg(&c).arg(&vec);
        // SAFETY: argument types match `gather_rows` in permute.cu; sizes asserted above; vec 8
        // only for aligned rows of a multiple of 8.
        ok(unsafe { l.launch(per_row(index.len())) }, "gather_rows");
    }

    /// A grid-stride elementwise kernel of `dst`'s storage over `n` elements, with a scalar.
    fn elementwise_scalar(&self, f: &cudarc::driver::CudaFunction, dst: u64, value: f32, n: usize, what: &str) {
        // SAFETY: `fill`/`scale(act_t*, float, size_t)` of the variant matching dst's storage.
        ok(unsafe { self.stream.launch_builder(f).arg(&dst).arg(&value).arg(&n).launch(grid_stride(n)) }, what);
    }

    /// Most bytes allocated from the device's memory pool at once since the pool was created or
    /// [`Self::reset_peak_device_bytes`] last ran: every buffer and scratch of this backend and
    /// cuBLASLt's workspace (they come from the stream's pool), not the context or the kernels.
    pub fn peak_device_bytes(&self) -> Result<u64> {
        let mut high = 0u64;
        // SAFETY: the attribute is a u64 (cuuint64_t); the pool is the device's current one.
        self.mem_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, |pool, attr| unsafe { cudarc::driver::result::mem_pool::get_attribute(pool, attr, (&mut high as *mut u64).cast()) })?;
        Ok(high)
    }

    /// Bytes of the device ring uploads go through (`staging.rs`), allocated at the first upload
    /// and grown to what the ops hold (`cuda_scratch::upload_ring_bytes` plans it); 0 before.
    pub fn upload_ring_bytes(&self) -> u64 {
        self.staging.ring_len() as u64
    }

    /// Bytes the device has free and bytes this backend's pool holds (in use or kept for reuse).
    fn free_and_held_bytes(&self) -> Result<(u64, u64)> {
        let fail = |e: DriverError| Error::Invalid(format!("CUDA memory query failed: {e:?}"));
        self.stream.context().bind_to_thread().map_err(fail)?;
        let (free, _total) = cudarc::driver::result::mem_get_info().map_err(fail)?;
        let mut held = 0u64;
        // SAFETY: the attribute is a u64 (cuuint64_t); the pool is the device's current one.
        self.mem_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, |pool, attr| unsafe { cudarc::driver::result::mem_pool::get_attribute(pool, attr, (&mut held as *mut u64).cast()) })?;
        Ok((free as u64, held))
    }

    /// Starts a new high-water mark for [`Self::peak_device_bytes`] (the driver accepts only 0).
    pub fn reset_peak_device_bytes(&self) -> Result<()> {
        let mut zero = 0u64;
        // SAFETY: as above; setting USED_MEM_HIGH to 0 resets it to the current use.
        self.mem_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, |pool, attr| unsafe { cudarc::driver::result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast()) })
    }

    /// Keeps freed memory in the device's pool instead of handing it back to the driver at every
    /// synchronisation (the default release threshold is 0): the engine frees and allocates
    /// per block, and the router's download synchronises once per layer.
    fn keep_freed_memory(&self) -> Result<()> {
        let mut keep = u64::MAX;
        // SAFETY: the release threshold is a u64 (cuuint64_t).
        self.mem_pool_attribute(PoolAttribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, |pool, attr| unsafe {
            cudarc::driver::result::mem_pool::set_attribute(pool, attr, (&mut keep as *mut u64).cast())
        })
    }

    /// Runs `f` on the device's current memory pool (the one the stream allocates from) and
    /// the attribute `attr`.
    fn mem_pool_attribute(&self, attr: PoolAttribute, f: impl FnOnce(PoolHandle, PoolAttribute) -> std::result::Result<(), DriverError>) -> Result<()> {
        let ctx = self.stream.context();
        let fail = |e: DriverError| Error::Invalid(format!("CUDA memory pool query failed: {e:?}"));
        ctx.bind_to_thread().map_err(fail)?;
        // SAFETY: the device handle comes from the live context.
        let pool = unsafe { cudarc::driver::result::device::get_mem_pool(ctx.cu_device()) }.map_err(fail)?;
        f(pool, attr).map_err(fail)
    }
}

type PoolHandle = cudarc::driver::sys::CUmemoryPool;
type PoolAttribute = cudarc::driver::sys::CUmemPool_attribute;
type DriverError = cudarc::driver::result::DriverError;

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;
    type HostBuf = offload::PinnedHost;
    type CopyMark = cudarc::driver::CudaEvent;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn memory_budget(&self) -> Result<Option<u64>> {
        let (free, held) = self.free_and_held_bytes()?;
        Ok(Some(free + held))
    }
    fn device_group(&self, group: &dyn crate::parallel::comm::Communicator) -> Result<super::GroupOnDevice<Self>> {
        nccl::open(self, group)
    }
    /// Profiled as the stream time it spans: the stream idles while the host works, since the
    /// work follows a download.
    fn host_work<R: Send>(&self, op: &'static str, f: impl FnOnce() -> R + Send) -> R {
        let _span = self.span(op, || Work::NONE);
        f()
    }

    fn alloc(&self, len: usize) -> DevBuf {
        self.alloc_storage(len, self.storage())
    }
    fn alloc_f32(&self, len: usize) -> DevBuf {
        self.alloc_storage(len, Storage::F32)
    }
    fn alloc_scratch(&self, len: usize, precision: Precision) -> DevBuf {
        self.scratch_storage(len, self.storage_of(precision))
    }
    fn activation_bytes(&self) -> u64 {
        self.storage().bytes() as u64
    }
    fn buf_bytes(buf: &DevBuf) -> u64 {
        (buf.len * buf.storage.bytes()) as u64
    }
    fn len(buf: &DevBuf) -> usize {
        buf.len
    }
    fn view(buf: &DevBuf, range: Range<usize>) -> DevView<'_> {
        assert!(range.start <= range.end && range.end <= buf.len, "view {range:?} of {}", buf.len);
        DevView { ptr: offset(buf.ptr, range.start, buf.storage), len: range.len(), storage: buf.storage, _buf: PhantomData }
    }
    fn view_mut(buf: &mut DevBuf, range: Range<usize>) -> DevViewMut<'_> {
        assert!(range.start <= range.end && range.end <= buf.len, "view {range:?} of {}", buf.len);
        DevViewMut { ptr: offset(buf.ptr, range.start, buf.storage), len: range.len(), storage: buf.storage, _buf: PhantomData }
    }
    fn as_view<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        DevView { ptr: v.ptr, len: v.len, storage: v.storage, _buf: PhantomData }
    }
    fn reborrow_mut<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        DevViewMut { ptr: v.ptr, len: v.len, storage: v.storage, _buf: PhantomData }
    }
    fn subview<'b>(v: Self::View<'b>, range: Range<usize>) -> Self::View<'b> {
        assert!(range.start <= range.end && range.end <= v.len, "subview {range:?} of {}", v.len);
        DevView { ptr: offset(v.ptr, range.start, v.storage), len: range.len(), storage: v.storage, _buf: PhantomData }
    }
    fn subview_mut<'b>(v: &'b mut DevViewMut<'_>, range: Range<usize>) -> DevViewMut<'b> {
        assert!(range.start <= range.end && range.end <= v.len, "subview {range:?} of {}", v.len);
        DevViewMut { ptr: offset(v.ptr, range.start, v.storage), len: range.len(), storage: v.storage, _buf: PhantomData }
    }
    /// Views are addresses, so disjoint ones of one buffer coexist, each of its own type.
    fn arena_views<'a>(&self, buf: &'a mut DevBuf, parts: &[ArenaPart]) -> Option<Vec<DevViewMut<'a>>> {
        expect("arena_views", "buf", buf.storage, Storage::F32);
        let storage = |p: Precision| self.storage_of(p);
        let bytes = Self::buf_bytes(buf);
        let mut spans: Vec<(u64, u64)> = parts.iter().filter(|p| p.len > 0).map(|p| (p.at, p.at + p.len as u64 * p.precision.bytes(self.activation_bytes()))).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "arena_views: bytes {:?} and {:?} overlap", w[0], w[1]);
        }
        assert!(spans.last().is_none_or(|s| s.1 <= bytes), "arena_views: a part ends past the buffer's {bytes} bytes");
        Some(
            parts
                .iter()
                .map(|p| {
                    let st = storage(p.precision);
                    assert!(p.at.is_multiple_of(st.bytes() as u64), "arena part at byte {} is not aligned for {st:?}", p.at);
                    DevViewMut { ptr: buf.ptr + p.at, len: p.len, storage: st, _buf: PhantomData }
                })
                .collect(),
        )
    }
    fn upload(&self, dst: DevViewMut<'_>, src: &[f32]) {
        let _span = self.span("upload", || Work::NONE);
        assert_eq!(dst.len(), src.len(), "upload");
        self.bind();
        let stream = self.stream.cu_stream();
        // SAFETY: dst holds src.len() elements of its storage type; a copy from pageable host
        // memory has read the source by the time the call returns, so the temporary may go.
        match dst.storage {
            Storage::F32 => ok(unsafe { drv::memcpy_htod_async(dst.ptr, src, stream) }, "upload"),
            Storage::Bf16 => {
                let host: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                ok(unsafe { drv::memcpy_htod_async(dst.ptr, &host, stream) }, "upload")
            }
        }
    }
    fn download(&self, src: DevView<'_>) -> Vec<f32> {
        let _span = self.span("download", || Work::NONE);
        self.bind();
        match src.storage {
            Storage::F32 => self.readback.read::<f32>(src.ptr, src.len(), "download"),
            Storage::Bf16 => self.readback.read::<bf16>(src.ptr, src.len(), "download").iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn alloc_host(&self, bytes: u64) -> offload::PinnedHost {
        self.bind();
        self.offload.alloc(self.stream.context(), bytes)
    }
    fn offload(&self, dst: &mut offload::PinnedHost, at: u64, src: DevView<'_>, precision: Precision) {
        let _span = self.span("offload", || Work::NONE);
        self.bind();
        expect("offload", "src", src.storage, self.storage_of(precision));
        self.offload.offload(&self.stream, dst, at, src, src.len * src.storage.bytes());
    }
    fn reload(&self, dst: DevViewMut<'_>, src: &offload::PinnedHost, at: u64, precision: Precision) {
        let _span = self.span("reload", || Work::NONE);
        expect("reload", "dst", dst.storage, self.storage_of(precision));
        self.bind();
        let bytes = dst.len * dst.storage.bytes();
        self.offload.reload(&self.stream, dst, src, at, bytes);
    }
    fn copy_mark(&self) -> cudarc::driver::CudaEvent {
        self.offload.mark()
    }
    fn copy_wait(&self, mark: cudarc::driver::CudaEvent) {
        self.offload.wait(&self.stream, mark);
    }
    fn fill(&self, dst: DevViewMut<'_>, value: f32) {
        let _span = self.span("fill", || Work::moving(dst.bytes()));
        let n = dst.len();
        if n > 0 {
            self.elementwise_scalar(&self.k.elementwise(dst.storage).fill, dst.ptr, value, n, "fill");
        }
    }
    fn copy(&self, dst: DevViewMut<'_>, src: DevView<'_>) {
        let _span = self.span("copy", || Work::moving(dst.bytes() + src.bytes()));
        assert_eq!(dst.len(), src.len(), "copy");
        self.bind();
        if dst.storage == src.storage {
            let bytes = src.len() * src.storage.bytes();
            // SAFETY: both ranges hold `bytes` bytes; views of one buffer never overlap a
            // writable one (the borrow rules).
            ok(unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }, "copy");
        } else {
            self.convert(dst.ptr, dst.storage, src.ptr, src.len());
        }
    }

    fn add_assign(&self, dst: DevViewMut<'_>, src: DevView<'_>) {
        let _span = self.span("add_assign", || Work::moving(2 * dst.bytes() + src.bytes()));
        let n = dst.len();
        assert_eq!(n, src.len(), "add_assign");
        expect("add_assign", "src", src.storage, dst.storage);
        if n == 0 {
            return;
        }
        let f = &self.k.elementwise(dst.storage).add_assign;
        let vec = vec_width(n, &[dst.ptr, src.ptr]);
        // SAFETY: `add_assign(act_t*, const act_t*, size_t, int vec)` of the variant matching
        // both; vec 8 only for aligned buffers and n a multiple of 8.
        ok(unsafe { self.stream.launch_builder(f).arg(&dst.ptr).arg(&src.ptr).arg(&n).arg(&vec).launch(grid_stride(n / vec as usize)) }, "add_assign");
    }
    fn add(&self, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
        let _span = self.span("add", || Work::moving(out.bytes() + a.bytes() + b.bytes()));
        let n = out.len();
        assert!(a.len() == n && b.len() == n, "add");
        expect("add", "a", a.storage, out.storage);
        expect("add", "b", b.storage, out.storage);
        if n == 0 {
            return;
        }
        let f = &self.k.elementwise(out.storage).add;
        let vec = vec_width(n, &[out.ptr, a.ptr, b.ptr]);
        // SAFETY: `add(act_t*, const act_t*, const act_t*, size_t, int vec)` of the matching
        // variant; vec 8 only for aligned buffers and n a multiple of 8.
        ok(unsafe { self.stream.launch_builder(f).arg(&out.ptr).arg(&a.ptr).arg(&b.ptr).arg(&n).arg(&vec).launch(grid_stride(n / vec as usize)) }, "add");
    }
    fn scale(&self, dst: DevViewMut<'_>, s: f32) {
        let _span = self.span("scale", || Work::moving(2 * dst.bytes()));
        let n = dst.len();
        if n > 0 {
            self.elementwise_scalar(&self.k.elementwise(dst.storage).scale, dst.ptr, s, n, "scale");
        }
    }
    fn sum_squares(&self, x: DevView<'_>) -> f64 {
        let _span = self.span("sum_squares", || Work::moving(x.bytes()));
        let n = x.len();
        let ew = self.k.elementwise(x.storage);
        // The partial sums, then the total after them, in the reductions' scratch.
        let (partial, total) = (self.reduction.ptr, self.reduction.ptr + 8 * SUMSQ_BLOCKS as u64);
        let (cfg, one_warp) = launch::sum_squares();
        let (count, vec) = (SUMSQ_BLOCKS as i32, vec_width(8, &[x.ptr]));
        // SAFETY: `sum_squares_partial(double*, const act_t*, size_t, int vec)` with SUMSQ_BLOCKS
        // blocks (vec 8 only for an aligned x), then `sum_squares_final(double*, const double*,
        // int)` on one warp; the scratch holds SUMSQ_BLOCKS + 1 doubles (launch.rs asserts it).
        unsafe {
            ok(self.stream.launch_builder(&ew.sum_squares_partial).arg(&partial).arg(&x.ptr).arg(&n).arg(&vec).launch(cfg), "sum_squares");
            ok(self.stream.launch_builder(&ew.sum_squares_final).arg(&total).arg(&partial).arg(&count).launch(one_warp), "sum_squares");
        }
        self.readback.read::<f64>(total, 1, "download")[0]
    }

    fn matmul(&self, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>, m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) {
        let _span = self.span("matmul", || Work::computing(2.0 * (m * k * n) as f64, a.bytes() + b.bytes() + out.bytes() * (1 + accumulate as usize)));
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                self.fill(out, 0.0);
            }
            return;
        }
        assert!(out.len() == m * n && a.len() == m * k && b.len() == k * n, "matmul {m}×{k}×{n}: buffer sizes {} {} {}", a.len(), b.len(), out.len());
        expect("matmul", "b", b.storage, a.storage);
        self.bind();
        self.blas.matmul(out.operand(), a.operand(), b.operand(), m, k, n, ta, tb, accumulate.then(|| out.operand()));
    }

    fn matmul_residual(&self, out: DevViewMut<'_>, residual: DevView<'_>, a: DevView<'_>, b: DevView<'_>, m: usize, k: usize, n: usize, tb: bool) {
        if m * n == 0 || k == 0 {
            // Nothing to multiply: the residual is the result.
            return copy_then_matmul(self, out, residual, a, b, m, k, n, tb);
        }
        let _span = self.span("matmul", || Work::computing(2.0 * (m * k * n) as f64, a.bytes() + b.bytes() + residual.bytes() + out.bytes()));
        assert!(out.len() == m * n && residual.len() == m * n && a.len() == m * k && b.len() == k * n, "matmul_residual {m}×{k}×{n}: buffer sizes {} {} {} {}", a.len(), b.len(), residual.len(), out.len());
        expect("matmul_residual", "residual", residual.storage, out.storage);
        expect("matmul_residual", "b", b.storage, a.storage);
        self.bind();
        self.blas.matmul(out.operand(), a.operand(), b.operand(), m, k, n, false, tb, Some(residual.operand()));
    }

    fn grouped_matmul(&self, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>, gemms: &[Gemm], ta: bool, tb: bool, accumulate: bool) {
        let live: Vec<Gemm> = gemms.iter().copied().filter(|g| g.m * g.n > 0).collect();
        let mut outs: Vec<(usize, usize)> = live.iter().map(|g| (g.out, g.out + g.m * g.n)).collect();
        outs.sort_unstable();
        assert!(outs.windows(2).all(|w| w[0].1 <= w[1].0), "grouped_matmul: outputs overlap");
        for g in &live {
            assert!(g.out + g.m * g.n <= out.len() && g.a + g.m * g.k <= a.len() && g.b + g.k * g.n <= b.len(), "grouped_matmul: {g:?} outside its views");
        }
        // The expert kernels write products of untransposed a, and write or add the weight
        // gradients (aᵀ b into f32); the profile names them apart from cuBLAS's.
        let ops = experts::Operands { a: a.ptr, w: b.ptr, out: out.ptr, elem_bytes: Storage::Bf16.bytes(), ..Default::default() };
        let fused = match (ta, tb) {
            (false, _) if !accumulate => self.fused_call(&[out.storage, a.storage, b.storage], || experts::gemm_call(ops, &live, tb)),
            (true, false) if out.storage == Storage::F32 => self.fused_call(&[a.storage, b.storage], || experts::grad_call(ops, &live, accumulate, [false; 2])),
            _ => None,
        };
        if let Some(call) = fused {
            let _span = self.span("grouped_matmul_wgmma", || grouped_work(&out, &a, &b, gemms, accumulate));
            return self.launch_fused(&call);
        }
        let _span = self.span("grouped_matmul", || grouped_work(&out, &a, &b, gemms, accumulate));
        match &self.grouped {
            Some(grouped) if grouped::Grouped::supports(out.operand(), a.operand(), b.operand(), &live, ta, tb) => {
                self.bind();
                grouped.run(&self.staging, out.operand(), a.operand(), b.operand(), &live, ta, tb, accumulate)
            }
            _ => matmul_each(self, out, a, b, &live, ta, tb, accumulate),
        }
    }

    fn grouped_matmul_swiglu(&self, gu: DevViewMut<'_>, act: DevViewMut<'_>, (a, pick): (DevView<'_>, Option<Pick<'_>>), b: DevView<'_>, gemms: &[SwiGluGemm]) {
        let k = gemms.first().map_or(1, |g| g.gemm.k.max(1));
        let a_len = picked_len(a, pick, k, "grouped_matmul_swiglu");
        for g in gemms {
            let (m, k, n) = (g.gemm.m, g.gemm.k, g.gemm.n);
            let fits = g.gemm.out + m * n <= gu.len() && g.act + m * n / 2 <= act.len() && g.gemm.a + m * k <= a_len && g.gemm.b + n * k <= b.len();
            assert!(fits, "grouped_matmul_swiglu: {g:?} outside its views");
        }
        let ops = experts::Operands { a: a.ptr, w: b.ptr, out: gu.ptr, act: act.ptr, elem_bytes: Storage::Bf16.bytes(), ..Default::default() };
        let Some(mut call) = self.fused_call(&[gu.storage, act.storage, a.storage, b.storage], || experts::up_call(ops, gemms, pick.is_some())) else {
            return swiglu_each(self, gu, act, (a, pick), b, gemms);
        };
        // Per output of the product: gu written, and half as much act.
        let _span = self.span("grouped_matmul_swiglu", || fused_work(gemms.iter().map(|g| g.gemm), 1.5));
        let _pick = pick.and_then(|p| self.place_pick(&mut call, experts::Side::A, p, row_stretch(gemms.iter().map(|g| (g.gemm.a / k, g.gemm.m)))));
        self.launch_fused(&call);
    }

    fn fuses_expert_gather(&self, d_model: usize, widths: &[usize]) -> bool {
        self.hopper_experts && super::cuda_scratch::expert_kernels_gather(d_model, widths)
    }

    fn grouped_weight_grad(&self, out: DevViewMut<'_>, (a, a_pick): (DevView<'_>, Option<Pick<'_>>), (b, b_pick): (DevView<'_>, Option<Pick<'_>>), gemms: &[Gemm], accumulate: bool) {
        if a_pick.is_none() && b_pick.is_none() {
            return self.grouped_matmul(out, a, b, gemms, true, false, accumulate);
        }
        let live: Vec<Gemm> = gemms.iter().copied().filter(|g| g.m * g.n > 0).collect();
        let (m, n) = live.first().map_or((1, 1), |g| (g.m.max(1), g.n.max(1)));
        let (a_len, b_len) = (picked_len(a, a_pick, m, "grouped_weight_grad"), picked_len(b, b_pick, n, "grouped_weight_grad"));
        for g in &live {
            let fits = g.out + g.m * g.n <= out.len() && g.a + g.m * g.k <= a_len && g.b + g.k * g.n <= b_len && (a_pick.is_none() || g.m == m) && (b_pick.is_none() || g.n == n);
            assert!(fits, "grouped_weight_grad: {g:?} outside its views (or picked rows of another width)");
        }
        let ops = experts::Operands { a: a.ptr, w: b.ptr, out: out.ptr, elem_bytes: Storage::Bf16.bytes(), ..Default::default() };
        let call = (out.storage == Storage::F32).then(|| self.fused_call(&[a.storage, b.storage], || experts::grad_call(ops, &live, accumulate, [a_pick.is_some(), b_pick.is_some()]))).flatten();
        let Some(mut call) = call else {
            return weight_grad_gathering(self, out, (a, a_pick), (b, b_pick), gemms, accumulate);
        };
        let _span = self.span("grouped_matmul_wgmma", || grouped_work(&out, &a, &b, gemms, accumulate));
        let _a_pick = a_pick.and_then(|p| self.place_pick(&mut call, experts::Side::A, p, row_stretch(live.iter().map(|g| (g.a / m, g.k)))));
        let _b_pick = b_pick.and_then(|p| self.place_pick(&mut call, experts::Side::W, p, row_stretch(live.iter().map(|g| (g.b / n, g.k)))));
        self.launch_fused(&call);
    }

    fn grouped_matmul_swiglu_bwd(&self, dgu: DevViewMut<'_>, act: DevViewMut<'_>, dact: DevViewMut<'_>, (dy, pick): (DevView<'_>, Option<Pick<'_>>), b: DevView<'_>, gu: DevView<'_>, gemms: &[SwiGluBwdGemm]) {
        let k = gemms.first().map_or(1, |g| g.gemm.k.max(1));
        let dy_len = picked_len(dy, pick, k, "grouped_matmul_swiglu_bwd");
        for g in gemms {
            let (m, k, h) = (g.gemm.m, g.gemm.k, g.gemm.n);
            let fits = g.gu + 2 * m * h <= gu.len() && g.dgu + 2 * m * h <= dgu.len() && g.act + m * h <= act.len() && g.gemm.a + m * k <= dy_len && g.gemm.b + k * h <= b.len();
            assert!(fits, "grouped_matmul_swiglu_bwd: {g:?} outside its views");
        }
        let ops = experts::Operands { a: dy.ptr, w: b.ptr, out: dgu.ptr, gu: gu.ptr, act: act.ptr, elem_bytes: Storage::Bf16.bytes() };
        let Some(mut call) = self.fused_call(&[dgu.storage, act.storage, dy.storage, b.storage, gu.storage], || experts::dact_call(ops, gemms, pick.is_some())) else {
            // Only this path writes dact (the model hands an empty one where it expects the kernel).
            let room = gemms.iter().all(|g| g.gemm.out + g.gemm.m * g.gemm.n <= dact.len());
            assert!(room, "grouped_matmul_swiglu_bwd: the portable path needs room for dact ({} elements)", dact.len());
            return swiglu_bwd_each(self, dgu, act, dact, (dy, pick), b, gu, gemms);
        };
        // Per output of the product (dact, which stays on the chip): gu read and dgu written
        // (two each), act written.
        let _span = self.span("grouped_matmul_swiglu_bwd", || fused_work(gemms.iter().map(|g| g.gemm), 5.0));
        let _pick = pick.and_then(|p| self.place_pick(&mut call, experts::Side::A, p, row_stretch(gemms.iter().map(|g| (g.gemm.a / k, g.gemm.m)))));
        self.launch_fused(&call);
    }

    fn embedding_fwd(&self, out: DevViewMut<'_>, table: DevView<'_>, tokens: &[u32], c: usize) {
        let _span = self.span("embedding_fwd", || Work::moving(2 * out.bytes()));
        if tokens.is_empty() || c == 0 {
            return;
        }
        assert_eq!(out.len(), tokens.len() * c, "embedding out");
        expect("embedding_fwd", "out", out.storage, self.storage());
        expect("embedding_fwd", "table", table.storage, self.storage());
        let t = self.upload_u32(tokens);
        let c = c as i32;
        // SAFETY: `embedding_fwd(act_t*, const act_t*, const unsigned*, int)`, one block per token.
        ok(unsafe { self.stream.launch_builder(&self.k.embedding_fwd).arg(&out.ptr).arg(&table.ptr).arg(&t.ptr).arg(&c).launch(per_row(tokens.len())) }, "embedding_fwd");
    }
    fn embedding_bwd(&self, dtable: DevViewMut<'_>, dout: DevView<'_>, tokens: &[u32], c: usize) {
        let _span = self.span("embedding_bwd", || Work::moving(dout.bytes() + 2 * tokens.len() * c * 4));
        if tokens.is_empty() || c == 0 {
            return;
        }
        expect("embedding_bwd", "dtable", dtable.storage, Storage::F32);
        expect("embedding_bwd", "dout", dout.storage, self.storage());
        let groups = kernels::group_positions(tokens);
        let (ids, offsets, pos) = (self.upload_u32(&groups.ids), self.upload_u32(&groups.offsets), self.upload_u32(&groups.positions));
        let c = c as i32;
        // SAFETY: `embedding_bwd(float*, const act_t*, const unsigned* ids, offsets, pos, int)`,
        // one block per distinct token, so no two blocks write the same row.
        ok(
            unsafe { self.stream.launch_builder(&self.k.embedding_bwd).arg(&dtable.ptr).arg(&dout.ptr).arg(&ids.ptr).arg(&offsets.ptr).arg(&pos.ptr).arg(&c).launch(per_row(groups.ids.len())) },
            "embedding_bwd",
        );
    }

    fn rmsnorm_fwd(&self, out: DevViewMut<'_>, rstd: DevViewMut<'_>, x: DevView<'_>, w: DevView<'_>, n: usize, c: usize, eps: f32) {
        let _span = self.span("rmsnorm_fwd", || Work::moving(out.bytes() + rstd.bytes() + x.bytes() + w.bytes()));
        if n == 0 {
            return;
        }
        assert!(x.len() == n * c && out.len() == n * c && rstd.len() == n, "rmsnorm_fwd shapes");
        for (arg, st) in [("out", out.storage), ("x", x.storage), ("w", w.storage)] {
            expect("rmsnorm_fwd", arg, st, self.storage());
        }
        expect("rmsnorm_fwd", "rstd", rstd.storage, Storage::F32);
        let vec = vec_width(c, &[out.ptr, x.ptr, w.ptr]);
        let c = c as i32;
        // SAFETY: `rmsnorm_fwd(act_t* out, float* rstd, const act_t* x, const act_t* w, int, float,
        // int vec)`; vec 8 only for aligned rows of a multiple of 8.
        ok(unsafe { self.stream.launch_builder(&self.k.rmsnorm_fwd).arg(&out.ptr).arg(&rstd.ptr).arg(&x.ptr).arg(&w.ptr).arg(&c).arg(&eps).arg(&vec).launch(per_row(n)) }, "rmsnorm_fwd");
    }
    fn rmsnorm_bwd(&self, dx: DevViewMut<'_>, dw: DevViewMut<'_>, dout: DevView<'_>, x: DevView<'_>, w: DevView<'_>, rstd: DevView<'_>, residual: Option<DevView<'_>>, n: usize, c: usize) {
        let _span = self.span("rmsnorm_bwd", || Work::moving(dx.bytes() + 2 * dw.bytes() + dout.bytes() + x.bytes() + w.bytes() + rstd.bytes() + residual.as_ref().map_or(0, DevView::bytes)));
        if n == 0 || c == 0 {
            return;
        }
        assert!(dx.len() == n * c && dout.len() == n * c && x.len() == n * c && dw.len() == c && rstd.len() == n, "rmsnorm_bwd shapes");
        for (arg, st) in [("dx", dx.storage), ("dout", dout.storage), ("x", x.storage), ("w", w.storage)] {
            expect("rmsnorm_bwd", arg, st, self.storage());
        }
        expect("rmsnorm_bwd", "dw", dw.storage, Storage::F32);
        if let Some(r) = &residual {
            assert_eq!(r.len(), n * c, "rmsnorm_bwd residual");
            expect("rmsnorm_bwd", "residual", r.storage, self.storage());
        }
        let residual = residual.map_or(0u64, |r| r.ptr);
        expect("rmsnorm_bwd", "rstd", rstd.storage, Storage::F32);
        let ci = c as i32;
        let vec = vec_width(c, &[dx.ptr, dout.ptr, x.ptr, w.ptr, residual]);
        // SAFETY: `rmsnorm_bwd_dx` in norm.cu; vec 8 only for aligned rows of a multiple of 8.
        ok(unsafe { self.stream.launch_builder(&self.k.rmsnorm_bwd_dx).arg(&dx.ptr).arg(&residual).arg(&dout.ptr).arg(&x.ptr).arg(&w.ptr).arg(&rstd.ptr).arg(&ci).arg(&vec).launch(per_row(n)) }, "rmsnorm_bwd_dx");
        let (part, row_bytes) = (self.reduction.ptr, (c * dout.storage.bytes()) as u64);
        for pass in launch::rmsnorm_dw_passes(n, c, launch::RMSNORM_PARTIALS) {
            let first = pass.first_row as u64;
            let (dout_at, x_at, rstd_at) = (dout.ptr + first * row_bytes, x.ptr + first * row_bytes, rstd.ptr + 4 * first);
            let (rows, chunks, chunk_rows) = (pass.rows as i32, pass.chunks as i32, launch::ROW_CHUNK as i32);
            // SAFETY: `rmsnorm_dw_partial` and `rmsnorm_dw_reduce` in norm.cu, on the pass's rows;
            // the reductions' scratch holds its chunks × c ≤ RMSNORM_PARTIALS floats, and the
            // stream orders each pass's use of it after the previous one's.
            unsafe {
                ok(self.stream.launch_builder(&self.k.rmsnorm_dw_partial).arg(&part).arg(&dout_at).arg(&x_at).arg(&rstd_at).arg(&rows).arg(&ci).arg(&chunk_rows).launch(pass.cfg), "rmsnorm_dw_partial");
                ok(self.stream.launch_builder(&self.k.rmsnorm_dw_reduce).arg(&dw.ptr).arg(&part).arg(&chunks).arg(&ci).launch(grid_stride(c)), "rmsnorm_dw_reduce");
            }
        }
    }

    fn rope(&self, qkv: DevViewMut<'_>, table: DevView<'_>, shape: AttnShape, first_row: usize, inverse: bool) {
        let _span = self.span("rope", || Work::moving(2 * qkv.len() / shape.qkv_width() * (shape.n_heads + shape.n_kv_heads) * shape.head_dim * qkv.storage.bytes()));
        let n = qkv.len() / shape.qkv_width();
        assert_eq!(qkv.len(), n * shape.qkv_width(), "rope qkv");
        expect("rope", "qkv", qkv.storage, self.storage());
        expect("rope", "table", table.storage, Storage::F32);
        let rotated = shape.n_heads + shape.n_kv_heads;
        if n * rotated * shape.head_dim == 0 {
            return;
        }
        let (fr, seq, rh, hd, wd) = (first_row as i32, shape.seq as i32, rotated as i32, shape.head_dim as i32, shape.qkv_width() as i32);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        // head_dim a multiple of 8 makes the row width one too.
        let vec = vec_width(shape.head_dim, &[qkv.ptr, table.ptr]);
        // SAFETY: `rope(act_t*, const float*, int first_row, int seq, int rotated_heads, int
        // head_dim, int row_width, float sign, int vec)`, a block per row; vec 8 only for aligned
        // buffers and head_dim a multiple of 8.
        ok(
            unsafe { self.stream.launch_builder(&self.k.rope).arg(&qkv.ptr).arg(&table.ptr).arg(&fr).arg(&seq).arg(&rh).arg(&hd).arg(&wd).arg(&sign).arg(&vec).launch(per_row(n)) },
            "rope",
        );
    }

    fn attention_fwd(&self, out: DevViewMut<'_>, lse: DevViewMut<'_>, qkv: DevView<'_>, shape: AttnShape) {
        let _span = self.span("attention_fwd", || Work::computing(shape.causal_attention_flops(), qkv.bytes() + out.bytes() + lse.bytes()));
        attention::forward(self, out, lse, qkv, shape)
    }
    fn attention_bwd(&self, dqkv: DevViewMut<'_>, dout: DevView<'_>, out: DevView<'_>, lse: DevView<'_>, qkv: DevView<'_>, shape: AttnShape, scratch: DevViewMut<'_>) {
        let _span = self.span("attention_bwd", || Work::computing(2.5 * shape.causal_attention_flops(), dqkv.bytes() + dout.bytes() + out.bytes() + lse.bytes() + qkv.bytes()));
        attention::backward(self, dqkv, dout, out, lse, qkv, shape, scratch)
    }
    fn attention_bwd_scratch_len(&self, shape: AttnShape) -> usize {
        (cuda_scratch::attention_bwd_bytes(shape) / 4) as usize
    }

    fn swiglu_fwd(&self, out: DevViewMut<'_>, gu: DevView<'_>, rows: usize, h: usize) {
        let _span = self.span("swiglu_fwd", || Work::moving(out.bytes() + gu.bytes()));
        if rows * h == 0 {
            return;
        }
        assert!(out.len() == rows * h && gu.len() == rows * 2 * h, "swiglu_fwd shapes");
        expect("swiglu_fwd", "out", out.storage, self.storage());
        expect("swiglu_fwd", "gu", gu.storage, self.storage());
        let (hi, vec) = (h as i32, vec_width(h, &[out.ptr, gu.ptr]));
        // SAFETY: `swiglu_fwd(act_t*, const act_t*, size_t rows, int h, int vec)`; vec 8 only
        // for aligned buffers and h a multiple of 8.
        ok(unsafe { self.stream.launch_builder(&self.k.swiglu_fwd).arg(&out.ptr).arg(&gu.ptr).arg(&rows).arg(&hi).arg(&vec).launch(grid_stride(rows * h / vec as usize)) }, "swiglu_fwd");
    }
    fn swiglu_bwd(&self, dgu: DevViewMut<'_>, out: Option<DevViewMut<'_>>, dout: DevView<'_>, gu: DevView<'_>, rows: usize, h: usize) {
        let _span = self.span("swiglu_bwd", || Work::moving(dgu.bytes() + dout.bytes() + gu.bytes() + out.as_ref().map_or(0, DevViewMut::bytes)));
        if rows * h == 0 {
            return;
        }
        assert!(dgu.len() == rows * 2 * h && dout.len() == rows * h && gu.len() == rows * 2 * h, "swiglu_bwd shapes");
        assert!(out.as_ref().is_none_or(|o| o.len() == rows * h), "swiglu_bwd out");
        for (arg, st) in [("dgu", dgu.storage), ("dout", dout.storage), ("gu", gu.storage)] {
            expect("swiglu_bwd", arg, st, self.storage());
        }
        if let Some(o) = &out {
            expect("swiglu_bwd", "out", o.storage, self.storage());
        }
        let out = out.map_or(0u64, |o| o.ptr);
        let (hi, vec) = (h as i32, vec_width(h, &[dgu.ptr, dout.ptr, gu.ptr, out]));
        // SAFETY: `swiglu_bwd(act_t* dgu, act_t* out /*nullable*/, const act_t* dout, const
        // act_t* gu, size_t, int h, int vec)`; vec 8 only for aligned buffers and h a multiple of 8.
        ok(
            unsafe { self.stream.launch_builder(&self.k.swiglu_bwd).arg(&dgu.ptr).arg(&out).arg(&dout.ptr).arg(&gu.ptr).arg(&rows).arg(&hi).arg(&vec).launch(grid_stride(rows * h / vec as usize)) },
            "swiglu_bwd",
        );
    }


    fn softmax_rows(&self, out: DevViewMut<'_>, logits: DevView<'_>, rows: usize, cols: usize) {
        let _span = self.span("softmax_rows", || Work::moving(out.bytes() + logits.bytes()));
        if rows == 0 {
            return;
        }
        assert!(out.len() == rows * cols && logits.len() == rows * cols, "softmax_rows shapes");
        expect("softmax_rows", "out", out.storage, Storage::F32);
        expect("softmax_rows", "logits", logits.storage, Storage::F32);
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: `softmax_rows_fwd(float*, const float*, int rows, int cols)`.
        ok(unsafe { self.stream.launch_builder(&self.k.softmax_rows_fwd).arg(&out.ptr).arg(&logits.ptr).arg(&r).arg(&c).launch(warp_per_row(rows)) }, "softmax_rows");
    }
    fn router_bwd(&self, dlogits: DevViewMut<'_>, dgate: DevView<'_>, probs: DevView<'_>, logits: DevView<'_>, grad: RouterGrad<'_>) {
        let _span = self.span("router_bwd", || Work::moving(dlogits.bytes() + dgate.bytes() + probs.bytes() + logits.bytes()));
        let (n, e) = (grad.tokens(), grad.experts());
        if n == 0 {
            return;
        }
        assert!(dlogits.len() == n * e && probs.len() == n * e && logits.len() == n * e, "router_bwd: dlogits, probs and logits must be (N = {n}, E = {e})");
        let s = grad.gate.len();
        assert!(dgate.len() <= s && grad.slot_expert.len() == s && grad.by_token.slots.len() == s && grad.p_penalty.len() == e, "router_bwd: slot and expert lengths");
        expect("router_bwd", "dlogits", dlogits.storage, self.storage());
        for (arg, st) in [("dgate", dgate.storage), ("probs", probs.storage), ("logits", logits.storage)] {
            expect("router_bwd", arg, st, Storage::F32);
        }
        let (offsets, slots, slot_expert) = (self.upload_u32(grad.by_token.offsets), self.upload_u32(grad.by_token.slots), self.upload_u32(grad.slot_expert));
        let gate = self.upload_f32(grad.gate);
        let aux = self.upload_f32(&[grad.load_balance, grad.p_penalty].concat());
        let (ni, ei) = (n as i32, e as i32);
        let mut l = self.stream.launch_builder(&self.k.router_bwd);
        l.arg(&dlogits.ptr).arg(&dgate.ptr).arg(&probs.ptr).arg(&logits.ptr).arg(&offsets.ptr).arg(&slots.ptr).arg(&slot_expert.ptr).arg(&gate.ptr).arg(&aux.ptr);
        let ran = dgate.len() as u32;
        l.arg(&grad.entropy).arg(&grad.z_loss).arg(&ni).arg(&ei).arg(&ran);
        // SAFETY: `router_bwd(act_t*, const float*, const float*, const float*, const unsigned*,
        // const unsigned*, const unsigned*, const float*, const float*, float, float, int, int,
        // unsigned)`; lengths asserted above (offsets has n + 1 entries, every slot index < s,
        // dgate read below `ran`).
        ok(unsafe { l.launch(grid_stride(n)) }, "router_bwd");
    }

    fn route_scratch_len(&self, n: usize, e: usize, rule: RouteRule) -> usize {
        RouteScratch::new(n, e, rule).map_or(0, |r| r.words())
    }

    fn route(&self, probs: DevView<'_>, logits: DevView<'_>, n: usize, e: usize, rule: RouteRule, scratch: DevViewMut<'_>) -> Option<RoutedSlots> {
        let layout = RouteScratch::new(n, e, rule)?;
        let _span = self.span("route", || Work::moving(probs.bytes() + logits.bytes()));
        assert!(probs.len() == n * e && logits.len() == n * e, "route: probs and logits must be (N = {n}, E = {e})");
        for (arg, st) in [("probs", probs.storage), ("logits", logits.storage), ("scratch", scratch.storage)] {
            expect("route", arg, st, Storage::F32);
        }
        assert!(scratch.len() >= layout.words() && scratch.ptr.is_multiple_of(8), "route: scratch of {} words at {:#x}, needs {} 8-byte aligned", scratch.len(), scratch.ptr, layout.words());
        self.bind();
        let (groups, capacity, header) = (layout.groups, layout.capacity, layout.header());
        // Every word a kernel reads an earlier kernel wrote: the scratch needs no clearing.
        let mut next = scratch.ptr;
        let [totals_q, totals, token, gate, sums, chosen, stats, counts, offsets] = layout.parts.map(|words| {
            let part = next;
            next += 4 * words as u64;
            part
        });
        let (top_k, top_p) = match rule {
            RouteRule::TopK(k) => (k as i32, 0.0f32),
            RouteRule::TopP(p) => (0, p),
        };
        let (ni, ei, gi, group) = (n as i32, e as i32, groups as i32, ROUTE_GROUP as i32);
        // SAFETY (the four launches): the signatures in softmax.cu's routing section, every
        // pointer a part of `scratch` (borrowed until the read-backs below) of the size the kernels
        // index, the f64 parts 8-byte aligned; route_scan runs a warp per quantity.
        let mut l = self.stream.launch_builder(&self.k.route_select);
        l.arg(&chosen).arg(&stats).arg(&probs.ptr).arg(&logits.ptr).arg(&ni).arg(&ei).arg(&top_k).arg(&top_p);
        ok(unsafe { l.launch(grid_stride(n)) }, "route_select");
        let mut l = self.stream.launch_builder(&self.k.route_group_sums);
        l.arg(&counts).arg(&sums).arg(&chosen).arg(&probs.ptr).arg(&stats).arg(&ni).arg(&ei).arg(&gi).arg(&group);
        ok(unsafe { l.launch(grid_stride((e + 2) * groups)) }, "route_group_sums");
        let mut l = self.stream.launch_builder(&self.k.route_scan);
        l.arg(&offsets).arg(&totals).arg(&totals_q).arg(&counts).arg(&sums).arg(&ei).arg(&gi);
        ok(unsafe { l.launch(launch::route_scan(e)) }, "route_scan");
        let mut l = self.stream.launch_builder(&self.k.route_layout);
        l.arg(&token).arg(&gate).arg(&chosen).arg(&probs.ptr).arg(&offsets).arg(&totals).arg(&ni).arg(&ei).arg(&gi).arg(&group);
        ok(unsafe { l.launch(grid_stride(e * groups)) }, "route_layout");

        let read = |from: usize, len: usize| self.readback.read::<u32>(totals_q + 4 * from as u64, len, "route read-back");
        let words = read(0, if matches!(rule, RouteRule::TopK(_)) { header + 2 * capacity } else { header });
        let f64_at = |i: usize| f64::from_bits(words[2 * i] as u64 | (words[2 * i + 1] as u64) << 32);
        let counts: Vec<usize> = words[2 * (e + 2)..header].iter().map(|&c| c as usize).collect();
        let slots: usize = counts.iter().sum();
        assert!(slots <= capacity, "route: {slots} slots past the {capacity} allocated");
        let (token, gate) = if words.len() > header {
            (words[header..header + slots].to_vec(), words[header + capacity..header + capacity + slots].to_vec())
        } else {
            (read(header, slots), read(header + capacity, slots))
        };
        Some(RoutedSlots {
            token,
            gate: gate.into_iter().map(f32::from_bits).collect(),
            counts,
            sum_probs: (0..e).map(f64_at).collect(),
            entropy: f64_at(e),
            z: f64_at(e + 1),
        })
    }

    fn gather_rows(&self, out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], c: usize) {
        let _span = self.span("gather_rows", || Work::moving(2 * out.bytes()));
        self.gather(out, x, index, None, c)
    }
    fn combine_rows(&self, out: DevViewMut<'_>, y: DevView<'_>, by_token: TokenSlots<'_>, weight: Option<&[f32]>, residual: Option<DevView<'_>>, c: usize) {
        let _span = self.span("combine_rows", || Work::moving(out.bytes() + by_token.slots.len() * c * y.storage.bytes() + residual.as_ref().map_or(0, DevView::bytes)));
        let tokens = by_token.offsets.len().saturating_sub(1);
        if tokens == 0 || c == 0 {
            return;
        }
        assert_eq!(out.len(), tokens * c, "combine_rows out");
        expect("combine_rows", "out", out.storage, self.storage());
        expect("combine_rows", "y", y.storage, self.storage());
        if let Some(r) = &residual {
            assert_eq!(r.len(), tokens * c, "combine_rows residual");
            expect("combine_rows", "residual", r.storage, self.storage());
        }
        let residual = residual.map_or(0u64, |r| r.ptr);
        let (offsets, slots) = (self.upload_u32(by_token.offsets), self.upload_u32(by_token.slots));
        let w = weight.map(|w| self.upload_f32(w));
        let ci = c as i32;
        let null = 0u64;
        let mut l = self.stream.launch_builder(&self.k.combine_rows);
        l.arg(&out.ptr).arg(&y.ptr).arg(&offsets.ptr).arg(&slots.ptr);
        match &w {
            Some(w) => l.arg(&w.ptr),
            None => l.arg(&null),
        };
        let vec = vec_width(c, &[out.ptr, y.ptr, residual]);
        l.arg(&residual).arg(&ci).arg(&vec);
        // SAFETY: `combine_rows(act_t*, const act_t*, const unsigned*, const unsigned*, const float*
        // /*nullable*/, const act_t* /*nullable*/, int c, int vec)`; vec 8 only for aligned rows of
        // a multiple of 8.
        ok(unsafe { l.launch(per_row(tokens)) }, "combine_rows");
    }
    fn gathered_dots(&self, dots: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>, index: &[u32], c: usize) {
        let _span = self.span("gathered_dots", || Work::moving(dots.bytes() + 2 * b.bytes()));
        if index.is_empty() {
            return;
        }
        assert_eq!(dots.len(), index.len(), "gathered_dots dots");
        assert_eq!(b.len(), index.len() * c, "gathered_dots b");
        expect("gathered_dots", "dots", dots.storage, Storage::F32);
        expect("gathered_dots", "a", a.storage, self.storage());
        expect("gathered_dots", "b", b.storage, self.storage());
        let idx = self.upload_u32(index);
        let (s, ci, vec) = (index.len() as i32, c as i32, vec_width(c, &[a.ptr, b.ptr]));
        // SAFETY: `gathered_dots(float*, const act_t*, const act_t*, const unsigned*, int slots, int
        // c, int vec)`; vec 8 only for aligned rows of a multiple of 8.
        ok(unsafe { self.stream.launch_builder(&self.k.gathered_dots).arg(&dots.ptr).arg(&a.ptr).arg(&b.ptr).arg(&idx.ptr).arg(&s).arg(&ci).arg(&vec).launch(warp_per_row(index.len())) }, "gathered_dots");
    }
    fn gather_rows_scaled(&self, out: DevViewMut<'_>, x: DevView<'_>, index: &[u32], weight: &[f32], c: usize) {
        let _span = self.span("gather_rows_scaled", || Work::moving(2 * out.bytes()));
        self.gather(out, x, index, Some(weight), c)
    }

    fn classifier(&self, x: DevView<'_>, w: DevView<'_>, targets: &[u32], n: usize, c: usize, v: usize, grads: Option<(DevViewMut<'_>, DevViewMut<'_>, f32)>, scratch: DevViewMut<'_>) -> Vec<f32> {
        let _span = self.span("classifier", || classifier_work(&x, &w, &grads, n, c, v));
        if n == 0 {
            return Vec::new();
        }
        assert!(x.len() == n * c && w.len() == v * c && targets.len() == n, "classifier shapes");
        expect("classifier", "x", x.storage, self.storage());
        expect("classifier", "w", w.storage, self.storage());
        if let Some((dx, dw, _)) = &grads {
            expect("classifier", "dx", dx.storage, self.storage());
            expect("classifier", "dw", dw.storage, Storage::F32);
            assert!(dx.len() == n * c && dw.len() == v * c, "classifier gradient sizes: dx {} (want {}), dw {} (want {})", dx.len(), n * c, dw.len(), v * c);
        }
        expect("classifier", "scratch", scratch.storage, Storage::F32);
        let act_bytes = self.storage().bytes() as u64;
        let need = cuda_scratch::classifier_scratch_len(n, v, act_bytes);
        assert!(scratch.len() >= need, "classifier: scratch of {} f32 elements, {n} rows of {v} need {need}", scratch.len());
        self.bind();
        let rows_per_chunk = cuda_scratch::classifier_chunk_rows(n, v);
        // In the scratch: a chunk's logits in activation storage, which softmax_xent overwrites
        // with their gradient for the two GEMMs (each chunk's GEMM, beta = 0, writes its rows
        // before anything reads them: no zeroing), then every row's loss.
        let grad_scale = grads.as_ref().map_or(0.0, |g| g.2 / n as f32);
        let logits = Operand { ptr: scratch.ptr, storage: self.storage() };
        let losses = scratch.ptr + cuda_scratch::classifier_chunk_bytes(n, v, act_bytes).next_multiple_of(16);
        let t = self.upload_u32(targets);
        let (vi, vec) = (v as i32, vec_width(v, &[logits.ptr]));
        for r0 in (0..n).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(n - r0);
            let xs = Self::subview(x, r0 * c..(r0 + rows) * c);
            self.blas.matmul(logits, xs.operand(), w.operand(), rows, c, v, false, true, None);
            let (ls, ts) = (losses + 4 * r0 as u64, t.ptr + 4 * r0 as u64);
            // SAFETY: `softmax_xent(act_t* logits, float* losses, const unsigned* targets, int v,
            // float, int vec)`, one block per row of this chunk; the scratch (its length asserted)
            // holds rows_per_chunk × v logits, then n losses; vec 8 only for aligned rows of a
            // multiple of 8.
            ok(
                unsafe { self.stream.launch_builder(&self.k.softmax_xent).arg(&logits.ptr).arg(&ls).arg(&ts).arg(&vi).arg(&grad_scale).arg(&vec).launch(per_row(rows)) },
                "softmax_xent",
            );
            if let Some((dx, dw, _)) = grads.as_ref().filter(|_| grad_scale != 0.0) {
                // The logits now hold their gradient.
                let dxs = Operand { ptr: offset(dx.ptr, r0 * c, dx.storage), storage: dx.storage };
                self.blas.matmul(dxs, logits, w.operand(), rows, v, c, false, false, None);
                self.blas.matmul(dw.operand(), logits, xs.operand(), v, rows, c, true, false, Some(dw.operand()));
            }
        }
        if let Some((dx, _, _)) = grads.filter(|_| grad_scale == 0.0) {
            self.fill(dx, 0.0); // a zero loss weight: no gradient (softmax_xent left the logits)
        }
        self.readback.read::<f32>(losses, n, "download")
    }
    fn classifier_scratch_len(&self, n: usize, v: usize) -> usize {
        cuda_scratch::classifier_scratch_len(n, v, self.storage().bytes() as u64)
    }

    fn uses_working_copy(&self) -> bool {
        self.storage() != Storage::F32
    }
    fn refresh_working_copy(&self, work: DevViewMut<'_>, master: DevView<'_>) {
        let _span = self.span("refresh_working_copy", || Work::moving(work.bytes() + master.bytes()));
        expect("refresh_working_copy", "master", master.storage, Storage::F32);
        self.copy(work, master);
    }
    fn adamw(&self, p: DevViewMut<'_>, work: Option<DevViewMut<'_>>, m: DevViewMut<'_>, v: DevViewMut<'_>, g: DevView<'_>, hp: AdamW, grad_scale: f32, decay: bool) {
        let _span = self.span("adamw", || Work::moving(2 * (p.bytes() + m.bytes() + v.bytes()) + g.bytes() + work.as_ref().map_or(0, |w| w.bytes())));
        let n = p.len();
        assert!(m.len() == n && v.len() == n && g.len() == n && work.as_ref().is_none_or(|w| w.len() == n), "adamw shapes");
        for (arg, st) in [("p", p.storage), ("m", m.storage), ("v", v.storage), ("g", g.storage)] {
            expect("adamw", arg, st, Storage::F32);
        }
        if let Some(w) = &work {
            expect("adamw", "work", w.storage, self.storage());
        }
        if n == 0 {
            return;
        }
        let args = kernels::AdamWArgs::new(hp, decay);
        let work_ptr = work.as_ref().map_or(0u64, |w| w.ptr);
        let vec = vec_width(n, &[p.ptr, work_ptr, m.ptr, v.ptr, g.ptr]);
        // SAFETY: `adamw(float* master, act_t* work /*nullable*/, float* m, float* v, const float*
        // g, size_t n, AdamW, float, int vec)`; AdamWArgs is #[repr(C)] and matches `struct
        // AdamW`; vec 8 only for aligned buffers and n a multiple of 8.
        ok(
            unsafe {
                self.stream
                    .launch_builder(&self.k.adamw)
                    .arg(&p.ptr)
                    .arg(&work_ptr)
                    .arg(&m.ptr)
                    .arg(&v.ptr)
                    .arg(&g.ptr)
                    .arg(&n)
                    .arg(&args)
                    .arg(&grad_scale)
                    .arg(&vec)
                    .launch(grid_stride(n / vec as usize))
            },
            "adamw",
        );
    }
}
