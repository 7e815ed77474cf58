//! GPU time per op ([`super::CudaBackend::with_profile`]): every trait op is bracketed by two
//! timing events on the compute stream, and the time between them is summed per op name.
//!
//! The time is the stream's, not the kernels' alone: if the host is slow to queue an op's work
//! (a pageable upload that waits, a per-call allocation), the stream idles inside the span and
//! the op is charged for it, which is what a profile meant to find lost time should show. An op
//! called from inside another (a grouped matmul falling back to matmuls) is charged to the outer
//! one only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

#[derive(Default)]
struct State {
    /// Spans open now (nesting depth).
    open: u32,
    done: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

#[derive(Default)]
pub struct Profiler {
    state: Mutex<State>,
}

/// An open span; closing it (drop) records its end.
pub struct Span<'a> {
    profiler: &'a Profiler,
    stream: &'a Arc<CudaStream>,
    /// The op and its start event, for the outermost span only.
    start: Option<(&'static str, CudaEvent)>,
}

fn timing_event(stream: &CudaStream) -> CudaEvent {
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap_or_else(|e| panic!("CUDA profile event failed: {e:?}"))
}

impl Profiler {
    pub fn span<'a>(&'a self, stream: &'a Arc<CudaStream>, op: &'static str) -> Span<'a> {
        let mut s = self.state.lock().expect("profile lock");
        s.open += 1;
        let start = (s.open == 1).then(|| (op, timing_event(stream)));
        Span { profiler: self, stream, start }
    }

    /// (op, calls, seconds) since the start or the last call, slowest first. Waits for the
    /// stream to finish the recorded work.
    pub fn take(&self) -> Vec<(&'static str, u64, f64)> {
        let done = std::mem::take(&mut self.state.lock().expect("profile lock").done);
        let mut per_op: BTreeMap<&'static str, (u64, f64)> = BTreeMap::new();
        for (op, start, end) in done {
            let ms = start.elapsed_ms(&end).unwrap_or_else(|e| panic!("CUDA profile timing failed: {e:?}"));
            let e = per_op.entry(op).or_default();
            e.0 += 1;
            e.1 += ms as f64 / 1e3;
        }
        let mut rows: Vec<_> = per_op.into_iter().map(|(op, (n, s))| (op, n, s)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let mut s = self.profiler.state.lock().expect("profile lock");
        s.open -= 1;
        if let Some((op, start)) = self.start.take() {
            s.done.push((op, start, timing_event(self.stream)));
        }
    }
}
