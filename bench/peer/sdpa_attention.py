#!/usr/bin/env python3
"""PyTorch SDPA causal attention, timed the way motley's bench/attention.rs times its kernels.

Same shapes (B = max(1, tokens / T), H heads of D), same clock (wall time around a batch of calls,
after a synchronize), same FLOP convention: forward 2*2*B*H*T^2*D/2 (QK^T and PV over the causal
half), backward 2.5x the forward (FlashAttention's convention). q, k, v are bf16 (B, H, T, D).

Issue #6 quotes SDPA (flash) on the H100 at forward 427 / 486 / 451 and forward+backward
394 / 442 / 431 TFLOP/s for T = 4K / 32K / 128K without stating the convention; the "convention
check" printed at the end gives the rates under the alternatives, to see which one reproduces them.

Prints one JSON line per length on stdout, then the tables on stderr.
Run: python3 bench/peer/sdpa_attention.py [--lengths 4K,32K,128K --heads 16 --head-dim 64
     --tokens 32K --min-seconds 1 --backend flash|cudnn|efficient|math|default]
"""
import argparse
import contextlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

BWD_PER_FWD = 2.5  # as bench/attention.rs
ISSUE_6 = {4096: (427.0, 394.0), 32768: (486.0, 442.0), 131072: (451.0, 431.0)}  # fwd, fwd+bwd TFLOP/s


def size(text):
    """4096, 16K or 1M (binary multiples), as bench/common/args.rs parses them."""
    t = text.strip()
    unit = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:].lower(), 1)
    n = int(t[:-1] if unit > 1 else t)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return n * unit


def causal_fwd_flops(b, h, t, d):
    return 2 * 2 * b * h * t * t * d / 2


def time_per_call(fn, min_seconds):
    """One call to size the repetitions, then enough calls to last min_seconds (at most 100)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = min(100, max(1, math.ceil(min_seconds / max(once, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def backend_context(name):
    if name == "default":
        return contextlib.nullcontext()  # PyTorch picks
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[name]])


def measure(b, h, t, d, min_seconds):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.rand(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(2).sub_(1).requires_grad_() for _ in range(3))
    dout = torch.rand(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(2).sub_(1)

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), dout)  # no accumulation into .grad

    return time_per_call(forward, min_seconds), time_per_call(forward_backward, min_seconds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4K,32K,128K")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=size, default=32 << 10)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--backend", default="flash", choices=["flash", "cudnn", "efficient", "math", "default"])
    a = ap.parse_args()
    lengths = [size(x) for x in a.lengths.split(",")]
    h, d = a.heads, a.head_dim
    gpu = torch.cuda.get_device_name()
    rows = []
    with backend_context(a.backend):
        for t in lengths:
            b = max(1, a.tokens // t)
            fwd, fb = measure(b, h, t, d, a.min_seconds)
            flops = causal_fwd_flops(b, h, t, d)
            r = {"impl": f"PyTorch SDPA ({a.backend})", "device": gpu, "torch": torch.__version__, "T": t, "B": b, "H": h, "D": d,
                 "fwd_ms": fwd * 1e3, "fwd_TFLOPs": flops / fwd / 1e12,
                 "fwdbwd_ms": fb * 1e3, "fwdbwd_TFLOPs": (1 + BWD_PER_FWD) * flops / fb / 1e12}
            rows.append(r)
            print(json.dumps(r), flush=True)
    err = sys.stderr
    print(f"PyTorch {torch.__version__} SDPA ({a.backend}) causal attention on {gpu}, bf16, {h} heads of {d}", file=err)
    print("| T | B | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |\n|---|---|---|---|---|---|", file=err)
    for r in rows:
        print(f"| {r['T']} | {r['B']} | {r['fwd_ms']:.2f} | {r['fwd_TFLOPs']:.1f} | {r['fwdbwd_ms']:.2f} | {r['fwdbwd_TFLOPs']:.1f} |", file=err)
    print("\nConvention check against issue #6 (SDPA flash, H100): these timings in TFLOP/s under each convention", file=err)
    print("| T | issue fwd | fwd: causal half (used) | fwd: full square | issue fwd+bwd | bwd 2.5x, half (used) | bwd 2x, half | bwd 2.5x, full | bwd 2x, full |", file=err)
    print("|---|---|---|---|---|---|---|---|---|", file=err)
    for r in rows:
        issue_fwd, issue_fb = ISSUE_6.get(r["T"], ("—", "—"))
        half = causal_fwd_flops(r["B"], h, r["T"], d) / 1e12
        f, fb = r["fwd_ms"] / 1e3, r["fwdbwd_ms"] / 1e3
        fwd_rates = [half / f, 2 * half / f]
        fb_rates = [3.5 * half / fb, 3 * half / fb, 7 * half / fb, 6 * half / fb]
        cells = [str(r["T"]), str(issue_fwd)] + [f"{x:.0f}" for x in fwd_rates] + [str(issue_fb)] + [f"{x:.0f}" for x in fb_rates]
        print("| " + " | ".join(cells) + " |", file=err)

if __name__ == "__main__":
    main()
