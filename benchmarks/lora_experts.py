"""LoRA on the routed experts, one MoE expert layer forward + backward: our Triton kernels against what a
user would run instead, at Ling-Lite's expert shape (issue 24).

    python benchmarks/lora_experts.py [--tokens 4096 8192] [--rank 8] [--json out.json]       # GPU
    TRITON_INTERPRET=1 python benchmarks/lora_experts.py --tiny --reps 2                        # CPU: the script runs

Rows (bf16 on GPU, fp32 under the interpreter; E=64 experts top-6, H=2048, I=1408; uniform random routing;
the frozen weights require no gradient, the adapters do; alpha = 2 rank):
  triton_lora    kernels.triton_moe_mlp(..., lora=ExpertLoRA): the adapters inside the grouped GEMMs
  torch_lora     kernels.reference.grouped_mm_moe_mlp(..., lora=...): torch._grouped_mm, the adapters as
                 extra grouped GEMMs on the same sorted rows (this trainer's torch backend)
  loop_lora      kernels.reference.loop_moe_mlp(..., lora=...): one masked pass per expert, each expert's
                 projections W x + s B (A x), as PEFT runs over the reference code's per-expert nn.Linear
                 (64 modules a layer), without PEFT's own module overhead
  triton_full    full fine-tuning's kernels for comparison: the same layer, weights requiring gradients,
                 no adapters (what LoRA saves: the frozen weights' gradient GEMMs)
Correct first: triton_lora's output and every adapter gradient are compared with torch_lora's (and
torch_lora's with loop_lora's) before any timing; a row whose values disagree beyond bf16 rounding is
reported as wrong and not timed. Times: the median of --reps forward+backward passes (CUDA events),
every implementation timed in the same process on the same inputs (random, not zeros); peak memory:
torch.cuda.max_memory_allocated over one pass, above the inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import times_ms  # noqa: E402
from kernels import triton_moe_mlp  # noqa: E402
from kernels.lora import ExpertLoRA  # noqa: E402
from kernels.reference import grouped_mm_moe_mlp, loop_moe_mlp  # noqa: E402

IMPLS = {"triton_lora": triton_moe_mlp, "torch_lora": grouped_mm_moe_mlp, "loop_lora": loop_moe_mlp,
         "triton_full": triton_moe_mlp}


def _inputs(T, E, K, H, I, r, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, H)
    w_gu, w_d = rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5)
    scores = torch.rand(T, E, generator=g)
    tw, ids = scores.topk(K, dim=-1)
    tw = (tw / tw.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
    # B nonzero (a trained adapter, not the zero start), so the adapters' paths carry real values
    adapters = [rnd(E, 2 * r, H, scale=H ** -0.5), rnd(E, 2 * I, r, scale=r ** -0.5), rnd(E, r, I, scale=I ** -0.5),
                rnd(E, H, r, scale=r ** -0.5)]
    dy = rnd(T, H)
    return x, w_gu, w_d, ids.to(device), tw, adapters, dy


def _pass(name, inputs, scale):
    """One forward + backward; returns (y, grads) with grads of x, topk_w and the adapters (or the weights)."""
    x, w_gu, w_d, ids, tw, adapters, dy = inputs
    full = name == "triton_full"
    xs, tws = x.detach().requires_grad_(), tw.detach().requires_grad_()
    if full:
        leaves = [w_gu.detach().requires_grad_(), w_d.detach().requires_grad_()]
        y = IMPLS[name](xs, leaves[0], leaves[1], ids, tws)
    else:
        leaves = [a.detach().requires_grad_() for a in adapters]
        y = IMPLS[name](xs, w_gu, w_d, ids, tws, lora=ExpertLoRA(*leaves, scale))
    grads = torch.autograd.grad(y, [xs, tws, *leaves], dy)
    return y, grads


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _time_ms(fn, reps):
    times = times_ms(fn, reps)
    return statistics.median(times), min(times), max(times)


def _commit():
    env = os.environ.get("LINGMOE_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="tokens per layer call")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (the Ling repository's LoRA recipes: 8)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408, help="expert width")
    p.add_argument("--impls", nargs="+", choices=sorted(IMPLS), default=list(IMPLS))
    p.add_argument("--no-loop-above", type=int, default=8192,
                   help="skip loop_lora above this many tokens (it is slow and only a baseline)")
    p.add_argument("--reps", type=int, default=20, help="timed passes per row; the median is reported")
    p.add_argument("--tiny", action="store_true", help="a shape the Triton interpreter runs in seconds (CPU check)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("no CUDA device: run with TRITON_INTERPRET=1 (and --tiny) to check the script on CPU")
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if a.tiny:
        a.tokens, a.experts, a.topk, a.hidden, a.inter = [24], 4, 2, 32, 16
    scale = 2.0  # alpha = 2 rank
    # bf16 rounding of outputs/gradients summed in a different order: a few parts in a thousand
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    rows = []
    for T in a.tokens:
        inputs = _inputs(T, a.experts, a.topk, a.hidden, a.inter, a.rank, dtype, dev, seed=T)
        loop_ok = T <= a.no_loop_above
        ref = {"torch_lora": _pass("torch_lora", inputs, scale)}
        if loop_ok:
            ref["loop_lora"] = _pass("loop_lora", inputs, scale)
        for name in a.impls:
            row = dict(impl=name, tokens=T, experts=a.experts, topk=a.topk, hidden=a.hidden, inter=a.inter,
                       rank=a.rank, dtype=str(dtype).replace("torch.", ""))
            if name == "loop_lora" and not loop_ok:
                rows.append({**row, "skipped": f"more than --no-loop-above {a.no_loop_above} tokens"})
                print(rows[-1], flush=True)
                continue
            try:
                out = _pass(name, inputs, scale)
                # each LoRA row against another implementation: torch's against the loop, the rest against torch's
                vs = ("loop_lora" if loop_ok else None) if name == "torch_lora" else "torch_lora"
                if name != "triton_full" and vs is not None:
                    want = ref[vs]
                    errs = [_rel(out[0], want[0])] + [_rel(g, w) for g, w in zip(out[1], want[1])]
                    row.update(rel_err_vs=vs, max_rel_err=max(errs))
                    if max(errs) > tol:
                        rows.append({**row, "wrong": f"relative error {max(errs):.3g} > {tol}"})
                        print(rows[-1], flush=True)
                        continue
                del out
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    _pass(name, inputs, scale)
                    torch.cuda.synchronize()
                    row["peak_mib_above_inputs"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                med, lo, hi = _time_ms(lambda: _pass(name, inputs, scale), a.reps)
                row.update(ms_median=med, ms_min=lo, ms_max=hi, reps=a.reps)
            except Exception as e:  # a failure is a result too: recorded, the other rows still run
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            print(row, flush=True)
        by = {r["impl"]: r for r in rows if r["tokens"] == T and "ms_median" in r}
        if "triton_lora" in by:
            for other in ("torch_lora", "loop_lora", "triton_full"):
                if other in by:
                    print(f"T={T}: {other} / triton_lora time = {by[other]['ms_median'] / by['triton_lora']['ms_median']:.2f}x")
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", torch=torch.__version__,
                triton=__import__("triton").__version__, commit=_commit(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=sys.argv[1:] if argv is None else argv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
