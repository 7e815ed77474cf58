//! MEMO's two-level planning.
//!
//! A whole training iteration of a deep model has far too many transient requests for the MIP, but
//! it is highly repetitive: every layer's forward issues the same requests, and so does every
//! layer's backward. Level 1 plans each distinct [`Phase`] once, in op indices local to the phase.
//! Level 2 plans the iteration, in which every [`PhaseRun`] (a layer executing a phase) is one
//! block the size of its phase's level-1 peak, alongside the long-lived requests (skeletal buffers,
//! anything that crosses layers). A request's final offset is its run's block base plus its offset
//! inside the phase.
//!
//! The composition is exact, not an approximation of a plan: [`BiLevelPlan::requests`] lists every
//! request with its global lifetime and [`BiLevelPlan::composed`] its offset, so [`super::verify`]
//! checks the final layout directly. What two levels give up is packing one layer's transients
//! into another layer's holes; `composed.lower_bound` (over the real requests) shows the cost.

use std::time::Instant;

use super::{lower_bound, plan, Plan, Request, Strategy};
use crate::{Error, Result};

/// One layer phase (a forward or a backward) with its transient requests; their `start`/`end`
/// are op indices within the phase, all below `ops`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Phase {
    pub name: String,
    /// Number of ops the phase lasts.
    pub ops: usize,
    pub requests: Vec<Request>,
}

/// One execution of `phases[phase]` in the iteration, occupying global ops `start..start + ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhaseRun {
    pub phase: usize,
    pub start: usize,
}

/// Both levels and their composition.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BiLevelPlan {
    /// Level 1: one plan per phase, offsets relative to the phase's block.
    pub phases: Vec<Plan>,
    /// Level 2: one block per run (in run order), then the long-lived requests.
    pub iteration: Plan,
    /// Every run's requests with global lifetimes (run by run), then the long-lived requests.
    pub requests: Vec<Request>,
    /// Final offsets of `requests`; `peak` is the iteration's, `lower_bound` that of `requests`,
    /// `solve_time` covers both levels.
    pub composed: Plan,
    /// Run `r`'s requests are `requests[run_bounds[r]..run_bounds[r + 1]]`; the long-lived follow.
    run_bounds: Vec<usize>,
}

impl BiLevelPlan {
    /// Final offset of request `request` of run `run`.
    pub fn run_offset(&self, run: usize, request: usize) -> Option<u64> {
        let (first, end) = (*self.run_bounds.get(run)?, *self.run_bounds.get(run + 1)?);
        (first + request < end).then(|| self.composed.offsets[first + request])
    }

    /// Final offset of the `k`-th long-lived request.
    pub fn long_lived_offset(&self, k: usize) -> Option<u64> {
        let first = *self.run_bounds.last()?;
        self.composed.offsets.get(first + k).copied()
    }
}

/// Plans every phase (level 1), then the iteration of `runs` plus `long_lived` (level 2), both with
/// `strategy`, and composes the final offsets.
pub fn plan_bilevel(
    phases: &[Phase],
    runs: &[PhaseRun],
    long_lived: &[Request],
    alignment: u64,
    strategy: Strategy,
) -> Result<BiLevelPlan> {
    let began = Instant::now();
    for (p, phase) in phases.iter().enumerate() {
        if let Some(r) = phase.requests.iter().find(|r| r.end > phase.ops) {
            return Err(Error::config(
                format!("phases[{p}] ({}).requests[{}].end", phase.name, r.name),
                r.end,
                format!("at most the phase's ops ({})", phase.ops),
            ));
        }
    }
    let level1: Vec<Plan> = phases.iter().map(|p| plan(&p.requests, alignment, strategy)).collect::<Result<_>>()?;

    let mut blocks = Vec::with_capacity(runs.len() + long_lived.len());
    let mut requests = Vec::new();
    let mut local_offsets: Vec<u64> = Vec::new();
    let mut run_bounds = Vec::with_capacity(runs.len() + 1);
    for (r, run) in runs.iter().enumerate() {
        let phase = phases
            .get(run.phase)
            .ok_or_else(|| Error::config(format!("runs[{r}].phase"), run.phase, format!("below {}", phases.len())))?;
        let end = shift(run.start, phase.ops, r)?;
        let tag = format!("{}@{}", phase.name, run.start);
        blocks.push(Request::new(tag.clone(), level1[run.phase].peak, run.start, end));
        run_bounds.push(requests.len());
        for q in &phase.requests {
            let global = Request::new(format!("{tag}/{}", q.name), q.size, shift(run.start, q.start, r)?, shift(run.start, q.end, r)?);
            requests.push(global);
        }
        local_offsets.extend(&level1[run.phase].offsets);
    }
    run_bounds.push(requests.len());
    blocks.extend_from_slice(long_lived);
    let iteration = plan(&blocks, alignment, strategy)?;

    let mut offsets: Vec<u64> = Vec::with_capacity(requests.len() + long_lived.len());
    for (r, bounds) in run_bounds.windows(2).enumerate() {
        let base = iteration.offsets[r];
        offsets.extend(local_offsets[bounds[0]..bounds[1]].iter().map(|&local| base + local));
    }
    offsets.extend(&iteration.offsets[runs.len()..]);
    requests.extend_from_slice(long_lived);

    let composed = Plan {
        offsets,
        peak: iteration.peak,
        lower_bound: lower_bound(&requests, alignment)?,
        alignment,
        method: iteration.method.clone(),
        solve_time: began.elapsed(),
    };
    Ok(BiLevelPlan { phases: level1, iteration, requests, composed, run_bounds })
}

fn shift(start: usize, local: usize, run: usize) -> Result<usize> {
    start
        .checked_add(local)
        .ok_or_else(|| Error::config(format!("runs[{run}].start"), start, "small enough that start + ops fits in usize"))
}
