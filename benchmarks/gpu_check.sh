#!/usr/bin/env bash
# Everything that needs a CUDA device, in one go (for a lent GPU machine with a short budget):
# the GPU tests (no host sync, CUDA-graph capture, fused vs reference), then the step and
# training-step benchmarks. Results go to ${OUT:-gpu-results}/.
# Usage, from the repository root with the project installed: bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
python benchmarks/step.py --device cuda --shapes resnet50,gpt2 --steps 50 --rounds 5 \
    --out "$out/step-cuda.json" 2>&1 | tee "$out/step-cuda.txt"
python benchmarks/train_step.py --device cuda --width 64 --batch 256 --steps 50 \
    --out "$out/train-cuda.json" 2>&1 | tee "$out/train-cuda.txt"
exit "$tests_rc"
