#!/usr/bin/env bash
# A dress rehearsal of the GPU session, here, without a GPU: bench/gpu/run.sh with the carried
# binaries (bench/gpu/build.sh first), motley's commands on the emulated CUDA device
# (tests/cuda_emu/device: driver, NVRTC, cuBLASLt and cuBLAS on the CPU, kernels on the kernel
# emulator) and every part shrunk to what the emulator runs in minutes (h100-ref-mini, whose
# shapes the Hopper kernels take; short lengths, two training steps). It checks the harness and
# the binaries' CUDA paths end to end (flags, files, JSON, tables, MEMO's sweep children), not
# speed: its timings are the emulator's. Parts that need PyTorch fail where it is missing, and are recorded so.
# Usage: bench/gpu/rehearse.sh [part...]   (default: all; output in ./rehearsal-out or $OUT).
# Exits non-zero when a motley command failed (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x gpu-carry/bin/motley ] || { echo "rehearse.sh: gpu-carry/bin/motley missing: run bench/gpu/build.sh first" >&2; exit 2; }

# The parity test builds the emulator's libraries (cached until their sources change).
MOTLEY_PARITY_DEVICE=emulator cargo test --release --features cuda --test cuda_parity -q -- --exact elementwise::f32 > /dev/null
emu=${CARGO_TARGET_DIR:-$PWD/target}/tmp/cuda_emu
newest() { ls -td "$@" 2> /dev/null | head -n 1; }
device=$(newest "$emu"/device-*/)
export MOTLEY_CUDA_LD=${device%/}
export MOTLEY_PTX_CACHE=$MOTLEY_CUDA_LD/ptx
MOTLEY_EMU_KERNELS_F32=$(newest "$emu"/libemu-f32-*.so)
MOTLEY_EMU_KERNELS_BF16=$(newest "$emu"/libemu-bf16-*.so)
export MOTLEY_EMU_KERNELS_F32 MOTLEY_EMU_KERNELS_BF16

export OUT=${OUT:-$PWD/rehearsal-out}
export SHAPE=h100-ref-mini SHAPE_ARGS="--batch 1 --seq 64"
export ATTN_LENGTHS=128,256 ATTN_ARGS="--tokens 256 --heads 2 --min-seconds 0.1"
export LONG_LENGTHS=64,128 MAX_LENGTHS=256
export CHECK_STEPS=2 ROUTE_TOKENS=2K
export CHECK_ARGS="--set train.batch_size=2 --set train.seq_len=64 --set model.seq_len=64 --set train.eval_batches=1"
rm -rf "$OUT"
# No Nsight Compute here: a stand-in that drops ncu's flags and runs the profiled command.
mkdir -p "$OUT"
printf '#!/usr/bin/env bash\nwhile [ $# -gt 0 ] && [ ! -x "$1" ]; do shift; done\nexec "$@"\n' > "$OUT/ncu"
chmod +x "$OUT/ncu"
export NCU=$OUT/ncu PROFILE_LENGTH=128 PROFILE_ARGS="--tokens 256 --heads 2"
bash bench/gpu/run.sh "${@:-all}"

# `motley train --hopper` on a model whose shapes the Hopper kernels take (head_dim 64, widths
# multiples of 128), against the portable kernels with the same seed: the flag reaches the
# kernels end to end (the GPU session leaves this to the parity tests, which hold the kernels).
# 200 tokens a sequence: several attention tiles, the last partial (with one tile both kernel
# sets give the same bits, and the comparison would not show which ran).
hopper_ok=1
mini=(--steps 2 --prompt "" --set train.batch_size=1 --set train.seq_len=200 --set model.seq_len=200 --set train.eval_batches=1
    --set model.d_model=128 --set model.n_heads=2 --set model.n_kv_heads=2 --set 'moe.expert_widths=[128,256,384,512]')
for kernels in portable hopper; do
    rm -rf "$OUT/train-$kernels"
    flag=(); [ $kernels = hopper ] && flag=(--hopper)
    env LD_LIBRARY_PATH="$MOTLEY_CUDA_LD" gpu-carry/bin/motley train --device cuda "${flag[@]}" "${mini[@]}" --out "$OUT/train-$kernels" > "$OUT/train-$kernels.log" 2>&1 || hopper_ok=0
done
if grep -q -e 'portable kernels' -e 'run on cuBLAS instead' "$OUT/train-hopper.log" || ! grep -q '^training on ' "$OUT/train-hopper.log"; then
    hopper_ok=0
fi
python3 bench/gpu/compare_losses.py "$OUT/train-portable/metrics.jsonl" "$OUT/train-hopper/metrics.jsonl" > "$OUT/train-hopper.md" 2>&1 || hopper_ok=0
if [ $hopper_ok = 0 ]; then
    echo "rehearse.sh: motley train --hopper did not run on the Hopper kernels or did not agree with the portable ones:" >&2
    cat "$OUT/train-hopper.log" "$OUT/train-hopper.md" >&2
    exit 1
fi
echo "rehearse.sh: motley train --hopper: $(tail -n 1 "$OUT/train-hopper.md")"
# Every motley command must have passed; PyTorch's may fail here for want of PyTorch.
if tail -n +3 "$OUT/summary.md" | grep -v -e '| ok |' -e '| AGREE' -e 'PyTorch'; then
    echo "rehearse.sh: the commands above did not pass on the emulated device (logs under $OUT)" >&2
    exit 1
fi
echo "rehearse.sh: every motley command passed on the emulated device"
