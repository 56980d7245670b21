"""Export a training checkpoint (torch.distributed.checkpoint) to a Hugging Face bailing_moe directory.

    python -m checkpoints_convert.dcp_to_hf CKPT OUT [--dtype bf16|fp32|keep] [--shard-size 5GB]

CKPT is a step directory written by the trainer (it holds model_config.json), or a run's
checkpoints/ directory (the latest complete step is taken). Tensors are read from the sharded
checkpoint one decoder layer at a time, in a single process with no process group, so exporting
never holds more than a layer plus the output shard being filled.
"""
from __future__ import annotations

import argparse
import sys

import torch

from checkpoints_convert import _cli
from checkpoints_convert.checkpoint import write_hf_from_native
from checkpoints_convert.dcp_layout import iter_native_tensors, read_model_config, resolve_step_dir, stored_dtypes
from checkpoints_convert.io import parse_dtype


def dcp_to_hf(ckpt: str, out: str, dtype: torch.dtype | str = "auto", shard_size: str = "5GB",
              overwrite: bool = False, progress: bool = False) -> str:
    """dtype: "auto" = the model config's torch_dtype (bf16 for Ling-Lite, not the fp32 master
    weights), "keep" = as stored, or a dtype / its name."""
    ckpt = resolve_step_dir(ckpt)
    cfg = read_model_config(ckpt)
    if dtype == "auto":
        dtype = parse_dtype(cfg.torch_dtype)
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    write_hf_from_native(iter_native_tensors(ckpt, cfg), cfg, out, shard_size, dtype, overwrite,
                         source_dtypes=stored_dtypes(ckpt, cfg), progress=progress)
    return ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_convert.dcp_to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 on success, 2 on any error (message on stderr, no output left behind).")
    p.add_argument("ckpt", help="a step_N checkpoint directory, or a checkpoints/ directory (latest step)")
    p.add_argument("out", help="output HF directory (must not exist)")
    _cli.add_common(p)
    p.set_defaults(dtype="auto")
    for action in p._actions:
        if action.dest == "dtype":
            action.choices = ["auto", "keep", "bf16", "fp32", "fp16"]
            action.help = ("dtype of the tensors written: auto (default: the model config's torch_dtype, bf16 for "
                           "Ling-Lite, not the fp32 master weights), keep (as stored), bf16, fp32 or fp16")
    a = p.parse_args(argv)
    src = dcp_to_hf(a.ckpt, a.out, a.dtype, a.shard_size, progress=not a.quiet)
    print(f"exported {src} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
