"""Where the time of the Triton expert MLP goes, kernel by kernel, and how tile configs change it.

    python benchmarks/kernel_profile.py                                  # GPU: Ling-Lite, T=8192, uniform
    python benchmarks/kernel_profile.py --variants "" "tile_order=0" "num_stages=4" --json out.json

Each variant is a LINGMOE_TRITON_CONFIG override ("" = the built-in heuristic). For each one the six
kernels of kernels/_grouped_gemm.py are launched on their own on the same inputs and timed with CUDA
events (median of --reps after --warmup), with their FLOPs:

    gate_up_fwd   2*N*H*2I    down_fwd   2*N*I*H      (forward)
    down_bwd      2*N*H*I     down_wgrad 2*N*H*I      gate_up_bwd_dx 2*N*2I*H   gate_up_wgrad 2*N*2I*H

and the whole op (kernels.triton_moe_mlp) is timed forward and forward+backward; "other" is the
whole minus the kernels (routing tables, the fixed-order sums over K, casts). Every variant is first checked
against the fp32 loop reference (output and all gradients). --peers adds a torch.profiler breakdown of
Liger's fused MoE and the grouped_mm MLP at the same inputs. Legend: T tokens, E experts, K top-k,
H hidden, I expert width, N = T*K routed rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.tools import kernel_bench as bench  # noqa: E402
from kernels._grouped_gemm import CONFIG_ENV  # noqa: E402

KERNELS = ("gate_up_fwd", "down_fwd", "down_bwd", "down_wgrad", "gate_up_bwd_dx", "gate_up_wgrad")


def _time(fn, reps, warmup):
    """Median ms of ``fn`` on the GPU (kernels.bench's timing: CUDA events, warm-up first)."""
    return bench._time(fn, reps, warmup, torch.device("cuda"))[0]


def kernel_calls(inputs):
    """The six launchers as closures over one set of inputs, in the order triton_moe_mlp runs them."""
    from kernels import _grouped_gemm as gg
    from kernels.routing import build_routing

    x, w_gu, w_d, ids, tw, dy = inputs
    T, K = ids.shape
    E = w_gu.shape[0]
    tw_N = tw.to(x.dtype).reshape(-1).contiguous()
    cfg = gg.pick_config(T * K, E, x.dtype)
    routing = build_routing(ids, E, cfg.block_m)
    h, gu = gg.gate_up_fwd(x, w_gu, routing, cfg, save_preact=True)
    dgu, _, hw = gg.down_bwd(dy, w_d, gu, tw_N, routing, cfg)
    return cfg, {
        "gate_up_fwd": lambda: gg.gate_up_fwd(x, w_gu, routing, cfg, save_preact=True),
        "down_fwd": lambda: gg.down_fwd(h, w_d, tw_N, routing, cfg),
        "down_bwd": lambda: gg.down_bwd(dy, w_d, gu, tw_N, routing, cfg),
        "down_wgrad": lambda: gg.down_wgrad(dy, hw, routing, cfg, E),
        "gate_up_bwd_dx": lambda: gg.gate_up_bwd_dx(dgu, w_gu, routing, cfg),
        "gate_up_wgrad": lambda: gg.gate_up_wgrad(dgu, x, routing, cfg, E),
    }


def kernel_flops(name, N, H, I):
    return {"gate_up_fwd": 4, "down_fwd": 2, "down_bwd": 2, "down_wgrad": 2, "gate_up_bwd_dx": 4,
            "gate_up_wgrad": 4}[name] * N * H * I


def profile_variant(spec, inputs, ref, args):
    os.environ[CONFIG_ENV] = spec
    x, w_gu, w_d, ids, tw, dy = inputs
    T, K = ids.shape
    H, I = x.shape[1], w_d.shape[2]
    N = T * K
    fn = bench._impl_fn("triton")
    row = {"variant": spec or "default"}
    try:
        row["max_rel_err"] = bench._check(fn, inputs, True, ref)
        row["ok"] = bool(row["max_rel_err"] <= bench._TOL[x.dtype])
        cfg, calls = kernel_calls(inputs)
        row["config"] = cfg._asdict()
        for name in KERNELS:
            ms = _time(calls[name], args.reps, args.warmup)
            row[name] = {"ms": ms, "tflops": kernel_flops(name, N, H, I) / ms / 1e9}
        del calls
        for pass_ in ("fwd", "fwd+bwd"):
            ms = _time(bench._moe_runner(fn, inputs, pass_ == "fwd+bwd"), args.reps, args.warmup)
            row[pass_] = {"ms": ms, "tflops": bench.moe_flops(T, K, H, I, pass_) / ms / 1e9}
        row["fwd_other_ms"] = row["fwd"]["ms"] - row["gate_up_fwd"]["ms"] - row["down_fwd"]["ms"]
        row["fwd+bwd_other_ms"] = row["fwd+bwd"]["ms"] - sum(row[k]["ms"] for k in KERNELS)
    except Exception as e:  # a config that does not compile or fit: record it, go on with the next
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        os.environ.pop(CONFIG_ENV, None)
        torch.cuda.empty_cache()
    return row


# Which kernels a config field changes: variants that touch disjoint groups can be composed.
FIELD_GROUPS = {"block_n_gu": "gate_up", "block_n": "rows", "block_n_dbwd": "down_bwd", "dbwd_warps": "down_bwd",
                "wg_block_m": "wgrad", "wg_block_n": "wgrad", "wg_block_k": "wgrad", "wg_warps": "wgrad",
                "wg_stages": "wgrad"}
GROUP_KERNELS = {"gate_up": ("gate_up_fwd",), "rows": ("down_fwd", "gate_up_bwd_dx"), "down_bwd": ("down_bwd",),
                 "wgrad": ("down_wgrad", "gate_up_wgrad")}


def compose(rows, min_gain=0.03):
    """From variants that each change one kernel group, the spec joining every group's fastest variant
    (only where it beats the heuristic's kernels by more than min_gain); '' when none does."""
    base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
    if base is None:
        return ""
    best = {}
    for r in rows:
        if "error" in r or not r.get("ok") or r["variant"] == "default":
            continue
        groups = {FIELD_GROUPS.get(item.split("=")[0].strip()) for item in r["variant"].split(",")}
        if len(groups) != 1 or None in groups:
            continue
        g = groups.pop()
        t = sum(r[k]["ms"] for k in GROUP_KERNELS[g])
        t0 = sum(base[k]["ms"] for k in GROUP_KERNELS[g])
        if t < (1 - min_gain) * t0 and t < best.get(g, (None, float("inf")))[1]:
            best[g] = (r["variant"], t)
    return ",".join(v for v, _ in best.values())


def profile_peer(impl, inputs, args):
    """Per-kernel CUDA time of one forward+backward of a peer, from torch.profiler (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn = bench._impl_fn(impl)
    run = bench._moe_runner(fn, inputs, True)
    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0)
        if t > 0:  # distinct kernels may share a shortened name: add them up
            out[ev.key[:60]] = out.get(ev.key[:60], 0.0) + t / 1e3 / 5  # us -> ms, per fwd+bwd
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:12])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/kernel_profile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens T (default: 8192)")
    p.add_argument("--experts", type=int, default=64, help="experts E (default: 64, Ling-Lite)")
    p.add_argument("--topk", type=int, default=6, help="experts per token K (default: 6)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size H (default: 2048)")
    p.add_argument("--inter", type=int, default=1408, help="expert width I (default: 1408)")
    p.add_argument("--skew", type=float, default=0.0, help="Zipf skew of expert popularity, 0 = uniform (default: 0)")
    p.add_argument("--variants", nargs="+", default=[""],
                   help="LINGMOE_TRITON_CONFIG overrides to compare, '' = the heuristic (default: '')")
    p.add_argument("--peers", nargs="*", default=[], choices=["triton", "liger", "grouped_mm"],
                   help="also break down these implementations with torch.profiler (default: none)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions, median reported (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default: 3)")
    p.add_argument("--compose", action="store_true",
                   help="also time the composition of the fastest variant of each kernel group (see FIELD_GROUPS)")
    p.add_argument("--best-out", default="",
                   help="write the fastest checked spec by forward+backward time here ('' for the heuristic), "
                        "for LINGMOE_TRITON_CONFIG of a following run (default: none)")
    p.add_argument("--json", default="", help="write the rows here as JSON (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the interpreter says nothing about kernel time)")
    dev = torch.device("cuda")
    inputs = bench._make_inputs(args.tokens, args.experts, args.topk, args.hidden, args.inter, torch.bfloat16,
                                args.skew, dev, 0)
    ref = bench._reference(inputs)
    rows = [profile_variant(v, inputs, ref, args) for v in args.variants]
    if args.compose:
        spec = compose(rows)
        if spec and spec not in args.variants:
            rows.append(profile_variant(spec, inputs, ref, args))
            rows[-1]["composed"] = True
    if args.best_out:
        good = [r for r in rows if "error" not in r and r.get("ok")]
        best = min(good, key=lambda r: r["fwd+bwd"]["ms"]) if good else None
        spec = "" if best is None or best["variant"] == "default" else best["variant"]
        with open(args.best_out, "w") as f:
            f.write(spec + "\n")
        print(f"fastest checked config by forward+backward: {spec or 'the heuristic'}")
    peers = {}
    for impl in args.peers:
        try:
            peers[impl] = profile_peer(impl, inputs, args)
        except Exception as e:
            peers[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    print(f"\nper-kernel ms (TFLOP/s) at T={args.tokens} E={args.experts} K={args.topk} H={args.hidden} "
          f"I={args.inter} skew={args.skew:g}, bf16, {torch.cuda.get_device_name()}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']}: FAILED {r['error']}")
            continue
        parts = "  ".join(f"{k} {r[k]['ms']:.3f} ({r[k]['tflops']:.0f})" for k in KERNELS)
        print(f"{r['variant']}: fwd {r['fwd']['ms']:.3f} ms ({r['fwd']['tflops']:.0f}), fwd+bwd "
              f"{r['fwd+bwd']['ms']:.3f} ms ({r['fwd+bwd']['tflops']:.0f}), other fwd {r['fwd_other_ms']:.3f} "
              f"fwd+bwd {r['fwd+bwd_other_ms']:.3f}, err {r['max_rel_err']:.1e}{'' if r['ok'] else ' FAILED CHECK'}\n"
              f"    {parts}")
    for impl, table in peers.items():
        print(f"{impl} per fwd+bwd (ms): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in table.items()))
    if args.json:
        meta = dict(bench.run_metadata(dev), T=args.tokens, E=args.experts, K=args.topk, H=args.hidden,
                    I=args.inter, skew=args.skew, dtype="bf16", rows=rows, peers=peers)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
