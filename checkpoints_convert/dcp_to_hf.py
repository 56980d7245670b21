"""Export a training checkpoint (torch.distributed.checkpoint) to a Hugging Face bailing_moe directory.

    python -m checkpoints_convert.dcp_to_hf CKPT OUT [--dtype bf16|fp32|keep] [--shard-size 5GB]

CKPT is a step directory written by the trainer (it holds model_config.json), or a run's
checkpoints/ directory (the latest complete step is taken). Tensors are read from the sharded
checkpoint one decoder layer at a time, in a single process with no process group, so exporting
never holds more than a layer plus the output shard being filled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import torch

from checkpoints_convert import _cli, adapter
from checkpoints_convert.checkpoint import write_hf_from_native
from checkpoints_convert.io import CheckpointError, parse_dtype
from moe.config import BailingMoeConfig

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _resolve(ckpt: str) -> str:
    if os.path.exists(os.path.join(ckpt, "model_config.json")):
        return ckpt
    from trainer.checkpoint import latest_checkpoint  # a run's checkpoints/ directory

    latest = latest_checkpoint(ckpt)
    if latest is None:
        raise CheckpointError(f"{ckpt}: neither a checkpoint step directory (no model_config.json) "
                              f"nor a directory holding complete step_* checkpoints")
    return latest


def _metadata(ckpt: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(ckpt).read_metadata().state_dict_metadata


def stored_dtypes(ckpt: str, cfg: BailingMoeConfig) -> dict[str, torch.dtype]:
    meta = _metadata(ckpt)
    out = {}
    for n in adapter.native_shapes(cfg):
        if f"model.{n}" not in meta:
            raise CheckpointError(f"{ckpt}: checkpoint has no tensor {n!r}")
        out[n] = meta[f"model.{n}"].properties.dtype
    return out


def iter_native_tensors(ckpt: str, cfg: BailingMoeConfig):
    """Yield (native_name, tensor) in model order, loading one layer's tensors per DCP read."""
    import torch.distributed.checkpoint as dcp

    meta = _metadata(ckpt)
    groups: list[list[str]] = []
    last = None
    for name in adapter.native_shapes(cfg):
        m = _LAYER_RE.match(name)
        key = m.group(1) if m else name
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(name)
    for names in groups:
        want = {}
        for n in names:
            k = f"model.{n}"
            if k not in meta:
                raise CheckpointError(f"{ckpt}: checkpoint has no tensor {n!r}")
            md = meta[k]
            want[n] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": want}, checkpoint_id=ckpt, no_dist=True)
        yield from want.items()


def dcp_to_hf(ckpt: str, out: str, dtype: torch.dtype | str = "auto", shard_size: str = "5GB",
              overwrite: bool = False, progress: bool = False) -> str:
    """dtype: "auto" = the model config's torch_dtype (bf16 for Ling-Lite, not the fp32 master
    weights), "keep" = as stored, or a dtype / its name."""
    ckpt = _resolve(ckpt)
    with open(os.path.join(ckpt, "model_config.json")) as f:
        cfg = BailingMoeConfig.from_dict(json.load(f))
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
