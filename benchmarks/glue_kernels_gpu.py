"""Time the kernels around the expert GEMMs, one launch against the torch ops they replaced (issue 26).

    python benchmarks/glue_kernels_gpu.py [--tokens 4096 8192 16384] [--json out.json]    # GPU
    TRITON_INTERPRET=1 python benchmarks/glue_kernels_gpu.py --tokens 64 --reps 2         # CPU: the script runs

Rows, at Ling-Lite's routing (E=64, K=6, H=2048, bf16, uniform random top-k):
- routing: kernels.routing.build_routing (about 20 torch ops, the reference) against
  kernels._glue.build_routing_fused (one Triton launch), both given the router's counts; the two
  tables are compared first and must be equal.
- combine: the K-way sum as it was (fp32 sum over a [T, K, H] view, then a cast to bf16) against
  kernels._glue.combine_k; compared first (equal to fp32 rounding).
Each time is the median of --reps runs (CUDA events on GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import times_ms  # noqa: E402
from kernels._glue import build_routing_fused, combine_k  # noqa: E402
from kernels.routing import build_routing, expert_counts  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    return statistics.median(times_ms(fn, reps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--block-m", type=int, default=128, help="the tile rows the tables are built for")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    interpret = dev == "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rows = []
    for T in a.tokens:
        g = torch.Generator(device=dev).manual_seed(T)
        ids = torch.rand(T, a.experts, generator=g, device=dev).topk(a.topk, -1).indices
        counts = expert_counts(ids, a.experts)
        ref = build_routing(ids, a.experts, a.block_m, counts)
        got = build_routing_fused(ids, a.experts, a.block_m, counts, interpret=interpret)
        assert all(torch.equal(x, y) for x, y in zip(got[:-1], ref[:-1])), "routing tables differ"
        t_ref = _median_ms(lambda: build_routing(ids, a.experts, a.block_m, counts), a.reps)
        t_new = _median_ms(lambda: build_routing_fused(ids, a.experts, a.block_m, counts, interpret), a.reps)
        o = torch.randn(T * a.topk, a.hidden, generator=g, device=dev).to(dtype)

        def old_combine():
            return o.view(T, a.topk, a.hidden).sum(dim=1, dtype=torch.float32).to(dtype)

        err = (combine_k(o, T, dtype, interpret=interpret)[0].float() - old_combine().float()).abs().max().item()
        assert err <= 1e-2 * old_combine().float().abs().max().item(), f"combine differs by {err}"
        c_ref = _median_ms(old_combine, a.reps)
        c_new = _median_ms(lambda: combine_k(o, T, dtype, interpret=interpret), a.reps)
        row = dict(T=T, E=a.experts, K=a.topk, H=a.hidden, routing_torch_ms=t_ref, routing_one_launch_ms=t_new,
                   combine_torch_ms=c_ref, combine_one_launch_ms=c_new)
        rows.append(row)
        print(f"T={T}: routing {t_ref:.3f} -> {t_new:.3f} ms, combine {c_ref:.3f} -> {c_new:.3f} ms", flush=True)
    if a.json:
        meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
                    torch=torch.__version__, dtype=str(dtype), rows=rows)
        with open(a.json, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
