#!/usr/bin/env bash
# GPU part of the vLLM checks (called from benchmarks/gpu.sh): vLLM plain, vLLM + MCTP drafter
# (verified) and our Generator Vanilla/verified/Turbo on Qwen2.5 0.5B and 7B shapes (random
# weights, heads trained briefly), bf16, one GPU. Needs the official CUDA `vllm` wheel of the
# pinned release in .venv-vllm-gpu (built here when absent; the device machine reaches no
# registry, so build or carry that venv before). Tables go to stdout and $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
venv=.venv-vllm-gpu
pinned=$(sed -n 's/^VLLM_VERSION = "\(.*\)"$/\1/p' mctp/vllm/__init__.py)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "vllm==$pinned"
  "$venv/bin/pip" install -q --no-deps -e .
  "$venv/bin/pip" install -q peft soundfile soxr kaldi-native-fbank
fi
"$venv/bin/python" -c 'import mctp.vllm; mctp.vllm.check_vllm_version()'
for shape in 0.5b 7b; do
  timeout 240 "$venv/bin/python" benchmarks/vllm_bench.py --shape "$shape" --device cuda \
    --dtype bfloat16 --new-tokens 256 --train-steps 30 --repeats 2 \
    2>&1 | tee "$out/vllm-$shape.txt" || true
done
# start-up smoke check of `mctp serve --engine vllm` (the console command, verified with the
# drafter): ready time, one spoken chat answer and one /v1/audio/speech answer
timeout 420 "$venv/bin/python" benchmarks/vllm_serve_smoke.py --device cuda \
  2>&1 | tee "$out/vllm-serve-smoke.txt" || true
