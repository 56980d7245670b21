#!/usr/bin/env bash
# The GPU work of issue 4 in three stages, each sized to fit one 10-minute device call:
#
#   bash benchmarks/gpu_session.sh check    # versions, GPU tests, sm_90 spill check      (~3 min)
#   bash benchmarks/gpu_session.sh kernels  # python -m kernels.bench at Ling-Lite shapes  (~5 min)
#   bash benchmarks/gpu_session.sh train    # benchmarks/train_step.py, 3 backends         (~6 min)
#
# Results go to $OUT (the device tool's output folder) or benchmarks/gpu_out; copy them into
# benchmarks/ with the device in the name and add a row to benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage="${1:-}"
tag="$(python3 -c 'import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"; print("h200" if "H200" in n else "h100" if "H100" in n else "gpu")')"

case "$stage" in
  check)
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      python3 -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__, "cuda", torch.version.cuda)'
      git rev-parse HEAD 2>/dev/null || true; date -u +%FT%TZ; } 2>&1 | tee "$out/env.txt"
    python3 -m pytest -q -s tests/test_kernels_gpu.py 2>&1 | tee "$out/test_kernels_gpu.log"
    python3 benchmarks/aot_compile_check.py --dtypes bf16 --check-no-spills 2>&1 | tail -3
    ;;
  kernels)
    python3 -m kernels.bench --json "$out/moe_bench_$tag.json" --plot "$out/moe_bench_$tag.png" 2>&1 \
      | tee "$out/moe_bench_$tag.log"
    ;;
  train)
    python3 benchmarks/train_step.py --json "$out/train_step_$tag.json" 2>&1 | tee "$out/train_step_$tag.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh check|kernels|train" >&2
    exit 2
    ;;
esac
