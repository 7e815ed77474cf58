#!/usr/bin/env bash
# Builds, on this machine (cargo, no GPU), everything a GPU session runs, into gpu-carry/
# (git-ignored) for the device tool's `carry: ["gpu-carry"]`:
#   gpu-carry/bin/  motley, cuda_parity and cuda_memory (the GPU tests), train_step, attention and
#                   routing (the benches), built with --features cuda and stripped
#   gpu-carry/ptx/  every kernel as PTX for sm_90a (H100, H200): with MOTLEY_PTX_CACHE pointing
#                   here the GPU machine loads them without NVRTC compiling or the CUDA headers
#   gpu-carry/BUILD.txt  commit, toolchain, files, sizes
# First runs .ci/cuda-nvrtc.sh (NVRTC from pip in a venv; every kernel compiles for sm_90a).
# Then, on the device: bench/gpu/run.sh (see docs/cuda.md, "Next GPU session").
# Usage: bench/gpu/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=gpu-carry
limit_mib=48 # the device tool carries 64 MiB in all, working tree included

bash .ci/cuda-nvrtc.sh
venv="${MOTLEY_CUDA_HOME:-$HOME/.cache/motley/venv-cuda13}"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cu="$site/nvidia/cu13"

# "target-name path" of every executable that cargo's JSON messages announce.
executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            print(m["target"]["name"], m["executable"])'
}

rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/ptx"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
cargo build --release --features cuda --bin motley --bench train_step --bench attention --bench routing --example ptx_cache \
    --message-format=json-render-diagnostics | executables >> "$list"
cargo test --release --features cuda --no-run --test cuda_parity --test cuda_memory --message-format=json-render-diagnostics | executables >> "$list"

for name in motley cuda_parity cuda_memory train_step attention routing; do
    exe=$(awk -v n="$name" '$1 == n { print $2 }' "$list" | tail -n 1)
    [ -n "$exe" ] || { echo "build.sh: cargo built no executable named $name" >&2; exit 1; }
    strip -o "$carry/bin/$name" "$exe"
done

ptx_cache=$(awk '$1 == "ptx_cache" { print $2 }' "$list" | tail -n 1)
MOTLEY_PTX_CACHE="$carry/ptx" LD_LIBRARY_PATH="$cu/lib" MOTLEY_CUDA_INCLUDE="$cu/include" "$ptx_cache" sm_90a > /dev/null

{
    echo "gpu-carry built $(date -u +%Y-%m-%dT%H:%MZ) by bench/gpu/build.sh"
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
    echo "toolchain: $(rustc --version); cargo features: cuda; NVRTC: $(cd "$cu/lib" && echo libnvrtc.so.*) from pip"
    echo "files (bytes, sha256):"
    (cd "$carry" && find bin ptx -type f | sort | while read -r f; do echo "  $f $(stat -c %s "$f") $(sha256sum "$f" | cut -c1-16)"; done)
} > "$carry/BUILD.txt"

bytes=$(du -sb "$carry" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "gpu-carry: $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB ($(find "$carry/ptx" -name '*.ptx' | wc -l) PTX files); tracked files: $(awk -v b="$tree" 'BEGIN { printf "%.1f", b / 1048576 }') MiB" | tee -a "$carry/BUILD.txt"
if [ "$bytes" -gt $((limit_mib * 1048576)) ]; then
    echo "build.sh: gpu-carry is over ${limit_mib} MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi
