//! Presenting candidates: a markdown table, JSON, and a paragraph on the winner's bottleneck.

use serde_json::{json, Value};

use super::space::Topology;
use super::Candidate;

const GIB: f64 = (1u64 << 30) as f64;

/// The groups of a mapping that cross nodes (InfiniBand), e.g. `dp,edp,pp`, or `-`.
fn inter_node(t: &Topology) -> String {
    let spans = [("tp", t.tp), ("cp", t.cp), ("ep", t.ep), ("etp", t.etp), ("dp", t.dp_cp), ("edp", t.edp), ("pp", t.pp)];
    let names: Vec<&str> = spans.iter().filter(|(_, s)| s.size > 1 && !s.intra_node()).map(|(n, _)| *n).collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// The step-time parts, largest first, with their names.
fn parts(c: &Candidate) -> Vec<(&'static str, f64)> {
    let t = &c.time;
    let mut p = vec![
        ("compute", t.compute),
        ("recompute", t.recompute),
        ("TP communication", t.tp),
        ("CP communication", t.cp),
        ("EP all-to-all", t.ep),
        ("DP gradient reduction", t.dp),
        ("PP transfers", t.pp),
        ("pipeline bubble", t.bubble),
        ("optimizer step", t.optimizer),
    ];
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    p
}

/// The largest cost other than useful compute.
fn bottleneck(c: &Candidate) -> (&'static str, f64) {
    parts(c).into_iter().find(|(n, _)| *n != "compute").unwrap_or(("none", 0.0))
}

/// The first `top` candidates as a markdown table.
pub fn render_table(candidates: &[Candidate], top: usize) -> String {
    let mut s = String::from(
        "| # | TP | CP | PP | VP | EP | ETP | DP | EDP | mb | activations | MFU | tok/s/GPU | mem GiB | step s | over IB | top overhead |\n\
         |---|----|----|----|----|----|-----|----|-----|----|-------------|-----|-----------|---------|--------|---------|--------------|\n",
    );
    for (i, c) in candidates.iter().take(top).enumerate() {
        let m = &c.mapping;
        let (what, secs) = bottleneck(c);
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {:.0} | {:.1} | {:.2} | {} | {} {:.0}% |\n",
            i + 1,
            m.tp,
            m.cp,
            m.pp,
            m.vp,
            m.ep,
            m.etp,
            m.dp,
            m.edp,
            m.micro_batch,
            c.policy.label(),
            100.0 * c.mfu,
            c.tokens_per_s_per_gpu,
            c.memory.total / GIB,
            c.time.step,
            inter_node(&c.topology),
            what,
            100.0 * secs / c.time.step,
        );
    }
    s
}

/// The first `top` candidates as JSON: mapping, links, policy, memory (bytes), time (seconds).
pub fn to_json(candidates: &[Candidate], top: usize) -> Value {
    let rows: Vec<Value> = candidates
        .iter()
        .take(top)
        .map(|c| {
            json!({
                "mapping": c.mapping,
                "topology": c.topology,
                "inter_node": inter_node(&c.topology),
                "policy": c.policy,
                "mfu": c.mfu,
                "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu,
                "memory": c.memory,
                "time": c.time,
            })
        })
        .collect();
    Value::Array(rows)
}

/// A few sentences on where a candidate's step goes and what limits it.
pub fn explain(c: &Candidate) -> String {
    let step = c.time.step;
    let breakdown: Vec<String> = parts(c)
        .into_iter()
        .filter(|(_, t)| *t > 0.0005 * step)
        .map(|(n, t)| format!("{n} {:.1}%", 100.0 * t / step))
        .collect();
    let (what, secs) = bottleneck(c);
    let t = &c.topology;
    let why = match what {
        "EP all-to-all" if !t.ep.intra_node() => {
            format!("the EP group ({} GPUs) spans {} nodes, so the all-to-all runs over InfiniBand", t.ep.size, t.ep.nodes)
        }
        "EP all-to-all" => format!("the EP all-to-all over {} GPUs stays on NVLink but is not overlapped", t.ep.size),
        "TP communication" => format!(
            "TP {} adds two all-gathers and two reduce-scatters per block per pass, none overlapped{}",
            t.tp.size,
            if t.tp.intra_node() { "" } else { ", across nodes" }
        ),
        "pipeline bubble" => format!(
            "PP {} with VP {} idles (PP−1)/VP micro-batch times in fill and drain",
            c.mapping.pp, c.mapping.vp
        ),
        "recompute" => format!("activations do not fit with `keep`, so the backward recomputes ({})", c.policy.label()),
        "DP gradient reduction" => "the gradient reduce-scatter outlasts the last backward it hides under".to_string(),
        "CP communication" => "the KV ring of context parallelism outlasts the attention it hides under".to_string(),
        _ => "compute dominates; the remaining overheads are small".to_string(),
    };
    format!(
        "{} with {}: {:.1}% MFU, {:.0} tokens/s/GPU, {:.1} of {:.1} GiB. Step {:.2} s: {}. \
         Largest overhead: {} ({:.0}% of the step): {}. Groups over InfiniBand: {}.",
        c.mapping.label(),
        c.policy.label(),
        100.0 * c.mfu,
        c.tokens_per_s_per_gpu,
        c.memory.total / GIB,
        c.memory.capacity / GIB,
        step,
        breakdown.join(", "),
        what,
        100.0 * secs / step,
        why,
        inter_node(t),
    )
}
