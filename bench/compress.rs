//! Model-level compression benchmark: RTN, k-means and JLCM at 2, 2.5, 3 and 4 bits on a small
//! HMoE trained on the embedded Austen corpus, each through the real `motley compress` path
//! (`run_compress`: calibrate, compress, write the compressed checkpoint, reload it from disk,
//! evaluate validation perplexity).
//!
//! The model is the default config (`configs/tiny.toml`) trained for `--steps` steps; the trained
//! checkpoint is kept under `--run` and reused by later runs with the same step count.
//!
//! Run: `cargo bench --bench compress [-- --steps 300 --threads 2 --calib-tokens 4096 --run DIR]`
//! (about 2.5 min of training plus 5 min of compression and evaluation on 2 cores).

use std::path::{Path, PathBuf};

use motley::backend::cpu::Cpu;
use motley::compress::checkpoint::{run_compress, CompressArgs};
use motley::parallel::comm::SingleProcess;
use motley::train::trainer::{train, validation_loss, TrainOptions};
use motley::compress::{CodebookDtype, CodebookKind, Embeddings, Method};
use motley::config::Config;
use motley::data::prepare::prepare;

fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Trains the default model for `config.train.steps` steps with the real training loop and
/// returns its final checkpoint. Reuses an existing run of that length.
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
    let threads = arg(&args, "--threads", 2);
    let steps: u64 = arg(&args, "--steps", 300);
    let calib_tokens = arg(&args, "--calib-tokens", 4096);
    let groups = arg(&args, "--groups", 8);
    let run: PathBuf = arg(&args, "--run", PathBuf::from("target/bench-compress-run"));
    let be = Cpu::new(threads);
    let config = Config::default_with(&[format!("train.steps={steps}"), format!("train.warmup_steps={}", (steps / 10).max(1)), format!("train.threads={threads}")]).expect("config");
    let ck = trained_checkpoint(&config, &run);

    let data = prepare(&config, &run.join("data")).expect("data");
    let (model, ..) = motley::train::trainer::load_checkpoint(&ck, &be).expect("checkpoint");
    let t = &config.train;
    let fp32 = validation_loss(&be, &model, &data.val, t.batch_size, t.seq_len, t.eval_batches).expect("eval");
    let val_tokens = t.eval_batches * t.batch_size * t.seq_len;
    println!(
        "\nmodel: {} params ({} layers, d_model {}, experts {:?}), {steps} steps; val: {val_tokens} tokens of Austen; calibration: {calib_tokens} training tokens (JLCM only); {threads} threads",
        model.n_params(),
        config.model.n_layers,
        config.model.d_model,
        config.moe.expert_widths
    );
    println!("embeddings and head dense f16, norms and routers f32; groups {groups}; JLCM per-group codebooks, experts folded\n");
    println!("| method | bits | file KiB | bits/param (whole file) | bits/weight (compressed matrices, payload) | val ppl | Δ ppl | compress s |");
    println!("|---|---|---|---|---|---|---|---|");
    let fp32_bytes = 4 * model.n_params();
    println!("| fp32 | 32 | {:.0} | 32.00 | 32.00 | {:.3} | — | — |", fp32_bytes as f64 / 1024.0, fp32.exp());
    let mut deltas = Vec::new();
    for method in [Method::Rtn, Method::Kmeans, Method::Jlcm] {
        for bits in [2.0f32, 2.5, 3.0, 4.0] {
            let out = run.join(format!("compressed-{method:?}-{bits}").to_lowercase());
            let a = CompressArgs {
                checkpoint: ck.clone(),
                method,
                bits,
                groups,
                codebooks: CodebookKind::PerGroup,
                calib_tokens,
                out,
                embeddings: Embeddings::Dense(CodebookDtype::F16),
                eval_batches: t.eval_batches,
            };
            let r = run_compress(&be, &a).expect("compress");
            let ppl = r.val_ppl.unwrap_or(f64::NAN);
            let delta = ppl - fp32.exp();
            deltas.push((method, bits, delta));
            println!(
                "| {method:?} | {bits} | {:.0} | {:.2} | {:.2} | {ppl:.3} | {delta:+.3} | {:.1} |",
                r.file_bytes as f64 / 1024.0,
                r.bits_per_param,
                r.matrix_bits_per_weight,
                r.seconds
            );
        }
    }
    let at = |m: Method| deltas.iter().find(|(mm, b, _)| *mm == m && *b == 2.5).map(|d| d.2).unwrap_or(f64::NAN);
    let (j, k) = (at(Method::Jlcm), at(Method::Kmeans));
    println!(
        "\ntarget (issue 9): JLCM's perplexity increase at 2.5 bits ≤ half of k-means': JLCM {j:+.3} vs k-means {k:+.3} → {}",
        if j <= 0.5 * k { "holds" } else { "does NOT hold" }
    );
}
