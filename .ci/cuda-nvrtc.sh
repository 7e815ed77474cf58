#!/usr/bin/env bash
# Compiles every CUDA kernel of the `cuda` backend with NVRTC for sm_90a and assembles the PTX with
# ptxas (and checks the Hopper kernels' SASS with nvdisasm), without a GPU.
#
# NVRTC, the CUDA runtime headers, CCCL (which cuda_bf16.h includes) and ptxas come from NVIDIA's pip
# wheels into a virtualenv, so the check needs neither a CUDA toolkit nor a driver.
# Usage: .ci/cuda-nvrtc.sh            (venv in $MOTLEY_CUDA_HOME, default ~/.cache/motley/venv-cuda13)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${MOTLEY_CUDA_HOME:-$HOME/.cache/motley/venv-cuda13}"
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")" && python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvcc==13.0.*" \
    "nvidia-cuda-nvdisasm==13.5.*"

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cu="$site/nvidia/cu13"
[ -f "$cu/include/cuda_bf16.h" ] || { echo "cuda-nvrtc: $cu/include/cuda_bf16.h missing after pip install" >&2; exit 1; }

export LD_LIBRARY_PATH="$cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOTLEY_CUDA_INCLUDE="$cu/include"
export MOTLEY_PTXAS="$cu/bin/ptxas"  # assembles the PTX too, as the driver would
export MOTLEY_NVDISASM="$cu/bin/nvdisasm"  # and disassembles the Hopper kernels, whose SASS is checked
for tool in "$MOTLEY_PTXAS" "$MOTLEY_NVDISASM"; do
    [ -x "$tool" ] || { echo "cuda-nvrtc: $tool missing after pip install" >&2; exit 1; }
done
export CI="${CI:-true}"  # missing NVRTC must fail here, not skip
cargo test --release --features cuda --test cuda_nvrtc -- --nocapture
