#!/usr/bin/env bash
# GLM-4-Voice-9B with MCTP heads on one GPU (called from benchmarks/gpu.sh; < 4 minutes on one
# H100/H200): the first-audio table at the full GLM-4-Voice-9B shape (hidden 4096, 40 layers,
# 32 heads / 2 kv groups, MLP 13696, vocabulary 168,960), random weights, bf16, 26 MCTP heads
# (~19 GB backbone + ~12 GB heads). Results go to stdout and to $OUT (or out/gpu) as
# glm4-voice-9b.txt. Paste the table into docs/other-models.md with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt torch==2.13.0 -e ".[dev]"
fi
. .venv/bin/activate
timeout 220 python benchmarks/glm4_voice.py --device cuda --dtype bfloat16 --new-tokens 256 \
  --repeats 3 2>&1 | tee "$out/glm4-voice-9b.txt" || true
