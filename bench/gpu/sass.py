#!/usr/bin/env python3
"""Instruction counts of the kernels' SASS, from nvdisasm's listing (bench/gpu/sass.sh runs it).

Where no GPU is lent the kernels cannot be timed; what can be counted is what they issue: a
loop's instructions a warp against the tensor clocks its products take (each SM sub-partition
issues one instruction a clock). For each kernel asked for: its static instruction count, its
loops (a branch back to an earlier label: the instructions between them, the largest first),
its step loops (the innermost of the loops that issue wgmma: a K step of the expert kernels, whose
persistent tile loop holds it and the epilogue; a tile of attention's) and the commonest
opcodes of its largest step loop (of its largest loop where none multiplies).

Usage: sass.py LISTING [KERNEL ...]   (LISTING: `nvdisasm -c` of one cubin)
"""
import re
import sys
from collections import Counter

INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def kernels(listing):
    """{name: [lines]} of each `.text.NAME:` section."""
    out, name = {}, None
    for line in listing:
        m = re.match(r"^\.text\.(\w+):", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def loops(lines):
    """(instructions, first line, last line) of each backward branch's span, largest first; none
    spanning an EXIT (ptxas puts an mbarrier wait's retries after the kernel's end, branching
    back to the wait: no loop of the kernel's code)."""
    labels, spans = {}, set()
    for i, line in enumerate(lines):
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        m = BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            if any("EXIT" in l for l in lines[start:i]):
                continue
            count = sum(1 for l in lines[start : i + 1] if INSTRUCTION.match(l))
            spans.add((count, start, i))
    return sorted(spans, reverse=True)


def step_loops(lines, spans):
    """The spans that issue wgmma (HGMMA) and hold no other span that does, largest first."""
    products = [s for s in spans if any("HGMMA" in l for l in lines[s[1] : s[2] + 1])]
    return [s for s in products if not any(o != s and s[1] <= o[1] and o[2] <= s[2] for o in products)]


def opcodes(lines):
    return Counter(m.group(1) for m in map(INSTRUCTION.match, lines) if m)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        found = kernels(f.read().splitlines())
    wanted = sys.argv[2:] or sorted(found)
    missing = [k for k in wanted if k not in found]
    if missing:
        sys.exit(f"sass.py: no kernel {', '.join(missing)} in {sys.argv[1]}; it has {', '.join(sorted(found))}")
    print("| kernel | instructions | loops (instructions a warp, largest first) | step loops | largest step loop's commonest opcodes |")
    print("|---|---|---|---|---|")
    for k in wanted:
        lines = found[k]
        spans = loops(lines)
        steps = step_loops(lines, spans)
        sizes = lambda found, shown=4: ", ".join(str(c) for c, _, _ in found[:shown]) or "none"
        common = ""
        if spans:
            _, a, b = (steps or spans)[0]
            common = ", ".join(f"{op} {n}" for op, n in opcodes(lines[a : b + 1]).most_common(8))
        print(f"| `{k}` | {sum(opcodes(lines).values())} | {sizes(spans)} | {sizes(steps, len(steps))} | {common} |")


if __name__ == "__main__":
    main()
