"""python -m checkpoints_convert.hf_to_native --hf DIR --out DIR [--dtype keep|bf16|fp32|fp16] [--shard-size 5GB]"""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert import _cli
from checkpoints_convert.checkpoint import convert
from data.errors import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.hf_to_native",
        description="Convert a Hugging Face bailing_moe checkpoint (config.json + safetensors shards) into "
                    "lingmoe's native layout (routed experts stacked per layer). The input is validated "
                    "completely first; tensors are then read one at a time and output shards are streamed "
                    "to disk, so memory stays near one layer's experts. The output directory appears only "
                    "when the conversion succeeded.",
        epilog="Exit status: 0 on success, 2 on any error (message on stderr, no output left behind).")
    p.add_argument("--hf", required=True, metavar="DIR", help="input: Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output: native checkpoint directory (must not exist)")
    _cli.add_common(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    convert(args.hf, args.out, "native", args.shard_size, args.dtype, expect="hf", progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
