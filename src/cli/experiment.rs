//! `motley experiment hmoe` and `motley routes`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::experiment::routes::{self, RoutesOptions};
use crate::experiment::{report, sweep, variants};
use crate::Result;

/// The sweep's base model, compiled in like `configs/tiny.toml`.
const SWEEP_TOML: &str = include_str!("../../configs/hmoe-sweep.toml");

#[derive(Subcommand)]
pub enum Experiment {
    /// Dense vs homogeneous MoE vs heterogeneous MoE (Top-K, Top-P, P-Penalty, no aux) at equal
    /// training FLOPs on Austen + KJV; writes results.md, results.json and PNGs into --out.
    Hmoe(HmoeArgs),
}

#[derive(Args)]
pub struct HmoeArgs {
    #[arg(long)]
    out: PathBuf,
    /// Base model (default: the embedded configs/hmoe-sweep.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a base-config field (repeatable), e.g. `--set model.n_layers=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Comma-separated variants (default: all eight).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Comma-separated seeds.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2])]
    seeds: Vec<u64>,
    /// Training FLOPs per run (the default makes the 16-run sweep take about an hour on 2 cores).
    #[arg(long, default_value_t = 4e12)]
    max_flops: f64,
    /// Validation evaluations per run.
    #[arg(long, default_value_t = 8)]
    evals: usize,
}

#[derive(Args)]
pub struct RoutesArgs {
    /// A checkpoint directory or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory (default: RUN/routes).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tokenized-data cache of the run (default: RUN/data; experiment runs use OUT/data).
    #[arg(long)]
    data_cache: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    batches: usize,
    /// Tokens listed for the smallest and largest expert.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

pub fn run_experiment(which: Experiment) -> Result<()> {
    let Experiment::Hmoe(a) = which;
    let base = match &a.config {
        Some(path) => Config::load(Some(path), &a.set)?,
        None => Config::from_toml_str(SWEEP_TOML, "configs/hmoe-sweep.toml (embedded)", &a.set)?,
    };
    let variants = if a.variants.is_empty() { variants::all() } else { variants::select(&a.variants)? };
    let opts = sweep::SweepOptions { out: a.out.clone(), base, variants, seeds: a.seeds.clone(), max_flops: a.max_flops, evals: a.evals };
    let started = std::time::Instant::now();
    let results = sweep::run(&opts)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    report::write(&a.out, &report::header(&opts, &command), &opts.variants, &results)?;
    println!("{} runs in {:.0} s; table {}", results.len(), started.elapsed().as_secs_f64(), a.out.join("results.md").display());
    Ok(())
}

pub fn run_routes(a: RoutesArgs) -> Result<()> {
    let opts = RoutesOptions { checkpoint: a.checkpoint, out: a.out, data_cache: a.data_cache, batches: a.batches, top: a.top };
    let (r, out) = routes::analyze(&opts)?;
    println!("{} tokens routed; activated params/token {:.0}", r.tokens, r.activated_params_per_token);
    for l in &r.layers {
        let shares: Vec<String> = l.share.iter().map(|s| format!("{s:.2}")).collect();
        println!("layer {}: experts/token {:.2}, expert params/token {:.0}, shares [{}]", l.layer, l.mean_experts_per_token, l.expert_params_per_token, shares.join(" "));
    }
    for side in &r.all_layers {
        let words: Vec<String> = side.most_frequent.iter().map(|t| format!("{:?}", t.text)).collect();
        println!("expert {} (width {}), most frequent: {}", side.expert, side.width, words.join(" "));
    }
    println!("written: {}", out.display());
    Ok(())
}
