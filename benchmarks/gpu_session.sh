#!/usr/bin/env bash
# The GPU work (kernels, training steps, the suite on CUDA) in stages, each with its own time limit, so that several fit in one
# 10-minute device call and a stage that hangs or fails costs only its own limit:
#
#   bash benchmarks/gpu_session.sh check    # versions, the two ceilings, tests/test_kernels_gpu.py   (~2 min)
#   bash benchmarks/gpu_session.sh kernels  # python -m kernels.bench, all peers, Ling-Lite + Qwen3    (~4 min)
#   bash benchmarks/gpu_session.sh quick    # the bench at Ling-Lite T=8192 only                      (~2 min)
#   bash benchmarks/gpu_session.sh qwen3    # the bench at Qwen3-30B-A3B's expert shape only, T=8192 and 32768 (~3 min)
#   bash benchmarks/gpu_session.sh lingmini2  # the bench at Ling-mini-2.0's expert shape (E=256 K=8 H=2048 I=512),
#                                           # T=8192 and 32768, and tests/test_model_v2.py's GPU test (~4 min)
#   bash benchmarks/gpu_session.sh profile  # per-kernel times, tile-config variants, peer breakdown  (~1 min)
#   bash benchmarks/gpu_session.sh tune     # profile + the composition of each kernel group's fastest
#                                           # variant; the winner goes to $OUT/best_config.txt, which a
#                                           # following 'kernels' stage in the same call uses  (~2 min)
#   bash benchmarks/gpu_session.sh suite    # the whole pytest suite on CUDA                          (~3 min)
#   bash benchmarks/gpu_session.sh train    # benchmarks/train_step.py, 3 backends, S=4096            (~4 min)
#   bash benchmarks/gpu_session.sh trainprof  # the train stage's setup, triton only, micro-batches of 1 and 2 rows,
#                                           # one profiled step after the timed ones: GPU busy share, top kernels,
#                                           # host waits, and a Chrome trace (3 files per micro-batch size) (~4 min)
#   bash benchmarks/gpu_session.sh flex     # packed 16k rows, 2 documents: flex vs SDPA dense mask  (~3 min)
#   bash benchmarks/gpu_session.sh aftersave  # 2 Ling-Lite layers, step time before/after a mid-run save (~3 min)
#   bash benchmarks/gpu_session.sh issue26  # compiled blocks (inductor vs eager on CUDA: the GPU tests), the routing
#                                           # and combine kernels against the torch ops they replaced, and training
#                                           # steps, eager and compiled (~4-5 min)
#   bash benchmarks/gpu_session.sh issue26mem  # expert recompute at micro-batch 2 (~1.5 min)
#   bash benchmarks/gpu_session.sh onerank  # issue 26 item 2: one GPU without FSDP (parallel.one_rank plain) against
#                                           # FSDP2 at world size 1, 3 Ling-Lite layers, micro-batches of 1/2/4 rows
#                                           # (fsdp at 1 and 4); the micro-batch-1 pair profiled (~3 min)
#   bash benchmarks/gpu_session.sh asyncsave  # issue 26 item 3: 1 Ling-Lite layer (13 GB checkpoint), saves after
#                                           # steps 4 and 8, ordinary against --checkpoint.async true (~2 min)
#   bash benchmarks/gpu_session.sh window   # issue 27's one 9-minute run: gpucheck trainprof kernels3 suite, in that
#                                           # order, under one budget (GPU_BUDGET_S, default 520 s; see below)
#   bash benchmarks/gpu_session.sh gpucheck # versions, the two ceilings, every test marked gpu (kernels, trainer, LoRA,
#                                           # Ling 2.0) (~2.5 min)
#   bash benchmarks/gpu_session.sh kernels3 # the bench at T=8192 for Ling-Lite and Ling-mini-2.0, T=32768 for Qwen3-30B-A3B,
#                                           # then the LoRA expert bench at T=8192 (~4 min)
#   bash benchmarks/gpu_session.sh lora     # issue 24: tests/test_lora_gpu.py (LoRA and offload on CUDA, the Triton
#                                           # LoRA kernels against the torch backend), benchmarks/lora_experts.py
#                                           # (one expert layer with LoRA: triton, torch, loop, and full fine-tuning's
#                                           # kernels) and benchmarks/lora_cpu.py at 2 Ling-Lite layers (~6 min)
#
# With GPU_BUDGET_S set, the stages named share that many seconds: each runs under `timeout` of what is left
# (its own limits still apply inside), and one with under 30 s left is skipped, said so in the log. So one
# device call of at most 9 minutes is: GPU_BUDGET_S=520 bash benchmarks/gpu_session.sh STAGE...
#
# Liger-Kernel, when wanted, is installed first from wheels carried in .whl/ (device README).
# Results go to $OUT (the device tool's output folder) or benchmarks/gpu_out; copy them into
# benchmarks/ with the device in the name. LINGMOE_GIT_COMMIT names the commit when .git is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
variants="${VARIANTS:-}"
# The dense matmul rate a 'check' stage measured earlier in this call, as train_step.py's --ceiling-tflops
# (the trainer then logs mfu_vs_measured_peak); nothing when there is none.
ceiling() {
  [ -s "$out/ceilings.json" ] &&
    python3 -c 'import json, sys; print("--ceiling-tflops", json.load(open(sys.argv[1]))["dense_bf16_tflops"])' \
      "$out/ceilings.json"
}

# The device, the versions, the commit and the date, then the two ceilings (check and gpucheck start with it).
machine_and_ceilings() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import liger_kernel, importlib.metadata as m; print("liger-kernel", m.version("liger-kernel"))' 2>&1 | tail -1
  echo "commit ${LINGMOE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"; date -u +%FT%TZ
  timeout 60 python3 benchmarks/ceilings.py --json "$out/ceilings.json"
}

# Issue 26 (compiled blocks, fewer launches, expert recompute). Predictions written before any GPU run:
# benchmarks/NOTES.md, "Issue 26". issue26: limits 370 s in all, ~4-5 min expected; issue26mem: 100 s.
issue26_stage() {
  local common=(--backends triton --layers 6 --steps 4 --warmup 2 --save-at 0)
  { timeout 120 python3 -m pytest -q -rA -p no:cacheprovider tests/test_trainer_gpu.py \
      -k "compiled_blocks_match_eager and triton" 2>&1 | tail -15
    timeout 30 python3 benchmarks/glue_kernels_gpu.py --json "$out/glue_kernels.json"
    timeout 80 python3 benchmarks/train_step.py $(ceiling) "${common[@]}" --json "$out/train_i26_eager.json"
    timeout 140 python3 benchmarks/train_step.py $(ceiling) "${common[@]}" --json "$out/train_i26_compiled.json" \
      -- --model.compile true
  } 2>&1 | tee "$out/issue26.log"
}

# Expert recompute at micro-batch 2 (compare with a micro-batch-2 row of the same call without it).
issue26mem_stage() {
  timeout 100 python3 benchmarks/train_step.py $(ceiling) --backends triton --layers 6 --steps 4 --warmup 2 --save-at 0 \
    --micro-batch 2 --json "$out/train_i26_recompute_mb2.json" -- --model.expert_recompute true 2>&1 \
    | tee "$out/issue26mem.log"
}

stages=()
for stage in "$@"; do
  if [ "$stage" = window ]; then stages+=(gpucheck trainprof kernels3 suite); else stages+=("$stage"); fi
done
[ "${1:-}" = window ] && [ $# -eq 1 ] && : "${GPU_BUDGET_S:=520}"
if [ -n "${GPU_BUDGET_S:-}" ]; then
  started=$(date +%s)
  for stage in "${stages[@]}"; do
    left=$(( GPU_BUDGET_S - ($(date +%s) - started) ))
    if [ "$left" -lt 30 ]; then
      echo "=== stage $stage skipped: $left s of GPU_BUDGET_S=$GPU_BUDGET_S left" | tee -a "$out/budget.log"
      continue
    fi
    echo "=== stage $stage under the budget: $left s left" | tee -a "$out/budget.log"
    SUITE_LIMIT=$(( left - 10 )) env -u GPU_BUDGET_S timeout -k 5 "$left" bash "$0" "$stage"
    echo "=== stage $stage ended with status $? after $(( $(date +%s) - started )) s" | tee -a "$out/budget.log"
  done
  exit 0
fi
for stage in "${stages[@]}"; do
  echo "=== stage $stage: $(date -u +%FT%TZ)"
  case "$stage" in
    check)
      { machine_and_ceilings
        timeout 240 python3 -m pytest -q -rA -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -40
      } 2>&1 | tee "$out/check.log"
      ;;
    gpucheck)
      { machine_and_ceilings
        timeout 200 python3 -m pytest -q -rA -p no:cacheprovider --timeout 100 -m gpu tests 2>&1 | tail -60
      } 2>&1 | tee "$out/gpucheck.log"
      ;;
    kernels3)
      if [ -s "$out/best_config.txt" ]; then export LINGMOE_TRITON_CONFIG="$(tr -d '\n' < "$out/best_config.txt")"; fi
      { timeout 90 python3 -m kernels.bench --tokens 8192 --reps 10 --json "$out/moe_bench_lingl_8k.json" --no-plot
        timeout 90 python3 -m kernels.bench --experts 128 --topk 8 --hidden 2048 --inter 768 --tokens 32768 --reps 10 \
          --impls triton liger grouped_mm dense --json "$out/moe_bench_qwen3_32k.json" --no-plot
        timeout 90 python3 -m kernels.bench --experts 256 --topk 8 --hidden 2048 --inter 512 --tokens 8192 --reps 10 \
          --json "$out/moe_bench_lingmini2_8k.json" --no-plot
        timeout 60 python3 benchmarks/lora_experts.py --tokens 8192 --reps 10 --json "$out/lora_experts.json"
      } 2>&1 | tee "$out/kernels3.log"
      ;;
    kernels)
      if [ -s "$out/best_config.txt" ]; then export LINGMOE_TRITON_CONFIG="$(tr -d '\n' < "$out/best_config.txt")"; fi
      echo "LINGMOE_TRITON_CONFIG=${LINGMOE_TRITON_CONFIG:-}"
      { timeout 330 python3 -m kernels.bench --tokens 4096 8192 16384 32768 --json "$out/moe_bench_lingl.json" \
          --plot "$out/moe_bench_lingl.png"
        timeout 200 python3 -m kernels.bench --experts 128 --topk 8 --hidden 2048 --inter 768 --tokens 8192 32768 \
          --json "$out/moe_bench_qwen3.json" --plot "$out/moe_bench_qwen3.png"
      } 2>&1 | tee "$out/kernels.log"
      ;;
    qwen3)
      timeout 300 python3 -m kernels.bench --experts 128 --topk 8 --hidden 2048 --inter 768 --tokens 8192 32768 \
        --json "$out/moe_bench_qwen3.json" --plot "$out/moe_bench_qwen3.png" 2>&1 | tee "$out/qwen3.log"
      ;;
    lingmini2)
      { timeout 300 python3 -m kernels.bench --experts 256 --topk 8 --hidden 2048 --inter 512 --tokens 8192 32768 \
          --json "$out/moe_bench_lingmini2.json" --plot "$out/moe_bench_lingmini2.png"
        timeout 120 python3 -m pytest -q -rA -p no:cacheprovider tests/test_model_v2.py -k on_gpu 2>&1 | tail -10
      } 2>&1 | tee "$out/lingmini2.log"
      ;;
    quick)
      timeout 300 python3 -m kernels.bench --tokens 8192 --json "$out/moe_bench_quick.json" --no-plot 2>&1 \
        | tee "$out/quick.log"
      ;;
    profile)
      timeout 240 python3 benchmarks/kernel_profile.py --peers liger grouped_mm --json "$out/profile.json" \
        --variants "" ${variants} 2>&1 | tee "$out/profile.log"
      ;;
    tune)
      timeout 240 python3 benchmarks/kernel_profile.py --peers triton grouped_mm --json "$out/profile.json" \
        --variants "" ${variants} --compose --best-out "$out/best_config.txt" 2>&1 | tee "$out/profile.log"
      ;;
    suite)
      timeout "${SUITE_LIMIT:-300}" python3 -m pytest -v --tb=short -p no:cacheprovider --timeout 120 tests 2>&1 \
        | tee "$out/suite.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | grep -v PASSED
      ;;
    train)
      timeout 420 python3 benchmarks/train_step.py $(ceiling) --steps "${TRAIN_STEPS:-10}" --warmup "${TRAIN_WARMUP:-3}" \
        --json "$out/train_step.json" 2>&1 | tee "$out/train.log"
      ;;
    trainprof)
      for mb in ${TRAIN_MBS:-1 2}; do
        timeout 280 python3 benchmarks/train_step.py $(ceiling) --backends triton --micro-batch "$mb" --steps 3 --warmup 2 \
          --save-at 0 --profile --json "$out/train_prof_mb$mb.json" 2>&1 | tee "$out/trainprof_mb$mb.log"
      done
      ;;
    flex)
      for attn in flex sdpa; do
        timeout 200 python3 benchmarks/train_step.py $(ceiling) --backends triton --seq-len 16384 --docs-per-row 2 \
          --attn "$attn" --global-batch 2 --steps 3 --warmup 2 --json "$out/train_16k_$attn.json" 2>&1 \
          | tee "$out/flex_$attn.log"
      done
      ;;
    aftersave)
      # The default train stage cannot save mid-run (6 layers' fp32 state is ~41 GB): 2 layers can.
      timeout 300 python3 benchmarks/train_step.py $(ceiling) --backends triton --layers 2 --steps 8 --warmup 2 --save-at 6 \
        --json "$out/train_step_aftersave.json" 2>&1 | tee "$out/aftersave.log"
      ;;
    issue26)
      issue26_stage
      ;;
    issue26mem)
      issue26mem_stage
      ;;
    onerank)
      # 3 layers, not 'auto': the two paths differ in memory (plain holds a bf16 copy, 2 bytes a parameter),
      # and the comparison needs the same model. 5 trainer processes, ~35 s each once triton's cache is warm.
      for run in plain:1 fsdp:1 plain:2 plain:4 fsdp:4; do
        mode=${run%:*} mb=${run#*:}
        prof=""; [ "$mb" = 1 ] && prof="--profile"
        timeout 100 python3 benchmarks/train_step.py $(ceiling) --backends triton --layers "${ONERANK_LAYERS:-3}" \
          --micro-batch "$mb" --one-rank "$mode" --steps 4 --warmup 2 --save-at 0 $prof \
          --json "$out/onerank_${mode}_mb$mb.json" 2>&1 | tee "$out/onerank_${mode}_mb$mb.log"
      done
      ;;
    lora)
      { timeout 150 python3 -m pytest -q -rA -p no:cacheprovider tests/test_lora_gpu.py 2>&1 | tail -15
        timeout 150 python3 benchmarks/lora_experts.py --tokens 4096 8192 --json "$out/lora_experts.json"
        timeout 200 python3 benchmarks/lora_cpu.py --repeat 1 --steps 12 --json "$out/lora_gpu.json"
      } 2>&1 | tee "$out/lora.log"
      ;;
    asyncsave)
      timeout 200 python3 benchmarks/save_stall.py --preset ling-lite --layers 1 --seq-len 4096 --micro-batch 1 \
        --global-batch 8 --save-every 4 --steps 11 --json "$out/save_stall.json" 2>&1 | tee "$out/asyncsave.log"
      ;;
    *)
      echo "unknown stage $stage: check kernels quick qwen3 profile tune suite train trainprof flex aftersave" \
        "issue26 issue26mem onerank asyncsave lingmini2 lora gpucheck kernels3 window" >&2
      exit 2
      ;;
  esac
done
