//! Data and expert parallelism with every rank on the CUDA backend, against one rank: on the
//! emulated device in CI (two emulated GPUs, NCCL emulated), on a GPU machine where
//! `MOTLEY_PARITY_DEVICE` says so (see tests/cuda_parity.rs); and the emulated NCCL's checks.
//! A test binary of its own, since it links the whole trainer, which the GPU session need not
//! carry with the parity tests.
#![cfg(feature = "cuda")]

#[path = "cuda_emu/build.rs"]
mod emu_build;

/// Data and expert parallelism with every rank on the CUDA backend (ranks on threads, as
/// tests/parallel.rs runs them, each on a GPU of its own where there are enough: the emulator
/// has two; `mpirun` gives each rank its node-local GPU): 2 ranks as DP=2 and as EP=2 train the
/// 1-rank run's loss curve on the same global batch, and their checkpoints (the EP run's experts
/// gathered from both devices) hold its model. Only the f32 order of the ranks' gradient sums
/// differs, which can turn a bf16 working weight's rounding: losses within 1e-3 relative,
/// parameters within 1e-3. On the emulator the gradients are summed (and EP's rows exchanged)
/// by (emulated) NCCL on the devices, and with `parallel.nccl = false` through host memory: the
/// same bits, since both add the ranks in order and moving rows changes none; 4 ranks on its 2
/// devices fall back to host memory. EP=2 recomputing every layer before its backward (the rows
/// exchanged again; the gate/up product saved or recomputed) gives EP=2's bits. DP=2 adding up
/// two micro-batches a rank (NCCL summing only the last one's ranges) gives the host path's.
#[test]
fn data_and_expert_parallel_match_one_rank() {
    use motley::config::Config;
    use motley::parallel::comm::LocalGroup;
    use motley::train::checkpoint;
    use motley::train::trainer::{train as train_run, TrainOptions};
    const STEPS: u64 = 4;
    let Some(device) = emu_build::device("cuda_parallel") else { return };
    let emulated = device == "emulator";
    let temp = |name: &str| {
        let d = std::env::temp_dir().join(format!("motley-cuda-parallel-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let cache = temp("data");
    // The run's directory and how its collectives ran.
    let run = |name: &str, ranks: usize, ep: usize, nccl: bool, extra: &[&str]| {
        let set: Vec<String> = [
            "device=\"cuda\"", "model.vocab_size=256", "data.tokenizer=\"byte\"", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=4", "moe.expert_widths=[32,64,96,128]", "train.batch_size=4", "train.seq_len=32", "model.seq_len=32",
            "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=1", "checkpoint.every=0", "moe.p_penalty=0.0",
            "moe.z_loss=0.0", "moe.load_balance=0.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("train.steps={STEPS}"), format!("parallel.ep={ep}"), format!("parallel.nccl={nccl}")])
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let cfg = Config::default_with(&set).unwrap();
        let out = temp(name);
        let opts = TrainOptions { out: out.clone(), resume: false, sample_prompt: String::new(), sample_tokens: 0, data_cache: Some(cache.clone()) };
        let summaries: Vec<_> = LocalGroup::run(ranks, |comm| train_run(&cfg, &opts, &comm)).unwrap().into_iter().enumerate().map(|(r, res)| res.unwrap_or_else(|e| panic!("{name}: rank {r}: {e}"))).collect();
        assert!(summaries.iter().all(|s| s.steps == STEPS), "{name}: every rank trains {STEPS} steps");
        (out, summaries[0].collectives.clone())
    };
    let losses = |out: &std::path::Path| -> Vec<f64> {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        records.filter(|r| r["kind"] == "train").map(|r| r["lm_loss"].as_f64().unwrap()).collect()
    };
    let params = |out: &std::path::Path| -> Vec<f32> {
        let dir = checkpoint::latest(out).unwrap().expect("a checkpoint");
        let state: checkpoint::TrainState = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
        let cfg = Config::from_toml_str(&state.config_toml, "state.json", &[]).unwrap();
        let ck = checkpoint::load(&dir, &cfg.config_hash()).unwrap();
        let layout = motley::model::params::ParamLayout::new(&cfg.model, &cfg.moe);
        layout.specs.iter().flat_map(|s| ck.model.get(&s.name, &s.shape).unwrap().to_vec()).collect()
    };
    let (one, _) = run("one", 1, 1, true, &[]);
    let (base, base_params) = (losses(&one), params(&one));
    assert_eq!(base.len(), STEPS as usize);
    let mut runs = Vec::new();
    // The last two recompute every layer before its backward, exchanging the rows again, with
    // the gate/up product saved (in the exchanged layout) or recomputed too.
    let recompute: &[&str] = &["memory.policy=\"recompute\""];
    let recompute_gate_up: &[&str] = &["memory.policy=\"recompute\"", "memory.gate_up=\"recompute\""];
    // The last two add up two micro-batches of one sequence a step on each rank (NCCL sums
    // each range as the second one's backward finishes it).
    let micro: &[&str] = &["train.micro_batch_size=1"];
    let cases = [
        ("dp2", 1, true, &[][..]),
        ("dp2-host", 1, false, &[]),
        ("ep2", 2, true, &[]),
        ("ep2-host", 2, false, &[]),
        ("ep2-recompute", 2, true, recompute),
        ("ep2-recompute-gate-up", 2, true, recompute_gate_up),
        ("dp2-micro", 1, true, micro),
        ("dp2-micro-host", 1, false, micro),
    ];
    for (name, ep, nccl, extra) in cases {
        let (out, collectives) = run(name, 2, ep, nccl, extra);
        let (got, got_params) = (losses(&out), params(&out));
        let d = base.iter().zip(&got).map(|(a, b)| (a - b).abs() / a.abs()).fold(0.0, f64::max);
        let p = base_params.iter().zip(&got_params).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{name}: {collectives}; losses {got:?} vs one rank's {base:?}: {d:.2e} relative; parameters within {p:.2e}");
        assert!(d < 1e-3, "{name}: train loss differs from 1 rank by {d:e} (relative)");
        assert!(p < 1e-3, "{name}: final parameters differ from 1 rank by {p:e}");
        if emulated {
            let want: &[&str] = match (nccl, ep) {
                (true, 1) => &["gradients summed by NCCL"],
                (true, _) => &["gradients summed by NCCL", "rows exchanged by NCCL"],
                (false, _) => &["through host memory"],
            };
            assert!(want.iter().all(|w| collectives.contains(w)), "{name}: {collectives}; expected {want:?}");
        }
        runs.push((got, got_params));
    }
    if emulated {
        // 4 ranks on the emulator's 2 devices: NCCL cannot take them, every rank says so.
        let (_, collectives) = run("dp4-shared", 4, 1, true, &[]);
        assert!(collectives.contains("through host memory") && collectives.contains("share a GPU"), "4 ranks on 2 devices: {collectives}");
        let bits = |(l, p): &(Vec<f64>, Vec<f32>)| (l.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), p.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert!(bits(&runs[0]) == bits(&runs[1]), "DP=2: NCCL's sums and the host's differ");
        assert!(bits(&runs[2]) == bits(&runs[3]), "EP=2: NCCL's exchanges and sums and the host's differ");
        assert!(bits(&runs[6]) == bits(&runs[7]), "DP=2 with micro-batches: NCCL's sums and the host's differ");
        for (run, how) in [(&runs[4], "recomputing"), (&runs[5], "recomputing the gate/up product too")] {
            assert!(bits(&runs[2]) == bits(run), "EP=2: {how} (rows exchanged again) differs from keeping");
        }
    }
}

/// The emulated NCCL reports misuse on every rank instead of hanging or summing garbage: ranks
/// passing different lengths to an all-reduce, and a receive longer than the matching send.
/// The error names NCCL's complaint and the remedy.
#[test]
fn nccl_misuse_fails_on_every_rank() {
    use motley::backend::cuda::{CudaBackend, Storage};
    use motley::backend::{Backend, GroupOnDevice};
    use motley::parallel::comm::LocalGroup;
    if emu_build::device("cuda_parallel") != Some("emulator") {
        return;
    }
    let results = LocalGroup::run(2, |comm| {
        let r = motley::parallel::comm::Communicator::rank(&comm);
        let be = CudaBackend::for_local_rank(r, Storage::Bf16).unwrap();
        let GroupOnDevice::Opened(group) = be.device_group(&comm).unwrap() else { panic!("two emulated GPUs open NCCL") };
        let mut sums = be.alloc_f32(8);
        let reduce = group.all_reduce_sum(CudaBackend::view_mut(&mut sums, 0..4 + r)).map_err(|e| e.to_string());
        let rows = be.alloc(8);
        let mut got = be.alloc(8);
        let exchange = group.exchange(CudaBackend::full(&rows), &[(1 - r, 0..4)], CudaBackend::full_mut(&mut got), &[(1 - r, 0..4 + r)]).map_err(|e| e.to_string());
        Ok::<_, motley::Error>((reduce, exchange))
    })
    .unwrap();
    for (r, res) in results.into_iter().enumerate() {
        let (reduce, exchange) = res.unwrap();
        let e = reduce.expect_err("different lengths");
        assert!(e.contains("every rank must pass the same") && e.contains("parallel.nccl = false"), "rank {r}: {e}");
        if r == 1 {
            let e = exchange.expect_err("a receive longer than its send");
            assert!(e.contains("receives 5 elements"), "rank {r}: {e}");
        }
    }
}
