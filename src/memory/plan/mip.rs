//! The paper's MIP for Dynamic Storage Allocation, solved through good_lp with the solver of
//! [`crate::memory::solver`] (pure-Rust microlp by default, HiGHS with the feature `highs`).
//!
//! Variables: an address `A_i ≥ 0` per request, the peak `M`, and one binary `z_ij` per pair of
//! requests whose lifetimes overlap (`z_ij = 0`: i sits below j). Minimise `M` subject to
//! `A_i + S_i ≤ M`, `A_i + S_i ≤ A_j + z_ij·Mcap`, `A_j + S_j ≤ A_i + (1 − z_ij)·Mcap`.
//!
//! Choices that keep it practical without a commercial solver:
//! - `Mcap` is the heuristic's peak: a valid big-M (no better plan needs more) and the tightest
//!   one available. The heuristic is also the warm start, so any answer is at least as good.
//! - `M ≥ lower_bound` is added as a bound: it is valid, and it lets branch and bound stop the
//!   moment the incumbent reaches the bound.
//! - Sizes are in alignment units divided by `Mcap`, so every coefficient lies in [0, 1].
//! - The solver's addresses are not used as-is: only its above/below decisions are, and the
//!   addresses are recomputed exactly as longest paths in that order. The result is integral,
//!   aligned and overlap-free whatever the solver's tolerances did, and its peak is ≤ the MIP's.
//! - Both solvers take a wall-clock limit (and return their best incumbent when it hits) but
//!   the binaries grow with the square of the overlap, so instances with more than
//!   `max_pairs` overlapping pairs are not attempted at all.

use std::time::Duration;

use good_lp::{variable, variables, Expression, Solution, SolutionStatus, SolverModel, Variable, WithTimeLimit};

use super::heuristic::Placement;
use crate::memory::solver::solver;
use super::{Fallback, Method, Request};

/// Bounds on the MIP attempt.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MipLimits {
    /// Most time-overlapping pairs (binary variables) to attempt.
    pub max_pairs: usize,
    /// Wall-clock budget for the solver; its best incumbent is used when it runs out.
    pub time_limit: Duration,
}

impl Default for MipLimits {
    /// Sized for a per-layer plan (tens of transients): microlp closed a 24-request, 99-pair instance
    /// in about 4 s, and did not prove a 40-request, 296-pair one in 10 s (it keeps the heuristic).
    fn default() -> Self {
        MipLimits { max_pairs: 300, time_limit: Duration::from_secs(5) }
    }
}

/// Runs the MIP from `greedy` (whose peak must be > 0) and keeps whichever plan has the smaller peak.
pub(super) fn improve(
    requests: &[Request],
    sizes: &[u64],
    lower_bound: u64,
    greedy: Placement,
    limits: MipLimits,
) -> (Vec<u64>, u64, Method) {
    let keep_greedy = |why| (greedy.offsets.clone(), greedy.peak, Method::Heuristic(why));
    let Some(pairs) = overlapping_pairs(requests, sizes, limits.max_pairs) else {
        return keep_greedy(Fallback::TooManyPairs { limit: limits.max_pairs });
    };
    let (below, status) = match solve(sizes, lower_bound, &greedy, &pairs, limits.time_limit) {
        Ok(found) => found,
        Err(message) => return keep_greedy(Fallback::SolverFailed(message)),
    };
    let Some((offsets, peak)) = addresses_from_order(sizes, &pairs, &below) else {
        return keep_greedy(Fallback::SolverFailed("the solver's above/below decisions form a cycle".into()));
    };
    let optimal = matches!(status, SolutionStatus::Optimal) || peak == lower_bound;
    if peak < greedy.peak {
        (offsets, peak, Method::Mip { optimal })
    } else {
        keep_greedy(Fallback::NoImprovement { optimal })
    }
}

/// Pairs `(i, j)`, `i < j`, of non-empty requests live at the same time; `None` past `limit`.
pub(super) fn overlapping_pairs(requests: &[Request], sizes: &[u64], limit: usize) -> Option<Vec<(usize, usize)>> {
    let mut order: Vec<usize> = (0..requests.len()).filter(|&i| sizes[i] > 0).collect();
    order.sort_by_key(|&i| requests[i].start);
    let mut live: Vec<usize> = Vec::new();
    let mut pairs = Vec::new();
    for &i in &order {
        live.retain(|&j| requests[j].end > requests[i].start);
        if pairs.len() + live.len() > limit {
            return None;
        }
        pairs.extend(live.iter().map(|&j| (i.min(j), i.max(j))));
        live.push(i);
    }
    Some(pairs)
}

/// Solves the MIP; returns for each pair whether its first request sits below its second.
fn solve(
    sizes: &[u64],
    lower_bound: u64,
    greedy: &Placement,
    pairs: &[(usize, usize)],
    time_limit: Duration,
) -> Result<(Vec<bool>, SolutionStatus), String> {
    let cap = greedy.peak as f64;
    let unit = |bytes: u64| bytes as f64 / cap;
    let mut vars = variables!();
    let peak = vars.add(variable().min(unit(lower_bound)).max(1.0).initial(1.0));
    let addr: Vec<Variable> = sizes
        .iter()
        .zip(&greedy.offsets)
        .map(|(&s, &a)| vars.add(variable().min(0.0).max(1.0 - unit(s)).initial(unit(a))))
        .collect();
    let z: Vec<Variable> = pairs
        .iter()
        .map(|&(i, j)| {
            let i_below_j = greedy.offsets[i] < greedy.offsets[j];
            vars.add(variable().binary().initial(if i_below_j { 0.0 } else { 1.0 }))
        })
        .collect();

    let mut model = vars.minimise(peak).using(solver).with_time_limit(time_limit.as_secs_f64());
    for (i, &a) in addr.iter().enumerate() {
        if sizes[i] > 0 {
            model.add_constraint((a + unit(sizes[i])).leq(peak));
        }
    }
    for (&(i, j), &zij) in pairs.iter().zip(&z) {
        let (si, sj) = (unit(sizes[i]), unit(sizes[j]));
        model.add_constraint((addr[i] + si).leq(Expression::from(addr[j]) + zij));
        model.add_constraint((addr[j] + sj).leq(addr[i] + 1.0 - zij));
    }
    let solution = model.solve().map_err(|e| e.to_string())?;
    let below = z.iter().map(|&v| solution.value(v) < 0.5).collect();
    Ok((below, solution.status()))
}

/// Lowest addresses consistent with the above/below decisions: each request sits on the highest
/// end among the requests decided to lie below it (longest path in a DAG). `None` on a cycle.
fn addresses_from_order(sizes: &[u64], pairs: &[(usize, usize)], below: &[bool]) -> Option<(Vec<u64>, u64)> {
    let n = sizes.len();
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (&(i, j), &i_below) in pairs.iter().zip(below) {
        let (lo, hi) = if i_below { (i, j) } else { (j, i) };
        succ[lo].push(hi);
        indegree[hi] += 1;
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut offsets = vec![0u64; n];
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &j in &succ[i] {
            offsets[j] = offsets[j].max(offsets[i] + sizes[i]);
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(j);
            }
        }
    }
    let peak = offsets.iter().zip(sizes).map(|(o, s)| o + s).max().unwrap_or(0);
    (done == n).then_some((offsets, peak))
}
