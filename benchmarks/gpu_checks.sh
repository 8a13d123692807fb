#!/usr/bin/env bash
# The prepared GPU check: run on a lent GPU machine (fresh, no network) from the repo root.
# That machine has torch + transformers but no Ray, so both smokes take their in-process paths.
# Writes logs and JSON results under $OUT (or ./.cache/gpu-checks).
set -uo pipefail
out="${OUT:-.cache/gpu-checks}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/operator:$PWD/workloads:$PWD"
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
ray_flag=""; python3 -c "import ray" 2>/dev/null || ray_flag="--no-ray"
timeout 300 python3 benchmarks/gpu_train_smoke.py $ray_flag 2>&1 | tee "$out/train.log" | tail -n 25
echo "train rc=${PIPESTATUS[0]}"
serve_flag=""; python3 -c "import ray.serve" 2>/dev/null || serve_flag="--skip-serve"
timeout 240 python3 benchmarks/gpu_serve_smoke.py $serve_flag --json "$out/serve.json" 2>&1 | tee "$out/serve.log" | tail -n 25
echo "serve rc=${PIPESTATUS[0]}"
# Multi-GPU pod (issue 13 item 4): one training worker per GPU, each GPU does work (skips on 1 GPU).
timeout 300 python3 benchmarks/gpu_multi_smoke.py $ray_flag 2>&1 | tee "$out/multi.log" | tail -n 12
echo "multi rc=${PIPESTATUS[0]}"
