#!/usr/bin/env bash
# The one prepared GPU check (run first thing when a session is lent a GPU; < 8 minutes on one
# H100/H200): the gpu-marked tests, then the 0.5B and 7B mode tables (eager and compiled fast
# path, bf16). Results go to stdout and to $OUT (the device tool's output folder) when set.
# Paste the tables into docs/benchmarks.md with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt torch==2.13.0 -e ".[dev]"
fi
. .venv/bin/activate
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/device.txt"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" || true
for cfg in 0.5b 7b; do
  timeout 75 python benchmarks/modes.py --config "$cfg" --device cuda --dtype bfloat16 \
    --new-tokens 512 --repeats 2 --bandwidth-gbs 4800 2>&1 | tee "$out/modes-$cfg-eager.txt" || true
  timeout 120 python benchmarks/modes.py --config "$cfg" --device cuda --dtype bfloat16 \
    --new-tokens 512 --repeats 2 --compile --bandwidth-gbs 4800 2>&1 | tee "$out/modes-$cfg-compiled.txt" || true
done
# batched serving on the GPU: the tiny default's server at 1/4/8 clients (fast path on CUDA)
timeout 90 python benchmarks/load.py --clients 1,4,8 --seconds 15 \
  --server-args "--device cuda --max-batch 8" 2>&1 | tee "$out/load.txt" || true
# optional parts, each bounded by its own script (run only when present)
[ -f benchmarks/gpu_glm4_voice.sh ] && { bash benchmarks/gpu_glm4_voice.sh || true; }
[ -f benchmarks/gpu_vllm.sh ] && { bash benchmarks/gpu_vllm.sh || true; }
