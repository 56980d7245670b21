"""What the conversion CLIs share: the size and dtype options (errors become exits in data.errors.run_cli)."""
from __future__ import annotations

import argparse

DTYPE_HELP = ("dtype of the floating tensors written: bf16, fp32, fp16, or keep (default: keep, i.e. each "
              "tensor in the dtype it is stored in; the conversion is then bit-exact)")
SHARD_HELP = ("largest output shard, e.g. 5GB, 500MB, 2GiB (default: %(default)s); a tensor bigger than this "
              "gets a shard of its own. Shards are streamed to disk, so this does not change memory use")


def add_common(p: argparse.ArgumentParser, shard_default: str = "5GB", dtype_default: str = "keep",
               dtype_choices: tuple[str, ...] = ("keep", "bf16", "fp32", "fp16"), dtype_help: str = DTYPE_HELP) -> None:
    p.add_argument("--shard-size", default=shard_default, metavar="SIZE", help=SHARD_HELP)
    p.add_argument("--dtype", default=dtype_default, choices=list(dtype_choices), help=dtype_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
