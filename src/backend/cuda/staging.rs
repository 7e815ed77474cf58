//! Uploads of per-call host data (tokens, routing slots and weights, the grouped matmul's pointer
//! arrays, the expert kernels' segment tables) through a page-locked ring into a device ring of
//! the same size, and downloads through a page-locked buffer.
//!
//! A copy from pageable memory may make the driver wait for the stream before it stages the
//! bytes through a buffer of its own (CUDA's "API synchronization behavior"), which drains the
//! queue of work the host had run ahead with. From page-locked memory the copy is queued like a
//! kernel. The ring hands out byte ranges in order; each upload records an event after its copy,
//! and a range of the page-locked ring is handed out again only once the uploads that used it
//! before have completed. The device ring needs no such wait: its uploads are read by work
//! queued on the same stream, which runs before any later copy into the same range. It only
//! must not hand out a range an op still holds (a [`Staged`] not dropped: its launch not yet
//! queued), so it grows to twice what the ops hold at once: the size `plan-memory` counts
//! (`cuda_scratch::upload_ring_bytes`).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice};

use super::ok;
use crate::backend::cuda_scratch::{upload_ring_len, upload_share};

/// The smallest page-locked download buffer.
const MIN_READBACK_BYTES: usize = 4 << 20;

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
        self.head = upload_share(end);
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
    state: Mutex<State>,
}

struct State {
    /// The page-locked ring and the device ring, the same length, and the ring's bookkeeping.
    host: Option<Pinned>,
    device: Option<CudaSlice<u8>>,
    ring: Ring<CudaEvent>,
    /// Events whose uploads completed (recorded again rather than created per upload).
    spare: Vec<CudaEvent>,
    /// Uploads still held (their launches not yet queued), by ring generation.
    held: Vec<(u64, Range<usize>)>,
    /// The ring generation (a new one each time it grows), and device rings replaced while
    /// uploads in them were held: freed (stream-ordered) once none is.
    generation: u64,
    retired: Vec<CudaSlice<u8>>,
}

/// An upload in the device ring: its address, until dropped once the work reading it is queued.
pub struct Staged<'a> {
    pub ptr: u64,
    staging: &'a Staging,
    generation: u64,
    range: Range<usize>,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        let mut state = self.staging.state.lock().expect("staging lock");
        let at = state.held.iter().position(|(g, r)| *g == self.generation && *r == self.range).expect("a held upload");
        state.held.swap_remove(at);
        let current = state.generation;
        if state.held.iter().all(|(g, _)| *g == current) {
            state.retired.clear();
        }
    }
}

// SAFETY: the raw pointer is into the owned page-locked allocation; the mutex serialises its use
// and the events order the device's reads of it.
unsafe impl Send for Staging {}
unsafe impl Sync for Staging {}

impl Staging {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        let state = State { host: None, device: None, ring: Ring::new(0), spare: Vec::new(), held: Vec::new(), generation: 0, retired: Vec::new() };
        Staging { stream, state: Mutex::new(state) }
    }

    /// `host` copied on the stream into the device ring; hold the result until the work that
    /// reads it is queued.
    pub fn upload<T: DeviceRepr + Copy>(&self, host: &[T], what: &str) -> Staged<'_> {
        let bytes = std::mem::size_of_val(host);
        let mut state = self.state.lock().expect("staging lock");
        let state = &mut *state;
        // What the ops hold with this upload, each upload its share of the ring.
        let held = state.held.iter().map(|(_, r)| upload_share(r.len())).sum::<usize>() + upload_share(bytes);
        if 2 * held > state.ring.len {
            self.grow(state, upload_ring_len(held), what);
        }
        let mut range = self.take(state, bytes, what);
        if bytes > 0 && state.held.iter().any(|(g, r)| *g == state.generation && r.start < range.end && range.start < r.end) {
            // An op holding uploads longer than a few calls: a fresh ring, twice as large.
            self.grow(state, 2 * state.ring.len, what);
            range = self.take(state, bytes, what);
        }
        let host_ring = state.host.as_ref().expect("ring allocated above");
        let device_ring = state.device.as_ref().expect("ring allocated above").device_ptr(&self.stream).0;
        let ptr = device_ring + range.start as u64;
        if bytes > 0 {
            debug_assert!(range.end <= host_ring.mem.len());
            // SAFETY: `range` lies in the allocation, and no queued copy still reads it (its
            // uploads' events completed); `host` is `bytes` long.
            let staged = unsafe {
                let at = host_ring.ptr.add(range.start);
                std::ptr::copy_nonoverlapping(host.as_ptr() as *const u8, at, bytes);
                std::slice::from_raw_parts(at as *const T, host.len())
            };
            // SAFETY: the device range is the ring's; work reading what it held before was
            // queued before this copy on the same stream (its uploads were dropped), and the
            // staged bytes stay untouched until the event recorded after the copy completes.
            ok(unsafe { drv::memcpy_htod_async(ptr, staged, self.stream.cu_stream()) }, what);
        }
        let fence = match state.spare.pop() {
            Some(event) => {
                ok(event.record(&self.stream), what);
                event
            }
            None => ok(self.stream.record_event(None), what),
        };
        state.ring.hold(range.clone(), fence);
        state.held.push((state.generation, range.clone()));
        Staged { ptr, staging: self, generation: state.generation, range }
    }

    /// The next range of `bytes` in the ring, after the page-locked bytes it reuses were copied.
    fn take(&self, state: &mut State, bytes: usize, what: &str) -> Range<usize> {
        let State { ring, spare, .. } = state;
        ring.take(bytes, |fence: CudaEvent| {
            ok(fence.synchronize(), what);
            spare.push(fence);
        })
    }

    /// The rings' length (0 before the first upload).
    pub fn ring_len(&self) -> usize {
        self.state.lock().expect("staging lock").ring.len
    }

    /// New rings of `len` bytes: the old page-locked one goes once every copy from it has run,
    /// the old device one once no upload in it is held (freed in stream order: after the work
    /// queued to read it).
    fn grow(&self, state: &mut State, len: usize, what: &str) {
        for fence in state.ring.drain() {
            ok(fence.synchronize(), what);
            state.spare.push(fence);
        }
        // SAFETY: u8 has no invalid bit patterns; every byte copied was written first.
        let mut mem = ok(unsafe { self.stream.context().alloc_pinned::<u8>(len) }, "page-locked staging allocation");
        let ptr = ok(mem.as_mut_ptr(), "page-locked staging memory");
        state.host = Some(Pinned { mem, ptr });
        // SAFETY: every byte a kernel reads was copied in first.
        let device = ok(unsafe { self.stream.alloc::<u8>(len) }, "device upload ring allocation");
        if let Some(old) = state.device.replace(device) {
            let generation = state.generation;
            if state.held.iter().any(|(g, _)| *g == generation) {
                state.retired.push(old);
            }
        }
        state.generation += 1;
        state.ring = Ring::new(len);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The page-locked memory is freed after this; errors at teardown are not actionable.
        let state = &mut *self.state.lock().expect("staging lock");
        for fence in state.ring.drain() {
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
            let len = bytes.max(MIN_READBACK_BYTES).next_power_of_two();
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
    use crate::backend::cuda_scratch::UPLOAD_ALIGN;

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
            assert!(range.end <= len && range.start % UPLOAD_ALIGN == 0, "{range:?}");
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
