//! MEMO's copies on the GPU: the host tier is page-locked memory, and offloads run on a copy
//! stream of their own, so a layer's skeletal tensors travel to the host while the next layer
//! computes.
//!
//! Every copy, offload or reload, waits (on the device) for the work queued before it and runs
//! on the copy stream; a mark is an event recorded there, and waiting on a mark makes the compute
//! stream wait for it, so buffers freed after it (stream-ordered frees on the compute stream) and
//! reloaded tensors read after it are safe. Reloading the layer before the current one while the
//! current one's backward computes is MEMO's prefetch.

use std::sync::Arc;

use cudarc::driver::{result as drv, CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use super::{ok, DevView, DevViewMut};

/// Page-locked host memory of the host tier. Dropping it first waits for the copy stream, which
/// may still be writing into it.
pub struct PinnedHost {
    mem: PinnedHostSlice<u8>,
    ptr: *mut u8,
    copies: Arc<CudaStream>,
}

// SAFETY: the pointer is owned page-locked memory; access is ordered by the streams' events.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Errors at teardown are not actionable; the memory is freed by `mem`'s own drop after.
        let _ = self.copies.synchronize();
    }
}

/// The copy stream.
pub struct Offloader {
    copies: Arc<CudaStream>,
}

impl Offloader {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        let copies = ctx.new_stream().map_err(|e| format!("CUDA copy stream: {e:?}"))?;
        Ok(Offloader { copies })
    }

    /// `bytes` of page-locked host memory (not write-combined: the tier is read back by DMA,
    /// but nothing stops a host read).
    pub fn alloc(&self, ctx: &Arc<CudaContext>, bytes: u64) -> PinnedHost {
        // SAFETY: u8 has no invalid bit patterns; the memory is only ever written before read.
        let mut mem = ok(unsafe { ctx.alloc_pinned_with_flags::<u8>((bytes as usize).max(1), 0) }, "page-locked host allocation");
        let ptr = ok(mem.as_mut_ptr(), "page-locked host memory");
        PinnedHost { mem, ptr, copies: self.copies.clone() }
    }

    /// Makes the copy stream wait for everything `compute` has queued.
    fn after(&self, compute: &CudaStream) {
        let ready = ok(compute.record_event(None), "copy event");
        ok(self.copies.wait(&ready), "copy wait");
    }

    /// Queues `src` (`bytes` long) to `dst` at byte `at` on the copy stream, after everything
    /// `compute` has queued.
    pub fn offload(&self, compute: &CudaStream, dst: &mut PinnedHost, at: u64, src: DevView<'_>, bytes: usize) {
        assert!(at as usize + bytes <= dst.mem.num_bytes(), "offload past the host tier's {} bytes", dst.mem.num_bytes());
        self.after(compute);
        // SAFETY: the destination range lies in the pinned allocation (asserted), which outlives
        // the copy (its drop synchronises the copy stream); the source buffer lives until a wait
        // on a later mark (ActivationStore keeps it in flight).
        let host = unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(at as usize), bytes) };
        ok(unsafe { drv::memcpy_dtoh_async(host, src.ptr, self.copies.cu_stream()) }, "offload copy");
    }

    /// Queues `bytes` from `src` at byte `at` into `dst` on the copy stream, after everything
    /// `compute` has queued (which allocated `dst`).
    pub fn reload(&self, compute: &CudaStream, dst: DevViewMut<'_>, src: &PinnedHost, at: u64, bytes: usize) {
        assert!(at as usize + bytes <= src.mem.num_bytes(), "reload past the host tier's {} bytes", src.mem.num_bytes());
        self.after(compute);
        // SAFETY: the source range lies in the pinned allocation (asserted); its offload was
        // queued earlier on this same stream; dst holds `bytes` and is not read before a wait
        // on a later mark.
        let host = unsafe { std::slice::from_raw_parts(src.ptr.add(at as usize) as *const u8, bytes) };
        ok(unsafe { drv::memcpy_htod_async(dst.ptr, host, self.copies.cu_stream()) }, "reload copy");
    }

    /// An event after every copy queued so far.
    pub fn mark(&self) -> CudaEvent {
        ok(self.copies.record_event(None), "copy mark")
    }

    /// Makes `compute` wait for the copies up to `mark`.
    pub fn wait(&self, compute: &CudaStream, mark: CudaEvent) {
        ok(compute.wait(&mark), "copy wait");
    }
}
