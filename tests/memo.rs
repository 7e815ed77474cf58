//! MEMO policies: loss and every gradient must be bitwise identical whether a layer keeps its
//! activations, offloads a fraction α of them to the host tier and recomputes the rest, or
//! recomputes everything but attention; and whether the experts' gate/up product is saved or
//! recomputed by the backward (`memory.gate_up`).

mod common;

use common::*;
use motley::backend::cpu::Cpu;
use motley::config::GateUp;
use motley::memory::store::LayerPolicy;
use motley::memory::transients::EXPERT_CHUNK_ROWS;
use motley::model::config::Routing as Kind;
use motley::model::Model;
use motley::parallel::dispatch::{DispatchMode, DropPolicy};
use motley::rng::Rng;

const HOST: u64 = 1 << 30;

fn batch(seed: u64, vocab: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let stream: Vec<u32> = (0..n + 1).map(|_| rng.below(vocab) as u32).collect();
    (stream[..n].to_vec(), stream[1..].to_vec())
}

/// Loss bits, gradient bits and per-layer (kept, offloaded, recomputed) bytes of one step, with
/// experts dispatched by `mode`.
#[allow(clippy::too_many_arguments)]
fn step(kind: Kind, seed: u64, policy: LayerPolicy, gate_up: GateUp, b: usize, t: usize, chunk_rows: usize, mode: DispatchMode) -> (u64, Vec<u32>, Vec<(u64, u64, u64)>) {
    let be = Cpu::new(2);
    let (cfg, moe) = tiny_model(kind);
    let (inputs, targets) = batch(seed + 100, cfg.vocab_size, b * t);
    let mut model = Model::new(&be, cfg.clone(), moe, seed).unwrap().with_expert_chunk_rows(chunk_rows).with_dispatch(mode).unwrap();
    let mut store = model.new_store_with(vec![policy; cfg.n_layers], HOST, gate_up).unwrap();
    model.zero_grads(&be);
    let stats = model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
    assert_eq!(stats.dropped > 0, mode != DispatchMode::Dropless, "{mode:?}: {} slots dropped", stats.dropped);
    let traffic = (0..cfg.n_layers).map(|l| store.traffic(l)).map(|x| (x.kept, x.offloaded, x.recomputed)).collect();
    (stats.loss.to_bits(), model.grads.iter().map(|g| g.to_bits()).collect(), traffic)
}

fn policies() -> Vec<LayerPolicy> {
    let mut p = vec![LayerPolicy::Recompute];
    p.extend([0.0, 0.25, 0.5, 1.0].map(|alpha| LayerPolicy::Offload { alpha }));
    p
}

#[test]
fn every_policy_gives_bitwise_identical_loss_and_gradients() {
    for kind in [Kind::TopK, Kind::TopP] {
        for seed in [1, 2, 3] {
            // 3 × 11 tokens: α = 0.25 splits inside the first sequence, 0.5 inside the second.
            let (b, t) = (3, 11);
            let (loss, grads, keep_all) = step(kind, seed, LayerPolicy::Keep, GateUp::Save, b, t, EXPERT_CHUNK_ROWS, DispatchMode::Dropless);
            for gate_up in [GateUp::Save, GateUp::Recompute] {
            let (_, _, keep) = step(kind, seed, LayerPolicy::Keep, gate_up, b, t, EXPERT_CHUNK_ROWS, DispatchMode::Dropless);
            assert!(keep.iter().all(|&(k, o, r)| k > 0 && o == 0 && r == 0));
            if gate_up == GateUp::Recompute {
                assert!(keep.iter().zip(&keep_all).all(|(a, b)| a.0 < b.0), "an unsaved gate/up product keeps fewer bytes");
            }
            for policy in std::iter::once(LayerPolicy::Keep).chain(policies()) {
                let (l, g, traffic) = step(kind, seed, policy, gate_up, b, t, EXPERT_CHUNK_ROWS, DispatchMode::Dropless);
                assert_eq!(l, loss, "{kind:?} seed {seed} {policy:?} {gate_up:?}: loss differs from keep-all");
                let first = g.iter().zip(&grads).position(|(x, y)| x != y);
                assert_eq!(first, None, "{kind:?} seed {seed} {policy:?} {gate_up:?}: gradient element {first:?} differs from keep-all");
                for (l, (&(k, o, r), &(total, ..))) in traffic.iter().zip(&keep).enumerate() {
                    assert_eq!(k + o + r, total, "layer {l} {policy:?}: bytes must add up to the keep-all total");
                    match policy {
                        LayerPolicy::Recompute => assert!(o == 0 && r > 0 && k > 0),
                        LayerPolicy::Offload { alpha: 1.0 } => assert!(k == 0 && r == 0),
                        LayerPolicy::Offload { .. } => assert!(k == 0 && o > 0 && r > 0),
                        LayerPolicy::Keep => assert!(o == 0 && r == 0),
                    }
                }
            }
            }
        }
    }
}

/// Under an expert capacity, every policy still matches keep-all bitwise: the recompute runs the
/// kept slots of the dropped tokens again, and the router's backward sees the dropped slots.
#[test]
fn every_policy_matches_keep_all_under_an_expert_capacity() {
    let modes = [(Kind::TopK, DispatchMode::Capacity { factor: 0.9, policy: DropPolicy::Probs }), (Kind::TopP, DispatchMode::Capacity { factor: 0.8, policy: DropPolicy::Position })];
    for (kind, mode) in modes {
        let (b, t) = (3, 11);
        let (loss, grads, _) = step(kind, 5, LayerPolicy::Keep, GateUp::Save, b, t, EXPERT_CHUNK_ROWS, mode);
        let (dropless, ..) = step(kind, 5, LayerPolicy::Keep, GateUp::Save, b, t, EXPERT_CHUNK_ROWS, DispatchMode::Dropless);
        assert_ne!(loss, dropless, "{mode:?}: dropping changed nothing");
        for gate_up in [GateUp::Save, GateUp::Recompute] {
            for policy in policies() {
                let (l, g, _) = step(kind, 5, policy, gate_up, b, t, EXPERT_CHUNK_ROWS, mode);
                assert_eq!(l, loss, "{mode:?} {policy:?} {gate_up:?}: loss differs from keep-all");
                let first = g.iter().zip(&grads).position(|(x, y)| x != y);
                assert_eq!(first, None, "{mode:?} {policy:?} {gate_up:?}: gradient element {first:?} differs from keep-all");
            }
        }
    }
}

/// Several optimizer steps with a mix of policies per layer track keep-all exactly.
#[test]
fn mixed_policies_train_identically() {
    use motley::train::optim::{AdamWConfig, Optimizer};
    let run = |policies: Vec<LayerPolicy>| {
        let be = Cpu::new(2);
        let (cfg, moe) = tiny_model(Kind::TopP);
        let mut model = Model::new(&be, cfg.clone(), moe, 9).unwrap();
        let mut store = model.new_store_with(policies, HOST, GateUp::Save).unwrap();
        let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
        let mut opt = Optimizer::new(&be, opt_cfg, model.n_params());
        (0..4)
            .map(|s| {
                let (inputs, targets) = batch(s, cfg.vocab_size, 2 * 24);
                model.zero_grads(&be);
                let st = model.forward_backward(&be, &mut store, &inputs, &targets, 2, 24).unwrap();
                opt.update(&be, &model.layout, &mut model.params, &model.grads, 3e-3);
                st.loss.to_bits()
            })
            .collect::<Vec<_>>()
    };
    let keep = run(vec![LayerPolicy::Keep; 2]);
    assert_eq!(run(vec![LayerPolicy::Offload { alpha: 0.3 }, LayerPolicy::Recompute]), keep);
    assert_eq!(run(vec![LayerPolicy::Recompute, LayerPolicy::Offload { alpha: 0.7 }]), keep);
}

#[test]
fn a_full_host_tier_is_an_error_not_a_panic() {
    let be = Cpu::new(1);
    let (cfg, moe) = tiny_model(Kind::TopK);
    let (inputs, targets) = batch(1, cfg.vocab_size, 24);
    let mut model = Model::new(&be, cfg.clone(), moe, 1).unwrap();
    let mut store = model.new_store_with(vec![LayerPolicy::Offload { alpha: 1.0 }; 2], 1024, GateUp::Save).unwrap();
    let err = model.forward_backward(&be, &mut store, &inputs, &targets, 1, 24).unwrap_err();
    assert!(err.to_string().contains("host tier full"), "{err}");
    assert!(model.new_store_with(vec![LayerPolicy::Offload { alpha: 1.5 }; 2], HOST, GateUp::Save).is_err());
    assert!(model.new_store_with(vec![LayerPolicy::Keep; 3], HOST, GateUp::Save).is_err());
}

/// Experts run on 7 rows at a time, so they straddle chunks and a recompute's chunks fall
/// elsewhere than the forward's: every policy still matches keep-all bitwise, the loss matches
/// unchunked experts bitwise, and gradients match them within 1e-6 of their scale (weight
/// gradients are summed chunk by chunk, so they round differently).
#[test]
fn chunked_experts_match_keep_all_bitwise_and_one_chunk_closely() {
    for kind in [Kind::TopK, Kind::TopP] {
        let (b, t) = (3, 11);
        let (loss, grads, _) = step(kind, 4, LayerPolicy::Keep, GateUp::Save, b, t, 7, DispatchMode::Dropless);
        for (policy, gate_up) in policies().into_iter().flat_map(|p| [(p, GateUp::Save), (p, GateUp::Recompute)]).chain([(LayerPolicy::Keep, GateUp::Recompute)]) {
            let (l, g, _) = step(kind, 4, policy, gate_up, b, t, 7, DispatchMode::Dropless);
            assert_eq!(l, loss, "{kind:?} {policy:?} {gate_up:?}: loss differs from keep-all");
            assert_eq!(g, grads, "{kind:?} {policy:?} {gate_up:?}: gradients differ from keep-all");
        }
        let (whole_loss, whole_grads, _) = step(kind, 4, LayerPolicy::Keep, GateUp::Save, b, t, EXPERT_CHUNK_ROWS, DispatchMode::Dropless);
        assert_eq!(loss, whole_loss, "{kind:?}: the forward must not depend on the chunk size");
        let (g, w): (Vec<f32>, Vec<f32>) = grads.iter().zip(&whole_grads).map(|(&a, &b)| (f32::from_bits(a), f32::from_bits(b))).unzip();
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err < 1e-6, "{kind:?}: chunked gradients differ by {err:e} of their scale");
        assert_ne!(grads, whole_grads, "{kind:?}: 7-row chunks should change the summation order somewhere");
    }
}

/// Offloaded tensors stay on the device while their copies may run, until the next layer's
/// seal, and the backward brings a layer back one ahead (prefetch): with every layer offloading
/// everything (α = 1), the device peak is exactly the largest pair of consecutive layers in the
/// forward and in the whole step (MEMO's two rotating skeletal buffers), and a forward-only pass
/// leaves nothing in flight.
#[test]
fn offloads_stay_in_flight_for_one_layer() {
    let be = Cpu::new(2);
    let (mut cfg, moe) = tiny_model(Kind::TopK);
    cfg.n_layers = 4;
    let (b, t) = (3, 11);
    let (inputs, _) = batch(7, cfg.vocab_size, b * t);
    let model = Model::new(&be, cfg.clone(), moe, 7).unwrap();
    let mut keep = model.new_store();
    model.forward_saving(&be, &mut keep, &inputs, b, t).unwrap();
    let layer: Vec<u64> = (0..cfg.n_layers).map(|l| keep.held_bytes(l)).collect();
    let mut off = model.new_store_with(vec![LayerPolicy::Offload { alpha: 1.0 }; cfg.n_layers], HOST, GateUp::Save).unwrap();
    model.forward_saving(&be, &mut off, &inputs, b, t).unwrap();
    let pairs = layer.windows(2).map(|w| w[0] + w[1]).max().unwrap();
    assert_eq!(off.peaks().0, pairs, "device peak with everything offloaded");
    assert!(pairs < layer.iter().sum::<u64>(), "two layers hold less than all four");
    assert!((0..cfg.n_layers).all(|l| off.held_bytes(l) == 0), "everything went to the host");
    off.reset_peaks();
    assert_eq!(off.peaks().0, 0, "the forward-only pass settled its last layer's offloads");

    let mut model = model;
    let mut step = model.new_store_with(vec![LayerPolicy::Offload { alpha: 1.0 }; cfg.n_layers], HOST, GateUp::Save).unwrap();
    let (inputs, targets) = batch(7, cfg.vocab_size, b * t);
    model.forward_backward(&be, &mut step, &inputs, &targets, b, t).unwrap();
    assert_eq!(step.peaks().0, pairs, "device peak over a whole step, prefetch included");
}

/// `plan-memory` against the store it plans for: with every token routed to every expert (the
/// routing the plan assumes), the skeletal peak the report predicts is the one the store reaches
/// over a step, byte for byte, and the transient arena it predicts is the one the step allocates,
/// for each policy the α planner picks (keep, recompute, offload with kept or recomputing layers
/// after it), with the gate/up product saved or recomputed.
#[test]
fn the_memory_plan_is_what_a_step_holds() {
    use motley::config::Config;
    use motley::memory::report::plan_report;
    let be = Cpu::new(2);
    let (b, t) = (3, 24);
    let cases: [&[&str]; 9] = [
        &["memory.policy=keep"],
        &["memory.policy=recompute"],
        &["memory.policy=offload", "memory.alpha=0.5"],
        &["memory.policy=offload", "memory.alpha=1"],
        &["memory.policy=offload", "memory.alpha=0.5", "memory.tail=\"recompute\""],
        &["memory.policy=offload", "memory.alpha=1", "memory.tail=\"recompute\""],
        &["memory.policy=keep", "memory.gate_up=\"recompute\""],
        &["memory.policy=offload", "memory.alpha=0.5", "memory.gate_up=\"recompute\""],
        &["memory.policy=offload", "memory.alpha=1", "memory.tail=\"recompute\"", "memory.gate_up=\"recompute\""],
    ];
    for memory in cases {
        let mut config = Config::default_with(&memory.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (config.model, config.moe) = tiny_model(Kind::TopK);
        config.model.n_layers = 4;
        config.moe.top_k = config.moe.n_experts();
        let report = plan_report(&config, t, b, u64::MAX, HOST, 10e9).unwrap();
        let policies: Vec<LayerPolicy> = report.layers.iter().map(|l| l.policy).collect();
        let mut model = Model::new(&be, config.model.clone(), config.moe.clone(), 5).unwrap();
        let mut store = model.new_store_with(policies.clone(), HOST, config.memory.gate_up).unwrap();
        let (inputs, targets) = batch(5, config.model.vocab_size, b * t);
        model.zero_grads(&be);
        model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
        assert_eq!(store.peaks().0, report.skeletal_device_bytes, "{memory:?} ({policies:?}): skeletal peak");
        assert_eq!(store.arena().capacity(), report.arena_bytes, "{memory:?} ({policies:?}): transient arena");
    }
}
