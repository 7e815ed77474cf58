//! The planned transient arena: training from it is bitwise identical to giving every transient a
//! zeroed buffer of its own (the engine before the arena), it is allocated once over steps of a
//! fixed shape, and its plans never place two transients live at the same time on shared bytes.

mod common;

use common::*;
use motley::backend::cpu::Cpu;
use motley::backend::Backend;
use motley::config::GateUp;
use motley::memory::arena::Arena;
use motley::memory::plan::verify;
use motley::memory::store::LayerPolicy;
use motley::memory::transients::{block_phases, BackendTransients, EXPERT_CHUNK_ROWS};
use motley::model::config::Routing as Kind;
use motley::model::Model;
use motley::rng::Rng;
use motley::train::optim::{AdamWConfig, Optimizer};

const STEPS: u64 = 4;

fn batch(seed: u64, vocab: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let stream: Vec<u32> = (0..n + 1).map(|_| rng.below(vocab) as u32).collect();
    (stream[..n].to_vec(), stream[1..].to_vec())
}

/// Loss bits of every step and the final parameter and gradient bits of `STEPS` AdamW steps of
/// fixed shape (a new batch each step), and the arena's allocations after the first step and
/// at the end.
fn train(kind: Kind, seed: u64, policies: Vec<LayerPolicy>, arena: Arena<Cpu>) -> (Vec<u64>, Vec<u32>, Vec<u32>, (usize, usize)) {
    let be = Cpu::new(2);
    let (cfg, moe) = tiny_model(kind);
    let mut model = Model::new(&be, cfg.clone(), moe, seed).unwrap();
    let mut store = model.new_store_with(policies, 1 << 30, GateUp::Save).unwrap();
    store.set_arena(arena);
    let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
    let mut opt = Optimizer::new(&be, opt_cfg, model.n_params());
    let mut losses = Vec::new();
    let mut after_first = 0;
    for s in 0..STEPS {
        let (inputs, targets) = batch(seed * 100 + s, cfg.vocab_size, 2 * 24);
        model.zero_grads(&be);
        let st = model.forward_backward(&be, &mut store, &inputs, &targets, 2, 24).unwrap();
        opt.update(&be, &model.layout, &mut model.params, &model.grads, 3e-3);
        losses.push(st.loss.to_bits());
        if s == 0 {
            after_first = store.arena().allocations();
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (losses, bits(model.params.master()), bits(&model.grads), (after_first, store.arena().allocations()))
}

#[test]
fn the_arena_trains_bitwise_like_one_buffer_per_transient() {
    for kind in [Kind::TopK, Kind::TopP] {
        for seed in [1, 2] {
            // Keep, and recompute / offload, whose recompute also runs from the arena.
            for policies in [vec![LayerPolicy::Keep; 2], vec![LayerPolicy::Recompute, LayerPolicy::Offload { alpha: 0.5 }]] {
                let (l0, p0, g0, _) = train(kind, seed, policies.clone(), Arena::per_tensor());
                let (l1, p1, g1, _) = train(kind, seed, policies.clone(), Arena::planned());
                let what = format!("{kind:?} seed {seed} {policies:?}");
                assert_eq!(l1, l0, "{what}: losses differ");
                assert_eq!(g1.iter().zip(&g0).position(|(a, b)| a != b), None, "{what}: first differing gradient element");
                assert_eq!(p1.iter().zip(&p0).position(|(a, b)| a != b), None, "{what}: first differing parameter element");
            }
        }
    }
}

#[test]
fn the_arena_is_allocated_once_over_steps_of_fixed_shape() {
    for kind in [Kind::TopK, Kind::TopP] {
        let (_, _, _, (first, end)) = train(kind, 3, vec![LayerPolicy::Keep; 2], Arena::planned());
        assert_eq!((first, end), (1, 1), "{kind:?}: allocations after the first step and after {STEPS}");
        let (_, _, _, (first, end)) = train(kind, 3, vec![LayerPolicy::Keep; 2], Arena::per_tensor());
        assert!(first > 10 && end == first * STEPS as usize, "{kind:?}: per-tensor allocations {first}, {end}");
    }
}

#[test]
fn arena_plans_of_real_routings_never_overlap_live_transients() {
    let be = Cpu::new(1);
    for kind in [Kind::TopK, Kind::TopP] {
        let (cfg, moe) = tiny_model(kind);
        let model = Model::new(&be, cfg.clone(), moe.clone(), 5).unwrap();
        let mut store = model.new_store();
        let mut phases_with_reuse = 0;
        let (inputs, _) = batch(5, cfg.vocab_size, 2 * 24);
        model.forward_saving(&be, &mut store, &inputs, 2, 24).unwrap();
        for l in 0..cfg.n_layers {
            let backend = BackendTransients { act_bytes: be.activation_bytes(), fused_gather: be.fuses_expert_gather(cfg.d_model, &moe.expert_widths), attention_scratch: 0 };
            let (f, b) = block_phases(&cfg, &moe, 2, 24, &store.routing(l).counts(), EXPERT_CHUNK_ROWS, GateUp::Save, backend);
            for phase in [f, b] {
                let mut arena = Arena::<Cpu>::planned();
                arena.begin(&be, phase.requests.clone());
                let (requests, plan) = arena.current();
                let plan = plan.expect("planned mode plans");
                verify(plan, requests).unwrap();
                // Wherever two transients are never live together, the plan must share memory.
                let rs = &phase.requests;
                let reusable = rs.iter().enumerate().any(|(i, p)| rs[i + 1..].iter().any(|q| !p.overlaps_in_time(q)));
                if reusable {
                    phases_with_reuse += 1;
                    assert!(plan.peak < rs.iter().map(|r| r.size.next_multiple_of(plan.alignment)).sum(), "{}: no reuse at all", phase.name);
                }
                assert!(arena.capacity() >= plan.peak);
            }
        }
        // The reuse check above must have had something to check.
        assert!(phases_with_reuse > 0, "{kind:?}: no phase has two transients that are never live together");
    }
}
