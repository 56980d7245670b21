"""Benchmark of MoE expert-MLP implementations: `python -m trainer.tools.kernel_bench --help` (or, by
its old name, `python -m kernels.bench`).

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.

Implementations: "triton" (kernels.triton_moe_mlp), "liger" (Liger-Kernel's fused MoE op,
LigerFusedMoEFunction, when the package is installed: a peer, never a dependency),
"grouped_mm" (the model's torch expert backend: sort once + torch._grouped_mm,
kernels.reference.grouped_mm_moe_mlp), "loop" (the model's per-expert loop,
kernels.reference.loop_moe_mlp) and "dense" (one dense SwiGLU MLP over N rows with the same FLOPs: the
ceiling a perfectly balanced grouped GEMM could reach).
FLOPs: 3 GEMMs of 2*H*I per routed row forward (6*N*H*I); forward+backward is 3x that.

Every implementation is checked against the loop reference (in fp32, computed once per T and
skew) before it is timed; the relative error goes into each JSON row, and the timing spread
(10th and 90th percentile) beside the median. On a CPU-only machine the torch paths run at
small default shapes and "triton" runs only under the Triton interpreter
(TRITON_INTERPRET=1 set before launch), which says nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from data.errors import run_cli
from kernels import reference

IMPLS = ("triton", "liger", "grouped_mm", "loop", "dense")
PASSES = ("fwd", "fwd+bwd")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Largest N*H*I the interpreter is allowed to chew on; beyond it a single launch takes minutes.
_INTERP_MAX_WORK = 2 ** 20


def moe_flops(n_tokens: int, top_k: int, hidden: int, inter: int, pass_: str) -> int:
    fwd = 3 * 2 * n_tokens * top_k * hidden * inter
    return fwd if pass_ == "fwd" else 3 * fwd


def _parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Time MoE expert-MLP implementations (forward and forward+backward). "
                    "Defaults are Ling-Lite shapes on a GPU and small shapes on CPU.")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384] if cuda else [64],
                   help="token counts T to sweep (default: 4096 8192 16384 on GPU, 64 on CPU)")
    p.add_argument("--experts", type=int, default=64 if cuda else 8,
                   help="number of routed experts E (default: 64 on GPU, 8 on CPU)")
    p.add_argument("--topk", type=int, default=6 if cuda else 2,
                   help="experts per token K (default: 6 on GPU, 2 on CPU)")
    p.add_argument("--hidden", type=int, default=2048 if cuda else 64,
                   help="model width H (default: 2048 on GPU, 64 on CPU)")
    p.add_argument("--inter", type=int, default=1408 if cuda else 32,
                   help="expert intermediate width I (default: 1408 on GPU, 32 on CPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16" if cuda else "fp32",
                   help="activation/weight dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--skew", type=float, nargs="+", default=[0.0, 1.2],
                   help="routing skews to sweep: 0 = uniform, s > 0 = Zipf(s) expert popularity "
                        "(default: 0 1.2)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to run (default: all)")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                   help="passes to time (default: fwd fwd+bwd)")
    p.add_argument("--reps", type=int, default=20 if cuda else 3,
                   help="timed repetitions; the median is reported; an implementation whose --reps runs would take "
                        f"over 3 s gets fewer, at least {_MIN_REPS} (default: 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1,
                   help="untimed warm-up repetitions (default: 5 GPU, 1 CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and routing")
    p.add_argument("--compile-workers", type=int, default=min(12, os.cpu_count() or 1) if cuda else 0,
                   help="processes that compile Liger's autotuning candidates in parallel before the run "
                        "(each compiles a share into the shared Triton cache; the run then only times them); "
                        "0 = let the autotuner compile them one by one (default: min(12, CPUs) on GPU, 0 on CPU)")
    p.add_argument("--json", default="benchmarks/moe_bench.json",
                   help="where to write the JSON results (default: benchmarks/moe_bench.json)")
    p.add_argument("--plot", default="benchmarks/moe_bench.png",
                   help="where to write the PNG plot (default: benchmarks/moe_bench.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    return p.parse_args(argv)


def _route(T, E, K, skew, gen, device):
    """[T, K] distinct experts per token: uniform, or Zipf(skew) popularity over experts."""
    if skew <= 0:
        probs = torch.ones(E)
    else:
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** skew
    ids = torch.multinomial(probs.float().expand(T, E), K, replacement=False, generator=gen)
    return ids.to(device)


def _make_inputs(T, E, K, H, I, dtype, skew, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w_gu = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    w_d = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    ids = _route(T, E, K, skew, gen, device)
    tw = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    dy = torch.randn(T, H, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w_gu), cast(w_d), ids, tw.to(device), cast(dy)


def _skip_reason(impl, device, interp, dtype, work, liger_missing):
    if impl == "liger":
        if liger_missing:
            return liger_missing
        if device.type != "cuda":
            return "liger runs on CUDA only here (its autotuner times candidates on the GPU)"
    if impl == "triton" and device.type == "cpu":
        if not interp:
            return "no CUDA and Triton interpreter not active"
        if work > _INTERP_MAX_WORK:
            return "shape too large for the interpreter"
        if dtype != torch.float32:
            return "interpreter 16-bit math is wrong; use --dtype fp32"
    return None


def _impl_fn(name):
    if name == "loop":
        return reference.loop_moe_mlp
    if name == "grouped_mm":
        return reference.grouped_mm_moe_mlp
    if name == "triton":
        from kernels.moe_mlp import triton_moe_mlp
        return triton_moe_mlp
    if name == "liger":
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        def liger_moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights):
            # Same weight layout as ours ([E, 2I, H] gate rows first, [E, H, I]); it wants int32 ids.
            return LigerFusedMoEFunction.apply(x, w_gate_up, w_down, topk_ids.to(torch.int32), topk_weights)
        return liger_moe_mlp
    raise ValueError(name)


def liger_available() -> str | None:
    """None when Liger-Kernel's fused MoE op can be imported, else why not."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction  # noqa: F401
    except Exception as e:  # not installed, or an import error inside it: report, never crash the bench
        return f"liger-kernel unavailable ({type(e).__name__}: {e}); pip install liger-kernel"
    return None


def _liger_autotuners():
    import triton
    from liger_kernel.ops import fused_moe_kernels as fk

    return [v for _, v in sorted(vars(fk).items()) if isinstance(v, triton.runtime.autotuner.Autotuner)]


def liger_warm_worker(share: int, n_shares: int, E: int, K: int, H: int, I: int, dtype: str) -> None:
    """Compile share/n_shares of every Liger autotuner's candidate configs at this shape into the
    Triton cache (run in a child process; T is small because T is not part of the compiled code)."""
    for tuner in _liger_autotuners():
        tuner.configs = tuner.configs[share::n_shares] or tuner.configs[:1]
    inputs = _make_inputs(256, E, K, H, I, _DTYPES[dtype], 0.0, torch.device("cuda"), share)
    _moe_runner(_impl_fn("liger"), inputs, True)()
    torch.cuda.synchronize()


def _liger_warm(workers: int, E: int, K: int, H: int, I: int, dtype: str) -> float:
    """Compile Liger's candidates in ``workers`` processes at once; returns the seconds spent."""
    t0 = time.perf_counter()
    code = "import sys; from trainer.tools.kernel_bench import liger_warm_worker as w; w(*map(int, sys.argv[1:7]), sys.argv[7])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(workers), str(E), str(K), str(H), str(I),
                               dtype], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    for pr in procs:
        _, err = pr.communicate()
        if pr.returncode != 0:  # the main run compiles whatever is missing; say why this one failed
            print(f"note: a Liger compile worker failed (exit {pr.returncode}): {err.strip()[-500:]}")
    return time.perf_counter() - t0


def _dense_fn(T, K, H, I, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T * K, H, generator=gen).to(device, dtype)
    w1 = (torch.randn(H, 2 * I, generator=gen) / math.sqrt(H)).to(device, dtype)
    w2 = (torch.randn(I, H, generator=gen) / math.sqrt(I)).to(device, dtype)
    dy = torch.randn(T * K, H, generator=gen).to(device, dtype)

    def run(backward):
        xs = [t.detach().requires_grad_(backward) for t in (x, w1, w2)]
        g, u = (xs[0] @ xs[1]).chunk(2, dim=-1)
        y = (F.silu(g) * u) @ xs[2]
        if backward:
            torch.autograd.grad(y, xs, dy)
        return y
    return run


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _reference(inputs):
    """The loop reference in fp32 on fp32 copies of the inputs: y and the four gradients."""
    x, w_gu, w_d, ids, tw, dy = inputs
    ref_in = [t.detach().float().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
    y_ref = reference.loop_moe_mlp(ref_in[0], ref_in[1], ref_in[2], ids, ref_in[3])
    if y_ref.abs().max() == 0:
        raise RuntimeError("reference output is all zeros: refusing to benchmark on it")
    grads = torch.autograd.grad(y_ref, ref_in, dy.float())
    return [y_ref.detach()] + list(grads)


def _check(fn, inputs, backward, ref):
    """Max relative error of the output (and, with ``backward``, the four gradients) against ``ref``
    (_reference). The implementations allocate their own outputs, so they cannot be poisoned
    beforehand; instead any non-finite value fails the check (NaN) rather than passing unnoticed."""
    x, w_gu, w_d, ids, tw, dy = inputs
    test_in = [t.detach().requires_grad_(backward) for t in (x, w_gu, w_d, tw)]
    with torch.set_grad_enabled(backward):
        y = fn(test_in[0], test_in[1], test_in[2], ids, test_in[3])
    got = [y]
    if backward:
        got += list(torch.autograd.grad(y, test_in, dy))
    errs = []
    for a, b in zip(got, ref):
        if not torch.isfinite(a).all():
            return float("nan")
        errs.append(_rel_err(a, b))
    return max(errs)


def _moe_runner(fn, inputs, backward):
    x, w_gu, w_d, ids, tw, dy = inputs

    def run(_backward=backward):
        if not _backward:
            with torch.no_grad():
                return fn(x, w_gu, w_d, ids, tw)
        xs = [t.detach().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
        y = fn(xs[0], xs[1], xs[2], ids, xs[3])
        torch.autograd.grad(y, xs, dy)
        return y
    return run


# Slow implementations (the per-expert loop at large T) get fewer repetitions, never fewer than
# _MIN_REPS: their median is stable long before --reps, and the session's device time is not.
_TIME_BUDGET_MS = 3000.0
_MIN_REPS = 5


def _time(run, reps, warmup, device):
    """Median, 10th and 90th percentile in ms, and the repetitions timed."""
    def once():
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        if once() > 200.0:  # already warm: compilation and allocation were done by the check
            break
    times = [once()]
    reps = max(1, min(reps, max(_MIN_REPS, int(_TIME_BUDGET_MS / max(times[0], 1e-3)))))
    times += [once() for _ in range(reps - 1)]
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.1), pick(0.9), len(times)


def _git_commit():
    # A copy of the tree without .git (the GPU machine gets one) names its commit in this variable.
    if os.environ.get("LINGMOE_GIT_COMMIT"):
        return os.environ["LINGMOE_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def run_metadata(device) -> dict:
    """What every recorded result carries: device, torch and triton versions, commit and UTC date."""
    return dict(device=_device_name(device), torch=torch.__version__, triton=_triton_version(),
                git_commit=_git_commit(), triton_config_override=os.environ.get("LINGMOE_TRITON_CONFIG", ""),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot ({path})")
        return
    fig, axes = plt.subplots(1, len(PASSES), figsize=(12, 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], PASSES):
        series = {}
        for r in rows:
            if r["pass"] == pass_ and r["tflops"] is not None:
                series.setdefault((r["impl"], r["skew"]), []).append((r["T"], r["tflops"]))
        for (impl, skew), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{impl} skew={skew:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(pass_)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype]
    from kernels._grouped_gemm import interpreter_active
    interp = interpreter_active()
    notes = []
    if device.type == "cpu":
        notes.append("CPU only: timings are CPU timings of small shapes, not GPU performance.")
        if "triton" in args.impls:
            notes.append("triton runs under the Triton interpreter (correctness only)." if interp
                         else "triton skipped: no CUDA and TRITON_INTERPRET=1 was not set "
                              "before launch (run `TRITON_INTERPRET=1 python -m kernels.bench`).")
    if "grouped_mm" in args.impls and not reference.grouped_mm_available(device.type, dtype):
        notes.append("grouped_mm: torch._grouped_mm (forward and backward) unavailable here for this dtype; "
                     "the model's torch backend, timed here, uses one matmul per expert segment instead.")
    E, K, H, I = args.experts, args.topk, args.hidden, args.inter
    liger_missing = liger_available() if "liger" in args.impls else None
    if liger_missing:
        notes.append(liger_missing)
    elif "liger" in args.impls and device.type == "cuda" and args.compile_workers > 0:
        secs = _liger_warm(args.compile_workers, E, K, H, I, args.dtype)
        notes.append(f"liger: its autotuning candidates were compiled by {args.compile_workers} processes "
                     f"in {secs:.0f} s before the run (Triton cache); its autotuner then timed them itself")
    for n in notes:
        print("note:", n)

    rows = []
    for T in args.tokens:
        for skew in args.skew:
            inputs = _make_inputs(T, E, K, H, I, dtype, skew, device, args.seed)
            ref = None
            for pass_ in args.passes:
                backward = pass_ == "fwd+bwd"
                flops = moe_flops(T, K, H, I, pass_)
                for impl in args.impls:
                    row = dict(impl=impl, **{"pass": pass_}, T=T, E=E, K=K, H=H, I=I,
                               dtype=args.dtype, skew=skew, ms=None, ms_p10=None, ms_p90=None,
                               tflops=None, flops=flops, max_rel_err=None, ok=None, skipped=None,
                               error=None)
                    row["skipped"] = _skip_reason(impl, device, interp, dtype, T * K * H * I, liger_missing)
                    if row["skipped"]:
                        rows.append(row)
                        continue
                    try:
                        if impl == "dense":
                            run = _dense_fn(T, K, H, I, dtype, device, args.seed)
                            run_pass = lambda r=run, b=backward: r(b)  # noqa: E731
                        else:
                            if ref is None:
                                ref = _reference(inputs)
                            fn = _impl_fn(impl)
                            t0 = time.perf_counter()
                            err = _check(fn, inputs, backward, ref if backward else ref[:1])
                            first = time.perf_counter() - t0
                            if first > 5:
                                print(f"note: {impl} {pass_} T={T}: first call (compile/autotune) took {first:.0f} s")
                            row["max_rel_err"] = err
                            row["ok"] = bool(err <= _TOL[dtype])  # False for NaN
                            if not row["ok"]:
                                print(f"WARNING: {impl} {pass_} T={T} skew={skew}: relative error "
                                      f"{err:.3g} exceeds {_TOL[dtype]:g}")
                            run_pass = _moe_runner(fn, inputs, backward)
                        row["ms"], row["ms_p10"], row["ms_p90"], row["reps"] = _time(
                            run_pass, args.reps, args.warmup, device)
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    except Exception as e:  # record and go on: one broken peer must not lose the others
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"ERROR: {impl} {pass_} T={T} skew={skew}: {row['error']}")
                    rows.append(row)
            del inputs, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "liger" in args.impls and not liger_missing and device.type == "cuda":
        try:
            notes.append("liger autotuned configs: " + "; ".join(
                f"{t.fn.__name__}: {t.best_config}" for t in _liger_autotuners()
                if getattr(t, "best_config", None) is not None))
        except Exception as e:
            notes.append(f"liger autotuned configs unavailable ({e})")

    _add_relative(rows)
    _print_table(rows, device, notes)
    targets = kernel_targets(rows)
    _print_targets(targets)
    meta = dict(run_metadata(device), interpreter=interp, notes=notes, targets=targets, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(meta, f, indent=2)
    print(f"wrote {args.json}")
    if not args.no_plot:
        _plot(rows, args.plot)
    return meta


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _add_relative(rows):
    key = lambda r: (r["pass"], r["T"], r["E"], r["K"], r["H"], r["I"], r["skew"])  # noqa: E731
    by = {name: {key(r): r for r in rows if r["impl"] == name and r["ms"]}
          for name in ("dense", "loop", "grouped_mm", "liger")}
    for r in rows:
        d = by["dense"].get(key(r))
        r["pct_of_dense"] = 100.0 * r["tflops"] / d["tflops"] if d and r["tflops"] else None
        for name in ("loop", "grouped_mm", "liger"):
            other = by[name].get(key(r))
            r[f"speedup_vs_{name}"] = other["ms"] / r["ms"] if other and r["ms"] else None


# Targets for the triton kernels at T=8192, uniform routing unless noted (docs/kernels.md).
TARGETS = {"fwd % of dense": 65.0, "fwd+bwd % of dense": 55.0, "fwd+bwd x liger": 1.15,
           "fwd+bwd x grouped_mm": 1.3, "fwd+bwd x loop": 10.0, "fwd+bwd skewed / uniform": 0.85}


def kernel_targets(rows, T: int = 8192) -> list[dict]:
    """The triton rows against TARGETS at T tokens, for each expert shape that was run: forward and
    forward+backward as % of the dense GEMM of equal FLOPs measured in the same run, the speed-up of
    forward+backward over Liger, the grouped_mm MLP and the loop, and the most skewed run's
    forward+backward TFLOP/s over uniform's. Targets whose rows were not run are left out."""
    out = []
    shapes = sorted({(r["E"], r["K"], r["H"], r["I"]) for r in rows if r["impl"] == "triton" and r["T"] == T})
    for shape in shapes:
        tri = {(r["pass"], r["skew"]): r for r in rows if r["impl"] == "triton" and r["T"] == T
               and (r["E"], r["K"], r["H"], r["I"]) == shape and r["ms"]}

        def add(name, value):
            if value is not None:
                out.append(dict(target=name, T=T, E=shape[0], K=shape[1], H=shape[2], I=shape[3], value=value,
                                threshold=TARGETS[name], met=bool(value >= TARGETS[name])))

        fwd, fb = tri.get(("fwd", 0.0)), tri.get(("fwd+bwd", 0.0))
        if fwd:
            add("fwd % of dense", fwd["pct_of_dense"])
        if fb:
            add("fwd+bwd % of dense", fb["pct_of_dense"])
            add("fwd+bwd x liger", fb.get("speedup_vs_liger"))
            add("fwd+bwd x grouped_mm", fb["speedup_vs_grouped_mm"])
            add("fwd+bwd x loop", fb["speedup_vs_loop"])
            skewed = [r for (p, s), r in tri.items() if p == "fwd+bwd" and s > 0]
            if skewed:
                worst = max(skewed, key=lambda r: r["skew"])
                add("fwd+bwd skewed / uniform", worst["tflops"] / fb["tflops"])
    return out


def _print_targets(targets):
    if not targets:
        return
    print(f"targets at T={targets[0]['T']} (triton, bf16 on the GPU):")
    for t in targets:
        print(f"  E={t['E']} K={t['K']} H={t['H']} I={t['I']}  {t['target']:<26}{t['value']:>9.2f}  "
              f"(>= {t['threshold']:g})  {'met' if t['met'] else 'MISSED'}")
    print()


def _print_table(rows, device, notes):
    shapes = sorted({(r["E"], r["K"], r["H"], r["I"]) for r in rows})
    print(f"\nMoE expert MLP on {_device_name(device)}, " + ", ".join(f"E={e} K={k} H={h} I={i}" for e, k, h, i in shapes))
    hdr = (f"{'impl':<11}{'pass':<9}{'T':>7}{'skew':>6}{'ms':>11}{'p10-p90':>18}{'TFLOP/s':>10}"
           f"{'%dense':>8}{'x loop':>8}{'x liger':>8}{'rel err':>10}")
    print(hdr)
    print("-" * len(hdr))
    def fmt(v, width, spec):
        return format(v, spec).rjust(width) if v is not None else "-".rjust(width)
    for r in rows:
        if r["skipped"]:
            print(f"{r['impl']:<11}{r['pass']:<9}{r['T']:>7}{r['skew']:>6g}  skipped: {r['skipped']}")
            continue
        if r.get("error"):
            print(f"{r['impl']:<11}{r['pass']:<9}{r['T']:>7}{r['skew']:>6g}  FAILED: {r['error'][:80]}")
            continue
        spread = f"{r['ms_p10']:.3f}-{r['ms_p90']:.3f}"
        print(f"{r['impl']:<11}{r['pass']:<9}{r['T']:>7}{r['skew']:>6g}{fmt(r['ms'], 11, '.3f')} {spread:>17}"
              f"{fmt(r['tflops'], 10, '.3g')}{fmt(r['pct_of_dense'], 8, '.1f')}"
              f"{fmt(r['speedup_vs_loop'], 8, '.2f')}{fmt(r.get('speedup_vs_liger'), 8, '.2f')}"
              f"{fmt(r['max_rel_err'], 10, '.2e')}")
    print()


def cli(argv=None) -> int:
    """The command: bad input becomes "error: ..." and its exit code (data/errors.py), as for every tool."""
    return run_cli(lambda a: 0 if main(a) else 1, argv)


if __name__ == "__main__":
    sys.exit(cli())
