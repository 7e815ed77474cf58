//! The experiment's outputs: `results.md` (the table), `results.json` (every run),
//! `loss_vs_flops.png` and one `shares_<variant>.png` per MoE variant.

use std::path::Path;

use super::sweep::{RunResult, SweepOptions};
use super::variants::Variant;
use crate::train::plot::{self, BarGroup, Chart, Series};
use crate::{Error, Result};

/// One variant's runs, summarised over seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub variant: String,
    pub about: String,
    pub seeds: usize,
    pub val_mean: f64,
    /// Half the range (max − min) of the seeds' validation losses.
    pub val_spread: f64,
    /// Mean validation loss per source.
    pub sources: Vec<(String, f64)>,
    pub activated_params: f64,
    pub activated_params_end: f64,
    pub total_params: usize,
    pub flops: f64,
    pub steps: f64,
    pub tokens: f64,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// One row per variant (in `variants` order) that has runs.
pub fn rows(variants: &[Variant], results: &[RunResult]) -> Vec<Row> {
    variants
        .iter()
        .filter_map(|v| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == v.name).collect();
            let first = runs.first()?;
            let vals = || runs.iter().map(|r| r.val_loss);
            let (lo, hi) = vals().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
            let sources = first.val_sources.iter().enumerate().map(|(i, (name, _))| (name.clone(), mean(runs.iter().map(|r| r.val_sources[i].1)))).collect();
            Some(Row {
                variant: v.name.to_string(),
                about: v.about.to_string(),
                seeds: runs.len(),
                val_mean: mean(vals()),
                val_spread: (hi - lo) / 2.0,
                sources,
                activated_params: mean(runs.iter().map(|r| r.activated_params)),
                activated_params_end: mean(runs.iter().map(|r| r.activated_params_end)),
                total_params: first.total_params,
                flops: mean(runs.iter().map(|r| r.flops)),
                steps: mean(runs.iter().map(|r| r.steps as f64)),
                tokens: mean(runs.iter().map(|r| r.tokens as f64)),
            })
        })
        .collect()
}

/// `1234567` → `1.23M`.
fn si(x: f64) -> String {
    match x.abs() {
        a if a >= 1e12 => format!("{:.2}T", x / 1e12),
        a if a >= 1e9 => format!("{:.2}G", x / 1e9),
        a if a >= 1e6 => format!("{:.2}M", x / 1e6),
        a if a >= 1e3 => format!("{:.1}k", x / 1e3),
        _ => format!("{x:.0}"),
    }
}

/// The markdown table; Δ is against `moe-top2` when that variant ran.
pub fn table(rows: &[Row]) -> String {
    let baseline = rows.iter().find(|r| r.variant == "moe-top2").map(|r| r.val_mean);
    let source_names: Vec<String> = rows.first().map(|r| r.sources.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
    let mut s = String::from("| variant | routing and losses | seeds | val loss (mean ± ½ range) |");
    for n in &source_names {
        s += &format!(" {n} val |");
    }
    s += " Δ vs moe-top2 | activated params/token (mean) | (last tenth) | total params | FLOPs | steps | tokens |\n|---|---|---|---|";
    s += &"---|".repeat(source_names.len());
    s += "---|---|---|---|---|---|---|\n";
    for r in rows {
        s += &format!("| {} | {} | {} | {:.4} ± {:.4} |", r.variant, r.about, r.seeds, r.val_mean, r.val_spread);
        for (_, v) in &r.sources {
            s += &format!(" {v:.4} |");
        }
        let delta = baseline.map_or("–".to_string(), |b| format!("{:+.4}", r.val_mean - b));
        s += &format!(" {delta} | {} | {} | {} | {:.3e} | {:.0} | {} |\n", si(r.activated_params), si(r.activated_params_end), si(r.total_params as f64), r.flops, r.steps, si(r.tokens));
    }
    s
}

/// The conditions above the table: command, base model, budget, data, what the columns mean.
pub fn header(opts: &SweepOptions, command: &str) -> String {
    let (m, t, d) = (&opts.base.model, &opts.base.train, &opts.base.data);
    let widths = &opts.base.moe.expert_widths;
    format!(
        "# HMoE experiment\n\n`{command}`\n\n\
         - base model: {} layers, d_model {}, {} heads, vocab {} ({} tokenizer), context {}; {} experts per layer, total expert width {} (HMoE widths {:?})\n\
         - data: `{}` (validation: last {:.0}% of each source); batch {} × {} tokens; AdamW lr {} constant after {} warm-up steps, weight decay {}\n\
         - every run stops when its cumulative counted training FLOPs (3 × forward matmul + attention FLOPs, experts counted by the tokens actually routed to them) reach {:.3e}\n\
         - seeds {:?} (seed changes init and batch order); val loss: {} fixed validation batches per split at the end; ± is half the range over seeds\n\
         - activated params/token: everything a token uses except the embedding table (attention, routers, chosen experts, head), averaged over all training steps and over the last tenth of them\n",
        m.n_layers, m.d_model, m.n_heads, m.vocab_size, d.tokenizer, t.seq_len, widths.len(), widths.iter().sum::<usize>(), widths,
        d.corpus, d.val_fraction * 100.0, t.batch_size, t.seq_len, t.lr, t.warmup_steps, t.weight_decay,
        opts.max_flops,
        opts.seeds, t.eval_batches,
    )
}

/// Writes every output into `out`; `header` (conditions, command) goes above the table.
pub fn write(out: &Path, header: &str, variants: &[Variant], results: &[RunResult]) -> Result<()> {
    let rows = rows(variants, results);
    let md = format!("{header}\n{}", table(&rows));
    let path = out.join("results.md");
    std::fs::write(&path, md).map_err(|e| Error::io(&path, e))?;
    let path = out.join("results.json");
    let json = serde_json::to_string_pretty(results).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    loss_vs_flops(&out.join("loss_vs_flops.png"), variants, results)?;
    for v in variants {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == v.name).collect();
        if runs.first().is_some_and(|r| r.expert_widths.len() > 1) {
            shares(&out.join(format!("shares_{}.png", v.name)), v.name, &runs)?;
        }
    }
    Ok(())
}

/// Validation loss against cumulative FLOPs, one line per variant: the seeds' curves averaged
/// point by point (evaluation i of every seed; FLOPs of the same evaluation differ between seeds
/// only through routing). The first evaluation is left out so the y axis shows the differences
/// that matter rather than the initial drop.
fn loss_vs_flops(path: &Path, variants: &[Variant], results: &[RunResult]) -> Result<()> {
    let series: Vec<Series> = variants
        .iter()
        .filter_map(|v| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == v.name).collect();
            let len = runs.iter().map(|r| r.curve.len()).min()?;
            let points = (1.min(len.saturating_sub(1))..len)
                .map(|i| (mean(runs.iter().map(|r| r.curve[i].0)), mean(runs.iter().map(|r| r.curve[i].1))))
                .collect();
            Some(Series { name: v.name.to_string(), points })
        })
        .collect();
    // Axis ticks print whole numbers in full, so FLOPs are shown in units of a power of ten.
    let top = series.iter().flat_map(|s| &s.points).map(|p| p.0).fold(1.0f64, f64::max);
    let exponent = top.log10().floor() as i32;
    let scale = 10f64.powi(exponent);
    let series: Vec<Series> = series.into_iter().map(|s| Series { points: s.points.iter().map(|&(x, y)| (x / scale, y)).collect(), ..s }).collect();
    let x_label = format!("cumulative training FLOPs (× 1e{exponent})");
    let chart = Chart { title: "Validation loss at equal training FLOPs (mean over seeds)", x_label: &x_label, y_label: "val loss (nats/token)", size: (900, 560) };
    plot::line_chart(path, &chart, &series)
}

/// Share of tokens per expert, one bar group per layer (mean over seeds, last tenth of training).
fn shares(path: &Path, name: &str, runs: &[&RunResult]) -> Result<()> {
    let widths = &runs[0].expert_widths;
    let categories: Vec<String> = widths.iter().enumerate().map(|(i, w)| format!("e{i} ({w})")).collect();
    let groups: Vec<BarGroup> = (0..runs[0].shares.len())
        .map(|l| BarGroup { name: format!("layer {l}"), values: (0..widths.len()).map(|e| mean(runs.iter().map(|r| r.shares[l][e]))).collect() })
        .collect();
    let title = format!("{name}: share of tokens per expert (width)");
    let chart = Chart { title: &title, x_label: "expert (hidden width)", y_label: "share of tokens", size: (800, 420) };
    plot::bar_chart(path, &chart, &categories, &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(variant: &str, seed: u64, val: f64) -> RunResult {
        RunResult {
            variant: variant.into(),
            seed,
            expert_widths: vec![8, 24],
            max_flops: 1e9,
            val_loss: val,
            val_sources: vec![("austen".into(), val + 0.1), ("kjv".into(), val - 0.1)],
            flops: 1.01e9,
            steps: 10,
            tokens: 640,
            seconds: 1.0,
            total_params: 1000,
            activated_params: 500.0,
            activated_params_end: 450.0,
            curve: vec![(1e8, 5.0), (5e8, val + 0.2), (1.01e9, val)],
            shares: vec![vec![0.7, 0.3]],
            dir: "x".into(),
        }
    }

    #[test]
    fn rows_average_seeds_and_table_shows_delta() {
        let vs = super::super::variants::select(&["moe-top2".into(), "hmoe-top2".into()]).unwrap();
        let rs = [run("moe-top2", 1, 3.0), run("moe-top2", 2, 3.2), run("hmoe-top2", 1, 2.9)];
        let rows = rows(&vs, &rs);
        assert_eq!(rows.len(), 2);
        assert!((rows[0].val_mean - 3.1).abs() < 1e-12 && (rows[0].val_spread - 0.1).abs() < 1e-12);
        assert!((rows[0].sources[0].1 - 3.2).abs() < 1e-12);
        let t = table(&rows);
        assert!(t.contains("| austen val | kjv val |"), "{t}");
        assert!(t.contains("-0.2000"), "{t}");
        assert_eq!(t.lines().count(), 4);
    }
}
