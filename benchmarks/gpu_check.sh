#!/usr/bin/env bash
# Everything that needs a CUDA device, in one go (for a lent GPU machine with a short budget):
# the GPU tests (no host sync, CUDA-graph capture, both fused backends against the reference,
# the Triton kernels natively), then the step benchmark, the Triton tuning table, the
# training-step benchmark, and last the slow (compiled-backend) GPU tests with the time left.
# Results go to ${OUT:-gpu-results}/ (8 files: what a lent machine sends back). Usage, from the repository root, with the
# project importable (installed, or PYTHONPATH=src) and ``adamp`` for the official figures:
#   bash benchmarks/gpu_check.sh            # BUDGET=540 seconds in all, by default
set -uo pipefail
out="${OUT:-gpu-results}"
py="${PYTHON:-python3}"
budget="${BUDGET:-540}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
left() { echo $(( budget - SECONDS )); }
run() {  # run SECONDS LOG COMMAND...: at most SECONDS (and never past the budget)
    local limit=$1 log=$2
    shift 2
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    if (( limit < 10 )); then echo "skipped (budget): $*" | tee -a "$log"; return 0; fi
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$py" -c "import adamp; print('adamp importable from', adamp.__file__)" || echo "adamp missing"
} 2>&1 | tee "$out/gpu.txt"
run 110 "$out/gpu-tests.txt" "$py" -m pytest -q -p no:cacheprovider -m "gpu and not slow" \
    tests/test_gpu.py -rs --durations=5
run 100 "$out/gpu-tests.txt" "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py -rs \
    --durations=5
run 200 "$out/step-cuda.txt" "$py" benchmarks/step.py --device cuda --shapes resnet50,gpt2 \
    --steps 20 --rounds 3 --out "$out/step-cuda.json"
run 90 "$out/triton-tuning.txt" "$py" benchmarks/triton_tuning.py --shapes resnet50,gpt2 --profile
run 45 "$out/train-cuda.txt" "$py" benchmarks/train_step.py --device cuda --width 64 \
    --batch 256 --steps 20 --out "$out/train-cuda.json"
run 600 "$out/gpu-slow-tests.txt" "$py" -m pytest -q -p no:cacheprovider -m "gpu and slow" \
    tests/test_gpu.py -rs
echo "done in ${SECONDS}s" | tee -a "$out/gpu.txt"
