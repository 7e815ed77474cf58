//! Offline memory planning (MEMO's Dynamic Storage Allocation).
//!
//! Every activation a layer needs transiently is a [`Request`]: a size and the half-open range of
//! op indices `[start, end)` during which it is live. A [`Plan`] gives each request a fixed byte
//! offset in one arena so that requests live at the same time never share bytes. The arena size is
//! the plan's `peak`; knowing the whole sequence in advance (the model's ops do not change between
//! iterations) lets the planner pack far tighter than a caching allocator that sees requests one at
//! a time, and it never fragments.
//!
//! Sizes are padded to the alignment and offsets are multiples of it, so `peak` is a multiple of the
//! alignment and never below [`lower_bound`] (the most padded bytes live at once): that bound is what
//! the reported ratio is measured against.
//!
//! Solvers: [`heuristic`] (greedy, thousands of requests in milliseconds) and [`mip`] (the paper's
//! MIP, warm-started from and never worse than the heuristic); [`bilevel`] composes a per-layer
//! plan with a whole-iteration plan as MEMO does.

pub mod bilevel;
pub mod heuristic;
pub mod mip;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use crate::backend::Precision;
use crate::{Error, Result};

pub use bilevel::{plan_bilevel, BiLevelPlan, Phase, PhaseRun};
pub use mip::MipLimits;

/// One buffer to place: `size` bytes live during ops `start..end`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// For messages and plan dumps; need not be unique.
    pub name: String,
    pub size: u64,
    pub start: usize,
    pub end: usize,
    /// The allocation a buffer of its own would take (the arena's per-tensor mode).
    #[serde(skip)]
    pub precision: Precision,
    /// Whether the size follows the routing (slots per expert), which drifts from step to step:
    /// the arena keeps headroom for such requests only.
    #[serde(skip)]
    pub routed: bool,
}

impl Request {
    pub fn new(name: impl Into<String>, size: u64, start: usize, end: usize) -> Self {
        Request { name: name.into(), size, start, end, precision: Precision::Activation, routed: false }
    }

    /// The same request for an f32 tensor.
    pub fn f32(self) -> Self {
        Request { precision: Precision::F32, ..self }
    }

    /// The same request, sized by the routing.
    pub fn routed(self) -> Self {
        Request { routed: true, ..self }
    }

    /// Whether the two lifetimes share an op (half-open ranges: `end` is already free).
    pub fn overlaps_in_time(&self, other: &Request) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// How to solve.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Strategy {
    Heuristic,
    /// The heuristic, then the MIP within `MipLimits` when the heuristic is not provably optimal.
    Mip(MipLimits),
}

/// Which solver produced the offsets.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// The greedy placement, and why no MIP result replaced it.
    Heuristic(Fallback),
    /// The MIP found a smaller peak than the heuristic; `optimal` when that is proven.
    Mip { optimal: bool },
}

/// Why a plan is the heuristic's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Fallback {
    /// [`Strategy::Heuristic`] was asked for.
    NotRequested,
    /// The heuristic already meets the lower bound, so it is optimal.
    AtLowerBound,
    /// The instance has more pairs of time-overlapping requests (one binary each) than allowed.
    TooManyPairs { limit: usize },
    /// The MIP ran but found nothing smaller; `optimal` when it proved the heuristic optimal.
    NoImprovement { optimal: bool },
    /// The solver returned an error (message kept for the log).
    SolverFailed(String),
}

/// A placement of every request.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Byte offset of each request, in the order the requests were given.
    pub offsets: Vec<u64>,
    /// Arena bytes needed: the highest padded end of any request.
    pub peak: u64,
    /// The most padded bytes live at one op; no plan can have a smaller peak.
    pub lower_bound: u64,
    pub alignment: u64,
    pub method: Method,
    /// Wall time of the whole planning call.
    pub solve_time: Duration,
}

/// One row of a planner benchmark table.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PlanSummary {
    pub peak: u64,
    pub lower_bound: u64,
    /// `peak / lower_bound` (1.0 when both are zero): how far from provably optimal.
    pub ratio: f64,
    pub solve_time: Duration,
}

impl Plan {
    pub fn summary(&self) -> PlanSummary {
        let ratio = if self.lower_bound == 0 { 1.0 } else { self.peak as f64 / self.lower_bound as f64 };
        PlanSummary { peak: self.peak, lower_bound: self.lower_bound, ratio, solve_time: self.solve_time }
    }
}

/// Places `requests` in one arena whose offsets are multiples of `alignment` (a power of two).
///
/// Errors on malformed requests (empty lifetime, sizes whose padded total overflows u64) or a bad
/// alignment; solver trouble never errors, it falls back to the heuristic and says so in `method`.
pub fn plan(requests: &[Request], alignment: u64, strategy: Strategy) -> Result<Plan> {
    let began = Instant::now();
    let sizes = padded_sizes(requests, alignment)?;
    let lower_bound = lower_bound_padded(requests, &sizes);
    let greedy = heuristic::place(requests, &sizes);
    let (offsets, peak, method) = match strategy {
        Strategy::Heuristic => (greedy.offsets, greedy.peak, Method::Heuristic(Fallback::NotRequested)),
        Strategy::Mip(_) if greedy.peak == lower_bound => {
            (greedy.offsets, greedy.peak, Method::Heuristic(Fallback::AtLowerBound))
        }
        Strategy::Mip(limits) => mip::improve(requests, &sizes, lower_bound, greedy, limits),
    };
    Ok(Plan { offsets, peak, lower_bound, alignment, method, solve_time: began.elapsed() })
}

/// The most bytes live at one op, each request padded to `alignment`: a floor on any plan's peak.
pub fn lower_bound(requests: &[Request], alignment: u64) -> Result<u64> {
    let sizes = padded_sizes(requests, alignment)?;
    Ok(lower_bound_padded(requests, &sizes))
}

/// Checks a plan against its requests: one offset each, offsets aligned, every request inside
/// `peak`, and no two requests with overlapping lifetimes sharing a byte. The error names the
/// first offending request(s).
pub fn verify(plan: &Plan, requests: &[Request]) -> Result<()> {
    if plan.offsets.len() != requests.len() {
        return Err(Error::Invalid(format!(
            "plan has {} offsets for {} requests",
            plan.offsets.len(),
            requests.len()
        )));
    }
    check_alignment(plan.alignment)?;
    for (r, &off) in requests.iter().zip(&plan.offsets) {
        if off % plan.alignment != 0 {
            return Err(Error::Invalid(format!("{}: offset {off} is not a multiple of {}", r.name, plan.alignment)));
        }
        if off.checked_add(r.size).is_none_or(|end| end > plan.peak) {
            return Err(Error::Invalid(format!("{}: [{off}, +{}) exceeds peak {}", r.name, r.size, plan.peak)));
        }
    }
    // Sweep in start order, comparing each request with those still live when it starts.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].start);
    let mut live: Vec<usize> = Vec::new();
    for &i in &order {
        let r = &requests[i];
        live.retain(|&j| requests[j].end > r.start);
        for &j in &live {
            let (a, b) = (plan.offsets[i], plan.offsets[j]);
            if a < b + requests[j].size && b < a + r.size {
                return Err(Error::Invalid(format!(
                    "{} [{a}, +{}) and {} [{b}, +{}) are live together at op {} and share bytes",
                    r.name, r.size, requests[j].name, requests[j].size, r.start
                )));
            }
        }
        live.push(i);
    }
    Ok(())
}

fn check_alignment(alignment: u64) -> Result<()> {
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(Error::config("alignment", alignment, "a power of two, e.g. 64 or 256 bytes"));
    }
    Ok(())
}

/// Validates the requests and pads each size to the alignment. Also guarantees the padded total
/// fits in u64, which bounds every peak the solvers compute, so they need no overflow checks.
fn padded_sizes(requests: &[Request], alignment: u64) -> Result<Vec<u64>> {
    check_alignment(alignment)?;
    let mut total: u64 = 0;
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.start >= r.end {
                return Err(Error::config(
                    format!("requests[{i}] ({}).end", r.name),
                    r.end,
                    format!("greater than start ({}): lifetimes are half-open op ranges", r.start),
                ));
            }
            let padded = r.size.div_ceil(alignment).checked_mul(alignment);
            let total_ok = padded.and_then(|p| total.checked_add(p));
            match (padded, total_ok) {
                (Some(p), Some(t)) => {
                    total = t;
                    Ok(p)
                }
                _ => Err(Error::Invalid(format!("requests[{i}] ({}): padded sizes overflow u64", r.name))),
            }
        })
        .collect()
}

fn lower_bound_padded(requests: &[Request], sizes: &[u64]) -> u64 {
    // (op, +size at start / −size at end); at equal ops the ends sort first (half-open ranges).
    let mut events: Vec<(usize, bool, u64)> = Vec::with_capacity(2 * requests.len());
    for (r, &s) in requests.iter().zip(sizes) {
        events.push((r.start, true, s));
        events.push((r.end, false, s));
    }
    events.sort_unstable_by_key(|&(op, is_start, _)| (op, is_start));
    let (mut live, mut most) = (0u64, 0u64);
    for (_, is_start, s) in events {
        if is_start {
            live += s;
            most = most.max(live);
        } else {
            live -= s;
        }
    }
    most
}
