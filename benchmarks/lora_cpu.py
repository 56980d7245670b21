"""LoRA against full fine-tuning through the real trainer: tokens/s and peak memory, in one run.

    python benchmarks/lora_cpu.py [--json benchmarks/lora_cpu.json] [--repeat 2] [--steps 30]

The CPU demo's shape (the tiny preset: hidden 128, 4 layers, 8 experts top-2, vocab 2048; rows of 256
tokens, 4 per micro-batch, 8 per step) from a random base saved as an HF checkpoint, on synthetic
rows (one causal document each). Each case is `python trainer/sft.py` in a fresh process:

  full   every parameter trains (fp32 weights, gradients, AdamW state)
  lora   --lora.rank 8 on every target (alpha 16): the base frozen, adapters and their AdamW state only

The cases alternate (full, lora, full, lora, ...) so that a change in the machine's load hits both.
Per run: the median tokens_per_s of the steps after the first five, and the process's peak RSS
(metrics.jsonl's memory_gib, ru_maxrss), with MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks go
back to the system and the peak follows live memory (benchmarks/plan_vs_measured.py says why). The
peak includes the interpreter, torch and the data loader (about 0.4 GiB here); `model_state_gib` is
the part the two cases differ in by construction (weights, gradients, AdamW moments).

On a GPU (when CUDA is available) the same runs use Ling-Lite's widths with --layers layers
(default 2) at S=4096, one row per micro-batch, bf16; not measured yet.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {"full": [], "lora": ["--lora.rank", "8"]}


def _base(path: str, gpu: bool, layers: int) -> dict:
    import torch

    from checkpoints_convert import save_hf
    from moe.config import BailingMoeConfig
    from moe.model import BailingMoeForCausalLM

    cfg = (BailingMoeConfig.preset("ling-lite", num_hidden_layers=layers, torch_dtype="bfloat16") if gpu
           else BailingMoeConfig.preset("tiny"))
    torch.manual_seed(0)
    model = BailingMoeForCausalLM(cfg)
    save_hf(model, path, dtype="bf16" if gpu else None)
    return cfg.to_dict()


def _run(base: str, case: str, steps: int, gpu: bool, work: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"lora-bench-{case}-", dir=work)
    shape = (["--data.seq_len", "4096", "--data.micro_batch_size", "1", "--train.global_batch_size", "4"] if gpu
             else ["--data.seq_len", "256", "--data.micro_batch_size", "4", "--train.global_batch_size", "8"])
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "sft.py"), "--model.init_from", base,
           "--data.synthetic", "true", "--data.synthetic_docs_per_row", "1", *shape, "--train.steps", str(steps),
           "--checkpoint.every", "0", "--checkpoint.save_final", "false", "--checkpoint.export_hf", "false",
           "--train.progress", "false", "--optim.lr", "1e-4", "--output-dir", out, *CASES[case]]
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps_ = [json.loads(line) for line in f]
    lora_line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("LoRA rank")), None)
    return {"case": case, "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps_[5:]),
            "peak_memory_gib": max(s["memory_gib"] for s in steps_), "loss_first": steps_[0]["loss"],
            "loss_last": steps_[-1]["loss"], "lora": lora_line}


def _model_state(cfg_dict: dict) -> dict:
    """Bytes of weights, gradients and AdamW moments per case (fp32, one process), from the planner."""
    from moe.config import BailingMoeConfig
    from moe.lora import LoraSpec
    from trainer.tools.plan import GIB, lora_counts, param_counts

    cfg = BailingMoeConfig.from_dict(cfg_dict)
    total, adapters = param_counts(cfg)["total"], lora_counts(cfg, LoraSpec(rank=8))["total"]
    return {"full": 16 * total / GIB, "lora": (4 * total + 16 * adapters) / GIB, "params": total,
            "adapter_params": adapters}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/lora_cpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "lora_cpu.json"))
    p.add_argument("--repeat", type=int, default=2, help="runs of each case (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="GPU only: Ling-Lite layers (default %(default)s)")
    a = p.parse_args(argv)
    import torch

    from trainer.tools.kernel_bench import run_metadata

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as work:
        base = os.path.join(work, "base")
        cfg = _base(base, gpu, a.layers)
        load_start = os.getloadavg()
        runs = [_run(base, case, a.steps, gpu, work) for _ in range(a.repeat) for case in CASES]
        load_end = os.getloadavg()
    for r in runs:
        print(f"{r['case']:5s} {r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_memory_gib']:.3f} GiB")
    summary = {case: {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs if r["case"] == case),
                      "peak_memory_gib_median": statistics.median(r["peak_memory_gib"] for r in runs
                                                                  if r["case"] == case)}
               for case in CASES}
    summary["lora_over_full_tokens_per_s"] = (summary["lora"]["tokens_per_s_median"]
                                              / summary["full"]["tokens_per_s_median"])
    summary["model_state_gib"] = _model_state(cfg)
    result = {**run_metadata(torch.device("cuda" if gpu else "cpu")), "config": cfg, "steps": a.steps,
              "load_avg_start": load_start, "load_avg_end": load_end, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=2))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
