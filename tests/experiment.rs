//! A tiny version of `motley experiment hmoe` and `motley routes` through the real binary:
//! outputs exist, the FLOP budget stops runs within one step, and counted FLOPs per token of
//! the dense and the homogeneous Top-2 model differ by exactly what their shapes predict.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const D_MODEL: f64 = 32.0;
const LAYERS: f64 = 2.0;
const EXPERTS: f64 = 8.0;
const TOTAL_WIDTH: f64 = 128.0;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("motley-exp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn motley(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(args).output().expect("run motley");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "motley {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sweep(out: &Path, budget: &str) -> String {
    let out = out.to_str().unwrap();
    let mut args = vec!["experiment", "hmoe", "--out", out, "--variants", "dense,moe-top2", "--seeds", "1,2", "--max-flops", budget, "--evals", "2"];
    for s in [
        "model.vocab_size=256",
        "data.tokenizer=byte",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.n_kv_heads=2",
        "model.seq_len=32",
        "train.seq_len=32",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.eval_batches=2",
        "moe.total_width=128",
    ] {
        args.extend(["--set", s]);
    }
    motley(&args)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn tiny_sweep_writes_outputs_with_consistent_flops() {
    let out = temp("sweep");
    sweep(&out, "1e9");
    for f in ["results.md", "results.json", "loss_vs_flops.png", "shares_moe-top2.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join("shares_dense.png").exists(), "a dense model has no expert shares to plot");
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| dense |") && table.contains("| moe-top2 |") && table.contains("austen val"), "{table}");

    let runs = json(&out.join("results.json"));
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 4);
    let per_token = |name: &str| -> f64 {
        let r = runs.iter().find(|r| r["variant"] == name).unwrap();
        let (flops, steps, tokens) = (r["flops"].as_f64().unwrap(), r["steps"].as_f64().unwrap(), r["tokens"].as_f64().unwrap());
        // The budget stops the run on the step that reaches it.
        assert!(flops >= 1e9 && flops - flops / steps < 1e9, "{name}: {flops} FLOPs in {steps} steps");
        assert_eq!(r["curve"].as_array().unwrap().last().unwrap()[0].as_f64().unwrap(), flops);
        flops / tokens
    };
    let (dense, top2) = (per_token("dense"), per_token("moe-top2"));
    // Same attention and head; per layer the dense FFN costs 6·C·T forward FLOPs per token and
    // Top-2 of 8 equal experts 6·C·(2T/8), while the router grows from 1 to 8 outputs (2·C each).
    let expected = 3.0 * LAYERS * (6.0 * D_MODEL * TOTAL_WIDTH * (1.0 - 2.0 / EXPERTS) - 2.0 * D_MODEL * (EXPERTS - 1.0));
    assert!(((dense - top2) - expected).abs() < 1e-6 * dense, "dense {dense} − top-2 {top2} FLOPs/token ≠ {expected}");
    assert!(dense / top2 > 1.5, "dense {dense} vs top-2 {top2} FLOPs/token");

    // A second sweep reuses finished runs; a different budget in the same directory is refused.
    let again = sweep(&out, "1e9");
    assert!(again.contains("4 runs"), "{again}");
    let o = Command::new(env!("CARGO_BIN_EXE_motley"))
        .args(["experiment", "hmoe", "--out", out.to_str().unwrap(), "--variants", "dense", "--seeds", "1", "--max-flops", "2e9", "--set", "data.tokenizer=byte", "--set", "model.vocab_size=256"])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("budget"), "{}", String::from_utf8_lossy(&o.stderr));

    // Routing analytics of one run: Top-2 sends every token to exactly two experts.
    let run = out.join("runs/moe-top2-s1");
    let text = motley(&["routes", "--checkpoint", run.to_str().unwrap(), "--data-cache", out.join("data").to_str().unwrap(), "--batches", "2", "--top", "3"]);
    assert!(text.contains("layer 1"), "{text}");
    for f in ["routes.json", "routes_shares.png", "routes_activated.png"] {
        assert!(run.join("routes").join(f).is_file(), "routes/{f} missing");
    }
    let routes = json(&run.join("routes/routes.json"));
    for layer in routes["layers"].as_array().unwrap() {
        assert!((layer["mean_experts_per_token"].as_f64().unwrap() - 2.0).abs() < 1e-9, "{layer}");
        assert!(layer["smallest"]["most_frequent"].as_array().unwrap().len() <= 3);
        let shares: f64 = layer["share"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).sum();
        assert!((shares - 2.0).abs() < 1e-9, "{layer}");
    }
    assert!(!routes["over_training"].as_array().unwrap().is_empty());
    let listed = routes["all_layers"][0]["most_frequent"].as_array().unwrap().len() + routes["all_layers"][1]["most_frequent"].as_array().unwrap().len();
    assert!(listed > 0, "no tokens listed for the smallest or largest expert");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_experiment_input_names_the_value() {
    let out = temp("bad");
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(["experiment", "hmoe", "--out", out.to_str().unwrap(), "--variants", "moe-top9"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("moe-top9") && err.contains("hmoe-topp"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(["experiment", "hmoe", "--out", out.to_str().unwrap(), "--max-flops", "0"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--max-flops"));
    let o = Command::new(env!("CARGO_BIN_EXE_motley")).args(["routes", "--checkpoint", "/nonexistent/run"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent/run"));
}
