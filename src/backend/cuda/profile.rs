//! GPU time per op ([`super::CudaBackend::with_profile`]): every trait op is bracketed by two
//! timing events on the compute stream, and the time between them is summed per op name, with
//! the op's [`Work`] (least bytes moved, FLOPs), so the table says how far each op is from the
//! GPU's bandwidth or tensor rate.
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

use crate::backend::OpTime;

/// What an op has to do at least: device-memory bytes (every operand read once, every result
/// written once; read-modify-write counts twice) and multiply-add FLOPs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub bytes: f64,
    pub flops: f64,
}

impl Work {
    /// Nothing counted: host work, uploads and downloads (PCIe, not device memory).
    pub const NONE: Work = Work { bytes: 0.0, flops: 0.0 };

    /// A memory-bound op moving `bytes`.
    pub fn moving(bytes: usize) -> Work {
        Work { bytes: bytes as f64, flops: 0.0 }
    }

    /// `flops` of products over operands and results of `bytes`.
    pub fn computing(flops: f64, bytes: usize) -> Work {
        Work { bytes: bytes as f64, flops }
    }
}

#[derive(Default)]
struct State {
    /// Spans open now (nesting depth).
    open: u32,
    done: Vec<(&'static str, Work, CudaEvent, CudaEvent)>,
}

#[derive(Default)]
pub struct Profiler {
    state: Mutex<State>,
}

/// An open span; closing it (drop) records its end.
pub struct Span<'a> {
    profiler: &'a Profiler,
    stream: &'a Arc<CudaStream>,
    /// The op, its work and its start event, for the outermost span only.
    start: Option<(&'static str, Work, CudaEvent)>,
}

fn timing_event(stream: &CudaStream) -> CudaEvent {
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap_or_else(|e| panic!("CUDA profile event failed: {e:?}"))
}

impl Profiler {
    pub fn span<'a>(&'a self, stream: &'a Arc<CudaStream>, op: &'static str, work: impl FnOnce() -> Work) -> Span<'a> {
        let mut s = self.state.lock().expect("profile lock");
        s.open += 1;
        let start = (s.open == 1).then(|| (op, work(), timing_event(stream)));
        Span { profiler: self, stream, start }
    }

    /// Per op since the start or the last call, slowest first. Waits for the stream to finish
    /// the recorded work.
    pub fn take(&self) -> Vec<OpTime> {
        let done = std::mem::take(&mut self.state.lock().expect("profile lock").done);
        let mut per_op: BTreeMap<&'static str, OpTime> = BTreeMap::new();
        for (op, work, start, end) in done {
            let ms = start.elapsed_ms(&end).unwrap_or_else(|e| panic!("CUDA profile timing failed: {e:?}"));
            let row = per_op.entry(op).or_insert(OpTime { op, calls: 0, seconds: 0.0, bytes: 0.0, flops: 0.0 });
            row.calls += 1;
            row.seconds += ms as f64 / 1e3;
            row.bytes += work.bytes;
            row.flops += work.flops;
        }
        let mut rows: Vec<OpTime> = per_op.into_values().collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let mut s = self.profiler.state.lock().expect("profile lock");
        s.open -= 1;
        if let Some((op, work, start)) = self.start.take() {
            s.done.push((op, work, start, timing_event(self.stream)));
        }
    }
}
