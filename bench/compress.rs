//! Model-level compression benchmark: RTN, k-means and JLCM at 2, 2.5, 3 and 4 bits, and
//! k-means and JLCM with bits per expert by routed share (`--expert-bits share`), on an HMoE
//! trained on the embedded corpus, each through the real `motley compress` path (`run_compress`:
//! calibrate, compress, write the compressed checkpoint, reload it from disk, evaluate validation
//! perplexity).
//!
//! The model is `--config` (default: the default config, `configs/tiny.toml`) trained for its
//! `train.steps` (or `--steps`, which also sets warm-up to a tenth) with the real training loop;
//! the checkpoint is kept under `--run` (default `target/bench-compress-<config name>`) and
//! reused by later runs with the same step count (so `motley train --config FILE --set
//! train.threads=2 --out RUN` can train it beforehand).
//!
//! Run: `cargo bench --bench compress [-- --config FILE --steps N --threads 2 --calib-tokens 4096
//! --groups 8 --run DIR --rows rtn,k-means,k-means-share,jlcm,jlcm-share --bits 2,2.5,3,4]`
//! (`--rows`, `--bits`: which methods and rates, default all). The default model with
//! `--steps 300`: about 25 minutes on 2 shared cores; `configs/small.toml`: about 35 minutes of
//! training and 10–15 minutes per JLCM row (BENCHMARKS.md).

use std::path::{Path, PathBuf};

use motley::backend::cpu::Cpu;
use motley::compress::checkpoint::{run_compress, CompressArgs};
use motley::compress::{CodebookDtype, CodebookKind, Embeddings, ExpertBits, Method};
use motley::config::Config;
use motley::data::prepare::prepare;
use motley::parallel::comm::SingleProcess;
use motley::train::trainer::{train, validation_loss, TrainOptions};

fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

/// Trains `config` for `config.train.steps` steps with the real training loop and returns its
/// final checkpoint. Reuses an existing run of that length.
fn trained_checkpoint(config: &Config, run: &Path) -> PathBuf {
    let dir = run.join("checkpoints").join(format!("step_{:06}", config.train.steps));
    if dir.join("state.json").is_file() {
        println!("reusing the trained model in {}", dir.display());
        return dir;
    }
    let _ = std::fs::remove_dir_all(run);
    let opts = TrainOptions { out: run.to_path_buf(), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: None };
    train(config, &opts, &SingleProcess).expect("training").checkpoint
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, "--threads").unwrap_or(2);
    let calib_tokens = arg(&args, "--calib-tokens").unwrap_or(4096);
    let groups = arg(&args, "--groups").unwrap_or(8);
    let config_path: Option<PathBuf> = arg(&args, "--config");
    let name = config_path.as_deref().and_then(Path::file_stem).map_or("tiny".into(), |s| s.to_string_lossy().into_owned());
    let run: PathBuf = arg(&args, "--run").unwrap_or_else(|| PathBuf::from(format!("target/bench-compress-{name}")));
    let mut overrides = vec![format!("train.threads={threads}")];
    if let Some(steps) = arg::<u64>(&args, "--steps") {
        overrides.extend([format!("train.steps={steps}"), format!("train.warmup_steps={}", (steps / 10).max(1))]);
    }
    let be = Cpu::new(threads);
    let config = Config::load(config_path.as_deref(), &overrides).expect("config");
    let steps = config.train.steps;
    let ck = trained_checkpoint(&config, &run);
    let data = prepare(&config, &run.join("data")).expect("data");
    let (model, ..) = motley::train::trainer::load_checkpoint(&ck, &be).expect("checkpoint");
    let t = &config.train;
    let fp32 = validation_loss(&be, &model, &data.val, t.batch_size, t.seq_len, t.eval_batches).expect("eval");
    let val_tokens = t.eval_batches * t.batch_size * t.seq_len;
    println!(
        "\nmodel `{name}`: {} params ({} layers, d_model {}, vocab {}, experts {:?}), {steps} steps on {}; val: {val_tokens} tokens; calibration: {calib_tokens} training tokens (JLCM and share rows); {threads} threads",
        model.n_params(),
        config.model.n_layers,
        config.model.d_model,
        config.model.vocab_size,
        config.moe.expert_widths,
        config.data.corpus
    );
    println!("embeddings and head dense f16, norms and routers f32; groups {groups}; JLCM per-group codebooks, experts folded; `share`: bits per expert by routed share\n");
    println!("| method | bits | file KiB | bits/param (whole file) | bits/weight (compressed matrices, payload) | val ppl | Δ ppl | compress s |");
    println!("|---|---|---|---|---|---|---|---|");
    let fp32_bytes = 4 * model.n_params();
    println!("| fp32 | 32 | {:.0} | 32.00 | 32.00 | {:.3} | — | — |", fp32_bytes as f64 / 1024.0, fp32.exp());
    let mut deltas = Vec::new();
    let mut allocations = Vec::new();
    let all = [(Method::Rtn, ExpertBits::Uniform), (Method::Kmeans, ExpertBits::Uniform), (Method::Kmeans, ExpertBits::Share), (Method::Jlcm, ExpertBits::Uniform), (Method::Jlcm, ExpertBits::Share)];
    let selected: Option<String> = arg(&args, "--rows");
    let rates: Vec<f32> = arg::<String>(&args, "--bits").map_or(vec![2.0, 2.5, 3.0, 4.0], |s| s.split(',').map(|b| b.parse().expect("--bits: numbers")).collect());
    for (method, expert_bits) in all {
        let share = expert_bits == ExpertBits::Share;
        let name = match method {
            Method::Rtn => "RTN",
            Method::Kmeans => "k-means",
            Method::Jlcm => "JLCM",
        };
        let label = format!("{name}{}", if share { " share" } else { "" });
        let key = label.to_lowercase().replace(' ', "-");
        if selected.as_ref().is_some_and(|s| !s.split(',').any(|k| k == key)) {
            continue;
        }
        for &bits in &rates {
            let out = run.join(format!("compressed-{key}-{bits}"));
            let a = CompressArgs {
                checkpoint: ck.clone(),
                method,
                bits,
                groups,
                codebooks: CodebookKind::PerGroup,
                expert_bits,
                calib_tokens,
                out,
                embeddings: Embeddings::Dense(CodebookDtype::F16),
                eval_batches: t.eval_batches,
            };
            let r = run_compress(&be, &a).expect("compress");
            let ppl = r.val_ppl.unwrap_or(f64::NAN);
            let delta = ppl - fp32.exp();
            deltas.push((label.clone(), bits, delta));
            if let (Some(w), Some(t), true) = (&r.expert_bits, &r.expert_tokens, bits == 2.5) {
                allocations.push((label.clone(), w.clone(), t.clone()));
            }
            println!(
                "| {label} | {bits} | {:.0} | {:.2} | {:.2} | {ppl:.3} | {delta:+.3} | {:.1} |",
                r.file_bytes as f64 / 1024.0,
                r.bits_per_param,
                r.matrix_bits_per_weight,
                r.seconds
            );
        }
    }
    for (label, widths, tokens) in allocations {
        println!("\n{label} at 2.5 bits, expert bits per layer (calibration tokens routed to each expert):");
        for (w, t) in widths.iter().zip(&tokens) {
            println!("  {w:?} ({t:?})");
        }
    }
    let at = |label: &str| deltas.iter().find(|(l, b, _)| l == label && *b == 2.5).map(|d| d.2).unwrap_or(f64::NAN);
    let (j, k) = (at("JLCM"), at("k-means"));
    println!(
        "\ntarget (issue 9): JLCM's perplexity increase at 2.5 bits ≤ half of k-means': JLCM {j:+.3} vs k-means {k:+.3} → {}",
        if j <= 0.5 * k { "holds" } else { "does NOT hold" }
    );
}
