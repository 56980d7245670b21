"""trainer.tools.plan's memory estimate against the measured peak of CPU training steps (one process, fp32).

    PYTHONPATH=. python benchmarks/plan_vs_measured.py [--out benchmarks/plan_vs_measured_cpu.json]

Cases: full training without and with activation checkpointing, and LoRA of rank 8 on every target
(frozen weights, adapters from PEFT's initial values, AdamW over the adapters only) likewise.

Each case runs in a fresh process: peak resident memory (ru_maxrss) after two AdamW steps of the
model, minus the resident memory after the imports and before building the model, against the
planner's terms for one GPU in fp32 (no FSDP: nothing is gathered, so the planner's gathered term
is left out of the compared total). The children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then
serves every block above 64 KiB by mmap and returns it to the system when freed, so the peak RSS
follows the live tensors; with glibc's default the heap keeps freed blocks, and a LoRA step, whose
many small temporaries fragment it, read about 0.13 GiB above its live peak (checked with torch's
profiler memory timeline at 102b013: the LoRA forward+backward's live peak was 0.44 GiB, full
training's 0.45). What remains above the estimate is the initialisation's per-tensor temporaries,
allocator slack and what the planner leaves out (AdamW's foreach temporaries, the router's fp32
tensors), so agreement within tens of percent is what to expect.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CFG = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
           intermediate_size=1024, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
           num_shared_experts=1, first_k_dense_replace=1, torch_dtype="float32", expert_backend="torch")
SEQ, BATCH = 512, 2
CASES = ("no_ac", "ac", "lora_no_ac", "lora_ac")


def _ac(case: str) -> bool:
    return case in ("ac", "lora_ac")


LORA_RANK = 8


def _measure(ac: bool, lora: bool = False) -> dict:
    import resource

    import torch
    from torch.utils.checkpoint import checkpoint

    from moe.config import BailingMoeConfig
    from moe.heads import CHUNK_TOKENS, CrossEntropy
    from moe.lora import LoraSpec, apply_lora, initial_adapter_value, is_adapter_name, set_trainable
    from moe.model import BailingMoeForCausalLM
    from moe.router import checkpoint_context_fn

    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = BailingMoeForCausalLM(BailingMoeConfig(**CFG))
    if lora:
        spec = LoraSpec(rank=LORA_RANK)
        apply_lora(model, spec)
        set_trainable(model, spec)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if is_adapter_name(n):
                    p.copy_(initial_adapter_value(n, tuple(p.shape), seed=0))
    if ac:
        for layer in model.model.layers:
            inner = layer.forward
            layer.forward = (lambda *a, _i=inner, _l=layer, **k: checkpoint(
                _i, *a, use_reentrant=False, context_fn=lambda: checkpoint_context_fn(_l), **k))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out = model(ids, labels=ids, head=CrossEntropy(chunk_size=CHUNK_TOKENS))
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as under FSDP
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured_gib": (peak - base) / 2 ** 30}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "plan_vs_measured_cpu.json"))
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:  # child process
        print(json.dumps(_measure(_ac(a.case), lora=a.case.startswith("lora"))))
        return
    from moe.config import BailingMoeConfig
    from moe.lora import LoraSpec
    from trainer.tools.plan import plan

    cfg = BailingMoeConfig(**CFG)
    rows = []
    for case in CASES:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        got = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True,
                             env=env)
        measured = json.loads(got.stdout.strip().splitlines()[-1])["measured_gib"]
        lay = plan(cfg, gpus=1, gpu_memory_gib=1e9, seq_len=SEQ, micro_batch=BATCH,
                   activation_checkpointing=_ac(case), compute_bytes=4,
                   lora=LoraSpec(rank=LORA_RANK) if case.startswith("lora") else None)
        est = lay.total_gib - lay.gathered_gib
        rows.append(dict(case=case, measured_gib=round(measured, 4), estimated_gib=round(est, 4),
                         ratio=round(est / measured, 3), measured_minus_estimated_gib=round(measured - est, 4), params_gib=lay.params_gib, grads_gib=lay.grads_gib,
                         optimizer_gib=lay.optimizer_gib, activations_gib=lay.activations_gib))
        print(rows[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    with open(a.out, "w") as f:
        json.dump({"commit": commit, "torch": torch.__version__, "device": "cpu (2 cores)", "config": CFG,
                   "seq_len": SEQ, "micro_batch": BATCH, "lora_rank": LORA_RANK,
                   "malloc": "MALLOC_MMAP_THRESHOLD_=65536", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
