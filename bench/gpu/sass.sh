#!/usr/bin/env bash
# Counts the instructions of the Hopper kernels' SASS, without a GPU (BENCHMARKS.md, thirteenth
# session): assembles the bf16 PTX that bench/gpu/build.sh wrote to gpu-carry/ptx (NVRTC's, as
# the backend compiles it) with ptxas for sm_90a, disassembles it with nvdisasm (both from
# NVIDIA's pip wheels, in the venv of .ci/cuda-nvrtc.sh) and prints bench/gpu/sass.py's table
# for each kernel file: static instructions, loop sizes and the largest loop's opcodes.
# Usage: bench/gpu/sass.sh [FILE ...]   (kernel files: attention, experts; default both)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${MOTLEY_CUDA_HOME:-$HOME/.cache/motley/venv-cuda13}"
[ -x "$venv/bin/python" ] || { echo "sass.sh: no venv at $venv: run .ci/cuda-nvrtc.sh (or bench/gpu/build.sh) first" >&2; exit 1; }
"$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvdisasm==13.5.*"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
bin="$site/nvidia/cu13/bin"
for tool in ptxas nvdisasm; do
    [ -x "$bin/$tool" ] || { echo "sass.sh: $bin/$tool missing after pip install" >&2; exit 1; }
done

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(attention experts)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for file in "${files[@]}"; do
    ptx=$(ls gpu-carry/ptx/"$file"-bf16-*.ptx 2>/dev/null | head -1)
    [ -n "$ptx" ] || { echo "sass.sh: no gpu-carry/ptx/$file-bf16-*.ptx: run bench/gpu/build.sh first" >&2; exit 1; }
    "$bin/ptxas" -arch=sm_90a -O3 "$ptx" -o "$work/$file.cubin"
    "$bin/nvdisasm" -c "$work/$file.cubin" > "$work/$file.sass"
    echo "## $file (bf16, sm_90a; $(basename "$ptx"))"
    # The Hopper entry points: the kernels these counts are about.
    case "$file" in
        attention) kernels=(attn_fwd_wgmma_d64 attn_bwd_wgmma_d64) ;;
        experts) kernels=(expert_up_wgmma expert_dact_wgmma grouped_nt_wgmma grouped_nn_wgmma grouped_tn_wgmma grouped_tn_add_wgmma) ;;
        *) kernels=() ;;
    esac
    python3 bench/gpu/sass.py "$work/$file.sass" "${kernels[@]}"
    echo
done
