//! The `motley` command line: clap subcommands that call into the library, nothing else.

mod experiment;
mod plan;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::backend::cpu::Cpu;
use crate::compress::checkpoint::{load_compressed_model, load_compressed_tokenizer, parse_codebooks, parse_expert_bits, parse_method, run_compress, CompressArgs, COMPRESSED_FILE};
use crate::compress::{CodebookDtype, Embeddings};
use crate::data::tokenizer::Tokenizer;
use crate::memory::report::plan_report;
use crate::model::Model;
use crate::train::checkpoint;
use crate::config::Config;
use crate::data::prepare::{prepare, tokenize_files};
use crate::data::shard::Shard;
use crate::parallel::comm::{Communicator, SingleProcess};
use crate::train::trainer::{self, TrainOptions};
use crate::{Error, Result};

#[derive(Parser)]
#[command(name = "motley", version, about = "Train, scale and compress heterogeneous Mixture-of-Experts language models")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: the tiny heterogeneous MoE on the embedded Austen corpus).
    Train {
        /// TOML config; the embedded configs/tiny.toml when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config field: `--set moe.routing=top_p` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Total training steps (same as --set train.steps=N).
        #[arg(long)]
        steps: Option<u64>,
        /// `cpu` or `cuda` (same as --set device=...); `cuda` falls back to the CPU, saying why,
        /// when this build or machine has no usable GPU.
        #[arg(long)]
        device: Option<String>,
        /// On a CUDA device, the Hopper kernels of our own for attention and the experts (same
        /// as --set cuda.hopper_attention=true --set cuda.hopper_experts=true; H100, H200).
        #[arg(long)]
        hopper: bool,
        /// Output directory (default: runs/run-<unix time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Text to continue at the end of training ("" for no sample).
        #[arg(long, default_value = "It is a truth universally acknowledged")]
        prompt: String,
    },
    /// Validation loss and perplexity of a checkpoint.
    Eval {
        /// A checkpoint directory or a run directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A token shard to evaluate on (default: the run's validation split).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Batches of the shard to use (default: all of it, up to 10,000).
        #[arg(long, default_value_t = 10_000)]
        batches: usize,
    },
    /// Continue a prompt with a trained model.
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Train a byte-level BPE on text files and write tokenizer.json plus token shards.
    Tokenize {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05)]
        val_fraction: f32,
    },
    /// Compress a trained checkpoint to a few bits per weight (RTN, k-means or JLCM).
    Compress {
        /// A training checkpoint or a run directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// jlcm, kmeans or rtn.
        #[arg(long, default_value = "jlcm")]
        method: String,
        /// Bits per weight of the compressed matrices (fractions mix ⌊b⌋ and ⌈b⌉ per group).
        #[arg(long)]
        bits: f32,
        /// Row groups per matrix (JLCM: grouped by weight distribution; k-means: row blocks).
        #[arg(long, default_value_t = 8)]
        groups: usize,
        /// JLCM codebooks: per-group, or shared-scaled (one codebook, a scale per group).
        #[arg(long, default_value = "per-group")]
        codebooks: String,
        /// Expert bit widths: uniform (every expert at --bits), or share (integer bits per expert
        /// from its routed share, same index bits in total).
        #[arg(long, default_value = "uniform")]
        expert_bits: String,
        /// Training tokens used to calibrate JLCM and --expert-bits share.
        #[arg(long, default_value_t = 4096)]
        calib_tokens: usize,
        /// Validation batches for the perplexity before/after (0: skip).
        #[arg(long, default_value_t = 8)]
        eval_batches: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Per-layer activation inventory, MEMO α, planned peak memory and whether a config fits.
    PlanMemory {
        /// TOML config (default: the embedded tiny config).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Sequence length (default: train.seq_len).
        #[arg(long)]
        seq: Option<usize>,
        /// Sequences through one forward and backward (default: train.micro_batch_size where
        /// set, else train.batch_size: one rank).
        #[arg(long)]
        batch: Option<usize>,
        /// Device memory (default: memory.device_gib where set, else 80GiB).
        #[arg(long)]
        device_mem: Option<String>,
        #[arg(long, default_value = "128GiB")]
        host_mem: String,
        /// Device→host bandwidth, e.g. 50GB/s.
        #[arg(long, default_value = "50GB/s")]
        bandwidth: String,
        #[arg(long)]
        json: bool,
    },
    /// Experiments that test the papers' claims (e.g. `experiment hmoe --out DIR`).
    Experiment {
        #[command(subcommand)]
        which: experiment::Experiment,
    },
    /// Routing analytics of a trained model: expert shares, experts and parameters per token,
    /// tokens of the smallest and largest experts; JSON + PNG.
    Routes(experiment::RoutesArgs),
    /// Parallel layouts: the folded rank groups of a world.
    PlanParallel {
        #[command(subcommand)]
        command: plan::PlanParallel,
    },
}

/// Parses the command line and runs the command.
pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Train { config, set, steps, device, hopper, out, resume, prompt } => {
            let mut set = set;
            if let Some(n) = steps {
                set.push(format!("train.steps={n}"));
            }
            if let Some(d) = device {
                set.push(format!("device={d:?}"));
            }
            if hopper {
                set.extend(["cuda.hopper_attention=true".to_string(), "cuda.hopper_experts=true".to_string()]);
            }
            let config = Config::load(config.as_deref(), &set)?;
            let out = out.unwrap_or_else(default_out);
            let opts = TrainOptions { out: out.clone(), resume, sample_prompt: prompt, sample_tokens: 120, data_cache: None };
            let s = with_data_parallel(|dp| trainer::train(&config, &opts, dp))?;
            if s.sample.is_none() && s.val_loss.is_none() {
                return Ok(()); // a follower rank: rank 0 reports
            }
            println!("trained {} steps in {:.1} s; final train loss {:.4}", s.steps, s.seconds, s.train_loss);
            if let Some(v) = s.val_loss {
                println!("validation loss {v:.4} (perplexity {:.2}); ln(vocab) = {:.2}", v.exp(), (config.model.vocab_size as f64).ln());
            }
            println!("checkpoint: {}", s.checkpoint.display());
            println!("metrics:    {}\nloss plot:  {}", out.join("metrics.jsonl").display(), out.join("loss.png").display());
            if let Some(text) = s.sample {
                println!("\nsample — {}{}", opts.sample_prompt, text);
            }
            Ok(())
        }
        Command::Eval { checkpoint, data, batches } => {
            let be = Cpu::new(0);
            let (model, config, _, dir) = load_any_checkpoint(&checkpoint, &be)?;
            let shard = match data {
                Some(path) => path,
                None => prepare(&config, &data_dir_of(&dir))?.val,
            };
            Shard::open(&shard)?;
            let t = &config.train;
            let loss = trainer::validation_loss(&be, &model, &shard, t.batch_size, t.seq_len, batches)?;
            println!("checkpoint {}\ndata {}\nloss {loss:.4}\nperplexity {:.3}", dir.display(), shard.display(), loss.exp());
            Ok(())
        }
        Command::Generate { checkpoint, prompt, max_tokens, temperature, top_k, seed } => {
            let be = Cpu::new(0);
            let (model, _, tokenizer, _) = load_any_checkpoint(&checkpoint, &be)?;
            let text = trainer::generate(&be, &model, &tokenizer, &prompt, max_tokens, temperature, top_k, seed)?;
            println!("{prompt}{text}");
            Ok(())
        }
        Command::Tokenize { input, vocab, out, val_fraction } => {
            let p = tokenize_files(&input, vocab, val_fraction, &out)?;
            println!(
                "tokenizer {} (vocab {}), {} train + {} val tokens in {} and {}",
                out.join("tokenizer.json").display(),
                p.tokenizer.vocab_size(),
                p.train_tokens,
                p.val_tokens,
                p.train.display(),
                p.val.display()
            );
            Ok(())
        }
        Command::Compress { checkpoint, method, bits, groups, codebooks, expert_bits, calib_tokens, eval_batches, out } => {
            let be = Cpu::new(0);
            let checkpoint = match checkpoint::latest(&checkpoint)? {
                Some(dir) if !checkpoint.join("state.json").exists() => dir,
                _ => checkpoint,
            };
            let args = CompressArgs {
                checkpoint,
                method: parse_method(&method)?,
                bits,
                groups,
                codebooks: parse_codebooks(&codebooks)?,
                expert_bits: parse_expert_bits(&expert_bits)?,
                calib_tokens,
                out,
                embeddings: Embeddings::Dense(CodebookDtype::F16),
                eval_batches,
            };
            let r = run_compress(&be, &args)?;
            println!("{}: {:?} at {} bits in {:.1} s", r.file.display(), r.method, r.bits, r.seconds);
            println!(
                "{} bytes: {:.3} bits per parameter (whole file), {:.3} bits per compressed weight (matrices only)",
                r.file_bytes, r.bits_per_param, r.matrix_bits_per_weight
            );
            if let Some(widths) = &r.expert_bits {
                for (l, layer) in widths.iter().enumerate() {
                    println!("layer {l} expert bits {layer:?} (routed tokens {:?})", r.expert_tokens.as_ref().map_or(&[][..], |t| &t[l][..]));
                }
            }
            if let (Some(a), Some(b)) = (r.val_ppl_fp32, r.val_ppl) {
                println!("validation perplexity {a:.3} → {b:.3} ({:+.3})", b - a);
            }
            Ok(())
        }
        Command::PlanMemory { config, set, seq, batch, device_mem, host_mem, bandwidth, json } => {
            let config = Config::load(config.as_deref(), &set)?;
            let seq = seq.unwrap_or(config.train.seq_len);
            let batch = batch.or(config.train.micro_batch_size).unwrap_or(config.train.batch_size);
            let device_mem = match device_mem {
                Some(text) => parse_size("--device-mem", &text)?,
                None if config.memory.device_gib > 0.0 => (config.memory.device_gib * (1u64 << 30) as f64) as u64,
                None => 80 << 30,
            };
            let report = plan_report(&config, seq, batch, device_mem, parse_size("--host-mem", &host_mem)?, parse_bandwidth(&bandwidth)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("JSON of the report"));
            } else {
                println!("{report}");
            }
            // Refuse, with the numbers, a plan that does not fit.
            report.check_fits()
        }
        Command::Experiment { which } => experiment::run_experiment(which),
        Command::Routes(args) => experiment::run_routes(args),
        Command::PlanParallel { command } => plan::run(command),
    }
}

/// A training checkpoint (or run directory), or a compressed checkpoint directory.
fn load_any_checkpoint(path: &Path, be: &Cpu) -> Result<(Model<Cpu>, Config, Tokenizer, PathBuf)> {
    if path.join(COMPRESSED_FILE).exists() {
        let (model, config) = load_compressed_model(path, be)?;
        let tokenizer = load_compressed_tokenizer(path, &config)?;
        return Ok((model, config, tokenizer, path.to_path_buf()));
    }
    trainer::load_checkpoint(path, be)
}

/// Where a checkpoint's run tokenized its data: `RUN/data` for `RUN/checkpoints/step_N`, or
/// `DIR/data` for a compressed checkpoint directory.
fn data_dir_of(checkpoint: &Path) -> PathBuf {
    if checkpoint.join(COMPRESSED_FILE).exists() {
        return checkpoint.join("data");
    }
    run_dir_of(checkpoint).join("data")
}

/// `80GiB`, `512MiB`, `2TB`, or plain bytes.
fn parse_size(flag: &str, text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 && scale.is_finite() => Ok((v * scale) as u64),
        _ => Err(Error::config(flag, format!("\"{text}\""), "a size such as 80GiB, 512MiB or 2TB")),
    }
}

/// `50GB/s` (or `50GiB/s`) in bytes per second.
fn parse_bandwidth(text: &str) -> Result<f64> {
    let per_s = text.trim().strip_suffix("/s").unwrap_or(text);
    let bytes = parse_size("--bandwidth", per_s).map_err(|_| Error::config("--bandwidth", format!("\"{text}\""), "a rate such as 50GB/s"))?;
    if bytes == 0 {
        return Err(Error::config("--bandwidth", format!("\"{text}\""), "a positive rate such as 50GB/s"));
    }
    Ok(bytes as f64)
}

/// Runs `f` over the data-parallel ranks: the MPI world when launched by `mpirun` (and built
/// with the `mpi` feature), else this process alone. An error on any MPI rank aborts the job,
/// so no rank is left waiting in a collective.
fn with_data_parallel<T>(f: impl FnOnce(&dyn Communicator) -> Result<T>) -> Result<T> {
    let launched_by_mpi = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some();
    #[cfg(feature = "mpi")]
    if launched_by_mpi {
        let runtime = crate::parallel::mpi::MpiRuntime::init()?;
        let world = runtime.world();
        return f(&world).map_err(|e| {
            eprintln!("error (rank {}): {e}", world.rank());
            runtime.abort(1)
        });
    }
    #[cfg(not(feature = "mpi"))]
    if launched_by_mpi {
        return Err(crate::Error::Invalid("launched by mpirun, but this motley was built without MPI; rebuild with `--features mpi`".into()));
    }
    f(&SingleProcess)
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

/// `RUN/checkpoints/step_N` → `RUN`.
fn run_dir_of(checkpoint: &std::path::Path) -> PathBuf {
    checkpoint.parent().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}
