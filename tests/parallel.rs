//! Data and expert parallelism in training, ranks simulated on threads (the same `train` runs
//! under `mpirun` with MPI ranks, see tests/mpi.rs).
//!
//! The key property (issue: parallel folding): 4 ranks as DP=4, DP=2×EP=2 and EP=4 train 20
//! steps with the same loss curve as 1 rank on the same global batch.
//! - Aux losses off: every configuration matches 1 rank within 1e-5 relative per step. Only f32
//!   summation order differs (gradients summed over ranks, expert rows grouped differently).
//! - Aux losses on: each data-parallel rank's aux losses use its local routing (as in Megatron),
//!   so 4 ranks differ from 1 rank, but folding EP onto the same 4 ranks must not change
//!   anything: DP=2×EP=2 and EP=4 match DP=4 within 1e-5.
//! - The checkpoints the expert-parallel runs write (experts gathered from their ranks) hold the
//!   same model as the data-parallel run's, within 1e-4 absolute.

use std::path::{Path, PathBuf};

use motley::config::Config;
use motley::parallel::comm::LocalGroup;
use motley::train::checkpoint;
use motley::train::trainer::{train, TrainOptions};

const STEPS: u64 = 20;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("motley-parallel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(ep: usize, aux: bool, extra: &[&str]) -> Config {
    let mut set: Vec<String> = [
        "model.vocab_size=256", "data.tokenizer=\"byte\"", "model.d_model=64", "model.n_layers=2", "moe.expert_widths=[32,64,96,128]",
        "train.batch_size=8", "train.seq_len=64", "model.seq_len=64", "train.threads=1", "train.eval_every=10", "train.eval_batches=2",
        "train.warmup_steps=2", "checkpoint.every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.push(format!("train.steps={STEPS}"));
    set.push(format!("parallel.ep={ep}"));
    if !aux {
        set.extend(["moe.p_penalty=0.0", "moe.z_loss=0.0", "moe.load_balance=0.0"].map(String::from));
    }
    set.extend(extra.iter().map(|s| s.to_string()));
    Config::default_with(&set).unwrap()
}

/// Trains on `ranks` simulated ranks (with `extra` config overrides); returns the run directory.
fn run(name: &str, ranks: usize, ep: usize, aux: bool, cache: &Path, extra: &[&str]) -> PathBuf {
    let out = temp(name);
    let cfg = config(ep, aux, extra);
    let opts = TrainOptions { out: out.clone(), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: Some(cache.to_path_buf()) };
    let results = LocalGroup::run(ranks, |comm| train(&cfg, &opts, &comm).map(|s| s.steps)).unwrap();
    for (r, res) in results.into_iter().enumerate() {
        assert_eq!(res.unwrap_or_else(|e| panic!("{name}: rank {r}: {e}")), STEPS);
    }
    out
}

fn records(out: &Path, kind: &str, field: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .map(|r| r[field].as_f64().unwrap())
        .collect()
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs()).fold(0.0, f64::max)
}

/// Largest absolute difference between the final checkpoints' parameters, tensor by tensor.
fn max_param_diff(a: &Path, b: &Path) -> f32 {
    let load = |out: &Path| {
        let dir = checkpoint::latest(out).unwrap().expect("a checkpoint");
        let text = std::fs::read_to_string(dir.join("state.json")).unwrap();
        let state: checkpoint::TrainState = serde_json::from_str(&text).unwrap();
        let cfg = Config::from_toml_str(&state.config_toml, "state.json", &[]).unwrap();
        (checkpoint::load(&dir, &cfg.config_hash()).unwrap(), cfg)
    };
    let ((ca, cfg), (cb, _)) = (load(a), load(b));
    let layout = motley::model::params::ParamLayout::new(&cfg.model, &cfg.moe);
    let mut worst = 0f32;
    for s in &layout.specs {
        let (x, y) = (ca.model.get(&s.name, &s.shape).unwrap(), cb.model.get(&s.name, &s.shape).unwrap());
        worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
    }
    worst
}

#[test]
fn expert_and_data_parallel_match_one_rank() {
    let cache = temp("data");
    let one = run("one", 1, 1, false, &cache, &[]);
    let base = records(&one, "train", "lm_loss");
    assert_eq!(base.len(), STEPS as usize);
    // "gate-up" runs recompute the experts' gate/up product in the backward, on each rank's
    // exchanged rows; "recompute" runs recompute every layer before its backward, exchanging
    // the rows again (and, with the gate/up product saved, writing it into the exchanged layout).
    let gate_up = "memory.gate_up=\"recompute\"";
    let recompute = "memory.policy=\"recompute\"";
    let runs: [(&str, usize, &[&str]); 7] = [
        ("dp4", 1, &[]),
        ("dp2-ep2", 2, &[]),
        ("ep4", 4, &[]),
        ("ep2-gate-up", 2, &[gate_up]),
        ("ep2-gate-up-recompute", 2, &[gate_up, recompute]),
        ("ep2-recompute", 2, &[recompute]),
        ("ep4-recompute", 4, &[recompute]),
    ];
    for (name, ep, extra) in runs {
        let out = run(name, 4, ep, false, &cache, extra);
        let d = max_rel_diff(&base, &records(&out, "train", "lm_loss"));
        assert!(d < 1e-5, "{name}, aux off: train loss differs from 1 rank by {d:e} (relative)");
        let d = max_rel_diff(&records(&one, "eval", "val_loss"), &records(&out, "eval", "val_loss"));
        assert!(d < 1e-5, "{name}, aux off: validation loss differs from 1 rank by {d:e} (relative)");
        let p = max_param_diff(&one, &out);
        assert!(p < 1e-4, "{name}: final parameters differ from 1 rank by {p:e}");
    }

    // Offloading half of each token-split tensor recomputes the later half of the tokens: each
    // rank exchanges only those rows, and a saved gate/up product is split chunk by chunk of
    // the exchanged layout (the first of three layers offloads; the last two keep).
    let three = "model.n_layers=3";
    let one = run("one-3", 1, 1, false, &cache, &[three]);
    for (name, extra) in [("ep2-offload-3", &[][..]), ("ep2-offload-3-gate-up", &[gate_up])] {
        let set: Vec<&str> = [three, "memory.policy=\"offload\"", "memory.alpha=0.5"].into_iter().chain(extra.iter().copied()).collect();
        let out = run(name, 4, 2, false, &cache, &set);
        let d = max_rel_diff(&records(&one, "train", "lm_loss"), &records(&out, "train", "lm_loss"));
        assert!(d < 1e-5, "{name}: train loss differs from 1 rank by {d:e} (relative)");
        let p = max_param_diff(&one, &out);
        assert!(p < 1e-4, "{name}: final parameters differ from 1 rank by {p:e}");
    }

    let dp4 = run("dp4-aux", 4, 1, true, &cache, &[]);
    let dp_losses = records(&dp4, "train", "loss");
    for (name, ep) in [("dp2-ep2-aux", 2), ("ep4-aux", 4)] {
        let out = run(name, 4, ep, true, &cache, &[]);
        let d = max_rel_diff(&dp_losses, &records(&out, "train", "loss"));
        assert!(d < 1e-5, "{name}, aux on: loss differs from 4 data-parallel ranks by {d:e} (relative)");
    }

    // With an expert capacity, each rank caps its own tokens before the exchange: expert
    // parallelism drops what data parallelism drops.
    let cap = ["moe.capacity_factor=1.0"];
    let dp4 = run("dp4-cap", 4, 1, true, &cache, &cap);
    assert!(records(&dp4, "train", "dropped_slots").iter().all(|&d| d > 0.0), "a capacity of 1.0 drops slots");
    let out = run("dp2-ep2-cap", 4, 2, true, &cache, &cap);
    let d = max_rel_diff(&records(&dp4, "train", "loss"), &records(&out, "train", "loss"));
    assert!(d < 1e-5, "dp2-ep2 with capacity: loss differs from 4 data-parallel ranks by {d:e} (relative)");
    let d = max_rel_diff(&dp_losses, &records(&dp4, "train", "loss"));
    assert!(d > 1e-4, "dropping slots changed the loss by only {d:e}");
}

/// Micro-batches are data-parallel ranks in time: 1 rank adding up 4 micro-batches of 2
/// sequences runs the partition of the batch that 4 data-parallel ranks of 2 run, aux losses
/// (each micro-batch's own routing) and expert capacity (each forward's own tokens) included,
/// so it trains the same curve within 1e-5 (only the f32 order of the sums differs); so do 2
/// ranks as EP=2 adding up 2 micro-batches each.
#[test]
fn micro_batches_match_data_parallel_ranks() {
    let cache = temp("data-micro");
    let micro = "train.micro_batch_size=2";
    for (what, extra) in [("aux", &[][..]), ("cap", &["moe.capacity_factor=1.0"][..])] {
        // Run names unique to this test: tests run at once in one process, and a name is a directory.
        let dp4 = run(&format!("micro-dp4-{what}"), 4, 1, true, &cache, extra);
        let with_micro: Vec<&str> = extra.iter().copied().chain([micro]).collect();
        let mut runs = vec![(format!("one-micro-{what}"), run(&format!("one-micro-{what}"), 1, 1, true, &cache, &with_micro))];
        if what == "aux" {
            runs.push(("ep2-micro-aux".into(), run("ep2-micro-aux", 2, 2, true, &cache, &with_micro)));
        }
        for (name, out) in runs {
            for (kind, field) in [("train", "loss"), ("train", "aux_loss"), ("train", "p_penalty"), ("train", "grad_norm"), ("train", "dropped_slots"), ("train", "activated_params"), ("eval", "val_loss")] {
                let d = max_rel_diff(&records(&dp4, kind, field), &records(&out, kind, field));
                assert!(d < 1e-5, "{name}: {field} differs from 4 data-parallel ranks by {d:e} (relative)");
            }
            let counts = |out: &Path| std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|r| r["kind"] == "train").map(|r| r["expert_counts"].clone()).collect::<Vec<_>>();
            assert_eq!(counts(&dp4), counts(&out), "{name}: the batch's expert counts");
        }
    }
    // Each rank's share must split into whole micro-batches.
    let opts = TrainOptions { out: temp("micro-4-of-2"), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: Some(cache.clone()) };
    let results = LocalGroup::run(4, |comm| train(&config(1, false, &["train.micro_batch_size=4"]), &opts, &comm).map(|s| s.steps)).unwrap();
    let e = results[0].as_ref().expect_err("an error").to_string();
    assert!(e.contains("train.micro_batch_size") && e.contains("8 / 4 ranks = 2"), "{e}");
}

#[test]
fn expert_parallel_sizes_are_checked() {
    let cache = temp("data-check");
    let opts = |n| TrainOptions { out: temp(n), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: Some(cache.clone()) };
    // One process cannot hold 2 expert-parallel ranks.
    let e = train(&config(2, false, &[]), &opts("ep2-one-rank"), &motley::parallel::comm::SingleProcess).err().expect("an error").to_string();
    assert!(e.contains("parallel.ep") && e.contains("mpirun"), "{e}");
    // 3 does not divide 4 experts.
    let e = Config::default_with(&["moe.expert_widths=[32,64,96,128]".into(), "parallel.ep=3".into()]).unwrap_err().to_string();
    assert!(e.contains("parallel.ep") && e.contains("divisor"), "{e}");
}
