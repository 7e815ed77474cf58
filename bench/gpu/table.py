#!/usr/bin/env python3
"""One markdown table from the JSON lines of motley's benches and their PyTorch peers.

  table.py step FILE...       training steps: motley (train_step --json) beside torch_hmoe.py's lines
  table.py attention FILE...  attention: motley (attention --json) beside sdpa_attention.py's lines

Step rows are sorted by sequence length, then implementation. MFU is recomputed for every row from
its model TFLOP/s over one peak, 989 TFLOP/s (H100/H200 SXM dense bf16), so motley and the peer
(whose own mfu_pct uses 989.4) share a denominator. Lines that are not JSON objects are skipped.
"""
import json
import sys

PEAK_TFLOPS = 989.0


def read(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("{"):
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            pass
        except OSError as e:
            print(f"table.py: {e}", file=sys.stderr)
    return rows


def size(n):
    for unit, name in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


def num(value, fmt):
    return "" if value is None else format(value, fmt)


def step_impl(r):
    """motley rows carry impl and mode (the MEMO policy); torch_hmoe.py's carry mode and ckpt."""
    if r.get("impl"):
        return r["impl"], r.get("mode", "")
    return f"PyTorch {r.get('mode', '?')}", "full activation checkpointing" if r.get("ckpt") else "keep"


def step_table(rows):
    out = ["| implementation | B × T | memory policy | status | step s | tokens/s | model TFLOP/s | MFU | peak GiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    keyed = []
    for r in rows:
        impl, policy = step_impl(r)
        status = r.get("status") or ("OOM" if r.get("oom") else "ok")
        tflops = r.get("model_TFLOPs")
        mfu = None if tflops is None or r.get("device") == "cpu" else 100 * tflops / PEAK_TFLOPS
        keyed.append(((r.get("T", 0), r.get("B", 0), impl),
                      f"| {impl} | {r.get('B', '?')} × {size(r.get('T', 0))} | {policy} | {status} | {num(r.get('step_s'), '.3f')} | "
                      f"{num(r.get('tok_s'), ',.0f')} | {num(tflops, '.1f')} | {num(mfu, '.1f')}{'%' if mfu is not None else ''} | {num(r.get('peak_GiB'), '.1f')} |"))
    return out + [line for _, line in sorted(keyed, key=lambda k: k[0])]


def attention_table(rows):
    by_t = {}
    for r in rows:
        by_t.setdefault(r["T"], {})[r.get("impl", "?")] = r
    impls = sorted({r.get("impl", "?") for r in rows}, key=lambda i: (not i.startswith("motley"), i))
    # Rows checked against the mma.sync kernels (the attention bench's --hopper) add the errors.
    checked = [i for i in impls if any("err_vs_mma_out" in r and r.get("impl") == i for r in rows)]
    head = "| T | B | " + " | ".join(f"{i} fwd TFLOP/s | {i} fwd+bwd TFLOP/s" for i in impls)
    head += "".join(f" | {i} error vs mma.sync (O / dqkv)" for i in checked) + " |"
    out = [head, "|---|---|" + "---|---|" * len(impls) + "---|" * len(checked)]
    for t in sorted(by_t):
        cells = []
        for i in impls:
            r = by_t[t].get(i, {})
            cells += [num(r.get("fwd_TFLOPs"), ".1f"), num(r.get("fwdbwd_TFLOPs"), ".1f")]
        for i in checked:
            r = by_t[t].get(i, {})
            cells.append(f"{num(r.get('err_vs_mma_out'), '.1e')} / {num(r.get('err_vs_mma_dqkv'), '.1e')}")
        b = next(iter(by_t[t].values())).get("B", "?")
        out.append(f"| {size(t)} | {b} | " + " | ".join(cells) + " |")
    return out


def main(argv):
    if len(argv) < 2 or argv[0] not in ("step", "attention"):
        print(__doc__, file=sys.stderr)
        return 2
    rows = read(argv[1:])
    lines = step_table(rows) if argv[0] == "step" else attention_table(rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
