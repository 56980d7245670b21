"""Bytes the routed-expert MLP keeps for its backward, per token, as experts get finer (issue 26, item 5).

    python benchmarks/expert_memory_cpu.py [--json benchmarks/expert_memory_cpu.json]

What is counted: every tensor autograd saves during one expert-MLP forward, seen by
torch.autograd.graph.saved_tensors_hooks, each storage once, parameters left out (they are kept
anyway). The layer's input x is listed on its own: it is saved, but it is also the output of the
layer before (post-attention norm), which the router and the shared expert save too.

A last row takes Ling-Lite's expert shape (H=2048, E=64, K=6, I=1408), the triton rows on the meta
device (the custom ops' fake rules give the saved tensors' sizes without running a kernel).

The sweep keeps the active expert FLOPs fixed (K x I = 256, H = 64, T = 64 tokens) and makes the
experts finer: (E, K, I) = (8, 1, 256) ... (128, 16, 16), SonicMoE's "granularity" axis. The
activation dtype is bf16, the training dtype (the triton backend runs under the interpreter here,
whose bf16 numbers are wrong but whose tensors have the right shapes and dtypes: only sizes are read).

Rows: the triton backend, with and without expert recompute; the torch backend (grouped_mm), with
and without it (with it, torch.utils.checkpoint keeps only the inputs); and a dense SwiGLU MLP of
width K x I (the same active FLOPs), the reference SonicMoE compares against.
SonicMoE (Guo et al., arXiv 2512.14080) claims an activation footprint per layer that stays constant
as granularity grows, equal to a dense model's with the same activated parameters, about 45% below
the previous kernels at their fine-grained 7B MoE on H100.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe.experts import expert_mlp  # noqa: E402

SWEEP = [(8, 1, 256), (16, 2, 128), (32, 4, 64), (64, 8, 32), (128, 16, 16)]


def _key(t: torch.Tensor) -> int:
    # The storage's identity (data pointers are all 0 on the meta device).
    return StorageWeakRef(t.untyped_storage()).cdata


def saved_bytes(fn, x, params) -> dict:
    """{"x": bytes of x's storage if saved, "other": every other saved storage} for one forward of fn()."""
    seen = {}
    param_keys = {_key(p) for p in params}

    def pack(t):
        if _key(t) not in param_keys:
            seen[_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    x_key = _key(x)
    out = dict(x=seen.pop(x_key, 0), other=sum(seen.values()))
    y.float().sum().backward()  # the graph must be usable (recompute paths run here)
    return out


def _inputs(T, H, E, K, I, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w_gu = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    w_d = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype).requires_grad_()
    probs = torch.randn(T, E, generator=g).softmax(-1)
    tw, ids = probs.topk(K, -1)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    out = x, w_gu, w_d, ids, tw.requires_grad_(), counts
    if device == "meta":  # shapes only: the ops' fake rules run, no kernel
        out = [torch.empty_like(t, device="meta").requires_grad_(t.requires_grad) for t in out]
    return out


def measure(T, H, E, K, I, dtype, triton_on_meta=False) -> dict:
    rows = {}
    for backend in ("triton", "torch"):
        for recompute in (False, True):
            device = "meta" if backend == "triton" and triton_on_meta else "cpu"
            x, w_gu, w_d, ids, tw, counts = _inputs(T, H, E, K, I, dtype, device)
            fn = expert_mlp(backend, recompute)
            b = saved_bytes(lambda: fn(x, w_gu, w_d, ids, tw, counts), x, (w_gu, w_d))
            rows[backend + (" recompute" if recompute else "")] = b
    # A dense SwiGLU MLP of width K*I: the same active FLOPs per token.
    x = torch.randn(T, H).to(dtype).requires_grad_()
    gate, up, down = (torch.nn.Linear(a, b, bias=False).to(dtype) for a, b in ((H, K * I), (H, K * I), (K * I, H)))
    params = [m.weight for m in (gate, up, down)]
    rows["dense SwiGLU, width K*I"] = saved_bytes(lambda: down(F.silu(gate(x)) * up(x)), x, params)
    for r in rows.values():
        r["per_token_excluding_x"] = r["other"] / T
        r["per_token_including_x"] = (r["other"] + r["x"]) / T
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="benchmarks/expert_memory_cpu.json")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    a = p.parse_args(argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("LINGMOE_GIT_COMMIT", "unknown")
    out = dict(commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, T=a.tokens, H=a.hidden, dtype="bf16", sweep=[])
    print(f"bytes kept for backward per token, excluding x ({2 * a.hidden} B/token in bf16), T={a.tokens} H={a.hidden}")
    for E, K, I in SWEEP:
        rows = measure(a.tokens, a.hidden, E, K, I, torch.bfloat16)
        out["sweep"].append(dict(E=E, K=K, I=I, granularity=a.hidden / I, rows=rows))
        print(f"E={E:4d} K={K:3d} I={I:4d} " + "  ".join(f"{k}: {v['per_token_excluding_x']:.0f}" for k, v in rows.items()),
              flush=True)
    # Ling-Lite's expert shape (H=2048, E=64, K=6, I=1408). The triton rows run on the meta device:
    # at this width the interpreter would take minutes, and only the saved tensors' sizes are read.
    rows = measure(a.tokens, 2048, 64, 6, 1408, torch.bfloat16, triton_on_meta=True)
    out["ling_lite"] = dict(E=64, K=6, I=1408, H=2048, rows=rows, note="triton rows on the meta device (fake rules)")
    print("Ling-Lite shape: " + "  ".join(f"{k}: {v['per_token_excluding_x']:.0f}" for k, v in rows.items()), flush=True)
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
