"""The CPU SFT demo as a user runs it (`python trainer/sft.py`), timed: the numbers README.md quotes.

    python benchmarks/sft_demo.py --json benchmarks/sft_demo_cpu.json

Runs the demo with its defaults (tiny preset, 200 steps, a checkpoint every 100 steps, the HF export
at the end) into a temporary directory and records the wall time of the whole command, the loss of
the first and last steps, and the median step time before and after the step-100 checkpoint (a save
once made every later step ~2x slower: trainer/checkpoint.py). The machine's load average at the
start and the end is recorded too: another busy process on a 2-core machine slows the steps.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def summarize(steps: list[dict], save_every: int) -> dict:
    """Loss at the ends and median step time before and after the first checkpoint."""
    t = [s["step_time_s"] for s in steps]
    out = {"steps": len(steps), "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
           "step_s_median": statistics.median(t[1:])}
    if 0 < save_every < len(steps):
        out.update(step_s_before_save=statistics.median(t[1:save_every]),
                   step_s_after_save=statistics.median(t[save_every:]))
        out["after_save_over_before"] = out["step_s_after_save"] / out["step_s_before_save"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/sft_demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "sft_demo_cpu.json"),
                   help="where to write the result (default: benchmarks/sft_demo_cpu.json)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the demo, each recorded (default: 1)")
    args = p.parse_args(argv)
    from trainer.tools.kernel_bench import run_metadata
    import torch

    runs = []
    for _ in range(args.repeat):
        out = tempfile.mkdtemp(prefix="lingmoe-sft-demo-")
        try:
            load_start = os.getloadavg()
            t0 = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "trainer", "sft.py"), "--train.progress",
                                   "false", "--output-dir", out], cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"the demo failed:\n{proc.stderr[-3000:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f]
            with open(os.path.join(out, "config.yaml")) as f:
                import yaml
                every = yaml.safe_load(f)["checkpoint"]["every"]
            run = {"wall_s": round(wall, 1), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
                   "exported_hf": os.path.exists(os.path.join(out, "hf", "config.json")), **summarize(steps, every)}
            runs.append(run)
            print(json.dumps(run), flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    result = {**run_metadata(torch.device("cpu")), "command": "python benchmarks/sft_demo.py "
              + " ".join(sys.argv[1:] if argv is None else argv), "demo_command": "python trainer/sft.py",
              "runs": runs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
