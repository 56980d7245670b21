"""Peak memory of checkpoint conversion at Ling-Lite's full widths: the numbers docs/checkpoints.md quotes.

    python benchmarks/convert_memory.py --layers 2 4 --json benchmarks/convert_memory_cpu.json

For each layer count it writes a synthetic HF checkpoint with Ling-Lite's widths
(checkpoints_convert.make_synthetic, input shards of at most 2 GB), converts it HF -> native and
native -> HF, and verifies the round trip, each command in its own process under /usr/bin/time -v,
whose "Maximum resident set size" is recorded with the wall time. The largest single layer's size is
recorded beside it: a streaming converter must peak near the largest tensor it holds, whatever the
number of layers. The baseline is a process that only imports the converter. Everything is written
under --workdir (about 3.4 GB for 2 layers, 5.7 GB for 4) and deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: peak RSS in bytes and wall seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"command": " ".join(["python", *cmd[1:]]), "peak_rss_bytes": kb * 1024,
            "wall_s": round(wall, 2), "stdout_tail": p.stdout.strip()[-300:]}


def largest_layer_bytes(layers: int) -> int:
    import torch

    from checkpoints_convert import adapter
    from moe.config import BailingMoeConfig

    cfg = BailingMoeConfig.preset("ling-lite", num_hidden_layers=layers)
    per_layer: dict[str, int] = {}
    for name, shape in adapter.native_shapes(cfg).items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            n = 1
            for d in shape:
                n *= d
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + n * torch.bfloat16.itemsize
    return max(per_layer.values())


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/convert_memory.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts to convert (default: 2 4)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "convert_memory_cpu.json"),
                   help="where to write the results (default: benchmarks/convert_memory_cpu.json)")
    p.add_argument("--workdir", default="", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    from trainer.tools.kernel_bench import run_metadata
    import torch

    work = args.workdir or tempfile.mkdtemp(prefix="lingmoe-convert-")
    py = sys.executable
    rows = []
    try:
        baseline = timed([py, "-c", "import checkpoints_convert.hf_to_native, checkpoints_convert.checkpoint, "
                                    "moe.model, tqdm"])
        for n in args.layers:
            hf, native, back = (os.path.join(work, f"{k}{n}") for k in ("hf", "native", "back"))
            made = timed([py, "-m", "checkpoints_convert.make_synthetic", "--out", hf, "--layers", str(n),
                          "--shard-size", "2GB", "--quiet"])
            row = {"layers": n, "checkpoint_bytes": dir_bytes(hf), "largest_layer_bytes": largest_layer_bytes(n),
                   "make_synthetic": made,
                   "hf_to_native": timed([py, "-m", "checkpoints_convert.hf_to_native", "--hf", hf, "--out", native,
                                          "--quiet"]),
                   "native_to_hf": timed([py, "-m", "checkpoints_convert.native_to_hf", "--native", native,
                                          "--out", back, "--quiet"]),
                   "verify": timed([py, "-m", "checkpoints_convert.verify", hf, back])}
            rows.append(row)
            print(f"{n} layers, {row['checkpoint_bytes'] / 1e9:.2f} GB: hf_to_native "
                  f"{row['hf_to_native']['peak_rss_bytes'] / 1e9:.2f} GB, native_to_hf "
                  f"{row['native_to_hf']['peak_rss_bytes'] / 1e9:.2f} GB, verify "
                  f"{row['verify']['peak_rss_bytes'] / 1e9:.2f} GB (largest layer "
                  f"{row['largest_layer_bytes'] / 1e9:.2f} GB)", flush=True)
            for d in (hf, native, back):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {**run_metadata(torch.device("cpu")), "command": "python benchmarks/convert_memory.py "
              + " ".join(sys.argv[1:] if argv is None else argv), "baseline_import": baseline, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
