//! Whole-model tests: finite-difference gradients of a 2-layer heterogeneous model, bitwise
//! determinism across thread counts, and overfitting a small batch.

mod common;

use common::*;
use motley::backend::cpu::Cpu;
use motley::backend::Backend;
use motley::model::config::Routing as Kind;
use motley::memory::store::ActivationStore;
use motley::model::Model;
use motley::rng::Rng;
use motley::parallel::dispatch::{DispatchMode, DropPolicy};
use motley::train::optim::{AdamWConfig, Optimizer};

fn batch(seed: u64, vocab: usize, batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let stream: Vec<u32> = (0..batch * seq + 1).map(|_| rng.below(vocab) as u32).collect();
    (stream[..batch * seq].to_vec(), stream[1..].to_vec())
}

/// A step's gradients do not depend on what the gradient buffer held before it: the block
/// matrices' first products write theirs, later ones add (experts split over chunks of 2 rows),
/// an expert without tokens gets zeros, and the rest is zeroed when the step starts. NaN left
/// over from a previous step would show; so would a chunk that wrote over an earlier one's part
/// (against a run in one chunk, to rounding).
#[test]
fn gradients_do_not_depend_on_the_stale_buffer() {
    let be = Cpu::new(2);
    let (cfg, mut moe) = tiny_model(Kind::TopK);
    moe.top_k = 1;
    let (b, t) = (1, 8);
    let (inputs, targets) = batch(5, cfg.vocab_size, b, t);
    let run = |stale: f32, chunk_rows: usize| {
        let mut model = Model::new(&be, cfg.clone(), moe.clone(), 3).unwrap().with_expert_chunk_rows(chunk_rows);
        let mut store = model.new_store();
        be.fill(Cpu::full_mut(&mut model.grads), stale);
        model.zero_grads(&be);
        let stats = model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
        (model.grads.iter().map(|g| g.to_bits()).collect::<Vec<u32>>(), stats.counts)
    };
    let (clean, counts) = run(0.0, 2);
    assert!(counts.iter().flatten().any(|&k| k == 0), "an expert receives no token: {counts:?}");
    assert!(counts.iter().flatten().any(|&k| k > 2), "an expert's rows span chunks: {counts:?}");
    assert_eq!(run(f32::NAN, 2).0, clean, "gradients after a NaN-filled buffer");
    let one_chunk: Vec<f32> = run(f32::NAN, 1 << 20).0.iter().map(|&g| f32::from_bits(g)).collect();
    let chunked: Vec<f32> = clean.iter().map(|&g| f32::from_bits(g)).collect();
    let scale = one_chunk.iter().fold(0f32, |m, g| m.max(g.abs()));
    let diff = one_chunk.iter().zip(&chunked).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * scale, "chunked weight gradients differ from one chunk's by {diff} (scale {scale})");
}

/// The backward hands each range of the gradients over (to be summed over ranks while it goes
/// on) only once nothing later in the step writes it: what each range held when handed over is
/// bitwise what the step ends with (a stale NaN buffer, experts split over chunks and one
/// without tokens, whose zeros must come before the hand-over). The ranges tile the buffer in
/// the backward's order: head and final norm, the blocks last first, the embedding.
#[test]
fn gradients_are_final_when_handed_over() {
    let be = Cpu::new(2);
    let (cfg, mut moe) = tiny_model(Kind::TopK);
    moe.top_k = 1;
    let (b, t) = (1, 8);
    let (inputs, targets) = batch(5, cfg.vocab_size, b, t);
    let mut model = Model::new(&be, cfg, moe, 3).unwrap().with_expert_chunk_rows(2);
    let mut store = model.new_store();
    be.fill(Cpu::full_mut(&mut model.grads), f32::NAN);
    model.zero_grads(&be);
    let mut handed: Vec<(std::ops::Range<usize>, Vec<u32>)> = Vec::new();
    let stats = model
        .forward_backward_with(&be, &mut store, &inputs, &targets, b, t, &mut |grads: &mut Vec<f32>, r| {
            handed.push((r.clone(), grads[r].iter().map(|g| g.to_bits()).collect()));
            Ok(())
        })
        .unwrap();
    assert!(stats.counts.iter().flatten().any(|&k| k == 0), "an expert receives no token: {:?}", stats.counts);
    let layout = &model.layout;
    let blocks = (0..layout.blocks.len()).rev().map(|l| layout.block_range(l));
    let order: Vec<std::ops::Range<usize>> = std::iter::once(layout.final_norm..layout.total).chain(blocks).chain(std::iter::once(0..layout.block_range(0).start)).collect();
    assert_eq!(handed.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(), order);
    for (r, bits) in &handed {
        let last: Vec<u32> = model.grads[r.clone()].iter().map(|g| g.to_bits()).collect();
        assert!(*bits == last, "gradients {r:?} changed after they were handed over");
    }
}

/// Without `zero_grads` between them, a second forward/backward adds to the first's gradients
/// (every product adds once the step has written its gradient).
#[test]
fn a_second_backward_adds_to_the_gradients() {
    let be = Cpu::new(2);
    let (cfg, moe) = tiny_model(Kind::TopP);
    let (b, t) = (2, 8);
    let (inputs, targets) = batch(6, cfg.vocab_size, b, t);
    let mut model = Model::new(&be, cfg, moe, 4).unwrap().with_expert_chunk_rows(3);
    let mut store = model.new_store();
    model.zero_grads(&be);
    model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
    let once = model.grads.clone();
    model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
    let scale = once.iter().fold(0f32, |m, g| m.max(g.abs()));
    let diff = model.grads.iter().zip(&once).fold(0f32, |m, (twice, g)| m.max((twice - 2.0 * g).abs()));
    assert!(diff <= 1e-5 * scale, "twice the gradients differ by {diff} (scale {scale})");
}

/// Directional finite differences of the full training loss (LM + weighted aux losses) with
/// respect to every parameter tensor. Tolerance: |fd − an| / max(|an|, 1e-2) < 2e-2. The floor
/// is there because an f32 forward leaves ~1e-4 of noise in a central difference at h = 2e-3.
/// A difference counts where neither step changed which slots the experts ran or dropped (under
/// an expert capacity, `mode`, where some must be dropped).
fn model_gradients(kind: Kind, mode: DispatchMode) {
    let be = Cpu::new(2);
    let (cfg, moe) = tiny_model(kind);
    let (b, t) = (2, 12);
    let (inputs, targets) = batch(7, cfg.vocab_size, b, t);
    let mut model = Model::new(&be, cfg.clone(), moe.clone(), 3).unwrap().with_dispatch(mode).unwrap();
    let mut store = model.new_store();
    model.zero_grads(&be);
    let base = model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
    assert_eq!(base.dropped > 0, mode != DispatchMode::Dropless, "{mode:?}: {} slots dropped", base.dropped);
    let params = model.params.master().clone();
    let grads = model.grads.clone();
    let layout = model.layout.clone();
    // The loss, and each layer's kept and dropped slots' tokens.
    let slots_of = |store: &ActivationStore<Cpu>| {
        let r = |l| store.routed(l);
        (0..cfg.n_layers).map(|l| [&r(l).kept, &r(l).dropped].map(|x| (x.token.clone(), x.offsets.clone()))).collect::<Vec<_>>()
    };
    let eval = |p: &[f32]| {
        let m = Model::from_values(&be, cfg.clone(), moe.clone(), p).unwrap().with_dispatch(mode).unwrap();
        let mut store = m.new_store();
        m.forward_saving(&be, &mut store, &inputs, b, t).unwrap();
        (m.evaluate(&be, &inputs, &targets, b, t).unwrap().loss, slots_of(&store))
    };
    let (loss, base_slots) = eval(&params);
    assert_eq!(loss.to_bits(), base.loss.to_bits(), "evaluate and train forward differ");
    let mut rng = Rng::new(11);
    // Dense directions first; where a step crosses a routing boundary, smaller steps along
    // sparser directions (16 coordinates).
    let attempts = [(2e-3f32, usize::MAX), (5e-4, usize::MAX), (2e-3, 16), (5e-4, 16), (5e-4, 16), (5e-4, 16)];
    for spec in &layout.specs {
        let mut checked = false;
        for &(h, nnz) in &attempts {
            let mut dir = vec![0f32; params.len()];
            let r = spec.range();
            if nnz >= spec.len() {
                dir[r].copy_from_slice(&randn(&mut rng, spec.len(), 1.0));
            } else {
                for _ in 0..nnz {
                    dir[r.start + rng.below(spec.len())] = rng.normal() as f32;
                }
            }
            let plus: Vec<f32> = params.iter().zip(&dir).map(|(p, d)| p + h * d).collect();
            let minus: Vec<f32> = params.iter().zip(&dir).map(|(p, d)| p - h * d).collect();
            let ((lp, slots_p), (lm, slots_m)) = (eval(&plus), eval(&minus));
            if slots_p != base_slots || slots_m != base_slots {
                continue; // the step crossed a routing boundary: finite differences do not apply
            }
            let fd = (lp - lm) / (2.0 * h as f64);
            let an = dot64(&grads, &dir);
            let err = rel_err(fd, an, 1e-2);
            assert!(err < 2e-2, "{kind:?} {}: finite difference {fd:.6e} vs analytic {an:.6e} (relative error {err:.2e}, h {h})", spec.name);
            checked = true;
            break;
        }
        assert!(checked, "{}: every direction changed the routing", spec.name);
    }
}

#[test]
fn model_gradients_top_k() {
    model_gradients(Kind::TopK, DispatchMode::Dropless);
}

#[test]
fn model_gradients_top_p() {
    model_gradients(Kind::TopP, DispatchMode::Dropless);
}

#[test]
fn model_gradients_with_expert_capacity() {
    model_gradients(Kind::TopK, DispatchMode::Capacity { factor: 0.9, policy: DropPolicy::Probs });
    model_gradients(Kind::TopP, DispatchMode::Capacity { factor: 0.8, policy: DropPolicy::Position });
}

fn train_losses(threads: usize, steps: usize, kind: Kind, seed: u64) -> Vec<u64> {
    let be = Cpu::new(threads);
    let (cfg, moe) = tiny_model(kind);
    let (b, t) = (4, 24);
    let mut model = Model::new(&be, cfg.clone(), moe, seed).unwrap();
    let mut store = model.new_store();
    let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
    let mut opt = Optimizer::new(&be, opt_cfg, model.n_params());
    (0..steps)
        .map(|step| {
            let (inputs, targets) = batch(100 + step as u64, cfg.vocab_size, b, t);
            model.zero_grads(&be);
            let stats = model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
            opt.update(&be, &model.layout, &mut model.params, &model.grads, 3e-3);
            stats.loss.to_bits()
        })
        .collect()
}

#[test]
fn bitwise_deterministic_across_thread_counts() {
    for kind in [Kind::TopK, Kind::TopP] {
        let one = train_losses(1, 20, kind, 5);
        let two = train_losses(2, 20, kind, 5);
        let three = train_losses(3, 20, kind, 5);
        assert_eq!(one, two, "{kind:?}: 1 vs 2 threads");
        assert_eq!(one, three, "{kind:?}: 1 vs 3 threads");
        assert_ne!(one, train_losses(2, 20, kind, 6), "a different seed must give a different run");
    }
}

#[test]
fn two_layer_model_overfits_a_small_batch() {
    let be = Cpu::new(2);
    let (cfg, moe) = tiny_model(Kind::TopK);
    let (b, t) = (2, 24);
    let (inputs, targets) = batch(42, cfg.vocab_size, b, t);
    let mut model = Model::new(&be, cfg, moe, 1).unwrap();
    let mut store = model.new_store();
    let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, grad_clip: 1.0 };
    let mut opt = Optimizer::new(&be, opt_cfg, model.n_params());
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 0..150 {
        model.zero_grads(&be);
        let s = model.forward_backward(&be, &mut store, &inputs, &targets, b, t).unwrap();
        if step == 0 {
            first = s.lm_loss;
        }
        last = s.lm_loss;
        opt.update(&be, &model.layout, &mut model.params, &model.grads, 1e-2);
    }
    // Random tokens over 64 symbols start near ln 64 ≈ 4.16; memorising 48 of them drives it near 0.
    assert!(first > 3.5, "initial loss {first}");
    assert!(last < 0.1, "loss after 150 steps on one batch: {last} (from {first})");
}

fn rounded_to_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// Mixed precision's plumbing, on the CPU: with a bf16 working copy every op must read the
/// working copy and never the f32 master, and AdamW must keep the copy fresh. A model whose
/// master holds the rounded values and has no working copy is the reference: losses and
/// gradients must match it bitwise at every step, while the master itself trains in f32.
#[test]
fn ops_read_the_bf16_working_copy_and_adamw_refreshes_it() {
    for kind in [Kind::TopK, Kind::TopP] {
        let (mixed_be, plain_be) = (Cpu::new(2).with_bf16_weights(), Cpu::new(2));
        let (cfg, moe) = tiny_model(kind);
        let (b, t) = (2, 12);
        let mut model = Model::new(&mixed_be, cfg.clone(), moe.clone(), 5).unwrap();
        let mut store = model.new_store();
        let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
        let mut opt = Optimizer::new(&mixed_be, opt_cfg, model.n_params());
        for step in 0..3 {
            let (inputs, targets) = batch(40 + step, cfg.vocab_size, b, t);
            let master = model.params.master().clone();
            assert_ne!(master, rounded_to_bf16(&master), "{kind:?} step {step}: the test needs values that bf16 changes");
            let mut reference = Model::from_values(&plain_be, cfg.clone(), moe.clone(), &rounded_to_bf16(&master)).unwrap();
            let mut ref_store = reference.new_store();
            reference.zero_grads(&plain_be);
            let want = reference.forward_backward(&plain_be, &mut ref_store, &inputs, &targets, b, t).unwrap();
            model.zero_grads(&mixed_be);
            let got = model.forward_backward(&mixed_be, &mut store, &inputs, &targets, b, t).unwrap();
            assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{kind:?} step {step}: loss");
            assert!(model.grads.iter().zip(&reference.grads).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} step {step}: gradients");
            let eval = model.evaluate(&mixed_be, &inputs, &targets, b, t).unwrap();
            assert_eq!(eval.lm_loss.to_bits(), reference.evaluate(&plain_be, &inputs, &targets, b, t).unwrap().lm_loss.to_bits(), "{kind:?} step {step}: evaluate");
            opt.update(&mixed_be, &model.layout, &mut model.params, &model.grads, 3e-3);
        }
        // The master kept f32 precision: some values are not bf16-representable.
        let master = model.params.master();
        assert_ne!(*master, rounded_to_bf16(master));
    }
}
