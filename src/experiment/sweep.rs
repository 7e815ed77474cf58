//! Runs every (variant, seed) of the HMoE experiment at one FLOP budget and collects what the
//! report needs from each run's summary and `metrics.jsonl`.
//!
//! Runs share one tokenized-data cache (`OUT/data`), so the BPE is trained once and every
//! variant sees the same tokens. A finished run leaves `result.json`; a sweep started again
//! with the same budget skips finished runs, so an interrupted sweep resumes where it stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::variants::Variant;
use crate::backend::cpu::Cpu;
use crate::backend::AttnShape;
use crate::config::Config;
use crate::model::Model;
use crate::parallel::comm::SingleProcess;
use crate::train::metrics::{self, Record};
use crate::train::trainer::{self, TrainOptions};
use crate::{Error, Result};

/// What to run.
pub struct SweepOptions {
    pub out: PathBuf,
    /// The base model every variant starts from (e.g. `configs/hmoe-sweep.toml`).
    pub base: Config,
    pub variants: Vec<Variant>,
    pub seeds: Vec<u64>,
    /// FLOP budget of every run (`train.max_flops`).
    pub max_flops: f64,
    /// Evaluations per run, spread evenly over the budget (the last one at the end).
    pub evals: usize,
}

/// One finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub expert_widths: Vec<usize>,
    pub max_flops: f64,
    /// Final validation loss on the combined split.
    pub val_loss: f64,
    /// Final validation loss per source (e.g. austen, kjv).
    pub val_sources: Vec<(String, f64)>,
    /// Cumulative counted training FLOPs.
    pub flops: f64,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub total_params: usize,
    /// Activated parameters per token, averaged over every training step.
    pub activated_params: f64,
    /// The same over the last tenth of training (routing drifts, e.g. under P-Penalty).
    #[serde(default)]
    pub activated_params_end: f64,
    /// (cumulative FLOPs, validation loss) at each evaluation.
    pub curve: Vec<(f64, f64)>,
    /// Per layer: share of tokens that activate each expert, over the last tenth of training.
    pub shares: Vec<Vec<f64>>,
    pub dir: PathBuf,
}

/// Greatest common divisor, for recovering the width granule of the base layout.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The config of one run: base + variant + seed + budget + constant schedule.
pub fn run_config(base: &Config, variant: &Variant, seed: u64, max_flops: f64, evals: usize) -> Result<Config> {
    let widths = &base.moe.expert_widths;
    if widths.len() < 2 {
        return Err(Error::config("moe.expert_widths", format!("{widths:?}"), "at least 2 experts in the experiment's base model"));
    }
    let granule = widths.iter().copied().fold(0, gcd);
    let mut set = variant.overrides(widths.len(), widths.iter().sum(), granule);
    set.extend([format!("train.seed={seed}"), format!("train.max_flops={max_flops:e}"), "train.schedule=\"constant\"".into()]);
    let config = Config::from_toml_str(&base.to_toml()?, &format!("experiment base + {}", variant.name), &set)?;
    let every = (estimated_steps(&config, variant)? / evals.max(1) as f64).ceil().max(1.0) as u64;
    Config::from_toml_str(&config.to_toml()?, &format!("experiment base + {}", variant.name), &[format!("train.eval_every={every}")])
}

/// Steps the budget buys if each token uses `expected_k` experts spread evenly.
fn estimated_steps(config: &Config, variant: &Variant) -> Result<f64> {
    let be = Cpu::new(1);
    let model = Model::new(&be, config.model.clone(), config.moe.clone(), 0)?;
    let t = &config.train;
    let shape = AttnShape { batch: t.batch_size, seq: t.seq_len, n_heads: config.model.n_heads, n_kv_heads: config.model.n_kv_heads, head_dim: config.model.head_dim() };
    let n = config.moe.n_experts();
    let per_expert = (shape.tokens() as f64 * variant.expected_k() / n as f64).round() as usize;
    let counts = vec![vec![per_expert; n]; config.model.n_layers];
    Ok(config.train.max_flops / (3.0 * model.forward_flops(shape, &counts)))
}

/// Runs (or reuses) every run of the sweep, reporting one line per run on stderr.
pub fn run(opts: &SweepOptions) -> Result<Vec<RunResult>> {
    if opts.variants.is_empty() || opts.seeds.is_empty() {
        return Err(Error::Invalid("experiment: give at least one variant and one seed".into()));
    }
    if !(opts.max_flops.is_finite() && opts.max_flops > 0.0) {
        return Err(Error::config("--max-flops", opts.max_flops, "a positive FLOP budget"));
    }
    let data_cache = opts.out.join("data");
    let total = opts.variants.len() * opts.seeds.len();
    let mut results = Vec::with_capacity(total);
    for variant in &opts.variants {
        for &seed in &opts.seeds {
            let dir = opts.out.join("runs").join(format!("{}-s{seed}", variant.name));
            let result = match reuse(&dir, opts.max_flops)? {
                Some(r) => r,
                None => {
                    if dir.exists() {
                        // An earlier sweep stopped inside this run; it saves only at the end, so start over.
                        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    }
                    let config = run_config(&opts.base, variant, seed, opts.max_flops, opts.evals)?;
                    let train_opts = TrainOptions { out: dir.clone(), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: Some(data_cache.clone()) };
                    let summary = trainer::train(&config, &train_opts, &SingleProcess)?;
                    let r = collect(&dir, variant, seed, &config, &summary)?;
                    let path = dir.join("result.json");
                    let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
                    r
                }
            };
            let sources: String = result.val_sources.iter().map(|(n, l)| format!(", {n} {l:.4}")).collect();
            eprintln!(
                "[{}/{total}] {} seed {seed}: val {:.4}{sources}; {:.3e} FLOPs, {} steps, {:.0} activated params/token, {:.0} s",
                results.len() + 1,
                variant.name,
                result.val_loss,
                result.flops,
                result.steps,
                result.activated_params,
                result.seconds
            );
            results.push(result);
        }
    }
    Ok(results)
}

/// A finished run's result when it was made with the same budget. What comes from
/// `metrics.jsonl` is read again, so a newer analysis applies to runs made before it.
fn reuse(dir: &Path, max_flops: f64) -> Result<Option<RunResult>> {
    let path = dir.join("result.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut r: RunResult = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?;
    if r.max_flops != max_flops {
        return Err(Error::Invalid(format!(
            "{}: made with a budget of {:.3e} FLOPs, not {max_flops:.3e}; use another --out",
            path.display(),
            r.max_flops
        )));
    }
    let config = Config::load(Some(&dir.join("config.toml")), &[])?;
    let m = from_metrics(dir, &config)?;
    (r.curve, r.activated_params, r.activated_params_end, r.shares) = (m.curve, m.activated_params, m.activated_params_end, m.shares);
    Ok(Some(r))
}

/// What a run's `metrics.jsonl` says beyond its summary.
struct FromMetrics {
    curve: Vec<(f64, f64)>,
    activated_params: f64,
    activated_params_end: f64,
    shares: Vec<Vec<f64>>,
}

/// Curve, activated parameters and expert shares from the run's metrics file.
fn from_metrics(dir: &Path, config: &Config) -> Result<FromMetrics> {
    let path = dir.join("metrics.jsonl");
    let records = metrics::read(&path)?;
    let train: Vec<_> = records.iter().filter_map(|r| if let Record::Train(t) = r { Some(t) } else { None }).collect();
    let curve = records
        .iter()
        .filter_map(|r| if let Record::Eval(e) = r { Some(e) } else { None })
        .map(|e| e.extra.get("flops").and_then(|v| v.as_f64()).map(|f| (f, f64::from(e.val_loss))))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::bad_file(&path, "an eval record has no `flops`"))?;
    if train.is_empty() {
        return Err(Error::bad_file(&path, "no training records"));
    }
    let activated_params = train.iter().map(|t| t.activated_params).sum::<f64>() / train.len() as f64;
    let tail = &train[train.len() - (train.len() / 10).max(1)..];
    let activated_params_end = tail.iter().map(|t| t.activated_params).sum::<f64>() / tail.len() as f64;
    let t = &config.train;
    let tokens_per_step = (t.batch_size * t.seq_len) as f64;
    let mut shares = vec![vec![0.0; config.moe.n_experts()]; config.model.n_layers];
    for rec in tail {
        let counts: Vec<Vec<f64>> = rec
            .extra
            .get("expert_counts")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| Error::bad_file(&path, format!("step {}: no readable `expert_counts`", rec.step)))?;
        for (layer, row) in shares.iter_mut().zip(&counts) {
            for (s, c) in layer.iter_mut().zip(row) {
                *s += c / tokens_per_step / tail.len() as f64;
            }
        }
    }
    Ok(FromMetrics { curve, activated_params, activated_params_end, shares })
}

/// The run's result from its summary and metrics file.
fn collect(dir: &Path, variant: &Variant, seed: u64, config: &Config, summary: &trainer::TrainSummary) -> Result<RunResult> {
    let m = from_metrics(dir, config)?;
    let t = &config.train;
    let tokens_per_step = (t.batch_size * t.seq_len) as u64;
    Ok(RunResult {
        variant: variant.name.to_string(),
        seed,
        expert_widths: config.moe.expert_widths.clone(),
        max_flops: t.max_flops,
        val_loss: summary.val_loss.unwrap_or(f64::NAN),
        val_sources: summary.val_sources.clone(),
        flops: summary.flops,
        steps: summary.steps,
        tokens: summary.steps * tokens_per_step,
        seconds: summary.seconds,
        total_params: crate::model::params::ParamLayout::new(&config.model, &config.moe).total,
        activated_params: m.activated_params,
        activated_params_end: m.activated_params_end,
        curve: m.curve,
        shares: m.shares,
        dir: dir.to_path_buf(),
    })
}
