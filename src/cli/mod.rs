//! The `motley` command line: clap subcommands that call into the library, nothing else.

mod experiment;
mod plan;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::cpu::Cpu;
use crate::config::Config;
use crate::data::prepare::{prepare, tokenize_files};
use crate::data::shard::Shard;
use crate::train::trainer::{self, TrainOptions};
use crate::Result;

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
        Command::Train { config, set, steps, out, resume, prompt } => {
            let mut set = set;
            if let Some(n) = steps {
                set.push(format!("train.steps={n}"));
            }
            let config = Config::load(config.as_deref(), &set)?;
            let out = out.unwrap_or_else(default_out);
            let opts = TrainOptions { out: out.clone(), resume, sample_prompt: prompt, sample_tokens: 120, data_cache: None };
            let s = trainer::train(&config, &opts)?;
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
            let (model, config, _, dir) = trainer::load_checkpoint(&checkpoint, &be)?;
            let shard = match data {
                Some(path) => path,
                None => prepare(&config, &run_dir_of(&dir).join("data"))?.val,
            };
            Shard::open(&shard)?;
            let t = &config.train;
            let loss = trainer::validation_loss(&be, &model, &shard, t.batch_size, t.seq_len, batches)?;
            println!("checkpoint {}\ndata {}\nloss {loss:.4}\nperplexity {:.3}", dir.display(), shard.display(), loss.exp());
            Ok(())
        }
        Command::Generate { checkpoint, prompt, max_tokens, temperature, top_k, seed } => {
            let be = Cpu::new(0);
            let (model, _, tokenizer, _) = trainer::load_checkpoint(&checkpoint, &be)?;
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
        Command::Experiment { which } => experiment::run_experiment(which),
        Command::Routes(args) => experiment::run_routes(args),
        Command::PlanParallel { command } => plan::run(command),
    }
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

/// `RUN/checkpoints/step_N` → `RUN`.
fn run_dir_of(checkpoint: &std::path::Path) -> PathBuf {
    checkpoint.parent().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}
