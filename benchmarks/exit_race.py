"""How often a two-rank gloo process aborts at exit ("terminate called without an active exception"),
with and without releasing the process group first, under CPU load.

The mechanism (tests/test_process_exit.py has the explanation): gloo's worker threads live as long as
the process-group object; a worker that frees a finished collective's tensors after the interpreter
began finalizing is ended by CPython inside a noexcept destructor, and the process aborts.

Two experiments, each repeated --runs times with --load busy processes beside it:
  miniature  a 2-rank program: our init_distributed, a DTensor op (so DTensor's caches hold the mesh),
             20 broadcast_object_list calls, then either plain destroy_process_group ("held": the group
             outlives it, as before the fix) or parallel.shutdown_distributed ("released");
  trainer    `torchrun --nproc_per_node=2 trainer/sft.py` on a tiny model, as shipped: a run counts as
             failed if the launcher exits non-zero, and the fallback (os._exit) is counted apart.

    python benchmarks/exit_race.py --runs 40 --json benchmarks/exit_race_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

MINIATURE = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor
from trainer import parallel
info = parallel.init_distributed("cpu")
(distribute_tensor(torch.ones(4, 4), info.mesh, [Shard(0)]) * 2).sum()
for i in range(20):
    out = [i, None]
    dist.broadcast_object_list(out, src=0)
if sys.argv[1] == "held":
    dist.destroy_process_group()
else:
    del info
    assert parallel.shutdown_distributed()
"""

TINY = ["--model.overrides", "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
        "intermediate_size: 64, moe_intermediate_size: 16, num_experts: 4, num_experts_per_tok: 2}",
        "--train.progress", "false", "--data.seq_len", "32", "--train.device", "cpu", "--data.synthetic", "true",
        "--train.steps", "4"]


def torchrun(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40, help="repetitions of each variant (default 40)")
    p.add_argument("--load", type=int, default=1, help="busy-looping processes started beside the runs (default 1)")
    p.add_argument("--only", choices=["miniature", "trainer"], help="run one experiment only (default both)")
    p.add_argument("--json", default="", help="write the counts here")
    a = p.parse_args(argv)

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prog = pathlib.Path(tmp, "race.py")
            prog.write_text(MINIATURE)
            variants = []
            if a.only in (None, "miniature"):
                variants += [("miniature", "held"), ("miniature", "released")]
            if a.only in (None, "trainer"):
                variants += [("trainer", "as shipped")]
            for experiment, variant in variants:
                aborted = failed = fallback = 0
                t0 = time.time()
                for i in range(a.runs):
                    if experiment == "miniature":
                        r = torchrun([str(prog), variant], cwd=str(ROOT))
                    else:
                        r = torchrun([str(ROOT / "trainer" / "sft.py"), *TINY, "--output-dir", f"{tmp}/run{i}"], cwd=tmp)
                    out = r.stdout + r.stderr
                    failed += r.returncode != 0
                    aborted += "terminate called without an active exception" in out
                    fallback += "still referenced at exit" in out
                row = {"experiment": experiment, "variant": variant, "runs": a.runs, "failed": failed,
                       "aborted_at_exit": aborted, "os_exit_fallback": fallback, "seconds": round(time.time() - t0, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        for b in busy:
            b.kill()
    if a.json:
        import torch

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        rec = {"what": "aborts at process exit of two-rank gloo runs", "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} cores, CPU only", "busy_processes": a.load, "torch": torch.__version__,
               "python": platform.python_version(), "commit": commit,
               "date": datetime.date.today().isoformat(), "rows": rows}
        pathlib.Path(a.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
