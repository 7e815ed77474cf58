//! The benchmarks' accounting and shared code, tested here because bench targets run without
//! the test harness:
//! - motley's counted training FLOPs (the numerator of MFU) against the PyTorch peer's
//!   `flops_per_step` (bench/peer/torch_hmoe.py): a golden case computed by hand, and a real
//!   step's routed counts;
//! - bench/common (arguments, shapes, policies, step summaries, child processes) and the
//!   train_step sweep's child protocol.
#![allow(dead_code)]

#[path = "../bench/common/mod.rs"]
mod common;
#[path = "../bench/train_step/one_shape.rs"]
mod one_shape;
#[path = "../bench/train_step/sweep.rs"]
mod sweep;

use std::process::Command;
use std::time::Duration;

use motley::backend::cpu::Cpu;
use motley::backend::AttnShape;
use motley::config::{Alpha, GateUp, MemoryPolicy, Tail};
use motley::memory::store::LayerPolicy;
use motley::model::config::{ModelConfig, MoeConfig, Routing};
use motley::model::params::ParamLayout;
use motley::model::Model;
use motley::rng::Rng;

use common::args::{parse_size, show_size, Args};
use common::child::{run, ChildRun, Outcome};
use common::shapes::{cpu_shapes, find};
use common::step::{gib, gpu_link_gbs, parse_policy, peak_flops, StepTime, Summary};
use motley::memory::store::policy_label;
use sweep::ChildReport;

/// torch_hmoe.py's `flops_per_step`, transcribed line by line: matmul FLOPs of a training step
/// (3× forward) with the experts' real token counts, causal attention at half the square.
#[allow(clippy::too_many_arguments)]
fn peer_flops_per_step(vocab: usize, d: usize, layers: usize, sizes: &[usize], _k: usize, b: usize, t: usize, counts_per_layer: &[Vec<usize>]) -> f64 {
    let (vocab, d, layers, b, t) = (vocab as f64, d as f64, layers as f64, b as f64, t as f64);
    let tokens = b * t;
    let attn_proj = 2.0 * 4.0 * d * d * tokens;
    let attn_core = 2.0 * 2.0 * t * d * tokens * 0.5;
    let router = 2.0 * d * sizes.len() as f64 * tokens;
    let per_layer = attn_proj + attn_core + router;
    let expert: f64 = counts_per_layer.iter().map(|cnt| sizes.iter().zip(cnt).map(|(&f, &c)| 2.0 * 3.0 * d * f as f64 * c as f64).sum::<f64>()).sum();
    let head = 2.0 * d * vocab * tokens;
    3.0 * (layers * per_layer + expert + head)
}

/// V 64, d 32, 2 layers of 4 heads (head_dim 8, no GQA: the peer's 4·d² projections), experts
/// 8/16/24/40, top-2.
fn small() -> (ModelConfig, MoeConfig) {
    let model = ModelConfig { vocab_size: 64, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 4, seq_len: 8, rope_theta: 1e4, norm_eps: 1e-6, init_std: 0.02 };
    let moe = MoeConfig { expert_widths: vec![8, 16, 24, 40], routing: Routing::TopK, top_k: 2, top_p: 1.0, load_balance: 0.0, p_penalty: 0.01, entropy: 0.0, z_loss: 0.0 };
    (model, moe)
}

#[test]
fn golden_case_by_hand() {
    // B = 2, T = 8: N = 16 tokens, 32 routed slots per layer.
    // Per layer: projections 2·4·32²·16 = 131 072, attention core 2·2·8·32·16/2 = 8 192,
    //   router 2·32·4·16 = 4 096: 143 360, × 2 layers = 286 720.
    // Experts: 6·32·(8·10 + 16·6 + 24·0 + 40·16) = 192·816 = 156 672 (layer 0),
    //   6·32·8·(8 + 16 + 24 + 40) = 135 168 (layer 1): 291 840.
    // Head 2·32·64·16 = 65 536. Forward 644 096; a training step 3× that: 1 932 288.
    let counts = vec![vec![10, 6, 0, 16], vec![8, 8, 8, 8]];
    let (cfg, moe) = small();
    let model = Model::new(&Cpu::new(1), cfg, moe, 1).unwrap();
    let shape = AttnShape { batch: 2, seq: 8, n_heads: 4, n_kv_heads: 4, head_dim: 8 };
    assert_eq!(shape.causal_attention_flops(), 8192.0);
    assert_eq!(model.forward_flops(shape, &counts), 644_096.0);
    assert_eq!(peer_flops_per_step(64, 32, 2, &[8, 16, 24, 40], 2, 2, 8, &counts), 1_932_288.0);
}

#[test]
fn a_steps_counted_flops_are_the_peers() {
    let be = Cpu::new(2);
    let (cfg, moe) = small();
    let mut model = Model::new(&be, cfg, moe, 3).unwrap();
    let mut store = model.new_store();
    let mut rng = Rng::new(5);
    let tokens: Vec<u32> = (0..3 * 8 + 1).map(|_| rng.below(64) as u32).collect();
    let stats = model.forward_backward(&be, &mut store, &tokens[..24], &tokens[1..], 3, 8).unwrap();
    assert!(stats.counts.iter().all(|c| c.iter().sum::<usize>() == 2 * 24), "top-2 routes every token twice: {:?}", stats.counts);
    let peer = peer_flops_per_step(64, 32, 2, &[8, 16, 24, 40], 2, 3, 8, &stats.counts);
    assert_eq!(stats.train_flops, peer, "counts {:?}", stats.counts);
}

#[test]
fn sizes_take_binary_suffixes() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("16K"), Ok(16384));
    assert_eq!(parse_size("1M"), Ok(1 << 20));
    assert!(parse_size("0").is_err() && parse_size("K").is_err() && parse_size("12Q").is_err());
    assert_eq!([16384, 1 << 20, 3000].map(show_size), ["16K", "1M", "3000"]);
    // `cargo bench` passes `--bench`; unknown flags are ignored.
    let args = Args::from(&["--bench", "--seq", "32K", "--sweep", "16K,64K", "--steps", "3"]);
    assert_eq!((args.size("--seq", 1), args.sizes("--sweep", "1K"), args.get("--steps", 9usize), args.get("--warmup", 2usize)), (32768, vec![16384, 65536], 3, 2));
}

#[test]
fn h100_ref_is_issue_6s_model() {
    let s = find("h100-ref").unwrap();
    assert_eq!((s.V, s.d, s.L, s.h, s.k, s.B, s.T), (32768, 1024, 12, 16, 2, 8, 4096));
    assert_eq!(s.sizes, (0..8).map(|i| 1024 + 512 * i).collect::<Vec<_>>());
    let (m, moe) = s.configs(s.T);
    assert_eq!(m.head_dim(), 64);
    // 948 M parameters, as the peer counts them (the same tensors: no biases, untied head).
    let params = ParamLayout::new(&m, &moe).total;
    assert_eq!((params as f64 / 1e6).round(), 948.0, "{params}");
    // serde_json sorts keys: the CPU table's rows come in this order.
    assert_eq!(cpu_shapes().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["small", "tiny"]);
    assert!(find("h100").unwrap_err().contains("h100-ref, h100-ref-mini, small, tiny"));
}

#[test]
fn policies_parse_and_print() {
    let p = parse_policy("alpha=0.25", 64.0, 55.0).unwrap();
    assert_eq!((p.policy, p.alpha, p.host_gib, p.bandwidth_gbs), (MemoryPolicy::Offload, Alpha::Fixed(0.25), 64.0, 55.0));
    assert_eq!(parse_policy("alpha", 1.0, 1.0).unwrap().alpha, Alpha::Auto);
    assert_eq!(parse_policy("recompute", 1.0, 1.0).unwrap().policy, MemoryPolicy::Recompute);
    assert_eq!(parse_policy("auto", 1.0, 1.0).unwrap().policy, MemoryPolicy::Auto);
    assert_eq!(parse_policy("alpha", 1.0, 1.0).unwrap().tail, Tail::Keep);
    let lean = parse_policy("alpha=0.5,tail=recompute", 1.0, 1.0).unwrap();
    assert_eq!((lean.policy, lean.alpha, lean.tail, lean.gate_up), (MemoryPolicy::Offload, Alpha::Fixed(0.5), Tail::Recompute, GateUp::Save));
    let leaner = parse_policy("alpha,tail=recompute,gate_up=recompute", 1.0, 1.0).unwrap();
    assert_eq!((leaner.tail, leaner.gate_up), (Tail::Recompute, GateUp::Recompute));
    assert_eq!(parse_policy("keep,gate_up=recompute", 1.0, 1.0).unwrap().gate_up, GateUp::Recompute);
    for bad in ["alpha=2", "swap", "alpha=x", "keep,tail=recompute", "alpha,tail=keeps", "alpha,gate_up=keep", "alpha,,tail=recompute"] {
        assert!(parse_policy(bad, 1.0, 1.0).unwrap_err().contains("keep, recompute"), "{bad}");
    }
    let layers = [LayerPolicy::Offload { alpha: 0.375 }, LayerPolicy::Offload { alpha: 0.375 }, LayerPolicy::Keep];
    assert_eq!(policy_label(&layers), "offload α=0.38 ×2, keep ×1");
    assert_eq!((peak_flops(), gpu_link_gbs()), (989e12, 55.0));
}

#[test]
fn summaries_count_timed_steps_only() {
    let st = |warmup, seconds, peak_bytes| StepTime { warmup, seconds, flops: 4e12, tokens: 1000, peak_bytes };
    let s = Summary::of(&[st(true, 9.0, 7 << 30), st(false, 1.0, 2 << 30), st(false, 3.0, 3 << 30)]).unwrap();
    assert_eq!((s.steps, s.step_s(), s.tokens_per_s(), s.flops_per_s(), gib(s.peak_bytes)), (2, 2.0, 500.0, 2e12, 7.0));
    assert!((s.mfu_pct() - 100.0 * 2e12 / 989e12).abs() < 1e-12);
    assert_eq!(Summary::of(&[st(true, 1.0, 0)]), None);
}

fn sh(script: &str, limit: f64) -> ChildRun {
    run(Command::new("sh").args(["-c", script]), Duration::from_secs_f64(limit))
}

#[test]
fn how_a_child_ends() {
    let done = sh("echo step 1; echo step 2", 10.0);
    assert_eq!((done.outcome, done.stdout), (Outcome::Done, vec!["step 1".to_string(), "step 2".to_string()]));
    let oom = sh("echo 'CUDA alloc failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")' >&2; exit 101", 10.0);
    assert_eq!(oom.outcome, Outcome::OutOfMemory);
    let slow = sh("echo step 1; exec sleep 5", 0.5);
    assert_eq!((slow.outcome, slow.stdout), (Outcome::TimedOut, vec!["step 1".to_string()]));
    assert!(slow.seconds < 4.0, "killed at the limit, not after the sleep: {}", slow.seconds);
    assert_eq!(sh("echo oops >&2; echo >&2; exit 3", 10.0).outcome, Outcome::Failed("oops".into()));
    let panic = "echo \"thread 'main' panicked at src/x.rs:1:1:\" >&2; echo 'CUDA attn_fwd failed: launch' >&2; echo 'note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace' >&2; exit 101";
    assert_eq!(sh(panic, 10.0).outcome, Outcome::Failed("CUDA attn_fwd failed: launch".into()));
}

#[test]
fn a_sweep_childs_lines_become_a_row() {
    let lines: Vec<String> = ["policy recompute ×12", "params 948036608", "step 1 30.5 1e15 16384 1073741824", "step 0 20 2e15 16384 2147483648"].map(String::from).to_vec();
    let r = ChildReport::parse(&lines);
    assert_eq!((r.policy.as_deref(), r.params, r.steps.len()), (Some("recompute ×12"), 948036608, 2));
    let s = r.summary().unwrap();
    assert_eq!((s.steps, s.step_s(), s.flops_per_s(), s.peak_bytes), (1, 20.0, 1e14, 2 << 30));
    assert_eq!(r.status(&Outcome::Done), "ok");
    assert_eq!(r.status(&Outcome::TimedOut), "timeout after 1 timed step");
    let warm_only = ChildReport::parse(&lines[..3]);
    assert_eq!(warm_only.summary().unwrap().step_s(), 30.5);
    assert!(warm_only.status(&Outcome::TimedOut).contains("first step only"));
    assert_eq!(ChildReport::parse(&lines[..2]).status(&Outcome::OutOfMemory), "OOM");
    assert_eq!(ChildReport::parse(&["step 1 x".into()]).steps, []);
}
