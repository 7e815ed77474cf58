//! The planned transient arena: one allocation holds every transient tensor of a block's forward
//! or backward (the requests of `transients.rs`), each at the offset the DSA planner gave it.
//!
//! Sizes depend on the routing (slots per expert), known only once a layer's router has run, so
//! each phase is planned when it begins, with the best-fit heuristic on the real counts: tens of
//! requests take microseconds, far below a block's milliseconds, and the plan is exact, where a
//! capacity bound would have to assume every expert gets every token (and, for Top-P, every
//! token every expert): several times the real peak. A plan is verified (no two requests live at
//! the same op share a byte) and reused while the requests stay the same.
//!
//! Layers run one at a time and a forward never overlaps a backward, so one buffer serves every
//! phase of a step; it lives across steps (in the activation store) and is reallocated only when
//! a plan needs more than it holds. The block reserves for the backward of a routing when its
//! forward begins, and every growth adds a quarter of the routed requests' bytes (at most a
//! quarter of the peak) for the routing drift of later steps (`allocation_for`): training
//! the default model 150 steps on a synthetic stream allocated once with Top-P and twice with
//! Top-K (the second time as the router specialised; measured when the headroom was a quarter
//! of the peak, which it still is there: the default model's routed requests outweigh its
//! phases' peaks).
//!
//! The block asks for the views it uses together ([`Arena::views`]); the arena checks each
//! against `transients.rs` (live at that point, no larger than planned), so the two stay in step.
//! Arena memory is never zeroed (`Backend::alloc_scratch`: NaN on the CPU, so a read before a
//! write shows in the tests): a transient the block accumulates into is cleared first. With
//! expert parallelism the rows exchanged between ranks and the local experts' transients are
//! still allocated per op (their counts come from the exchange).
//!
//! Requests are sized in bytes of their own element type (`transients.rs`: bf16 activations
//! take 2 bytes on a GPU in mixed precision, f32 statistics 4), and the one buffer is raw memory
//! the backend hands out typed views of (`Backend::arena_views`).
//!
//! Where a backend cannot hand out several views of one buffer, or when asked
//! ([`Arena::per_tensor`]), every request gets a buffer of its own instead, dropped once
//! its lifetime is over: the engine's allocation pattern before the arena, kept as the reference
//! the planned path is tested against.

use super::plan::{plan, verify, Plan, Request, Strategy};
use super::transients::ALIGNMENT;
use crate::backend::{ArenaPart, Backend, Precision};

pub struct Arena<B: Backend> {
    planned: bool,
    /// The one allocation (planned mode).
    buf: Option<B::Buf>,
    /// The current phase's requests and, in planned mode, their plan.
    requests: Vec<Request>,
    plan: Option<Plan>,
    /// Per-tensor mode: the current phase's buffers, by request.
    own: Vec<Option<B::Buf>>,
    allocations: usize,
}

impl<B: Backend> Default for Arena<B> {
    fn default() -> Self {
        Self::planned()
    }
}

impl<B: Backend> Arena<B> {
    /// Transients at planned offsets in one buffer (where the backend supports it).
    pub fn planned() -> Self {
        Arena { planned: true, buf: None, requests: Vec::new(), plan: None, own: Vec::new(), allocations: 0 }
    }

    /// One buffer per transient.
    pub fn per_tensor() -> Self {
        Arena { planned: false, ..Self::planned() }
    }

    /// Buffers allocated so far: growths of the one buffer, or one per transient.
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    /// Bytes of the one buffer (0 in per-tensor mode).
    pub fn capacity(&self) -> u64 {
        self.buf.as_ref().map_or(0, B::buf_bytes)
    }

    /// The current phase's requests and plan (`None` in per-tensor mode).
    pub fn current(&self) -> (&[Request], Option<&Plan>) {
        (&self.requests, self.plan.as_ref())
    }

    /// Starts a phase: plans `requests` (unless they equal the previous phase's) and grows the
    /// buffer if the plan needs more. Per-tensor mode drops the previous phase's buffers.
    pub fn begin(&mut self, be: &B, requests: Vec<Request>) {
        self.own.clear();
        if self.planned {
            if self.plan.is_none() || requests != self.requests {
                let p = phase_plan(&requests).expect("transients.rs requests are well-formed");
                verify(&p, &requests).expect("the heuristic's plan overlaps live requests");
                self.plan = Some(p);
            }
            self.requests = requests;
            let peak = self.plan.as_ref().map_or(0, |p| p.peak);
            self.grow(be, peak, allocation_for(peak, &self.requests));
        } else {
            self.requests = requests;
        }
        if !self.planned {
            self.own.resize_with(self.requests.len(), || None);
        }
    }

    /// Makes room for `requests` ahead of time (the backward of a routing whose forward begins),
    /// so the first step allocates once instead of once per larger phase.
    pub fn reserve(&mut self, be: &B, requests: &[Request]) {
        if self.planned {
            let p = phase_plan(requests).expect("transients.rs requests are well-formed");
            self.grow(be, p.peak, allocation_for(p.peak, requests));
        }
    }

    /// Reallocates the buffer, `bytes` long (`allocation_for`), when `peak` bytes do not fit;
    /// falls back to per-tensor mode for good where the backend cannot share a buffer between
    /// views.
    fn grow(&mut self, be: &B, peak: u64, bytes: u64) {
        if self.capacity() >= peak {
            return;
        }
        let mut buf = be.alloc_scratch((bytes / 4) as usize, Precision::F32);
        if be.arena_views(&mut buf, &[]).is_none() {
            (self.planned, self.plan) = (false, None);
            return;
        }
        self.buf = Some(buf);
        self.allocations += 1;
    }

    /// Views of `want = [(request, elements)]`, usable together. Each request must be live at
    /// the latest start among them (the current op, as far as the arena can tell) and at least
    /// `elements` long; a view is exactly `elements` long, starting at the request's offset.
    pub fn views<const K: usize>(&mut self, be: &B, want: [(usize, usize); K]) -> [B::ViewMut<'_>; K] {
        let now = want.iter().map(|&(r, _)| self.request(r).start).max().unwrap_or(0);
        for &(r, len) in &want {
            let q = self.request(r);
            assert!(q.end > now, "block.rs uses transient {} after op {now}, but transients.rs ends it at op {}", q.name, q.end);
            let bytes = len as u64 * q.precision.bytes(be.activation_bytes());
            assert!(bytes <= q.size, "block.rs needs {bytes} bytes of transient {}, transients.rs plans {}", q.name, q.size);
        }
        let views = if self.planned {
            let plan = self.plan.as_ref().expect("begin() plans the phase");
            let parts: Vec<ArenaPart> = want.iter().map(|&(r, len)| ArenaPart { at: plan.offsets[r], len, precision: self.requests[r].precision }).collect();
            let buf = self.buf.as_mut().expect("begin() allocates the arena");
            be.arena_views(buf, &parts).expect("checked in begin()")
        } else {
            self.own_views(be, now, &want)
        };
        match views.try_into() {
            Ok(v) => v,
            Err(_) => unreachable!("one view per request"),
        }
    }

    fn request(&self, r: usize) -> &Request {
        self.requests.get(r).unwrap_or_else(|| panic!("transient {r} is not in this phase ({} requests)", self.requests.len()))
    }

    /// Per-tensor mode: drop buffers whose request ended by `now`, allocate the missing ones.
    fn own_views(&mut self, be: &B, now: usize, want: &[(usize, usize)]) -> Vec<B::ViewMut<'_>> {
        for (q, own) in self.requests.iter().zip(&mut self.own) {
            if q.end <= now {
                *own = None;
            }
        }
        for &(r, len) in want {
            // The request's full size, so that a longer view later in the phase fits.
            let precision = self.requests[r].precision;
            let size = (self.requests[r].size / precision.bytes(be.activation_bytes())) as usize;
            let slot = &mut self.own[r];
            if slot.is_none() {
                *slot = Some(be.alloc_scratch(size.max(len), precision));
                self.allocations += 1;
            }
        }
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by_key(|&i| want[i].0);
        assert!(order.windows(2).all(|w| want[w[0]].0 != want[w[1]].0), "a transient asked for twice in one views() call");
        let mut out: Vec<Option<B::ViewMut<'_>>> = want.iter().map(|_| None).collect();
        let mut rest = self.own.iter_mut().enumerate();
        for i in order {
            let (_, buf) = rest.find(|(r, _)| *r == want[i].0).expect("sorted, distinct");
            out[i] = Some(B::view_mut(buf.as_mut().expect("allocated above"), 0..want[i].1));
        }
        out.into_iter().map(|v| v.expect("every request found")).collect()
    }
}

/// The arena's plan of one phase: the heuristic, since a phase is re-planned whenever its
/// routing changes, too often for the MIP.
pub fn phase_plan(requests: &[Request]) -> crate::Result<Plan> {
    plan(requests, ALIGNMENT, Strategy::Heuristic)
}

/// Bytes of the buffer the arena allocates for `requests` planned to peak at `peak` bytes, with
/// headroom for the routing of later steps (which drifts as the router trains): a quarter of
/// the routed requests' bytes (`Request::routed`), at most a quarter of the peak, in whole
/// 4-byte units. Any routed request may grow by a quarter before the plan outgrows the buffer;
/// a phase whose peak is the attention's (long context) keeps no headroom for it.
pub fn allocation_for(peak: u64, requests: &[Request]) -> u64 {
    let routed: u64 = requests.iter().filter(|r| r.routed).map(|r| r.size).sum();
    let units = peak.div_ceil(4);
    4 * (units + routed.min(peak).div_ceil(4) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn reqs() -> Vec<Request> {
        vec![Request::new("a", 4096, 0, 2), Request::new("b", 2048, 1, 3).routed(), Request::new("c", 4096, 2, 4)]
    }

    #[test]
    fn planned_views_share_one_buffer_and_reuse_dead_bytes() {
        let be = Cpu::new(1);
        let mut arena = Arena::<Cpu>::planned();
        arena.begin(&be, reqs());
        let (requests, plan) = arena.current();
        verify(plan.unwrap(), requests).unwrap();
        // a and c never live together: c may reuse a's bytes, so two of the three suffice.
        assert_eq!(plan.unwrap().peak, 4096 + 2048);
        assert_eq!(arena.capacity(), 4096 + 2048 + 2048 / 4, "a quarter of the routed request's bytes as headroom");
        {
            let [a, b] = arena.views(&be, [(0, 1024), (1, 512)]);
            a.fill(1.0);
            b.fill(2.0);
        }
        let [b, c] = arena.views(&be, [(1, 512), (2, 1000)]);
        assert!(b.iter().all(|&x| x == 2.0), "b keeps its contents between calls");
        assert_eq!(c.len(), 1000);
        arena.begin(&be, reqs());
        assert_eq!(arena.allocations(), 1);
    }

    /// Headroom for the routing's drift: a quarter of the routed requests' bytes, at most a
    /// quarter of the peak; none where no request follows the routing.
    #[test]
    fn headroom_is_for_routed_requests() {
        let fixed = [Request::new("attention", 1600, 0, 1)];
        assert_eq!(allocation_for(1600, &fixed), 1600);
        let routed = [Request::new("xe", 400, 0, 1).routed(), Request::new("dy", 400, 1, 2).routed(), Request::new("attention", 1600, 2, 3)];
        assert_eq!(allocation_for(1600, &routed), 1600 + 200);
        let all_routed = [Request::new("xe", 1600, 0, 1).routed(), Request::new("dy", 1600, 1, 2).routed()];
        assert_eq!(allocation_for(1600, &all_routed), 1600 + 400);
    }

    #[test]
    fn views_out_of_step_with_the_requests_panic() {
        let be = Cpu::new(1);
        let run = |f: fn(&mut Arena<Cpu>, &Cpu)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut arena = Arena::<Cpu>::planned();
                arena.begin(&be, reqs());
                f(&mut arena, &be);
            }))
            .is_err()
        };
        assert!(run(|a, be| {
            let _ = a.views(be, [(0, 1025)]);
        }), "larger than planned");
        assert!(run(|a, be| {
            let _ = a.views(be, [(0, 8), (2, 8)]);
        }), "a is dead when c starts");
        assert!(run(|a, be| {
            let _ = a.views(be, [(3, 8)]);
        }), "no such request");
        assert!(!run(|a, be| {
            let _ = a.views(be, [(0, 1024), (1, 512)]);
        }));
    }

    #[test]
    fn per_tensor_mode_gives_fresh_buffers_and_frees_dead_ones() {
        let be = Cpu::new(1);
        let mut arena = Arena::<Cpu>::per_tensor();
        arena.begin(&be, reqs());
        {
            let [b, a] = arena.views(&be, [(1, 512), (0, 1024)]);
            assert!(a.iter().chain(b.iter()).all(|&x| x.is_nan()), "scratch, poisoned on the CPU");
            a.fill(3.0);
        }
        let _ = arena.views(&be, [(2, 8)]);
        assert!(arena.own[0].is_none() && arena.own[1].is_some(), "a ended at op 2, b lives until 3");
        assert_eq!((arena.allocations(), arena.capacity()), (3, 0));
    }
}
