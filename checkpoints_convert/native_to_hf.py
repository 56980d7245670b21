"""python -m checkpoints_convert.native_to_hf --native DIR --out DIR [--shard-size 5GB] [--dtype keep|bf16|fp32|fp16]
    [--tokenizer DIR] [--source-hf DIR]"""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert import _cli
from checkpoints_convert.checkpoint import convert
from data.errors import run_cli
from data.template import TEMPLATES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.native_to_hf",
        description="Convert a lingmoe-native checkpoint into a Hugging Face bailing_moe checkpoint as the "
                    "published ones are laid out: config.json (model_type bailing_moe, architectures, auto_map "
                    "for modeling_bailing_moe.py), model-0000i-of-0000N.safetensors shards and "
                    "model.safetensors.index.json. Stacked experts are split one tensor at a time and shards "
                    "are streamed to disk; the output directory appears only when complete. The native "
                    "directory's other files (tokenizer, model code, generation config) travel unchanged; "
                    "auto_map is left out of config.json when the model code is not there.",
        epilog="Exit status: 0 on success, 2 on any error (message on stderr, no output left behind).")
    p.add_argument("--native", required=True, metavar="DIR", help="input: native checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output: Hugging Face checkpoint directory (must not exist)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the tokenizer the model was trained with: written beside the weights with the chat "
                        "template of data/template.py and a generation_config.json")
    p.add_argument("--source-hf", metavar="DIR",
                   help="the HF directory the model was trained from: its model code (*.py), license and "
                        "generation_config.json fields travel")
    p.add_argument("--template", choices=("auto", *TEMPLATES), default="auto",
                   help="with --tokenizer: the chat template written (default auto: bailing_v2 for a Ling 2.0 "
                        "model, bailing otherwise)")
    _cli.add_common(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    convert(args.native, args.out, "hf", args.shard_size, args.dtype, expect="native", progress=not args.quiet,
            tokenizer=args.tokenizer, source_hf=args.source_hf, template=args.template)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
