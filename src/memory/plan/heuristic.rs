//! Greedy placement: take the requests in some order and put each at the lowest address where it
//! overlaps no already-placed request that is live at the same time.
//!
//! No single order is best on every instance, so a few cheap ones are tried and the smallest peak
//! kept. Start order is there for a guarantee: when lifetimes are nested or disjoint (a stack
//! discipline, as in a layer's forward), each request lands right on top of the requests enclosing
//! it, so the peak equals the lower bound; with equal sizes it is the optimal interval-colouring
//! greedy. Size and area orders handle the mixed case, where big long-lived buffers placed first
//! leave regular holes for the small ones.
//!
//! Cost is O(k · n²) for k orders (each placement scans the requests placed so far): a few
//! milliseconds for thousands of requests, which is all a per-layer or per-iteration plan needs.

use super::Request;

/// Offsets (in request order) and the peak they reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offsets: Vec<u64>,
    pub peak: u64,
}

/// Best placement over the built-in orders; `sizes` are the padded sizes, one per request.
pub fn place(requests: &[Request], sizes: &[u64]) -> Placement {
    use std::cmp::Reverse;
    let n = requests.len();
    let length = |i: usize| (requests[i].end - requests[i].start) as u128;
    let orders = [
        sorted_by(n, |i| (requests[i].start, Reverse(requests[i].end), Reverse(sizes[i]))),
        sorted_by(n, |i| (Reverse(sizes[i]), requests[i].start)),
        sorted_by(n, |i| (Reverse(length(i)), Reverse(sizes[i]), requests[i].start)),
        sorted_by(n, |i| (Reverse(sizes[i] as u128 * length(i)), requests[i].start)),
    ];
    orders
        .iter()
        .map(|order| place_in_order(requests, sizes, order))
        .min_by_key(|p| p.peak)
        .unwrap_or(Placement { offsets: vec![], peak: 0 })
}

fn sorted_by<K: Ord>(n: usize, key: impl Fn(usize) -> K) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| key(i));
    order
}

/// Lowest-address placement of the requests in `order` (every index once).
pub fn place_in_order(requests: &[Request], sizes: &[u64], order: &[usize]) -> Placement {
    let mut offsets = vec![0u64; requests.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(requests.len());
    let mut busy: Vec<(u64, u64)> = Vec::new();
    let mut peak = 0;
    for &i in order {
        if sizes[i] == 0 {
            continue; // occupies no bytes: offset 0 conflicts with nothing
        }
        busy.clear();
        busy.extend(
            placed
                .iter()
                .filter(|&&j| requests[i].overlaps_in_time(&requests[j]))
                .map(|&j| (offsets[j], offsets[j] + sizes[j])),
        );
        busy.sort_unstable();
        let mut at = 0;
        for &(lo, hi) in &busy {
            if at + sizes[i] <= lo {
                break;
            }
            at = at.max(hi);
        }
        offsets[i] = at;
        peak = peak.max(at + sizes[i]);
        placed.push(i);
    }
    Placement { offsets, peak }
}
