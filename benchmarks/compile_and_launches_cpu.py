"""Kernel launches per MoE layer, and training-step time with eager against compiled decoder blocks, on CPU.

    python benchmarks/compile_and_launches_cpu.py --json benchmarks/compile_and_launches_cpu.json [--label after]

1. Launches. One MoE layer of the tiny preset (T = 2 x 32 tokens, H=128, E=8, K=2, I=64) runs its
   forward, then its backward, under tests/dispatch_utils.Launches: every aten op that would launch
   a kernel on a GPU (views and allocations left out) plus every Triton kernel launch (counted at
   the interpreter's entry). "experts" is GroupedExperts' call alone (the router's outputs given),
   "block" the whole MoEBlock (router, experts, shared expert). The triton backend runs under the
   interpreter; the counts are those a GPU would launch, the times are not. "decoder layer" is a
   whole MoE decoder layer, eager (norms, attention with RoPE, the MoE block, residual adds).
2. Step time. The tiny preset (4 layers, 1.5M parameters, the SFT demo's model) trains 4 rows x 256
   tokens per step with AdamW, torch backend, fp32: the same steps from the same initial weights
   with eager blocks and with each decoder block compiled by torch.compile (inductor), one eager and
   one compiled step in turn (a shared machine's load then hits both alike). It reports the first
   step (compilation included), the median of the timed steps, the median of the per-round ratios,
   the graph breaks dynamo counted, and the largest difference between the two runs' losses.

--label names the column written into the JSON (an existing file is updated, other labels kept), so
the same script run at an older commit records the "before" beside the "after". It runs at commits
without the expert_recompute option too (that row is then skipped).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton's kernels

import torch  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe import BailingMoeConfig, BailingMoeForCausalLM  # noqa: E402
from moe.model import DecoderLayer, MoEBlock, rotary_cos_sin  # noqa: E402
from tests.dispatch_utils import Launches  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LINGMOE_GIT_COMMIT", "unknown")


def _module(backend: str, dtype: torch.dtype, recompute: bool, layer: bool):
    extra = dict(expert_recompute=True) if recompute else {}
    cfg = BailingMoeConfig.preset("tiny", expert_backend=backend, **extra)
    torch.manual_seed(0)
    module = DecoderLayer(cfg, 1) if layer else MoEBlock(cfg)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return cfg, module.to(dtype)


def launches(backend: str, dtype: torch.dtype, part: str, recompute: bool = False) -> dict:
    cfg, module = _module(backend, dtype, recompute, layer=part == "decoder layer")
    x = torch.randn(2, 32, cfg.hidden_size, dtype=dtype, requires_grad=True)
    if part == "experts":
        def forward():
            x_TH = x.detach().view(-1, cfg.hidden_size)
            r = module.gate(x_TH)  # the router runs outside the count: its outputs are given
            return lambda: module.experts(x_TH.requires_grad_(), r.topk_ids_TK,
                                          r.topk_weights_TK.detach().requires_grad_(), r.all_counts_E)
    elif part == "block":
        def forward():
            return lambda: module(x, None, False)[0]
    else:
        pos = torch.arange(32)[None].expand(2, 32)
        rope = tuple(t[:, :, None] for t in rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype))

        def forward():
            return lambda: module(x, rope, None, None)[0]
    forward()().float().sum().backward()  # warm-up: the interpreter's first call rewrites each kernel
    module.zero_grad(set_to_none=True)  # a first backward assigns gradients, a second would add to them
    x.grad = None
    fwd, bwd = Launches(), Launches()
    run = forward()
    with fwd.watching_triton():
        y = run()
    dy = torch.randn_like(y)
    with bwd.watching_triton():
        y.backward(dy)
    return dict(forward=fwd.total, backward=bwd.total,
                forward_ops=dict(sorted({**fwd.aten, **fwd.triton}.items())),
                backward_ops=dict(sorted({**bwd.aten, **bwd.triton}.items())))


def _step(model, opt, ids) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, out.loss.item()


def step_times(steps: int, warmup: int) -> dict:
    """Eager and compiled steps alternate, one of each per round, so that both see the same machine load
    (other work on a shared 2-core machine moves single timings by 2x and more)."""
    import torch._dynamo.utils

    cfg = BailingMoeConfig.preset("tiny", expert_backend="torch")
    torch.manual_seed(0)
    models = {"eager": BailingMoeForCausalLM(cfg)}
    models["compiled"] = copy.deepcopy(models["eager"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in models["compiled"].model.layers:
        layer.compile()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    ids = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    for _ in range(warmup + steps):
        for k in models:
            t, loss = _step(models[k], opts[k], ids)
            times[k].append(t)
            losses[k].append(loss)
    out = {k: dict(first_step_s=round(times[k][0], 3), median_step_ms=round(1e3 * statistics.median(times[k][warmup:]), 2),
                   losses=[round(v, 6) for v in losses[k]]) for k in models}
    out["compiled"]["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    ratios = [a / b for a, b in zip(times["eager"][warmup:], times["compiled"][warmup:])]
    out["speedup_median_of_pairs"] = round(statistics.median(ratios), 3)
    out["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    out["setup"] = dict(preset="tiny", rows=4, seq_len=256, backend="torch", dtype="fp32", optimizer="AdamW",
                        steps_timed=steps, warmup=warmup, compiler="inductor (torch.compile default), each decoder block",
                        order="eager and compiled steps alternate")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="benchmarks/compile_and_launches_cpu.json", help="result file (updated in place)")
    p.add_argument("--label", default="after", help="the column these results go under (default: after)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps, compilation among them (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--skip-steps", action="store_true", help="launch counts only")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = dict(commit=_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, device=platform.processor() or platform.machine(), threads=a.threads)
    rows = {}
    for backend in ("triton", "torch"):
        for dtype in (torch.float32, torch.bfloat16):
            for part in ("experts", "block", "decoder layer"):
                for recompute in ((False, True) if backend == "triton" and dtype == torch.float32 else (False,)):
                    key = f"{backend} {str(dtype)[6:]} {part}" + (" recompute" if recompute else "")
                    try:
                        rows[key] = launches(backend, dtype, part, recompute)
                    except TypeError as e:  # a commit without the option
                        rows[key] = dict(skipped=str(e))
                    print(key, {k: v for k, v in rows[key].items() if not k.endswith("_ops")}, flush=True)
    result["launches_per_moe_layer"] = rows
    if not a.skip_steps:
        result["step_time"] = step_times(a.steps, a.warmup)
        st = result["step_time"]
        print(f"step time: eager {st['eager']['median_step_ms']} ms, compiled {st['compiled']['median_step_ms']} ms, "
              f"speedup (median of pairs) {st['speedup_median_of_pairs']} (first compiled step "
              f"{st['compiled']['first_step_s']} s; graph breaks {st['compiled']['graph_breaks']}), loss difference "
              f"{st['max_abs_loss_difference']:.2e}", flush=True)
    data = {}
    if os.path.exists(a.json):
        with open(a.json) as f:
            data = json.load(f)
    data[a.label] = result
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
