//! Uploads of per-call host data (tokens, routing slots and weights, the grouped matmul's pointer
//! arrays) through a page-locked ring, and downloads through a page-locked buffer.
//!
//! A copy from pageable memory may make the driver wait for the stream before it stages the
//! bytes through a buffer of its own (CUDA's "API synchronization behavior"), which drains the
//! queue of work the host had run ahead with. From page-locked memory the copy is queued like a
//! kernel. The ring hands out byte ranges in order; each upload records an event after its copy,
//! and a range is handed out again only once the uploads that used it before have completed.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice};

use super::ok;

/// The smallest ring; it grows to twice the largest upload.
const MIN_RING_BYTES: usize = 4 << 20;
/// Every upload starts at a multiple of this (DMA-friendly, and aligned for any element type).
const ALIGN: usize = 256;

/// Where the next upload goes in a ring of `len` bytes, and which earlier uploads must have
/// finished first: the ranges still in use, oldest first, each with its fence.
#[derive(Debug)]
struct Ring<F> {
    len: usize,
    head: usize,
    in_use: VecDeque<(Range<usize>, F)>,
}

impl<F> Ring<F> {
    fn new(len: usize) -> Self {
        Ring { len, head: 0, in_use: VecDeque::new() }
    }

    /// A range of `bytes` (at most `len`) after the last one, or at 0 when it does not fit
    /// before the end. `wait` gets, oldest first, the fence of every upload in use that the
    /// range overlaps or that the wrap skips over (older than any at the start). The caller
    /// records the range's own fence with [`Ring::hold`].
    fn take(&mut self, bytes: usize, mut wait: impl FnMut(F)) -> Range<usize> {
        assert!(bytes <= self.len, "an upload of {bytes} bytes in a ring of {}", self.len);
        let start = if self.head + bytes <= self.len { self.head } else { 0 };
        let end = start + bytes;
        // Ranges in use lie in ring order after the head, oldest first: those the new range
        // reaches (through the end of the ring when it wraps) are a prefix of the queue.
        let reached = |r: &Range<usize>| (r.start < end && start < r.end) || (start == 0 && self.head > 0 && r.end > self.head);
        while self.in_use.front().is_some_and(|(r, _)| reached(r)) {
            let (_, fence) = self.in_use.pop_front().expect("front");
            wait(fence);
        }
        self.head = end.next_multiple_of(ALIGN);
        start..end
    }

    /// Records that `range` is in use until `fence`.
    fn hold(&mut self, range: Range<usize>, fence: F) {
        self.in_use.push_back((range, fence));
    }

    /// Every fence still held, oldest first, leaving the ring empty.
    fn drain(&mut self) -> impl Iterator<Item = F> + '_ {
        self.head = 0;
        self.in_use.drain(..).map(|(_, f)| f)
    }
}

/// The ring's page-locked memory.
struct Pinned {
    mem: PinnedHostSlice<u8>,
    ptr: *mut u8,
}

pub struct Staging {
    stream: Arc<CudaStream>,
    /// The ring's memory, its bookkeeping, and events whose uploads completed (recorded again
    /// rather than created per upload).
    state: Mutex<(Option<Pinned>, Ring<CudaEvent>, Vec<CudaEvent>)>,
}

// SAFETY: the raw pointer is into the owned page-locked allocation; the mutex serialises its use
// and the events order the device's reads of it.
unsafe impl Send for Staging {}
unsafe impl Sync for Staging {}

impl Staging {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Staging { stream, state: Mutex::new((None, Ring::new(0), Vec::new())) }
    }

    /// A new device buffer holding `host`, copied on the stream from the ring.
    pub fn upload<T: DeviceRepr + Copy>(&self, host: &[T], what: &str) -> CudaSlice<T> {
        // SAFETY: the kernel or copy that reads it is queued after this copy on the same stream.
        let dst = ok(unsafe { self.stream.alloc::<T>(host.len().max(1)) }, what);
        let bytes = std::mem::size_of_val(host);
        if bytes == 0 {
            return dst;
        }
        let mut state = self.state.lock().expect("staging lock");
        let (pinned, ring, spare) = &mut *state;
        let mut done = |fence: CudaEvent| {
            ok(fence.synchronize(), what);
            spare.push(fence);
        };
        if bytes > ring.len {
            // Grow: the old ring goes once every copy from it has run.
            ring.drain().for_each(&mut done);
            let len = (2 * bytes).max(MIN_RING_BYTES).next_power_of_two();
            // SAFETY: u8 has no invalid bit patterns; every byte copied was written first.
            let mut mem = ok(unsafe { self.stream.context().alloc_pinned::<u8>(len) }, "page-locked staging allocation");
            let ptr = ok(mem.as_mut_ptr(), "page-locked staging memory");
            *pinned = Some(Pinned { mem, ptr });
            *ring = Ring::new(len);
        }
        let pinned = pinned.as_ref().expect("ring allocated above");
        let range = ring.take(bytes, &mut done);
        debug_assert!(range.end <= pinned.mem.len());
        // SAFETY: `range` lies in the allocation, and no queued copy still reads it (its
        // uploads' events completed); `host` is `bytes` long.
        let staged = unsafe {
            let at = pinned.ptr.add(range.start);
            std::ptr::copy_nonoverlapping(host.as_ptr() as *const u8, at, bytes);
            std::slice::from_raw_parts(at as *const T, host.len())
        };
        let (dst_ptr, _) = dst.device_ptr(&self.stream);
        // SAFETY: dst holds host.len() elements; the staged bytes stay untouched until the
        // event recorded after the copy completes (the ring waits for it before reuse).
        ok(unsafe { drv::memcpy_htod_async(dst_ptr, staged, self.stream.cu_stream()) }, what);
        let fence = match spare.pop() {
            Some(event) => {
                ok(event.record(&self.stream), what);
                event
            }
            None => ok(self.stream.record_event(None), what),
        };
        ring.hold(range, fence);
        dst
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The page-locked memory is freed after this; errors at teardown are not actionable.
        let (_, ring, _) = &mut *self.state.lock().expect("staging lock");
        for fence in ring.drain() {
            let _ = fence.synchronize();
        }
    }
}

/// Downloads through page-locked memory (cached, not write-combined: the host reads it). A copy
/// to pageable memory goes through the driver's own staging at a fraction of the bus's rate, and
/// every MoE layer's forward waits for one: the router's probabilities and logits, 1 MiB each at
/// H100-ref's B=8, T=4096, while the GPU idles.
pub struct Readback {
    stream: Arc<CudaStream>,
    buffer: Mutex<Option<Pinned>>,
}

// SAFETY: the raw pointer is into the owned page-locked allocation; the mutex serialises its use
// and each read synchronises the stream before the host reads the bytes.
unsafe impl Send for Readback {}
unsafe impl Sync for Readback {}

impl Readback {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Readback { stream, buffer: Mutex::new(None) }
    }

    /// The `len` elements at device address `src`, after everything queued on the stream.
    pub fn read<T: DeviceRepr + Copy>(&self, src: u64, len: usize, what: &str) -> Vec<T> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Vec::new();
        }
        let mut buffer = self.buffer.lock().expect("readback lock");
        if buffer.as_ref().is_none_or(|b| b.mem.len() < bytes) {
            let len = bytes.max(MIN_RING_BYTES).next_power_of_two();
            // SAFETY: u8 has no invalid bit patterns; every byte read was copied in first.
            let mut mem = ok(unsafe { self.stream.context().alloc_pinned_with_flags::<u8>(len, 0) }, "page-locked download allocation");
            let ptr = ok(mem.as_mut_ptr(), "page-locked download memory");
            *buffer = Some(Pinned { mem, ptr });
        }
        let pinned = buffer.as_ref().expect("allocated above");
        // SAFETY: `bytes` lie in the allocation (checked above) and the pointer is aligned for any
        // element type (page-locked allocations are page-aligned); the copy completes at the
        // synchronisation, before the host reads the slice.
        unsafe {
            let host = std::slice::from_raw_parts_mut(pinned.ptr as *mut T, len);
            ok(drv::memcpy_dtoh_async(host, src, self.stream.cu_stream()), what);
            ok(self.stream.synchronize(), what);
            host.to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
        a.start < b.end && b.start < a.end
    }

    /// Random uploads through a small ring: every range handed out lies in the ring and overlaps
    /// no range still in use once the fences waited for are gone, the fences come oldest first,
    /// and nothing is waited for that the range neither overlaps nor skips.
    #[test]
    fn ring_reuses_a_range_only_after_the_uploads_that_held_it() {
        let mut rng = crate::rng::Rng::new(7);
        let len = 4096;
        let mut ring = Ring::new(len);
        let mut waited_total = 0;
        for id in 0..5000usize {
            let bytes = 1 + rng.below(if id % 7 == 0 { len } else { 700 });
            let before: Vec<(Range<usize>, usize)> = ring.in_use.iter().cloned().collect();
            let mut waited = Vec::new();
            let range = ring.take(bytes, |f| waited.push(f));
            assert_eq!(range.len(), bytes);
            assert!(range.end <= len && range.start % ALIGN == 0, "{range:?}");
            assert!(waited.windows(2).all(|w| w[0] < w[1]), "fences out of order: {waited:?}");
            for (r, f) in &before {
                let gone = waited.contains(f);
                assert!(gone || !overlaps(r, &range), "upload {f} at {r:?} still in use under {range:?}");
                // A fence is only waited for when its range is reached: overlapped, or skipped
                // by the wrap (which only happens when the range starts at 0).
                assert!(!gone || overlaps(r, &range) || range.start == 0, "waited for {f} at {r:?} under {range:?}");
            }
            waited_total += waited.len();
            ring.hold(range, id);
        }
        assert!(waited_total > 1000, "the ring wrapped: {waited_total} waits");
        let left: Vec<usize> = ring.drain().collect();
        assert!(left.windows(2).all(|w| w[0] < w[1]) && ring.in_use.is_empty());
    }

    /// The wrap waits for what lies past the head too: an old upload at the ring's end would
    /// otherwise stop the queue's front while a newer one at the start is overwritten.
    #[test]
    fn a_wrap_waits_for_the_uploads_it_skips() {
        let mut ring = Ring::new(1024);
        let mut waited = Vec::new();
        let mut take = |ring: &mut Ring<usize>, bytes: usize, id: usize| {
            let r = ring.take(bytes, |f| waited.push(f));
            ring.hold(r.clone(), id);
            r
        };
        assert_eq!(take(&mut ring, 600, 0), 0..600);
        assert_eq!(take(&mut ring, 200, 1), 768..968);
        assert_eq!(take(&mut ring, 300, 2), 0..300); // wraps over upload 0
        // Head at 512: 600 bytes wrap again, skipping upload 1 at [768, 968), which is older
        // than upload 2 at [0, 300), the one they overlap.
        assert_eq!(take(&mut ring, 600, 3), 0..600);
        assert_eq!(waited, vec![0, 1, 2]);
    }
}
