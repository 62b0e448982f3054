#!/usr/bin/env bash
# The GPU check: every figure BENCHMARKS.md still lacks, from one machine with one NVIDIA GPU, in
# under 8 minutes, written as BENCHMARKS.md's markdown (stdout and FILE; errors on stderr).
#
#   bash bench/gpu.sh [FILE]          # default FILE: gpu-results.md; paste its tables into BENCHMARKS.md
#   bash bench/gpu.sh --cpu-smoke     # the same scripts at a tiny size on CPU: checks that they run (seconds)
#
# What it runs (each under a time limit, so one slow part cannot take the rest with it):
#   nvidia-smi                        the device, its memory and driver
#   python bench/gpu.py               attention backend, bf16 vs fp32 logits, torch.compile of
#                                     tess2.predict, seconds per sampling step at batch 8 x 2048 with
#                                     Mistral-7B layer sizes (argmax, top-p, reward guidance G = 1),
#                                     peak memory, the projection alone (see its docstring)
#   python bench/bench_train.py       training tokens/s, MFU and memory per stage at Mistral-7B layer
#                                     size (4 layers: weights, gradients and AdamW state of the full
#                                     32 would not fit one GPU; tokens/s per layer scales)
# Needs: the repository's requirements.txt and a CUDA build of torch; no network, no checkpoints
# (random weights). Environment: GPU_PEAK_TFLOPS (default 989, H100 bf16 dense) for MFU.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=gpu-results.md
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) smoke=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) out="$arg" ;;
    esac
done
peak="${GPU_PEAK_TFLOPS:-989}"

run() {  # run SECONDS CMD...: a part that fails or runs out of time is reported, and the rest go on
    local limit=$1; shift
    timeout "$limit" "$@" || echo "| error: '$*' exited with $? (124: past its ${limit} s) |"
}

{
    echo "# bench/gpu.sh, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [ "$smoke" = 1 ]; then
        run 300 python bench/gpu.py --cpu-smoke
        echo; echo '### Training (bench/bench_train.py)'; echo; echo '```'
        run 120 python bench/bench_train.py --device cpu --preset tiny --stages adapt --batch 1 --seq 64 \
            --iters 1 --warmup 0 --threads 1
        echo '```'
    else
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        run 330 python bench/gpu.py
        echo; echo '### Training (bench/bench_train.py): Mistral-7B layer size, 4 layers, bf16 autocast'
        echo; echo '```'
        run 120 python bench/bench_train.py --device cuda --preset mistral-layers --layers 4 --batch 2 \
            --seq 2048 --iters 3 --warmup 1 --peak-tflops "$peak"
        echo '```'
    fi
} | tee "$out"  # tracebacks (stderr) stay on the terminal
