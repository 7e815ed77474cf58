//! Training-step benchmark.
//!
//! Default: a CPU step on the PyTorch peer's CPU shapes (bench/cpu_configs.json): tokens/s and
//! model GFLOP/s (the peer's FLOP accounting: 3× forward matmuls with the experts' routed counts,
//! plus causal attention) next to the machine's single-GEMM GFLOP/s.
//!
//! One shape on a device (`--device cuda` needs the `cuda` feature and a GPU; `--device cpu`
//! runs the same code on the CPU): tokens/s, step time, MFU against 989 TFLOP/s, peak memory,
//! MEMO policy. `--sweep` runs one sequence length per child process (long context at B=1).
//!
//! Run:
//! - `cargo bench --bench train_step [-- --threads 2 --steps 10 --profile]`
//! - `cargo bench --features cuda --bench train_step -- --device cuda --shape h100-ref
//!   [--batch 8 --seq 4K --policy keep|recompute|alpha|alpha=A[,tail=recompute][,gate_up=recompute] --steps 10 --warmup 2 --max-seconds S --profile
//!   --hopper|--hopper-experts --json FILE]` (`--hopper`: the opt-in Hopper (wgmma) kernels,
//!   attention and the experts' grouped GEMMs with SwiGLU fused, rows named "motley (Hopper
//!   kernels)"; `--hopper-experts`: the experts' only, "motley (Hopper expert kernels)")
//! - `… --device cuda --shape h100-ref --policy recompute --sweep 16K,32K,64K,128K,256K,512K,1M
//!   [--time-limit 240 --budget 540 --json FILE]`

#[path = "common/mod.rs"]
mod common;
#[path = "train_step/cpu_table.rs"]
mod cpu_table;
#[path = "train_step/one_shape.rs"]
mod one_shape;
#[path = "train_step/sweep.rs"]
mod sweep;

use common::args::Args;

/// Every flag of the three modes (the CPU table, one shape, the sweep and its children).
const FLAGS: &[&str] = &[
    "--threads", "--steps", "--profile", "--device", "--shape", "--batch", "--seq", "--policy", "--warmup", "--max-seconds",
    "--host-gib", "--bandwidth-gbs", "--sweep", "--time-limit", "--budget", "--child", "--hopper", "--hopper-experts",
];

fn main() {
    let args = Args::from_env_known(FLAGS);
    if args.has("--child") {
        sweep::child(&args);
    } else if args.has("--sweep") {
        sweep::parent(&args);
    } else if args.has("--device") || args.has("--shape") {
        one_shape::run(&args);
    } else {
        cpu_table::run(&args);
    }
}
