#!/usr/bin/env bash
# The GPU session's harness. Runs on the device machine, from the repository root, with the
# gpu-carry/ folder that bench/gpu/build.sh made here (no Rust toolchain needed there):
#
#   bench/gpu/run.sh check      environment; GPU parity tests; memory plan vs peak; `motley train` CUDA vs CPU
#   bench/gpu/run.sh step       H100-ref B=8 T=4096: motley (mma.sync attention and cuBLAS experts,
#                               then the Hopper kernels), time per op of both, routing on the
#                               device vs the host, then PyTorch eager and compile
#   bench/gpu/run.sh attention  causal attention T=4K/32K/128K: motley (mma.sync, then the Hopper
#                               wgmma kernels), then PyTorch SDPA (flash)
#   bench/gpu/run.sh long       B=1 T=16K…256K: motley (memory.policy auto: the least recompute that
#                               fits the GPU), then the peer's long suite
#   bench/gpu/run.sh long-max   B=1 T=512K, 768K, 1M: motley
#   bench/gpu/run.sh profile    Nsight Compute on the attention kernels at T=32K and the experts'
#                               kernels in an H100-ref step (for tuning)
#   bench/gpu/run.sh all        every part in that order, as many as the call budget allows
#   bench/gpu/run.sh step attention   several parts, in the order given
#
# Each part writes logs, JSON lines and a markdown table under $OUT/<part>/ (default ./gpu-out),
# and a line per command into $OUT/summary.md; a command that fails or runs out of time is
# recorded and the next one runs. Every command has a time limit, and the whole call ends within
# RUN_BUDGET seconds (default 570: the device tool stops a call at 600 s). The summary and the
# tables are printed at the end.
#
# Environment: OUT, RUN_BUDGET; PYTHON (python3: the one with PyTorch); CHECK_STEPS (300),
# STEP_POLICY (keep), LONG_POLICY (auto), MAX_POLICY (alpha,tail=recompute,gate_up=recompute:
# offload by MEMO's α, the last two layers recomputing, the experts' gate/up product recomputed
# by the backward; by plan 512K, 768K and 1M take 48, 59 and 70 GiB), LONG_ARGS (more train_step flags for the long
# sweeps; unset, they take --hopper when this call's check part passed the Hopper kernels), PROFILE_LENGTH (32K), ROUTE_TOKENS (32K: the step part's routing bench), NCU (the ncu binary; found
# on PATH or in /usr/local/cuda/bin). bench/gpu/rehearse.sh runs all of it here, without
# a GPU, on the emulated device, by shrinking the work: SHAPE (h100-ref: a key of
# bench/gpu_configs.json or cpu_configs.json), SHAPE_ARGS (train_step flags after --shape, e.g.
# --batch), ATTN_LENGTHS (4K,32K,128K), ATTN_ARGS, LONG_LENGTHS (16K,…,256K), MAX_LENGTHS
# (512K,768K,1M), PROFILE_ARGS (flags of the profiled attention bench), CHECK_ARGS (flags of the check's `motley train`), MOTLEY_CUDA_LD (the library path
# motley's commands get) and MOTLEY_PTX_CACHE (kept when set).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
root=$PWD
OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
bin=$root/gpu-carry/bin
py=${PYTHON:-python3}
budget=${RUN_BUDGET:-570}
start=$SECONDS
summary=$OUT/summary.md
shape=${SHAPE:-h100-ref}
# Word-split on purpose: each holds flags.
# shellcheck disable=SC2206
shape_args=(--shape "$shape" ${SHAPE_ARGS:-})
# shellcheck disable=SC2206
attn_args=(--lengths "${ATTN_LENGTHS:-4K,32K,128K}" ${ATTN_ARGS:-})
# shellcheck disable=SC2206
check_args=(${CHECK_ARGS:-})
# shellcheck disable=SC2206
long_args=(${LONG_ARGS:-})
# shellcheck disable=SC2206
profile_args=(--lengths "${PROFILE_LENGTH:-32K}" ${PROFILE_ARGS:-})

# The shape as the peer's --config JSON; an unknown SHAPE is an error naming the known ones.
shape_json() {
    "$py" -c 'import json, sys
shapes = {k: v for f in ("bench/cpu_configs.json", "bench/gpu_configs.json") for k, v in json.load(open(f)).items() if not k.startswith("_")}
if sys.argv[1] not in shapes:
    sys.exit("run.sh: SHAPE=%s is in neither bench/gpu_configs.json nor bench/cpu_configs.json; known: %s" % (sys.argv[1], ", ".join(sorted(shapes))))
print(json.dumps(shapes[sys.argv[1]]))' "$shape"
}
# Checked before any device time is spent.
shape_json > /dev/null || exit 2

log() { echo "[$(date +%T) +$((SECONDS - start))s] $*" >&2; }
record() { echo "| $1 | $2 | $3 |" >> "$summary"; }

# Library folders for motley's CUDA libraries (NVRTC, cuBLASLt): /usr/local/cuda/lib64 and the
# nvidia/*/lib folders of the Python environment (issue #6). Only motley's commands get them
# (prefixed with "${gpu[@]}"): PyTorch keeps loading its own wheels' libraries.
cuda_lib_path() {
    local dirs=() d
    [ -d /usr/local/cuda/lib64 ] && dirs+=(/usr/local/cuda/lib64)
    while IFS= read -r d; do dirs+=("$d"); done < <("$py" -c '
import glob, os, nvidia
for p in nvidia.__path__:
    for d in sorted(glob.glob(os.path.join(p, "*", "lib"))):
        print(d)' 2> /dev/null)
    local IFS=:
    echo "${dirs[*]}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
CUDA_LD=${MOTLEY_CUDA_LD:-$(cuda_lib_path)}
gpu=(env "LD_LIBRARY_PATH=$CUDA_LD")

# The carried PTX comes from NVRTC 13 (PTX ISA 9.0): a driver older than CUDA 13 cannot load it,
# so then the kernels are compiled here instead, with this machine's NVRTC and headers.
driver_cuda=$(timeout 30 nvidia-smi 2> /dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$')
if [ -n "${MOTLEY_PTX_CACHE:-}" ]; then
    log "kernels from MOTLEY_PTX_CACHE=$MOTLEY_PTX_CACHE"
elif [ -n "$driver_cuda" ] && [ "$driver_cuda" -lt 13 ]; then
    log "driver supports CUDA $driver_cuda < 13: compiling kernels here instead of the carried PTX"
    export MOTLEY_PTX_CACHE=$OUT/ptx-cache
else
    export MOTLEY_PTX_CACHE=$root/gpu-carry/ptx
fi

# Seconds a command may take: `want`, cut to what the call budget leaves (15 s kept for the
# tables); 0 when under 20 s are left.
grant() {
    local left=$((budget - (SECONDS - start) - 15))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

# run_limited LABEL SECONDS LOG CMD...: CMD with stdout and stderr into LOG, killed after SECONDS
# (0: skipped); its result goes into the summary. Returns CMD's status (124: timed out).
run_limited() {
    local label=$1 limit=$2 logf=$3
    shift 3
    if [ "$limit" -le 0 ]; then
        record "$label" "skipped: the call's time budget is spent" 0
        log "skipped $label"
        return 125
    fi
    log "$label (limit ${limit}s) > ${logf#"$OUT"/}"
    local t0=$SECONDS rc result
    timeout -k 10 "$limit" "$@" > "$logf" 2>&1
    rc=$?
    case $rc in
        0) result=ok ;;
        124 | 137) result="timed out after ${limit}s" ;;
        *) result="failed (exit $rc): $(grep -v -e '^\s*$' -e 'RUST_BACKTRACE' "$logf" | tail -n 1 | cut -c1-160 | tr '|' '/')" ;;
    esac
    record "$label" "$result" $((SECONDS - t0))
    log "$label: $result"
    # A failure's own words, here too: the log may not come back (a rehearsal in CI), and the
    # summary line holds only its last line. Its first panics (a test's message), then its end.
    [ "$rc" -eq 0 ] || { echo "--- ${logf#"$OUT"/}:"; grep -m 5 -A 1 'panicked at' "$logf"; echo "..."; grep -v -e '^\s*$' "$logf" | tail -n 15; echo "---"; } >&2
    return "$rc"
}

part_check() {
    local d=$OUT/check steps=${CHECK_STEPS:-300}
    mkdir -p "$d"
    {
        echo "# Environment, $(date -u +%Y-%m-%dT%H:%MZ)"
        uname -a
        echo "cores: $(nproc); memory: $(free -g | awk '/^Mem:/ { print $2 " GiB" }')"
        timeout 30 nvidia-smi
        timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        echo "python: $("$py" --version 2>&1); nvidia packages: $("$py" -c 'import nvidia; print(list(nvidia.__path__))' 2>&1)"
        timeout 60 "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())' 2>&1
        echo "LD_LIBRARY_PATH for motley: $CUDA_LD"
        local dir lib
        for dir in ${CUDA_LD//:/ }; do
            for lib in "$dir"/libnvrtc.so* "$dir"/libcublasLt.so* "$dir"/libcudart.so*; do
                [ -e "$lib" ] && echo "  $lib"
            done
        done
        echo "MOTLEY_PTX_CACHE=$MOTLEY_PTX_CACHE"
        cat gpu-carry/BUILD.txt
    } > "$d/env.txt" 2>&1
    run_limited "check: GPU parity tests (cuda_parity)" "$(grant 180)" "$d/parity.log" \
        "${gpu[@]}" MOTLEY_PARITY_DEVICE=gpu "$bin/cuda_parity" --test-threads 1 --nocapture
    run_limited "check: memory plan vs measured device peak (cuda_memory)" "$(grant 120)" "$d/memory.log" \
        "${gpu[@]}" MOTLEY_PARITY_DEVICE=gpu "$bin/cuda_memory" --nocapture
    rm -rf "$d/train-cuda" "$d/train-cpu"
    run_limited "check: motley train --device cuda, $steps steps" "$(grant 240)" "$d/train-cuda.log" \
        "${gpu[@]}" "$bin/motley" train --device cuda --steps "$steps" "${check_args[@]}" --out "$d/train-cuda"
    if ! grep -q '^training on ' "$d/train-cuda.log"; then
        local why
        why=$({ grep -m 1 -i 'cuda' "$d/train-cuda.log" || tail -n 1 "$d/train-cuda.log"; } | cut -c1-200 | tr '|' '/')
        record "check: loss curves CPU vs CUDA" "not compared: the cuda run did not train on the GPU: $why" 0
        echo "not compared: the cuda run did not train on the GPU: $why" > "$d/losses.md"
        return
    fi
    run_limited "check: motley train --device cpu, $steps steps" "$(grant 180)" "$d/train-cpu.log" \
        "$bin/motley" train --device cpu --steps "$steps" "${check_args[@]}" --out "$d/train-cpu"
    "$py" bench/gpu/compare_losses.py "$d/train-cpu/metrics.jsonl" "$d/train-cuda/metrics.jsonl" > "$d/losses.md" 2>&1
    record "check: loss curves CPU vs CUDA" "$(tail -n 1 "$d/losses.md" | cut -c1-200 | tr '|' '/')" 0
}

part_step() {
    local d=$OUT/step
    mkdir -p "$d"
    rm -f "$d/motley.jsonl"
    run_limited "step: motley $shape (${STEP_POLICY:-keep})" "$(grant 300)" "$d/motley.log" \
        "${gpu[@]}" "$bin/train_step" --device cuda "${shape_args[@]}" --policy "${STEP_POLICY:-keep}" --warmup 2 --steps 10 --max-seconds 120 --json "$d/motley.jsonl"
    run_limited "step: motley $shape, Hopper kernels (wgmma attention, expert GEMMs with SwiGLU fused)" "$(grant 150)" "$d/motley-hopper.log" \
        "${gpu[@]}" "$bin/train_step" --device cuda "${shape_args[@]}" --policy "${STEP_POLICY:-keep}" --hopper --warmup 2 --steps 10 --max-seconds 60 --json "$d/motley.jsonl"
    # Where the step's time goes: GPU time per op (events around each op perturb the timing a
    # little, so this is a separate run and not the table's number).
    run_limited "step: motley time per op (profile)" "$(grant 120)" "$d/profile.log" \
        "${gpu[@]}" "$bin/train_step" --device cuda "${shape_args[@]}" --policy "${STEP_POLICY:-keep}" --warmup 1 --steps 3 --max-seconds 60 --profile
    # The experts' kernels alone, so that their per-op times stand even if the Hopper attention
    # fails on the hardware (the attention part times those kernels against mma.sync's).
    run_limited "step: motley time per op, Hopper expert kernels (profile)" "$(grant 90)" "$d/profile-hopper.log" \
        "${gpu[@]}" "$bin/train_step" --device cuda "${shape_args[@]}" --policy "${STEP_POLICY:-keep}" --hopper-experts --warmup 1 --steps 3 --max-seconds 60 --profile
    # What a MoE layer's forward waits for: routing on the device against the host path.
    run_limited "step: routing on the device vs on the host, ${ROUTE_TOKENS:-32K} tokens × 8 experts" "$(grant 30)" "$d/routing.log" \
        "${gpu[@]}" "$bin/routing" --device cuda --tokens "${ROUTE_TOKENS:-32K}" --experts 8 --min-seconds 0.5
    run_limited "step: PyTorch eager + torch.compile, same shape" "$(grant 360)" "$d/torch.log" \
        "$py" bench/peer/torch_hmoe.py --suite custom --config "$(shape_json)" --modes eager,compile
    {
        echo "H100-ref training step, B=8 × T=4096 (motley: bf16 activations and working weights, f32 master weights; PyTorch: bf16 autocast). MFU over 989 TFLOP/s."
        "$py" bench/gpu/table.py step "$d/motley.jsonl" "$d/torch.log"
        sed -n '/^time per op/,$p' "$d/profile.log"
        echo
        echo "With the Hopper expert kernels (grouped_matmul_wgmma, grouped_matmul_swiglu[_bwd]):"
        sed -n '/^time per op/,$p' "$d/profile-hopper.log"
        echo
        sed -n '/^routing on/,$p' "$d/routing.log"
    } > "$d/table.md"
}

part_attention() {
    local d=$OUT/attention
    mkdir -p "$d"
    rm -f "$d/motley.jsonl"
    run_limited "attention: motley fwd, fwd+bwd" "$(grant 240)" "$d/motley.log" \
        "${gpu[@]}" "$bin/attention" --device cuda "${attn_args[@]}" --json "$d/motley.jsonl"
    run_limited "attention: motley, Hopper (wgmma) kernels" "$(grant 150)" "$d/motley-hopper.log" \
        "${gpu[@]}" "$bin/attention" --device cuda --hopper "${attn_args[@]}" --json "$d/motley.jsonl"
    run_limited "attention: PyTorch SDPA (flash)" "$(grant 180)" "$d/sdpa.log" \
        "$py" bench/peer/sdpa_attention.py --lengths "${ATTN_LENGTHS:-4K,32K,128K}" --backend flash
    {
        echo "Causal attention, 16 heads of 64, B = 32K / T; TFLOP/s with forward 2·2·B·H·T²·D/2 and backward 2.5× forward (motley bf16 buffers, f32 lse; SDPA bf16)."
        "$py" bench/gpu/table.py attention "$d/motley.jsonl" "$d/sdpa.log"
        echo
        sed -n '/^Convention check/,$p' "$d/sdpa.log"
    } > "$d/table.md"
}

# passed TEST LOG: whether the libtest log (--nocapture: a test's output between its
# "test NAME ... " and its "ok") shows TEST passing.
passed() {
    awk -v head="test $1 ... " 'index($0, head) == 1 { on = 1; if ($0 == head "ok") found = 1 }
        on && $0 == "ok" { found = 1 } on && found { exit } on && /^test / && index($0, head) != 1 { exit }
        END { exit !found }' "$2" 2> /dev/null
}

# long_sweep DIR LABEL LENGTHS SECONDS POLICY: motley's sweep, its own budget a little under the
# limit so that it prints its table before being killed. Without LONG_ARGS, on the Hopper
# kernels when this call's check part saw them pass their parity tests (at 128K attention is
# most of the step), else on the default ones.
long_sweep() {
    local d=$1 label=$2 lengths=$3 policy=$5 s args=("${long_args[@]}")
    if [ -z "${LONG_ARGS+set}" ] && passed hopper_attention "$OUT/check/parity.log" && passed hopper_experts "$OUT/check/parity.log"; then
        args=(--hopper)
        label="$label, Hopper kernels (check passed them)"
    fi
    s=$(grant "$4")
    run_limited "$label" "$s" "$d/motley-$lengths.log" \
        "${gpu[@]}" "$bin/train_step" --device cuda --shape "$shape" --policy "$policy" --sweep "$lengths" \
        --time-limit $((s * 2 / 3)) --budget $((s - 20)) "${args[@]}" --json "$d/motley.jsonl"
}

# long_table DIR: motley's and the peer's long-context rows in one table.
long_table() {
    {
        echo "H100-ref at B=1, long context. MFU over 989 TFLOP/s; motley's rows in its logs also give the planned memory."
        "$py" bench/gpu/table.py step "$1/motley.jsonl" "$1/torch.log"
    } > "$1/table.md"
}

part_long() {
    local d=$OUT/long
    mkdir -p "$d"
    local lengths=${LONG_LENGTHS:-16K,32K,64K,128K,256K}
    long_sweep "$d" "long: motley $shape B=1 T=$lengths (${LONG_POLICY:-auto})" "$lengths" 330 "${LONG_POLICY:-auto}"
    run_limited "long: PyTorch --suite long (eager and checkpointed, T=16K…256K)" "$(grant 200)" "$d/torch.log" \
        "$py" bench/peer/torch_hmoe.py --suite long --steps 3
    long_table "$d"
}

part_long_max() {
    local d=$OUT/long
    mkdir -p "$d"
    local lengths=${MAX_LENGTHS:-512K,768K,1M} policy=${MAX_POLICY:-alpha,tail=recompute,gate_up=recompute}
    long_sweep "$d" "long-max: motley $shape B=1 T=$lengths ($policy)" "$lengths" 560 "$policy"
    long_table "$d"
}

# Nsight Compute on each attention kernel, one launch of it in the attention bench at one length:
# the full set of sections (speed of light, occupancy, warp stall reasons, memory tables, source
# counters) plus the tensor pipe's activity and shared-memory bank conflicts, as text. What the
# next kernel tuning works from where no GPU is lent.
part_profile() {
    local d=$OUT/profile ncu k length=${PROFILE_LENGTH:-32K}
    local attention="attn_fwd_d64 attn_bwd_delta attn_bwd_d64 attn_fwd_wgmma_d64 attn_bwd_wgmma_d64"
    local experts="expert_up_wgmma expert_dact_wgmma grouped_nt_wgmma grouped_nn_wgmma grouped_tn_wgmma"
    mkdir -p "$d"
    ncu=${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu 2> /dev/null || true)}
    if [ -z "$ncu" ] || [ ! -x "$ncu" ]; then
        record "profile: Nsight Compute" "skipped: no ncu on this machine (set NCU)" 0
        echo "no ncu on this machine" > "$d/table.md"
        return
    fi
    local metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
    metrics+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
    metrics+=,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_ldsm.sum
    # One launch of kernel $1 (its first) in the command that follows.
    ncu_one() {
        local k=$1 what=$2
        shift 2
        run_limited "profile: ncu $k, $what" "$(grant 100)" "$d/$k.txt" \
            "${gpu[@]}" "$ncu" --set full --metrics "$metrics" -k "regex:^$k\$" -c 1 "$@"
    }
    for k in $attention; do
        local hopper=()
        case $k in *wgmma*) hopper=(--hopper) ;; esac
        ncu_one "$k" "T=$length" "$bin/attention" --device cuda "${hopper[@]}" "${profile_args[@]}" --min-seconds 0
    done
    # The experts' kernels at the step's shape: the first layer's launch of each.
    for k in $experts; do
        ncu_one "$k" "$shape step" "$bin/train_step" --device cuda "${shape_args[@]}" --hopper-experts --warmup 0 --steps 1
    done
    {
        echo "Nsight Compute, one launch per kernel: the attention kernels of \`attention ${profile_args[*]}\` (default B = 32K / T, 16 heads of 64), the experts' of one \`train_step ${shape_args[*]} --hopper-experts\` step; full reports in $d/*.txt."
        for k in $attention $experts; do
            echo; echo "### $k"; echo '```'
            grep -E '^ +((Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Dynamic Shared Memory Per Block|Executed Ipc Active|Issue Slots Busy|Warp Cycles Per Issued Instruction|L1/TEX Hit Rate|L2 Hit Rate) |sm__pipe_tensor|l1tex__data|smsp__inst_executed_op_ldsm)' "$d/$k.txt" | sed 's/  */ /g'
            echo '```'
        done
    } > "$d/table.md"
}

parts=()
for arg in "$@"; do
    case $arg in
        check | step | attention | long | long-max | profile) parts+=("$arg") ;;
        all) parts+=(check step attention profile long long-max) ;;
        *) parts=() && break ;;
    esac
done
if [ ${#parts[@]} -eq 0 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
[ -f "$bin/motley" ] || { echo "run.sh: $bin/motley missing: run bench/gpu/build.sh where cargo is, and carry gpu-carry" >&2; exit 2; }
chmod +x "$bin"/* 2> /dev/null # in case the copy lost the modes
[ -f "$summary" ] || printf '| command | result | seconds |\n|---|---|---|\n' > "$summary"
for p in "${parts[@]}"; do
    log "== $p"
    case $p in
        check) part_check ;;
        step) part_step ;;
        attention) part_attention ;;
        long) part_long ;;
        long-max) part_long_max ;;
        profile) part_profile ;;
    esac
done
echo "# Summary ($OUT/summary.md, all calls so far)"
cat "$summary"
for p in "${parts[@]}"; do
    case $p in
        check) f=$OUT/check/losses.md ;;
        long-max) f=$OUT/long/table.md ;;
        *) f=$OUT/$p/table.md ;;
    esac
    [ -f "$f" ] && { echo; echo "## $p"; cat "$f"; }
done
if [ -f "$OUT/check/parity.log" ] && [[ " ${parts[*]} " == *" check "* ]]; then
    echo; echo "## parity errors"; grep -E '^primitive |normalised max error|test result|panicked' "$OUT/check/parity.log" | head -n 70
fi
if [ -f "$OUT/check/memory.log" ] && [[ " ${parts[*]} " == *" check "* ]]; then
    echo; echo "## memory plan vs measured"; grep -E 'MiB|test result|panicked' "$OUT/check/memory.log" | head -n 20
fi
exit 0
