"""The two ceilings of the GPU in hand, measured once per session (METHOD: use these, not datasheets).

    python benchmarks/ceilings.py --json ceilings.json

dense: a bf16 matrix product (torch.matmul, cuBLAS) of --size^3 on random data, TFLOP/s;
copy:  a device-to-device copy of --copy-gib GiB, counting bytes read plus bytes written, TB/s.
Each is the median of --reps timed runs (CUDA events) after warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn, reps, warmup=3):
    from trainer.tools.kernel_bench import _time

    return _time(fn, reps, warmup, torch.device("cuda"))[0]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/ceilings.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="matrix size n of the n x n x n product (default: 8192)")
    p.add_argument("--copy-gib", type=float, default=4.0, help="GiB copied device to device (default: 4)")
    p.add_argument("--reps", type=int, default=20, help="timed runs, median reported (default: 20)")
    p.add_argument("--json", default="", help="write the result here (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    n = args.size
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, args.reps)
    dense = 2 * n ** 3 / ms / 1e9
    elems = int(args.copy_gib * 2 ** 30) // 4
    src = torch.randn(elems, device="cuda")
    dst = torch.empty_like(src)
    ms_copy = _median_ms(lambda: dst.copy_(src), args.reps)
    copy_tb_s = 2 * src.numel() * 4 / (ms_copy * 1e-3) / 1e12
    from trainer.tools.kernel_bench import run_metadata

    res = dict(run_metadata(torch.device("cuda")), dense_bf16_tflops=dense, dense_size=n, dense_ms=ms,
               copy_tb_s=copy_tb_s, copy_gib=args.copy_gib, copy_ms=ms_copy)
    print(f"dense bf16 {n}^3: {dense:.0f} TFLOP/s ({ms:.3f} ms); device copy {args.copy_gib:g} GiB: "
          f"{copy_tb_s:.2f} TB/s read+write ({ms_copy:.3f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
