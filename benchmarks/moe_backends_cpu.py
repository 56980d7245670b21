"""MoE-layer forward+backward time of the expert backends on CPU (the "torch" backend vs the "loop" reference).

    python benchmarks/moe_backends_cpu.py [--tokens 2048 --hidden 256 --experts 64 --topk 6 --inter 128 --reps 7]

Both backends run in the same process on the same inputs and weights; outputs and gradients are
checked against each other before timing; the figure is the median over --reps runs after one warm-up.
Results are printed and written as JSON (--out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time

import torch

from moe.experts import BACKENDS


def run(backend, x, wgu, wd, ids, w, dy):
    x = x.detach().requires_grad_()
    wgu, wd, w = (t.detach().requires_grad_() for t in (wgu, wd, w))
    y = BACKENDS[backend](x, wgu, wd, ids, w)
    y.backward(dy)
    return y.detach(), x.grad, wgu.grad, wd.grad, w.grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens T in the layer's input (default 2048)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    p.add_argument("--experts", type=int, default=64, help="routed experts E (default 64)")
    p.add_argument("--topk", type=int, default=6, help="experts per token K (default 6)")
    p.add_argument("--inter", type=int, default=128, help="expert width I (default 128)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions; the median is reported (default 7)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    T, H, E, K, I = a.tokens, a.hidden, a.experts, a.topk, a.inter
    x = torch.randn(T, H, generator=g)
    wgu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    wd = torch.randn(E, H, I, generator=g) / I ** 0.5
    probs = torch.randn(T, E, generator=g).softmax(-1)
    w, ids = probs.topk(K, -1)
    dy = torch.randn(T, H, generator=g)

    ref = run("loop", x, wgu, wd, ids, w, dy)
    got = run("torch", x, wgu, wd, ids, w, dy)
    for name, r, o in zip(("y", "dx", "dw_gate_up", "dw_down", "dtopk_w"), ref, got):
        err = ((r - o).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"torch backend disagrees with loop on {name}: rel err {err:.2e}"

    times = {}
    for backend in ("loop", "torch"):
        run(backend, x, wgu, wd, ids, w, dy)
        ts = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            run(backend, x, wgu, wd, ids, w, dy)
            ts.append(time.perf_counter() - t0)
        times[backend] = statistics.median(ts) * 1e3
    speedup = times["loop"] / times["torch"]
    print(f"MoE layer fwd+bwd on CPU ({torch.get_num_threads()} threads), T={T} H={H} E={E} K={K} I={I}, fp32")
    print(f"{'backend':<8} {'ms (median)':>12}")
    for b, ms in times.items():
        print(f"{b:<8} {ms:>12.1f}")
    print(f"torch backend speedup over loop: {speedup:.2f}x")
    if a.out:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
        rec = dict(date=datetime.date.today().isoformat(), commit=commit, device=f"CPU {platform.processor() or platform.machine()}",
                   threads=torch.get_num_threads(), torch=torch.__version__, T=T, H=H, E=E, K=K, I=I, dtype="float32",
                   ms=times, speedup=speedup, grouped_mm=hasattr(torch, "_grouped_mm"))
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=2)
    return speedup


if __name__ == "__main__":
    main()
