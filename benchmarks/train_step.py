"""Time whole training steps (forward, backward, optimizer) per expert backend: tokens/s and MFU.

    python benchmarks/train_step.py                        # GPU: Ling-Lite width, as many layers as fit
    python benchmarks/train_step.py --backends torch loop  # CPU: the tiny preset, a quick check
    python benchmarks/train_step.py --layers 4 -- --model.activation_checkpointing true

Each backend runs the real trainer (trainer/sft.py) in a fresh process on synthetic rows of one causal
document each (so SDPA takes its causal kernel and the attention FLOPs counted are the ones done).
Options after ``--`` go to trainer/sft.py unchanged. The first --warmup steps (compilation,
autotuning, allocator growth) are dropped and the median of the rest is reported.

One checkpoint is saved mid-run (--save-at, default half-way through the timed steps) and the median
step time before and after it is reported: a save once made every later step ~2x slower (a second
OpenMP team started by gloo's gather, trainer/checkpoint.py), and this keeps it from coming back
unseen. The checkpoint is deleted with the run directory.

MFU = (6 x active parameters without the embedding + causal attention) FLOPs per token x tokens/s
over the datasheet dense bf16 peak (trainer.loop.flops_per_token and DATASHEET_PEAK_TFLOPS: 989
TFLOP/s for H100/H200 SXM, or --peak-tflops); with --ceiling-tflops (the dense matmul rate
benchmarks/ceilings.py measured on the GPU in hand), mfu_vs_measured_peak divides by that instead.
Results go to a JSON file with the device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BACKEND_NAMES = {"triton": "triton", "torch": "grouped_mm", "loop": "loop"}  # trainer name -> kernel-bench impl


def model_config(preset: str, layers: int):
    import dataclasses

    from moe.config import BailingMoeConfig

    cfg = BailingMoeConfig.preset(preset)
    return dataclasses.replace(cfg, num_hidden_layers=layers)


def layers_that_fit(preset: str, seq_len: int, micro_batch: int, free_bytes: int, state_bytes: int = 18) -> int:
    """A first guess at the deepest model whose training state and activations fit in ``free_bytes``
    of one GPU: ``state_bytes`` per parameter (fp32 master, fp32 gradient, two AdamW moments: 16; and
    the bf16 copy the model computes from without FSDP, parallel.one_rank plain: 18), ~90 KB of saved
    activations per token and layer (bf16, no activation checkpointing) and the logits' fp32 copies.
    The caller backs off by one layer per out-of-memory failure, so the guess may be a little high."""
    one, two = model_config(preset, 1), model_config(preset, 2)
    per_layer = state_bytes * (two.num_params() - one.num_params()) + 90_000 * seq_len * micro_batch
    fixed = state_bytes * (one.num_params() - (two.num_params() - one.num_params()))
    fixed += 3 * 4 * one.vocab_size * seq_len * micro_batch + (2 << 30)  # logits, their grad, CUDA context
    return max(1, int((0.92 * free_bytes - fixed) // per_layer))


def save_step(save_at: str, warmup: int, steps: int) -> int:
    """The step after which the mid-run checkpoint is saved (0 = none): 'auto' = half-way through the timed steps."""
    if save_at == "auto":
        return warmup + (steps + 1) // 2 if steps >= 2 else 0
    try:
        n = int(save_at)
    except ValueError:
        raise ValueError(f"--save-at must be a step number or 'auto', got {save_at!r}") from None
    if n < 0 or n >= warmup + steps:
        raise ValueError(f"--save-at must lie in [0, {warmup + steps}), got {n}")
    return n


def split_at_save(step_ms: list[float], warmup: int, save_at: int) -> dict:
    """Median step time of the timed steps up to the save and of those after it."""
    if not save_at:
        return {}
    before, after = step_ms[warmup:save_at], step_ms[save_at:]
    if not before or not after:
        return {}
    b, a = statistics.median(before), statistics.median(after)
    return {"ms_before_save": b, "ms_after_save": a, "after_save_over_before": a / b}


def profile_outputs(json_path: str, backend: str) -> str:
    """Where --profile copies a backend's Chrome trace: beside the results JSON."""
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return f"{stem}-{backend}-trace.json.gz"


def run_backend(backend: str, args, layers: int, trainer_args: list[str], workdir: str, save_at: int) -> dict:
    out_dir = os.path.join(workdir, f"{backend}-L{layers}")
    shutil.rmtree(out_dir, ignore_errors=True)
    n_steps = args.warmup + args.steps + (1 if args.profile else 0)  # the profiled step comes after the timed ones
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "sft.py"),
           "--model.preset", args.preset, "--model.overrides",
           json.dumps({"num_hidden_layers": layers, "attn_implementation": args.attn}),
           "--model.expert_backend", backend,
           "--data.synthetic", "true", "--data.synthetic_docs_per_row", str(args.docs_per_row),
           "--data.seq_len", str(args.seq_len), "--data.micro_batch_size", str(args.micro_batch),
           "--train.global_batch_size", str(args.global_batch), "--train.steps", str(n_steps),
           "--train.progress", "false", "--checkpoint.every", str(save_at), "--checkpoint.keep_last", "1",
           "--checkpoint.resume", "false", "--checkpoint.save_final", "false", "--checkpoint.export_hf", "false",
           "--parallel.one_rank", args.one_rank, "--output-dir", out_dir]
    if args.peak_tflops:
        cmd += ["--train.peak_tflops", str(args.peak_tflops)]
    if args.ceiling_tflops:
        cmd += ["--train.ceiling_tflops", str(args.ceiling_tflops)]
    if args.profile:
        cmd += ["--train.profile_step", str(n_steps)]
    cmd += trainer_args
    print(f"[{backend}] {layers} layer(s): " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        oom = "out of memory" in log.lower()
        return {"ok": False, "oom": oom, "log_tail": log[-3000:]}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    steps = [s for s in steps if "tokens_per_s" in s]
    profiled = steps[args.warmup + args.steps:]  # under the profiler: slower, kept out of every time below
    steps = steps[:args.warmup + args.steps]
    timed = steps[args.warmup:]
    if not timed:
        return {"ok": False, "oom": False, "log_tail": f"no timed steps in {out_dir}/metrics.jsonl"}
    med = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    row = {"ok": True, "step_ms": 1e3 * med("step_time_s"), "tokens_per_s": med("tokens_per_s"),
           "step_ms_all": [round(1e3 * s["step_time_s"], 2) for s in steps],
           "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
           "memory_gib": max(s.get("memory_gib", 0.0) for s in steps), "save_at": save_at,
           **split_at_save([1e3 * s["step_time_s"] for s in steps], args.warmup, save_at)}
    for key in ("mfu", "mfu_vs_measured_peak"):
        if all(key in s for s in timed):
            row[key] = med(key)
    if args.profile:
        summary = os.path.join(out_dir, "profile", f"step{n_steps}-rank0.json")
        if profiled and os.path.exists(summary):
            with open(summary) as f:
                row["profile"] = json.load(f)
            trace = os.path.join(out_dir, "profile", f"step{n_steps}-trace.json.gz")
            if os.path.exists(trace):
                dest = profile_outputs(args.json, backend)
                shutil.copyfile(trace, dest)
                row["profile"]["trace"] = os.path.basename(dest)
        else:
            row["profile"] = {"error": f"no profile summary at {summary}"}
    if not args.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python benchmarks/train_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", choices=sorted(BACKEND_NAMES),
                   default=["triton", "torch", "loop"] if gpu else ["torch", "loop"],
                   help="expert backends to time, each in its own trainer process (default: triton torch loop "
                        "on GPU; torch loop on CPU, where triton would run under the slow interpreter)")
    p.add_argument("--preset", default="ling-lite" if gpu else "tiny",
                   help="model preset giving the widths (default: ling-lite on GPU, tiny on CPU)")
    p.add_argument("--layers", default="auto",
                   help="decoder layers, or 'auto': as many as fit on the GPU, backing off one layer per "
                        "out-of-memory failure (default: auto; on CPU auto means 2)")
    p.add_argument("--seq-len", type=int, default=4096 if gpu else 256, help="tokens per row (default: 4096 "
                   "on GPU, 256 on CPU)")
    p.add_argument("--micro-batch", type=int, default=1 if gpu else 2,
                   help="rows per forward/backward (default: 1 on GPU, 2 on CPU)")
    p.add_argument("--global-batch", type=int, default=8 if gpu else 2,
                   help="rows per optimizer step, accumulated in micro-batches: the AdamW update reads and "
                        "writes ~16 bytes per parameter, which one 4096-token micro-batch cannot amortize "
                        "(default: 8 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=10 if gpu else 3, help="timed steps; the median is reported "
                   "(default: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=3 if gpu else 1, help="untimed first steps (default: 3 on GPU, "
                   "1 on CPU)")
    p.add_argument("--docs-per-row", type=int, default=1, choices=[1, 2],
                   help="documents packed in each synthetic row: 1 = one causal sequence (SDPA's causal kernel), "
                        "2 = two documents with a document mask (dense boolean mask under SDPA, block-sparse under "
                        "flex) (default: 1)")
    p.add_argument("--attn", choices=["auto", "sdpa", "flex"], default="auto",
                   help="attention implementation: auto (the trainer's default: flex for packed rows on CUDA, else "
                        "SDPA), sdpa, or flex (flex_attention, compiled on CUDA) (default: auto)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak per device for MFU; 0 = the datasheet figure the trainer knows for the GPU "
                        "(989 for H100/H200 SXM), and no MFU elsewhere (default: 0)")
    p.add_argument("--ceiling-tflops", type=float, default=0.0,
                   help="dense bf16 matmul rate measured on this device (benchmarks/ceilings.py's dense_bf16_tflops); "
                        "when set, rows also report mfu_vs_measured_peak (default: 0, not reported)")
    p.add_argument("--one-rank", choices=["plain", "fsdp"], default="plain",
                   help="the trainer's parallel.one_rank: 'plain' (no FSDP, bf16 copies of fp32 master weights) "
                        "or 'fsdp' (FSDP2 at world size 1, which casts and copies every parameter per micro-batch) "
                        "(default: plain)")
    p.add_argument("--save-at", default="auto",
                   help="save a checkpoint after this step and report the median step time before and after it; "
                        "'auto' = half-way through the timed steps, 0 = no save (default: auto)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "train_step.json"),
                   help="where to write the results (default: benchmarks/train_step.json)")
    p.add_argument("--workdir", default="", help="where the trainer's run directories go (default: a temporary "
                   "directory)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's directory (metrics.jsonl, config)")
    p.add_argument("--profile", action="store_true",
                   help="run one more step after the timed ones under torch.profiler (trainer option "
                        "--train.profile_step): its summary (GPU busy share, top kernels, host waits) goes into "
                        "the row as 'profile', its Chrome trace beside --json as <name>-<backend>-trace.json.gz")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        save_at = save_step(args.save_at, args.warmup, args.steps)
    except ValueError as e:
        p.error(str(e))
    if args.global_batch < 1 or args.micro_batch < 1 or args.global_batch % args.micro_batch:
        p.error(f"--global-batch ({args.global_batch}) must be a positive multiple of --micro-batch "
                f"({args.micro_batch})")

    from trainer.loop import flops_per_token

    if args.layers == "auto":
        if gpu:
            free, _ = torch.cuda.mem_get_info()
            layers = layers_that_fit(args.preset, args.seq_len, args.micro_batch, free,
                                     state_bytes=18 if args.one_rank == "plain" else 16)
        else:
            layers = 2
    else:
        try:
            layers = int(args.layers)
        except ValueError:
            p.error(f"--layers must be an integer or 'auto', got {args.layers!r}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="lingmoe-train-step-")
    os.makedirs(workdir, exist_ok=True)
    # The mid-run checkpoint holds fp32 weights and two AdamW moments: skip it where the disk cannot.
    ckpt_bytes = 12 * model_config(args.preset, layers).num_params()
    if save_at and shutil.disk_usage(workdir).free < 1.5 * ckpt_bytes:
        print(f"note: {workdir} has less than 1.5 x {ckpt_bytes / 1e9:.1f} GB free: no mid-run save", flush=True)
        save_at = 0
    rows = []
    for backend in args.backends:
        n = layers
        while True:
            res = run_backend(backend, args, n, trainer_args, workdir, save_at)
            if res["ok"] or not (res["oom"] and args.layers == "auto" and n > 1):
                break
            print(f"[{backend}] out of memory at {n} layers; trying {n - 1}", flush=True)
            n -= 1
        if not res["ok"]:
            print(f"[{backend}] failed:\n{res['log_tail']}", file=sys.stderr)
            rows.append({"backend": backend, "impl": BACKEND_NAMES[backend], "layers": n, "ok": False,
                         "attn": args.attn, "seq_len": args.seq_len, "docs_per_row": args.docs_per_row,
                         "error": res["log_tail"][-1500:]})
            continue
        if args.layers == "auto" and n < layers:
            layers = n  # later backends start from the depth that fitted
        cfg = model_config(args.preset, n)
        fpt = flops_per_token(cfg, args.seq_len)
        row = {"backend": backend, "impl": BACKEND_NAMES[backend], "pass": "train_step", "layers": n,
               "seq_len": args.seq_len, "docs_per_row": args.docs_per_row, "attn": args.attn,
               "micro_batch": args.micro_batch, "global_batch": args.global_batch, "one_rank": args.one_rank,
               "T": args.seq_len * args.global_batch,
               "E": cfg.num_experts, "K": cfg.num_experts_per_tok, "H": cfg.hidden_size,
               "I": cfg.moe_intermediate_size, "dtype": "bf16" if gpu else "fp32",
               "active_params": cfg.num_params(active_only=True), "flops_per_token": fpt,
               "ms": res["step_ms"], "tokens_per_s": res["tokens_per_s"],
               "tflops": fpt * res["tokens_per_s"] / 1e12, **{k: v for k, v in res.items() if k != "step_ms"}}
        rows.append(row)

    from trainer.tools.kernel_bench import run_metadata

    result = {
        **run_metadata(torch.device("cuda" if gpu else "cpu")),
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "trainer_args": trainer_args, "preset": args.preset, "warmup": args.warmup, "steps": args.steps,
        "one_rank": args.one_rank, "micro_batch": args.micro_batch,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.json)
    print(format_table(result))
    print(f"wrote {args.json}")
    if not args.workdir and not args.keep_runs:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def format_table(result: dict) -> str:
    lines = [f"training step on {result['device']} (torch {result['torch']}, triton {result['triton']}), "
             f"median of {result['steps']} steps after {result['warmup']} warm-up; micro-batch "
             f"{result.get('micro_batch', '?')} rows, one rank {result.get('one_rank', 'fsdp')}",
             "| backend | attention | layers | seq x docs | tokens/step | step ms | ms before / after save | "
             "tokens/s | model TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r['backend']} | {r.get('attn', '')} | {r['layers']} | failed | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        around = (f"{r['ms_before_save']:.1f} / {r['ms_after_save']:.1f}" if "ms_before_save" in r else "-")
        lines.append(f"| {r['backend']} | {r['attn']} | {r['layers']} | {r['seq_len']} x {r['docs_per_row']} | "
                     f"{r['T']} | {r['ms']:.1f} | {around} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops']:.3g} | {mfu} | {r['memory_gib']:.1f} |")
    for r in result["rows"]:
        prof = r.get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines.append(f"profile ({r['backend']}): {prof['error']}")
            continue
        busy = (f", GPU busy {prof['device_busy_ms']:.1f} ms ({100 * (1 - prof['device_idle_share']):.0f}%)"
                if prof.get("device_busy_ms") is not None else "")
        waits = sum(w["calls"] for w in prof.get("host_waits", []))
        top = "; ".join(f"{k['name'][:60]} {k['ms']:.1f} ms" for k in prof.get("top_kernels", [])[:5])
        lines.append(f"profile ({r['backend']}): step {prof['wall_ms']:.1f} ms{busy}, {prof['launches']} launches, "
                     f"{waits} host waits" + (f"; top kernels: {top}" if top else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
