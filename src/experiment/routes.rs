//! `motley routes`: how a trained model routes. Per layer: the share of tokens each expert
//! receives, mean experts per token (varies under Top-P), activated parameters per token; the
//! tokens most often sent to the smallest and largest experts (the HMoE paper's Table 3); and
//! activated parameters per token over training, from the run's `metrics.jsonl`.
//!
//! Routing is read from the activation store after `Model::forward_saving` on the run's
//! validation split, so it is exactly the routing the training forward would use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::cpu::Cpu;
use crate::data::loader::Loader;
use crate::data::prepare::prepare;
use crate::data::shard::Shard;
use crate::data::tokenizer::Tokenizer;
use crate::train::metrics::{self, Record};
use crate::train::plot::{self, BarGroup, Chart, Series};
use crate::train::trainer;
use crate::{Error, Result};

/// Seed of the analysis loader: the same batches every time.
const SEED: u64 = 0x0007_07e5;
/// A token must occur this often to be ranked by how specifically it goes to an expert.
const MIN_OCCURRENCES: usize = 20;

/// What to analyse.
pub struct RoutesOptions {
    /// A checkpoint directory or a run directory (its latest checkpoint).
    pub checkpoint: PathBuf,
    /// Output directory (default `RUN/routes`).
    pub out: Option<PathBuf>,
    /// Tokenized-data cache (default `RUN/data`; an experiment's runs share `OUT/data`).
    pub data_cache: Option<PathBuf>,
    /// Validation batches to route.
    pub batches: usize,
    /// Tokens listed per expert.
    pub top: usize,
}

/// A token and how often it went to one expert.
#[derive(Clone, Debug, Serialize)]
pub struct TokenCount {
    pub id: u32,
    pub text: String,
    /// Times (summed over the layers counted) this token was routed to the expert.
    pub routed: usize,
    /// Times it occurred (times the layers counted).
    pub occurrences: usize,
    /// `routed / occurrences`.
    pub fraction: f64,
}

/// The tokens of one expert: by count, and by the fraction of their occurrences it receives.
#[derive(Clone, Debug, Serialize)]
pub struct ExpertTokens {
    pub expert: usize,
    pub width: usize,
    pub most_frequent: Vec<TokenCount>,
    /// Among tokens occurring at least `MIN_OCCURRENCES` times.
    pub most_specific: Vec<TokenCount>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerRoutes {
    pub layer: usize,
    /// Share of tokens that activate each expert (sums to the mean experts per token).
    pub share: Vec<f64>,
    pub mean_experts_per_token: f64,
    /// Expert parameters a token activates in this layer, on average.
    pub expert_params_per_token: f64,
    pub smallest: ExpertTokens,
    pub largest: ExpertTokens,
}

/// Activated parameters per token at one training step.
#[derive(Clone, Debug, Serialize)]
pub struct TrainingPoint {
    pub step: u64,
    /// Whole model (what the trainer logged).
    pub activated_params: f64,
    /// Expert parameters per layer, from the logged tokens per expert.
    pub expert_params_per_layer: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Routes {
    pub checkpoint: PathBuf,
    pub expert_widths: Vec<usize>,
    pub tokens: usize,
    /// Whole model, on the analysed tokens.
    pub activated_params_per_token: f64,
    pub layers: Vec<LayerRoutes>,
    /// Smallest and largest expert with counts summed over every layer.
    pub all_layers: [ExpertTokens; 2],
    /// Empty when the run directory has no `metrics.jsonl`.
    pub over_training: Vec<TrainingPoint>,
}

/// Token counts of one expert (id → routed) plus occurrences (id → count).
struct Tally<'a> {
    tokenizer: &'a Tokenizer,
    occurrences: &'a HashMap<u32, usize>,
    /// Layers the counts are summed over (occurrences are per layer).
    layers: usize,
    top: usize,
}

impl Tally<'_> {
    fn expert(&self, expert: usize, width: usize, routed: &HashMap<u32, usize>) -> ExpertTokens {
        let mut all: Vec<TokenCount> = routed
            .iter()
            .map(|(&id, &n)| {
                let occ = self.occurrences.get(&id).copied().unwrap_or(0) * self.layers;
                let text = self.tokenizer.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));
                TokenCount { id, text, routed: n, occurrences: occ, fraction: n as f64 / occ.max(1) as f64 }
            })
            .collect();
        all.sort_by(|a, b| b.routed.cmp(&a.routed).then(a.id.cmp(&b.id)));
        let most_frequent = all.iter().take(self.top).cloned().collect();
        let mut specific: Vec<TokenCount> = all.into_iter().filter(|t| t.occurrences >= MIN_OCCURRENCES * self.layers).collect();
        specific.sort_by(|a, b| b.fraction.total_cmp(&a.fraction).then(b.routed.cmp(&a.routed)).then(a.id.cmp(&b.id)));
        specific.truncate(self.top);
        ExpertTokens { expert, width, most_frequent, most_specific: specific }
    }
}

/// `RUN/checkpoints/step_N` → `RUN`; a run directory stays itself.
fn run_dir(path: &Path, checkpoint: &Path) -> PathBuf {
    if path.join("metrics.jsonl").is_file() {
        return path.to_path_buf();
    }
    checkpoint.parent().and_then(Path::parent).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// Analyses the checkpoint and writes `routes.json`, `routes_shares.png` and (with metrics)
/// `routes_activated.png` into the output directory, which it returns with the analysis.
pub fn analyze(opts: &RoutesOptions) -> Result<(Routes, PathBuf)> {
    if opts.batches == 0 || opts.top == 0 {
        return Err(Error::Invalid("routes: --batches and --top must be positive".into()));
    }
    let be = Cpu::new(0);
    let (model, config, tokenizer, dir) = trainer::load_checkpoint(&opts.checkpoint, &be)?;
    let run = run_dir(&opts.checkpoint, &dir);
    let out = opts.out.clone().unwrap_or_else(|| run.join("routes"));
    let cache = opts.data_cache.clone().unwrap_or_else(|| run.join("data"));
    let val = prepare(&config, &cache)?.val;
    let t = &config.train;
    let mut loader = Loader::new(Shard::open(&val)?, t.batch_size, t.seq_len, SEED)?;
    let batches = opts.batches.min(loader.sequences_per_epoch() / t.batch_size).max(1);

    let widths = &config.moe.expert_widths;
    let (e, n_layers, c) = (widths.len(), config.model.n_layers, config.model.d_model);
    let smallest = (0..e).min_by_key(|&i| (widths[i], i)).expect("a model has experts");
    let largest = (0..e).max_by_key(|&i| (widths[i], usize::MAX - i)).expect("a model has experts");
    let mut counts = vec![vec![0usize; e]; n_layers];
    let mut routed: Vec<[HashMap<u32, usize>; 2]> = vec![Default::default(); n_layers];
    let mut occurrences: HashMap<u32, usize> = HashMap::new();
    let mut store = model.new_store();
    let (mut tokens, mut expert_params, mut dense_params) = (0usize, 0.0, 0.0);
    for b in 0..batches {
        let batch = loader.next_batch();
        let stats = model.forward_saving(&be, &mut store, &batch.inputs, t.batch_size, t.seq_len)?;
        if b == 0 {
            // forward_saving counts expert parameters only; the difference is the dense part.
            dense_params = model.evaluate(&be, &batch.inputs, &batch.targets, t.batch_size, t.seq_len)?.activated_params - stats.activated_params;
        }
        expert_params += stats.activated_params * batch.inputs.len() as f64;
        tokens += batch.inputs.len();
        for &id in &batch.inputs {
            *occurrences.entry(id).or_default() += 1;
        }
        for l in 0..n_layers {
            let routing = store.routing(l);
            for (x, k) in counts[l].iter_mut().zip(routing.counts()) {
                *x += k;
            }
            for (side, expert) in [smallest, largest].into_iter().enumerate() {
                for slot in routing.slots_of(expert) {
                    *routed[l][side].entry(batch.inputs[routing.token[slot] as usize]).or_default() += 1;
                }
            }
            store.release(l);
        }
    }

    let tally = |layers| Tally { tokenizer: &tokenizer, occurrences: &occurrences, layers, top: opts.top };
    let layers: Vec<LayerRoutes> = (0..n_layers)
        .map(|l| {
            let share: Vec<f64> = counts[l].iter().map(|&k| k as f64 / tokens as f64).collect();
            let params = counts[l].iter().zip(widths).map(|(&k, &h)| (k * 3 * c * h) as f64).sum::<f64>() / tokens as f64;
            LayerRoutes {
                layer: l,
                mean_experts_per_token: share.iter().sum(),
                share,
                expert_params_per_token: params,
                smallest: tally(1).expert(smallest, widths[smallest], &routed[l][0]),
                largest: tally(1).expert(largest, widths[largest], &routed[l][1]),
            }
        })
        .collect();
    let sum_layers = |side: usize| {
        let mut total: HashMap<u32, usize> = HashMap::new();
        for r in &routed {
            for (&id, &n) in &r[side] {
                *total.entry(id).or_default() += n;
            }
        }
        total
    };
    let all_layers = [tally(n_layers).expert(smallest, widths[smallest], &sum_layers(0)), tally(n_layers).expert(largest, widths[largest], &sum_layers(1))];
    let metrics_path = run.join("metrics.jsonl");
    let over_training = if metrics_path.is_file() { training_points(&metrics_path, widths, c, t.batch_size * t.seq_len)? } else { Vec::new() };
    let routes = Routes {
        checkpoint: dir,
        expert_widths: widths.clone(),
        tokens,
        activated_params_per_token: dense_params + expert_params / tokens as f64,
        layers,
        all_layers,
        over_training,
    };
    write(&out, &routes)?;
    Ok((routes, out))
}

/// Activated parameters per token at (at most 200 evenly spaced) logged training steps.
fn training_points(path: &Path, widths: &[usize], c: usize, tokens_per_step: usize) -> Result<Vec<TrainingPoint>> {
    let train: Vec<_> = metrics::read(path)?.into_iter().filter_map(|r| if let Record::Train(t) = r { Some(t) } else { None }).collect();
    let stride = train.len().div_ceil(200).max(1);
    train
        .iter()
        .enumerate()
        .filter(|(i, _)| i % stride == 0 || *i + 1 == train.len())
        .map(|(_, rec)| {
            let counts: Vec<Vec<usize>> = rec
                .extra
                .get("expert_counts")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .ok_or_else(|| Error::bad_file(path, format!("step {}: no readable `expert_counts`", rec.step)))?;
            let per_layer = counts
                .iter()
                .map(|row| row.iter().zip(widths).map(|(&k, &h)| (k * 3 * c * h) as f64).sum::<f64>() / tokens_per_step as f64)
                .collect();
            Ok(TrainingPoint { step: rec.step, activated_params: rec.activated_params, expert_params_per_layer: per_layer })
        })
        .collect()
}

fn write(out: &Path, routes: &Routes) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let path = out.join("routes.json");
    let json = serde_json::to_string_pretty(routes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    let categories: Vec<String> = routes.expert_widths.iter().enumerate().map(|(i, w)| format!("e{i} ({w})")).collect();
    let groups: Vec<BarGroup> = routes.layers.iter().map(|l| BarGroup { name: format!("layer {}", l.layer), values: l.share.clone() }).collect();
    let chart = Chart { title: "Share of tokens per expert (validation split)", x_label: "expert (hidden width)", y_label: "share of tokens", size: (800, 420) };
    plot::bar_chart(&out.join("routes_shares.png"), &chart, &categories, &groups)?;
    if !routes.over_training.is_empty() {
        let n_layers = routes.layers.len();
        let series: Vec<Series> = (0..n_layers)
            .map(|l| Series {
                name: format!("layer {l}"),
                points: routes.over_training.iter().map(|p| (p.step as f64, p.expert_params_per_layer[l] / 1e3)).collect(),
            })
            .collect();
        let chart = Chart { title: "Expert parameters activated per token during training", x_label: "step", y_label: "expert params / token (thousands)", size: (800, 420) };
        plot::line_chart(&out.join("routes_activated.png"), &chart, &series)?;
    }
    Ok(())
}
