"""python -m checkpoints_convert.make_synthetic --out DIR [--layers 2] [--layout hf|native]

Writes a checkpoint with Ling-Lite's full widths (hidden 2048, 64 experts of width 1408, 2 shared
experts, vocab 126464, bf16) but only --layers layers, filled with random numbers, one tensor at a
time through the same streaming writer as the converters. For measuring conversion memory and
speed without downloading the 33.6 GB model; about 1.16 GB per layer plus 1.04 GB of embeddings.
"""
from __future__ import annotations

import argparse
import sys

import torch

from checkpoints_convert import adapter
from checkpoints_convert.checkpoint import write_checkpoint
from moe.config import BailingMoeConfig
from data.errors import run_cli


def random_stream(cfg: BailingMoeConfig, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    for name, shape in adapter.native_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype)
        t.normal_(0.0, 0.02, generator=g)
        yield name, t
        del t


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m checkpoints_convert.make_synthetic",
                                description="Write a random full-width Ling-Lite checkpoint with few layers.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2; the real model has 28)")
    p.add_argument("--layout", choices=["hf", "native"], default="hf", help="checkpoint layout (default hf)")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE", help="largest shard (default 5GB)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the weights (default bf16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = BailingMoeConfig.preset("ling-lite", num_hidden_layers=args.layers,
                                  torch_dtype=str(dtype).removeprefix("torch."))
    write_checkpoint(random_stream(cfg, dtype, args.seed), cfg, args.out, args.layout, args.shard_size,
                     source_dtypes=dtype, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
