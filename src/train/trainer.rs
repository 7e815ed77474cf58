//! The training loop: data → forward/backward → clip → AdamW → metrics, evaluation,
//! checkpoints (atomic, resumable bit for bit), a loss plot and a text sample at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::checkpoint::{self, write_atomic, TensorRef, TrainState};
use super::metrics::{EvalRecord, MetricsWriter, TrainRecord};
use super::optim::{AdamWConfig, Optimizer};
use super::plot;
use super::progress::Progress;
use super::schedule::LrSchedule;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::config::{Config, MemoryConfig, MemoryPolicy};
use crate::memory::alpha::HostLink;
use crate::memory::auto;
use crate::memory::inventory::Slots;
use crate::memory::policy::{build_policy, Profile};
use crate::memory::report::{assumed_flops_per_s, PlanTarget};
use crate::memory::store::{policy_label, ActivationStore, LayerPolicy};
use crate::data::loader::Loader;
use crate::data::prepare::{prepare, Prepared};
use crate::data::shard::Shard;
use crate::data::tokenizer::Tokenizer;
use crate::model::block::GATE_UP;
use crate::model::params::ParamLayout;
use crate::parallel::comm::{Communicator, SingleProcess};
use crate::parallel::dispatch::DispatchMode;
use crate::parallel::sharding::{gather_full, ExpertGroups, GradBuckets};
use crate::model::{Model, StepStats};
use crate::rng::Rng;
use crate::{Error, Result};

/// Seed of the validation loader: every evaluation sees the same batches.
const VAL_SEED: u64 = 0x5eed_0fa1;

/// What `motley train` was asked for beyond the config.
pub struct TrainOptions {
    pub out: PathBuf,
    pub resume: bool,
    /// Text to continue at the end of the run (empty: no sample).
    pub sample_prompt: String,
    pub sample_tokens: usize,
    /// Where tokenized data is cached (default `out/data`): a sweep shares one cache so the
    /// BPE is trained once and every run sees exactly the same tokens.
    pub data_cache: Option<PathBuf>,
}

/// What a finished run reports.
pub struct TrainSummary {
    pub steps: u64,
    pub seconds: f64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    /// Final validation loss of each source of a combined corpus (empty for one source).
    pub val_sources: Vec<(String, f64)>,
    /// Cumulative counted training FLOPs (routed tokens per expert), the budget `max_flops` bounds.
    pub flops: f64,
    pub checkpoint: PathBuf,
    pub sample: Option<String>,
    /// How the ranks' collectives ran: "gradients summed by NCCL … over 4 GPUs; expert-parallel
    /// rows exchanged by NCCL … over 2 GPUs", or "… through host memory over 4 ranks (why)";
    /// empty for one rank.
    pub collectives: String,
}

/// The optimizer's hyper-parameters from `[train]`.
fn adamw_config(c: &Config) -> AdamWConfig {
    let t = &c.train;
    AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay, grad_clip: t.grad_clip }
}

/// Mean validation loss over up to `batches` fixed batches of the validation shard.
pub fn validation_loss<B: Backend>(be: &B, model: &Model<B>, val: &Path, batch: usize, seq: usize, batches: usize) -> Result<f64> {
    data_parallel_validation_loss(be, model, val, (batch, None), seq, batches, &SingleProcess)
}

/// [`validation_loss`] with each batch's rows split over the ranks of `dp` (a collective; every
/// rank gets the mean of the whole batches), each rank's run `micro` rows at a time (`None`:
/// all at once), as training runs them.
fn data_parallel_validation_loss<B: Backend>(be: &B, model: &Model<B>, val: &Path, (batch, micro): (usize, Option<usize>), seq: usize, batches: usize, dp: &dyn Communicator) -> Result<f64> {
    let mut loader = Loader::new(Shard::open(val)?, batch, seq, VAL_SEED)?;
    let n = batches.min(loader.sequences_per_epoch() / batch).max(1);
    let local = batch / dp.size();
    let micro = micro.unwrap_or(local);
    let mut total = 0.0;
    for _ in 0..n {
        let b = loader.next_batch();
        let mut parts = 0.0;
        for row in (dp.rank() * local..(dp.rank() + 1) * local).step_by(micro) {
            let rows = row * seq..(row + micro) * seq;
            parts += model.evaluate(be, &b.inputs[rows.clone()], &b.targets[rows], micro, seq)?.lm_loss;
        }
        total += parts / (local / micro) as f64;
    }
    if dp.size() == 1 {
        return Ok(total / n as f64);
    }
    let mut sum = [total as f32];
    dp.all_reduce_sum(&mut sum)?;
    Ok(sum[0] as f64 / (n * dp.size()) as f64)
}

/// Validation loss on the combined split and on each source's split (same fixed batches
/// every time); the per-source losses are also put into `extra` as `val_<name>`.
fn evaluate_all<B: Backend>(be: &B, model: &Model<B>, data: &Prepared, t: &crate::config::TrainConfig, dp: &dyn Communicator, extra: &mut Map<String, Value>) -> Result<(f64, Vec<(String, f64)>)> {
    let combined = data_parallel_validation_loss(be, model, &data.val, (t.batch_size, t.micro_batch_size), t.seq_len, t.eval_batches, dp)?;
    let mut per_source = Vec::with_capacity(data.val_sources.len());
    for (name, path) in &data.val_sources {
        let v = data_parallel_validation_loss(be, model, path, (t.batch_size, t.micro_batch_size), t.seq_len, t.eval_batches, dp)?;
        extra.insert(format!("val_{name}"), json!(v));
        per_source.push((name.clone(), v));
    }
    Ok((combined, per_source))
}

/// Samples `max_tokens` continuations of `prompt` (temperature, top-k; seeded).
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(be: &B, model: &Model<B>, tokenizer: &Tokenizer, prompt: &str, max_tokens: usize, temperature: f32, top_k: usize, seed: u64) -> Result<String> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt is empty; give some text to continue".into()));
    }
    let start = ids.len();
    let mut rng = Rng::new(seed);
    for _ in 0..max_tokens {
        let logits = model.next_token_logits(be, &ids)?;
        ids.push(sample(&logits, temperature, top_k, &mut rng) as u32);
    }
    tokenizer.decode(&ids[start..])
}

fn sample(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return order[0];
    }
    let keep = if top_k == 0 { logits.len() } else { top_k.min(logits.len()) };
    let top = &order[..keep];
    let max = logits[top[0]];
    let weights: Vec<f64> = top.iter().map(|&i| (((logits[i] - max) / temperature) as f64).exp()).collect();
    let mut u = rng.uniform() * weights.iter().sum::<f64>();
    for (w, &i) in weights.iter().zip(top) {
        if u < *w {
            return i;
        }
        u -= w;
    }
    top[keep - 1]
}

/// Tensors of one buffer laid out like `layout`, named `prefix + param name`.
fn named<'a>(layout: &ParamLayout, buf: &'a [f32], prefix: &str) -> Vec<TensorRef<'a>> {
    layout.specs.iter().map(|s| (format!("{prefix}{}", s.name), s.shape.clone(), &buf[s.range()])).collect()
}

/// The host values of a buffer laid out like `model`'s parameters, in the `full` layout of every
/// expert: as they are when the model holds every expert, gathered over the expert-parallel
/// group otherwise (a collective; `None` on the ranks that do not receive them).
fn full_values<B: Backend>(be: &B, model: &Model<B>, full: &ParamLayout, buf: &B::Buf) -> Result<Option<Vec<f32>>> {
    let host = be.download(B::full(buf));
    match model.expert_parallel() {
        None => Ok(Some(host)),
        Some(ep) => gather_full(full, &model.layout, &host, model.moe.n_experts(), ep),
    }
}

/// The named tensors of a checkpoint as host values laid out like `layout`.
fn restore(layout: &ParamLayout, set: &checkpoint::TensorSet, prefix: &str) -> Result<Vec<f32>> {
    let mut values = vec![0f32; layout.total];
    for s in &layout.specs {
        values[s.range()].copy_from_slice(set.get(&format!("{prefix}{}", s.name), &s.shape)?);
    }
    Ok(values)
}

/// Trains `config` into `opts.out` with data parallelism over `dp` (a single process or MPI
/// ranks): every rank draws the same global batch and keeps its own slice of rows, gradients are
/// summed over the ranks and averaged, and rank 0 alone writes metrics, checkpoints and plots.
/// Aux losses use each rank's local routing statistics (as Megatron does per data-parallel rank).
///
/// With `parallel.ep > 1` the MoE layers are folded onto the same ranks as expert parallelism:
/// each EP group of consecutive ranks shards the experts, the token dispatcher exchanges routed
/// rows, expert gradients are averaged over the expert data-parallel group, and checkpoints
/// gather the experts so they hold the whole model.
///
/// Refuses to touch an output directory that already holds checkpoints unless resuming, so a
/// good run is never overwritten.
pub fn train(config: &Config, opts: &TrainOptions, dp: &dyn Communicator) -> Result<TrainSummary> {
    config.validate()?;
    let cpu = || Cpu::new(config.train.threads);
    if config.device == "cpu" {
        return train_on(&cpu(), config, opts, dp);
    }
    #[cfg(feature = "cuda")]
    {
        // One GPU per rank on a node: the launcher's node-local rank picks it (OpenMPI, MPICH,
        // MVAPICH, Slurm's srun); ranks on threads of one process (tests) by their rank.
        let local_rank = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
            .iter()
            .find_map(|name| std::env::var(name).ok()?.parse().ok())
            .unwrap_or(dp.rank());
        match crate::backend::cuda::CudaBackend::for_local_rank(local_rank, crate::backend::cuda::Storage::Bf16) {
            Ok(gpu) => {
                let gpu = with_kernels(gpu, config, dp.rank() == 0)?;
                if dp.rank() == 0 {
                    eprintln!("training on {}", gpu.device());
                }
                train_on(&gpu, config, opts, dp)
            }
            Err(e) => {
                eprintln!("device = \"cuda\": {e}; training on the CPU instead");
                train_on(&cpu(), config, opts, dp)
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        eprintln!("device = \"cuda\": this motley was built without the `cuda` feature (cargo build --release --features cuda); training on the CPU instead");
        train_on(&cpu(), config, opts, dp)
    }
}

/// The GPU backend on the kernels `[cuda]` asks for: an error where the GPU has no Hopper
/// kernels (they were asked for by name), a note where the model's head_dim leaves attention on
/// the portable ones.
#[cfg(feature = "cuda")]
fn with_kernels(gpu: crate::backend::cuda::CudaBackend, config: &Config, leader: bool) -> Result<crate::backend::cuda::CudaBackend> {
    let cuda = &config.cuda;
    let asked = |key: &str, e: Error| Error::Invalid(format!("cuda.{key} = true: {e}; set it to false (or leave out --hopper) to train on the portable kernels"));
    let gpu = if cuda.hopper_attention { gpu.with_hopper_attention().map_err(|e| asked("hopper_attention", e))? } else { gpu };
    let gpu = if cuda.hopper_experts { gpu.with_hopper_experts().map_err(|e| asked("hopper_experts", e))? } else { gpu };
    let head_dim = config.model.head_dim();
    if cuda.hopper_attention && head_dim != crate::backend::cuda::attention::HOPPER_HEAD_DIM && leader {
        eprintln!("cuda.hopper_attention: the Hopper attention kernels take head_dim {}; this model's is {head_dim}, so attention runs on the portable kernels", crate::backend::cuda::attention::HOPPER_HEAD_DIM);
    }
    Ok(gpu)
}

fn train_on<B: Backend>(be: &B, config: &Config, opts: &TrainOptions, dp: &dyn Communicator) -> Result<TrainSummary> {
    let (rank, ranks) = (dp.rank(), dp.size());
    let leader = rank == 0;
    if !config.train.batch_size.is_multiple_of(ranks) {
        return Err(Error::config("train.batch_size", config.train.batch_size, format!("a multiple of the number of data-parallel ranks ({ranks})")));
    }
    let local_batch = config.train.batch_size / ranks;
    let micro = config.train.micro_batch_size.unwrap_or(local_batch);
    if !local_batch.is_multiple_of(micro) {
        return Err(Error::config("train.micro_batch_size", micro, format!("a divisor of each rank's share of train.batch_size ({} / {ranks} ranks = {local_batch})", config.train.batch_size)));
    }
    let micro_batches = local_batch / micro;
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let existing = checkpoint::latest(out)?;
    if existing.is_some() && !opts.resume {
        return Err(Error::Invalid(format!(
            "{} already holds checkpoints; pass --resume to continue that run, or choose another --out",
            out.display()
        )));
    }
    let t = &config.train;
    // Rank 0 tokenizes first; the others then find its cache.
    let data_dir = opts.data_cache.clone().unwrap_or_else(|| out.join("data"));
    let data: Prepared = if leader { prepare(config, &data_dir)? } else { dp.barrier()?; prepare(config, &data_dir)? };
    if leader {
        dp.barrier()?;
    }
    let (mut model, edp) = if config.parallel.ep > 1 {
        if !ranks.is_multiple_of(config.parallel.ep) {
            return Err(Error::config("parallel.ep", config.parallel.ep, format!("a divisor of the number of ranks ({ranks}); launch with `mpirun -np N`, N a multiple of {}", config.parallel.ep)));
        }
        let groups = ExpertGroups::new(dp, config.parallel.ep)?;
        (Model::new_expert_parallel(be, config.model.clone(), config.moe.clone(), t.seed, groups.ep)?.with_dispatch(config.dispatch)?, Some(groups.edp))
    } else {
        (Model::new(be, config.model.clone(), config.moe.clone(), t.seed)?.with_dispatch(config.dispatch)?, None)
    };
    let mut buckets = GradBuckets::new(&model.layout);
    let collectives = match ranks {
        1 => String::new(),
        _ if config.parallel.nccl => {
            let mut said = format!("gradients summed {}", buckets.reduce_on_device(be, dp, edp.as_deref())?);
            if let Some(how) = model.exchange_on_device(be)? {
                said += &format!("; expert-parallel rows exchanged {how}");
            }
            said
        }
        _ => format!("gradients summed (and expert-parallel rows exchanged) through host memory over {ranks} ranks (parallel.nccl = false)"),
    };
    if leader && ranks > 1 {
        eprintln!("{collectives}");
    }
    if leader && micro_batches > 1 {
        eprintln!("each step adds up {micro_batches} micro-batches of {micro} sequences on each of {ranks} rank(s) (train.micro_batch_size)");
    }
    let full_layout = ParamLayout::new(&config.model, &config.moe);
    let mut opt = Optimizer::new(be, adamw_config(config), model.n_params());
    let mut loader = Loader::new(Shard::open(&data.train)?, t.batch_size, t.seq_len, t.seed)?;
    let hash = config.config_hash();
    let metrics_path = out.join("metrics.jsonl");

    let mut flops = 0.0;
    // (dropped, chosen) routed slots since the last evaluation, under an expert capacity.
    let mut drops = (0usize, 0usize);
    if let (Some(dir), true) = (&existing, opts.resume) {
        let ck = checkpoint::load(dir, &hash)?;
        model.params.set(be, &restore(&model.layout, &ck.model, "")?);
        for (prefix, dst) in [("m.", &mut opt.m), ("v.", &mut opt.v)] {
            be.upload(B::full_mut(dst), &restore(&model.layout, &ck.optimizer, prefix)?);
        }
        opt.step = ck.state.step;
        flops = ck.state.flops;
        loader.restore(ck.state.loader)?;
    }
    let mut metrics = match (leader, opts.resume) {
        (false, _) => None,
        (true, true) => Some(MetricsWriter::resume(&metrics_path, opt.step)?),
        (true, false) => Some(MetricsWriter::create(&metrics_path)?),
    };
    if leader {
        write_atomic(&out.join("config.toml"), config.to_toml()?.as_bytes())?;
    }
    let tokenizer_json = data.tokenizer.to_json()?;
    let schedule = LrSchedule::from_config(t);
    let first = opt.step;
    if t.max_flops > 0.0 && flops >= t.max_flops {
        return Err(Error::Invalid(format!(
            "{}: the run already spent {flops:.3e} FLOPs, at or past train.max_flops = {:.3e}; raise the budget to continue",
            out.display(),
            t.max_flops
        )));
    }
    let mut store = activation_store(be, &model, &config.memory, &config.device, micro, t.seq_len)?;
    if leader && config.memory.policy == MemoryPolicy::Auto {
        let gate_up = if store.declares(GATE_UP) { "" } else { ", gate/up recomputed" };
        eprintln!("memory.policy = \"auto\": {}{gate_up}", policy_label(store.policies()));
    }
    let progress = leader.then(|| Progress::new(first, t.steps, (t.steps / 20).max(1)));
    // A collective with expert parallelism (the experts are gathered); rank 0 writes.
    let save = |model: &Model<B>, opt: &Optimizer<B>, loader: &Loader, flops: f64| -> Result<Option<PathBuf>> {
        if !leader && model.expert_parallel().is_none() {
            return Ok(None); // nothing to gather: rank 0 has the whole model
        }
        let (Some(params), Some(m), Some(v)) = (full_values(be, model, &full_layout, model.params.master())?, full_values(be, model, &full_layout, &opt.m)?, full_values(be, model, &full_layout, &opt.v)?) else {
            return Ok(None);
        };
        if !leader {
            return Ok(None);
        }
        let state = TrainState {
            flops,
            step: opt.step,
            rng: vec![t.seed],
            loader: loader.state(),
            config_hash: hash.clone(),
            config_toml: config.to_toml()?,
            tokenizer: tokenizer_json.clone(),
        };
        let mut moments = named(&full_layout, &m, "m.");
        moments.extend(named(&full_layout, &v, "v."));
        checkpoint::save(out, &state, &named(&full_layout, &params, ""), &moments, config.checkpoint.keep_last).map(Some)
    };

    let started = Instant::now();
    let mut last = None;
    let mut val_loss = None;
    let mut val_sources = Vec::new();
    let mut last_checkpoint = existing.clone().unwrap_or_default();
    for step in first..t.steps {
        let step_start = Instant::now();
        let batch = loader.next_batch();
        model.zero_grads(be);
        let mut parts = Vec::with_capacity(micro_batches);
        for m in 0..micro_batches {
            let row = rank * local_batch + m * micro;
            let rows = row * t.seq_len..(row + micro) * t.seq_len;
            // The last micro-batch's backward finishes each range of the gradients: the ranks
            // start summing it then (one rank has nothing to sum: `reduce_ready` skips it).
            let finishing = m + 1 == micro_batches;
            let mut reduce_ready = |grads: &mut B::Buf, range| if finishing { buckets.reduce_ready(grads, range, dp, edp.as_deref()) } else { Ok(()) };
            parts.push(model.forward_backward_with(be, &mut store, &batch.inputs[rows.clone()], &batch.targets[rows], micro, t.seq_len, &mut reduce_ready)?);
        }
        let mut stats = StepStats::of_micro_batches(parts);
        if ranks > 1 || micro_batches > 1 {
            buckets.average(be, &mut model.grads, dp, edp.as_deref(), micro_batches)?;
        }
        if ranks > 1 {
            // Losses and activated parameters (means over each rank's tokens) are averaged over
            // the ranks; FLOPs (from each rank's routed counts) summed, so every rank sees the
            // same budget and stops on the same step; routed and dropped slots summed, so the
            // metrics count the whole batch's (in f32: exact up to 2²⁴ slots an expert a step).
            let a = &mut stats.aux;
            let mut sums = vec![stats.lm_loss as f32, stats.aux_loss as f32, a.load_balance, a.p_penalty, a.entropy, a.z_loss, stats.activated_params as f32, stats.train_flops as f32, stats.dropped as f32];
            sums.extend(stats.counts.iter().flatten().map(|&k| k as f32));
            dp.all_reduce_sum(&mut sums)?;
            let mean = |sum: f32| sum / ranks as f32;
            stats.lm_loss = sums[0] as f64 / ranks as f64;
            stats.aux_loss = sums[1] as f64 / ranks as f64;
            [a.load_balance, a.p_penalty, a.entropy, a.z_loss] = [mean(sums[2]), mean(sums[3]), mean(sums[4]), mean(sums[5])];
            stats.activated_params = sums[6] as f64 / ranks as f64;
            stats.train_flops = sums[7] as f64;
            stats.dropped = sums[8] as usize;
            stats.counts.iter_mut().flatten().zip(&sums[9..]).for_each(|(k, &sum)| *k = sum as usize);
            stats.loss = stats.lm_loss + stats.aux_loss;
            stats.tokens *= ranks;
        }
        if !stats.loss.is_finite() {
            return Err(Error::NonFinite { step: step + 1, what: "loss".into(), value: stats.loss as f32 });
        }
        let lr = schedule.lr_at(step);
        let grad_norm = match model.expert_parallel().map(|ep| buckets.global_norm(be, &model.grads, ep)).transpose()? {
            None => opt.update(be, &model.layout, &mut model.params, &model.grads, lr),
            Some(norm) => {
                opt.update_with_norm(be, &model.layout, &mut model.params, &model.grads, lr, norm);
                norm
            }
        };
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { step: step + 1, what: "gradient norm".into(), value: grad_norm });
        }
        let seconds = step_start.elapsed().as_secs_f64();
        let tokens_per_s = stats.tokens as f64 / seconds;
        flops += stats.train_flops;
        let mut extra = Map::new();
        extra.insert("flops".into(), json!(flops));
        extra.insert("gflops".into(), json!(stats.train_flops / seconds / 1e9));
        extra.insert("load_balance".into(), json!(stats.aux.load_balance));
        extra.insert("p_penalty".into(), json!(stats.aux.p_penalty));
        extra.insert("entropy".into(), json!(stats.aux.entropy));
        extra.insert("z_loss".into(), json!(stats.aux.z_loss));
        extra.insert("expert_counts".into(), Value::from(stats.counts.clone()));
        extra.insert("dropped_slots".into(), json!(stats.dropped));
        drops = (drops.0 + stats.dropped, drops.1 + stats.dropped + stats.counts.iter().flatten().sum::<usize>());
        // The FLOP budget ends the run after the step that reaches it (overshoot < one step).
        let done = step + 1 == t.steps || (t.max_flops > 0.0 && flops >= t.max_flops);
        let checkpoint_now = (config.checkpoint.every > 0 && (step + 1) % config.checkpoint.every == 0) || done;
        last = Some(stats.lm_loss);
        if let Some(metrics) = metrics.as_mut() {
            metrics.train(&TrainRecord {
                step: step + 1,
                loss: stats.loss as f32,
                lm_loss: stats.lm_loss as f32,
                aux_loss: stats.aux_loss as f32,
                lr,
                grad_norm,
                tokens_per_s: tokens_per_s as f32,
                activated_params: stats.activated_params,
                extra,
            })?;
        }
        if let Some(p) = &progress {
            p.step(step + 1, stats.loss as f32, tokens_per_s as f32);
        }
        // Evaluation and checkpoints involve every rank (batch rows and experts are spread).
        if (t.eval_every > 0 && (step + 1) % t.eval_every == 0) || done {
            let mut extra = Map::new();
            extra.insert("flops".into(), json!(flops));
            let (v, sources) = evaluate_all(be, &model, &data, t, dp, &mut extra)?;
            if let Some(metrics) = metrics.as_mut() {
                metrics.eval(&EvalRecord { step: step + 1, val_loss: v as f32, extra })?;
            }
            if let Some(p) = &progress {
                let per_source: String = sources.iter().map(|(n, l)| format!(", {n} {l:.4}")).collect();
                let dropped = match model.dispatch() {
                    DispatchMode::Dropless => String::new(),
                    _ => format!("; {:.1} % of routed slots dropped by the experts' capacity", 100.0 * drops.0 as f64 / drops.1.max(1) as f64),
                };
                p.note(&format!("step {}: validation loss {v:.4} (perplexity {:.2}){per_source}{dropped}", step + 1, v.exp()));
            }
            drops = (0, 0);
            val_loss = Some(v);
            val_sources = sources;
        }
        if checkpoint_now {
            if let Some(dir) = save(&model, &opt, &loader, flops)? {
                last_checkpoint = dir;
            }
            dp.barrier()?;
        }
        if done {
            break;
        }
    }
    let want_sample = !opts.sample_prompt.is_empty() && opts.sample_tokens > 0;
    // An expert-parallel model samples on rank 0 from the gathered whole model.
    let gathered = match (want_sample, model.expert_parallel()) {
        (true, Some(_)) => full_values(be, &model, &full_layout, model.params.master())?.map(|v| Model::from_values(be, config.model.clone(), config.moe.clone(), &v)?.with_dispatch(config.dispatch)).transpose()?,
        _ => None,
    };
    if !leader {
        // Followers report nothing; rank 0 reports for the run.
        return Ok(TrainSummary { steps: opt.step, seconds: started.elapsed().as_secs_f64(), train_loss: last.unwrap_or(f64::NAN), val_loss: None, val_sources: Vec::new(), flops, checkpoint: last_checkpoint, sample: None, collectives });
    }
    if let Some(p) = &progress {
        p.finish();
    }
    plot::plot_loss(&metrics_path, &out.join("loss.png"))?;
    let sample = if want_sample {
        Some(generate(be, gathered.as_ref().unwrap_or(&model), &data.tokenizer, &opts.sample_prompt, opts.sample_tokens, 0.8, 40, t.seed)?)
    } else {
        None
    };
    Ok(TrainSummary {
        steps: opt.step,
        seconds: started.elapsed().as_secs_f64(),
        train_loss: last.unwrap_or(f64::NAN),
        val_loss,
        val_sources,
        flops,
        checkpoint: last_checkpoint,
        sample,
        collectives,
    })
}

/// The activation store of `model` under the `[memory]` policy `memory`: keep everything,
/// recompute, offload a token fraction α (fixed, or from MEMO's LP on a cost-model profile of
/// `device`, `"cpu"` or `"cuda"`, with `be`'s activation size), or what `memory::auto` chooses
/// within `memory.device_gib` or `be`'s memory budget, for steps of `batch × seq`, declaring
/// the experts' gate/up product where it is saved. The trainer's and the benchmarks'.
pub fn activation_store<B: Backend>(be: &B, model: &Model<B>, memory: &MemoryConfig, device: &str, batch: usize, seq: usize) -> Result<ActivationStore<B>> {
    if memory.policy == MemoryPolicy::Keep {
        return model.new_store_with(vec![LayerPolicy::Keep; model.config.n_layers], 0, memory.gate_up);
    }
    let link = HostLink { b_pcie: memory.bandwidth_gbs * 1e9, m_host: (memory.host_gib * (1u64 << 30) as f64) as u64 };
    if memory.policy == MemoryPolicy::Auto {
        let budget = if memory.device_gib > 0.0 { Some((memory.device_gib * (1u64 << 30) as f64) as u64) } else { be.memory_budget()? };
        let fused_gather = be.fuses_expert_gather(model.config.d_model, &model.moe.expert_widths);
        let target = PlanTarget { model: &model.config, moe: &model.moe, memory, device, fused_gather, dispatch: model.dispatch() };
        let choice = auto::choose(&target, batch, seq, budget.unwrap_or(u64::MAX), link)?;
        return model.new_store_with(choice.policies, link.m_host, choice.gate_up);
    }
    let profile = Profile::cost_model(&model.config, &model.moe, batch, seq, assumed_flops_per_s(device), link)?.with_activation_bytes(be.activation_bytes()).with_gate_up(memory.gate_up).with_slots(Slots::expected(model.dispatch()));
    let policies = build_policy(memory, &model.config, &model.moe, batch, seq, &profile)?;
    model.new_store_with(policies, link.m_host, memory.gate_up)
}

/// A model, its config and tokenizer, loaded from a checkpoint directory or a run directory
/// (its latest checkpoint).
pub fn load_checkpoint<B: Backend>(path: &Path, be: &B) -> Result<(Model<B>, Config, Tokenizer, PathBuf)> {
    let dir = if path.join("state.json").exists() {
        path.to_path_buf()
    } else {
        checkpoint::latest(path)?.ok_or_else(|| Error::bad_file(path, "no checkpoint here (expected state.json or checkpoints/step_*)"))?
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, e.to_string()))?;
    let config = Config::from_toml_str(&state.config_toml, &state_path.display().to_string(), &[])?;
    let ck = checkpoint::load(&dir, &config.config_hash())?;
    let layout = ParamLayout::new(&config.model, &config.moe);
    let model = Model::from_values(be, config.model.clone(), config.moe.clone(), &restore(&layout, &ck.model, "")?)?.with_dispatch(config.dispatch)?;
    let tokenizer = Tokenizer::from_json(state.tokenizer.as_deref(), &state_path)?;
    Ok((model, config, tokenizer, dir))
}
