#!/usr/bin/env python3
"""Loss curves of two `motley train` runs of the same config and seed (CPU and CUDA).

  compare_losses.py CPU_RUN/metrics.jsonl CUDA_RUN/metrics.jsonl

Prints a markdown table of training loss and gradient norm at a few steps and every validation
loss, both runs side by side, then a verdict. The CUDA backend trains in bf16 mixed precision
(bf16 activations and working weights, f32 master weights), so the runs are not bitwise equal and
drift apart over many steps; the verdict looks at the first 10 steps: loss within 5e-3 and
gradient norm within 5e-2 (relative). For scale, two CPU runs of the default config with seeds 1 and 2 differ by up to 1e-2
in loss and 2-60% in gradient norm over their first 10 steps (measured on the development
machine), so the check tells a right backend from a wrong one. The last validation losses are
shown, not judged. Exit status 0 when they agree, 1 when not, 2 when a file is missing or holds no
training record.
"""
import json
import sys

EARLY_STEPS, LOSS_TOL, NORM_TOL = 10, 5e-3, 5e-2


def records(path):
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (train if r.get("kind") == "train" else evals)[r["step"]] = r
    return train, evals


def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        (cpu_t, cpu_e), (gpu_t, gpu_e) = records(argv[0]), records(argv[1])
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_losses.py: {e}", file=sys.stderr)
        return 2
    steps = sorted(set(cpu_t) & set(gpu_t))
    if not steps:
        print("compare_losses.py: no training step in both runs", file=sys.stderr)
        return 2
    shown = sorted({s for s in steps if s in (1, 2, 5, 10, 20, 50) or s % 100 == 0} | {steps[-1]})
    print("| step | CPU loss | CUDA loss | relative | CPU grad norm | CUDA grad norm | relative |\n|---|---|---|---|---|---|---|")
    for s in shown:
        a, b = cpu_t[s], gpu_t[s]
        print(f"| {s} | {a['loss']:.5f} | {b['loss']:.5f} | {rel(a['loss'], b['loss']):.1e} | "
              f"{a['grad_norm']:.4f} | {b['grad_norm']:.4f} | {rel(a['grad_norm'], b['grad_norm']):.1e} |")
    common_evals = sorted(set(cpu_e) & set(gpu_e))
    for s in common_evals:
        a, b = cpu_e[s]["val_loss"], gpu_e[s]["val_loss"]
        print(f"| {s} (validation) | {a:.5f} | {b:.5f} | {rel(a, b):.1e} | | | |")
    early = steps[:EARLY_STEPS]
    loss_err = max(rel(cpu_t[s]["loss"], gpu_t[s]["loss"]) for s in early)
    norm_err = max(rel(cpu_t[s]["grad_norm"], gpu_t[s]["grad_norm"]) for s in early)
    ok = loss_err <= LOSS_TOL and norm_err <= NORM_TOL
    print(f"\n{'AGREE' if ok else 'DISAGREE'}: over the first {len(early)} steps loss differs by at most {loss_err:.1e} (limit {LOSS_TOL:.0e}), "
          f"gradient norm by {norm_err:.1e} (limit {NORM_TOL:.0e}); {len(steps)} steps in both runs (CPU {len(cpu_t)}, CUDA {len(gpu_t)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
