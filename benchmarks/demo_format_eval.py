"""The SFT and DPO demos and their format-error check, recorded: benchmarks/demo_format_eval.json.

    python benchmarks/demo_format_eval.py [--out-dir runs/demo_format_eval] [--json benchmarks/demo_format_eval.json]

Runs, each in its own process, exactly the README's demo commands (with the run directories under
--out-dir): the tiny SFT demo, DPO with the NLL term on chosen answers (the DPO script's default),
plain sigmoid DPO (--dpo.nll_coef 0), then `python -m trainer.tools.evaluate --suite demo` on the three
models (200 fresh demo prompts, greedy). Records the commands, the SFT loss at the first and last
step, each run's wall time and the evaluation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd: list[str], threads: int) -> float:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/demo_format_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/demo_format_eval", help="run directories (default %(default)s)")
    p.add_argument("--json", default="benchmarks/demo_format_eval.json", help="result file (default %(default)s)")
    p.add_argument("-n", type=int, default=200, help="evaluation prompts (default 200)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every step (default 2)")
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from trainer.tools.evaluate import git_state

    commit = git_state()
    py = sys.executable
    d = {k: os.path.join(a.out_dir, k) for k in ("sft", "dpo", "dpo_plain")}
    for v in d.values():
        if os.path.exists(v):
            raise SystemExit(f"error: {v} exists; choose another --out-dir or remove it (runs resume otherwise)")
    cmds = {
        "sft": [py, "trainer/sft.py", "--output-dir", d["sft"], "--train.progress", "false"],
        "dpo": [py, "trainer/dpo.py", "--model.init_from", os.path.join(d["sft"], "hf"), "--output-dir", d["dpo"],
                "--train.progress", "false", "--train.log_every", "25"],
        "dpo_plain": [py, "trainer/dpo.py", "--model.init_from", os.path.join(d["sft"], "hf"), "--dpo.nll_coef", "0",
                      "--output-dir", d["dpo_plain"], "--train.progress", "false", "--train.log_every", "25"],
    }
    seconds = {k: round(sh(c, a.threads), 1) for k, c in cmds.items()}
    eval_json = os.path.join(a.out_dir, "evaluate.json")
    ev_cmd = [py, "-m", "trainer.tools.evaluate", "--suite", "demo", "-n", str(a.n), "--threads", str(a.threads),
              "--name", "sft", "--name", "dpo_plain", "--name", "dpo", "--model", os.path.join(d["sft"], "hf"),
              "--model", os.path.join(d["dpo_plain"], "hf"), "--model", os.path.join(d["dpo"], "hf"),
              "--json", eval_json]
    seconds["evaluate"] = round(sh(ev_cmd, a.threads), 1)
    with open(os.path.join(d["sft"], "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    with open(eval_json) as f:
        ev = json.load(f)
    record = {"commit": commit, "date": datetime.date.today().isoformat(),
              "device": f"CPU {platform.machine()} ({os.cpu_count()} cores), {a.threads} threads",
              "commands": [" ".join(["python"] + c[1:]) for c in list(cmds.values()) + [ev_cmd]],
              "seconds": seconds,
              "sft_loss": {"step": [steps[0]["step"], steps[-1]["step"]],
                           "loss": [round(steps[0]["loss"], 3), round(steps[-1]["loss"], 3)]},
              "prompts": ev["prompts"], "n": ev["n"], "max_new_tokens": ev["max_new_tokens"], "decoding": ev["decoding"],
              "results": ev["results"]}
    with open(a.json, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    for name, r in ev["results"].items():
        print(f"{name:<10} format errors {r['with_format_errors']}/{r['samples']} ({r['format_error_rate']:.1%}), "
              f"accuracy {r['accuracy']:.1%}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
