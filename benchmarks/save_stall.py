"""How long checkpoint saves stop training: ordinary saves against --checkpoint.async true.

    python benchmarks/save_stall.py --steps 49 --save-every 8 --warmup 3 --threads 0 1   # CPU, the committed run
    python benchmarks/save_stall.py                        # CPU: a 59M-parameter model (0.7 GB checkpoint)
    python benchmarks/save_stall.py --preset ling-lite --layers 1 --save-every 4 --steps 11   # GPU

Each mode runs the real trainer (trainer/sft.py) in a fresh process on synthetic rows, saving every
--save-every steps (no final save, no export). Reported per mode and per save:

- call_s: what the trainer logs for the save call that training waits for: the whole save (sync),
  or the copy to host memory (async); the first async save also allocates the host buffers (pinned
  on CUDA), later ones reuse them;
- wait_s: how long the trainer later waited for that background write (at the next save or the end;
  0 when it had ended by then);
- stall_ms, from metrics.jsonl, which stamps each step's row with the wall time right after the step
  and before its save, so that the save of step S lies in the interval between rows S and S+1: that
  interval minus the median interval of the steps before the first save. It includes the step-to-step
  noise of a shared machine, which call_s does not;
- during_write_ms: the median interval of the next --during steps (a background write competes with
  them for the cores), and after_ms the median of the steps after those (a save that left the process
  slower for good, as the second OpenMP team once did, would show there).

Results go to a JSON file with the device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CPU_OVERRIDES = {"hidden_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "intermediate_size": 1536, "moe_intermediate_size": 384, "num_experts": 16}


def intervals_ms(rows: list[dict]) -> list[float]:
    """Wall time per step: the first row's step time, then the time between consecutive rows."""
    out = [1e3 * rows[0]["step_time_s"]]
    out += [1e3 * (b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]
    return out


def stalls(intervals: list[float], save_steps: list[int], warmup: int, during: int) -> dict:
    """Steps are 1-based: intervals[i] is step i+1's, and the save of step S lies in step S+1's interval.
    The baseline is the median interval after the warm-up and before the first save."""
    base = statistics.median(intervals[warmup:save_steps[0]])
    per = []
    for k, s in enumerate(save_steps):
        end = save_steps[k + 1] if k + 1 < len(save_steps) else len(intervals)
        writing = intervals[s + 1:min(s + 1 + during, end)]
        later = intervals[s + 1 + during:end]
        per.append({"step": s, "step_with_save_ms": intervals[s], "stall_ms": intervals[s] - base,
                    "during_write_ms": statistics.median(writing) if writing else None,
                    "after_ms": statistics.median(later) if later else None})
    return {"step_ms": base, "saves": per}


def save_times(log: str, mode: str, n: int) -> list[dict]:
    """call_s and wait_s of each of the n saves, from the trainer's log lines (in order)."""
    if mode == "sync":
        calls = [float(x) for x in re.findall(r"saved checkpoint \S+ \(([\d.]+) s\)", log)]
        waits = [0.0] * len(calls)
    else:
        calls = [float(x) for x in re.findall(r"state copied in ([\d.]+) s", log)]
        waits = [float(x) for x in re.findall(r"waited ([\d.]+) s", log)]
    return [{"call_s": c, "wait_s": w} for c, w in zip(calls[:n], waits[:n])]


def run_mode(mode: str, args, workdir: str, threads: int = 0) -> dict:
    out_dir = os.path.join(workdir, f"{mode}-{threads}")
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = json.loads(args.overrides)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "sft.py"), "--model.preset", args.preset,
           "--model.overrides", json.dumps(overrides), "--data.synthetic", "true",
           "--data.synthetic_docs_per_row", "1", "--data.seq_len", str(args.seq_len),
           "--data.micro_batch_size", str(args.micro_batch), "--train.global_batch_size", str(args.global_batch),
           "--train.steps", str(args.steps), "--train.progress", "false", "--checkpoint.every", str(args.save_every),
           "--checkpoint.keep_last", "1", "--checkpoint.save_final", "false", "--checkpoint.export_hf", "false",
           "--checkpoint.async", "true" if mode == "async" else "false", "--output-dir", out_dir, *args.trainer_args]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print(f"[{mode}, {threads or 'default'} threads] " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"ok": False, "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    iv = intervals_ms(rows)
    save_steps = list(range(args.save_every, args.steps, args.save_every))
    log = "\n".join(line for line in proc.stderr.splitlines() if "checkpoint" in line and "step_" in line)
    ckpts = os.path.join(out_dir, "checkpoints")
    last = os.path.join(ckpts, sorted(os.listdir(ckpts))[-1]) if os.path.isdir(ckpts) and os.listdir(ckpts) else None
    size = sum(os.path.getsize(os.path.join(last, n)) for n in os.listdir(last)) if last else 0
    st = stalls(iv, save_steps, args.warmup, args.during)
    for per, times in zip(st["saves"], save_times(log, mode, len(save_steps))):
        per.update(times)
    row = {"ok": True, "interval_ms": [round(x, 1) for x in iv], "checkpoint_bytes": size,
           "loss_last": rows[-1]["loss"], **st, "save_log": re.sub(r"/\S+/checkpoints/", "", log).splitlines()}
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
    p = argparse.ArgumentParser(prog="python benchmarks/save_stall.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny, widened by --overrides)")
    p.add_argument("--overrides", default=json.dumps(CPU_OVERRIDES) if not gpu else "{}",
                   help="model config overrides as JSON (default on CPU: a 59M-parameter widening of tiny)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the preset's or --overrides')")
    p.add_argument("--seq-len", type=int, default=64 if not gpu else 4096)
    p.add_argument("--micro-batch", type=int, default=2 if not gpu else 1)
    p.add_argument("--global-batch", type=int, default=2 if not gpu else 8)
    p.add_argument("--steps", type=int, default=13, help="optimizer steps in all (default 13)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the baseline (default 2)")
    p.add_argument("--save-every", type=int, default=6, help="save after every N steps (default 6: steps 6, 12)")
    p.add_argument("--during", type=int, default=3,
                   help="steps after the save's that are counted as 'during the write' (default 3)")
    p.add_argument("--threads", type=int, nargs="+", default=[0],
                   help="OMP_NUM_THREADS of the trainer, one run of each mode per value; 0 = torch's default "
                        "(all cores). Fewer threads than cores leave the writing thread a core, as on a GPU "
                        "node whose host mostly waits for the GPU (default: 0)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "save_stall_cpu.json"))
    p.add_argument("--workdir", default="", help="where the run directories go (default: a temporary directory)")
    args = p.parse_args(argv)
    args.trainer_args = trainer_args
    if not args.warmup < args.save_every < args.steps:
        p.error("need --warmup < --save-every < --steps")
    workdir = args.workdir or tempfile.mkdtemp(prefix="lingmoe-save-stall-")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    load_before = os.getloadavg()  # others' work on a shared machine moves every interval: recorded
    for threads in args.threads:
        for mode in args.modes:
            res = run_mode(mode, args, workdir, threads)
            if not res["ok"]:
                print(f"[{mode}] failed:\n{res['log_tail']}", file=sys.stderr)
            rows.append({"mode": mode, "threads": threads, **res})
    from moe.config import BailingMoeConfig
    from trainer.tools.kernel_bench import run_metadata

    overrides = json.loads(args.overrides)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    result = {**run_metadata(torch.device("cuda" if gpu else "cpu")),
              "command": "python benchmarks/save_stall.py " + " ".join(argv),
              "trainer_args": trainer_args, "preset": args.preset, "overrides": overrides,
              "params": BailingMoeConfig.preset(args.preset, **overrides).num_params(),
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "global_batch": args.global_batch,
              "steps": args.steps, "warmup": args.warmup, "save_every": args.save_every,
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()}, "rows": rows}
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.json)
    print(format_table(result))
    print(f"wrote {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def format_table(result: dict) -> str:
    lines = [f"checkpoint save stall on {result['device']}: {result['params'] / 1e6:.1f}M parameters, a save every "
             f"{result['save_every']} steps",
             "| mode | threads | save after step | checkpoint GB | save call s (trainer's log) | waited later s | step ms "
             "| step with the save ms | stall ms | during the write ms | after ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r['mode']} | {r.get('threads') or 'all'} | failed | | | | | | | | |")
            continue
        for s in r["saves"]:
            lines.append(f"| {r['mode']} | {r.get('threads') or 'all'} | {s['step']} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                         f"{num(s.get('call_s'), '.2f')} | {num(s.get('wait_s'), '.2f')} | {r['step_ms']:.0f} | "
                         f"{s['step_with_save_ms']:.0f} | {s['stall_ms']:.0f} | {num(s['during_write_ms'], '.0f')} | "
                         f"{num(s['after_ms'], '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
