//! Data and expert parallelism over MPI on this machine: step time of the default config for
//! 1, 2 and 4 ranks, with experts replicated (EP = 1) or sharded (EP = 2, 4), on the same global
//! batch. Each case is a real `motley train` run (under `mpirun` for more than one rank); the
//! figure is the median tokens/s of steps 6–30 from its `metrics.jsonl`.
//!
//! Run: `cargo bench --features mpi --bench mpi_scaling [-- --steps 30 --set KEY=VALUE ...]`
//! (needs OpenMPI); each `--set` overrides the config of every case, e.g. `--set
//! memory.policy='"recompute"' --set memory.gate_up='"recompute"'` for MEMO's recompute.

use std::path::Path;
use std::process::{Command, Stdio};

fn arg(args: &[String], flag: &str, default: usize) -> usize {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median tokens/s of the steps after the first five.
fn median_tokens_per_s(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let mut rates: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|r| r["kind"] == "train" && r["step"].as_u64().unwrap_or(0) > 5)
        .map(|r| r["tokens_per_s"].as_f64().expect("tokens_per_s"))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = arg(&args, "--steps", 30);
    let overrides: Vec<&String> = args.windows(2).filter(|w| w[0] == "--set").map(|w| &w[1]).collect();
    let tokens_per_step = 16.0 * 128.0; // configs/tiny.toml: batch 16 × seq 128
    println!("| ranks | EP | EDP | threads per rank | tokens/s | ms per step |");
    println!("|---|---|---|---|---|---|");
    for (ranks, ep) in [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)] {
        let out = std::env::temp_dir().join(format!("motley-bench-parallel-{}-{ranks}-{ep}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let threads = if ranks == 1 { 2 } else { 1 };
        let mut cmd = if ranks == 1 {
            Command::new(env!("CARGO_BIN_EXE_motley"))
        } else {
            let mut c = Command::new("mpirun");
            c.args(["--oversubscribe", "--allow-run-as-root", "-np", &ranks.to_string(), env!("CARGO_BIN_EXE_motley")]);
            c
        };
        cmd.args(["train", "--prompt", "", "--steps", &steps.to_string(), "--out", out.to_str().expect("utf-8 path")]);
        for set in ["train.eval_every=0".to_string(), format!("train.threads={threads}"), format!("parallel.ep={ep}")].iter().chain(overrides.iter().copied()) {
            cmd.args(["--set", set]);
        }
        let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("run motley");
        assert!(status.success(), "{ranks} ranks, EP {ep}: the run failed");
        let rate = median_tokens_per_s(&out);
        println!("| {ranks} | {ep} | {} | {threads} | {rate:.0} | {:.1} |", ranks / ep, 1e3 * tokens_per_step / rate);
        let _ = std::fs::remove_dir_all(&out);
    }
}
