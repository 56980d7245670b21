"""python -m checkpoints_convert.native_to_hf --native DIR --out DIR [--shard-size 5GB] [--dtype keep|bf16|fp32|fp16]"""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert import _cli
from checkpoints_convert.checkpoint import convert


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.native_to_hf",
        description="Convert a lingmoe-native checkpoint into a Hugging Face bailing_moe checkpoint as the "
                    "published ones are laid out: config.json (model_type bailing_moe, architectures, auto_map "
                    "for modeling_bailing_moe.py), model-0000i-of-0000N.safetensors shards and "
                    "model.safetensors.index.json. Stacked experts are split one tensor at a time and shards "
                    "are streamed to disk; the output directory appears only when complete.",
        epilog="Exit status: 0 on success, 2 on any error (message on stderr, no output left behind).")
    p.add_argument("--native", required=True, metavar="DIR", help="input: native checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output: Hugging Face checkpoint directory (must not exist)")
    _cli.add_common(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    convert(args.native, args.out, "hf", args.shard_size, args.dtype, expect="native", progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
