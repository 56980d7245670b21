"""python -m checkpoints_convert.merge_lora --base DIR --adapter DIR --out DIR [--dtype keep|bf16|fp32|fp16]
    [--shard-size 5GB] [--tokenizer DIR] [--template auto|bailing|bailing_v2] [--source-hf DIR]"""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert import _cli
from checkpoints_convert.peft import describe, merge_lora
from data.errors import run_cli
from data.template import TEMPLATES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.merge_lora",
        description="Merge a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, as "
                    "PEFT or lingmoe's trainer writes it) into its base model and write the merged model as a "
                    "Hugging Face bailing_moe checkpoint: every adapted weight becomes W + (B @ A) * alpha / r "
                    "(PEFT's merge_and_unload), computed in fp32 and rounded once. The base (HF or native) is "
                    "validated, the adapter is checked against it (every adapted module present, shapes), then "
                    "one tensor at a time is read, merged and streamed into the output shards; the output "
                    "directory appears only when complete. The base's other files (tokenizer, model code, "
                    "generation config) travel unchanged.",
        epilog="Exit status: 0 on success, 2 bad input, 3 a named file missing, 5 no space (message on stderr, "
               "no output left behind).")
    p.add_argument("--base", required=True, metavar="DIR", help="the base model the adapter was trained on (HF or native)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory (PEFT's format)")
    p.add_argument("--out", required=True, metavar="DIR", help="output: Hugging Face checkpoint directory (must not exist)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the tokenizer the adapter was trained with: written beside the weights with the chat "
                        "template of data/template.py and a generation_config.json")
    p.add_argument("--source-hf", metavar="DIR",
                   help="an HF directory whose model code (*.py), license and generation config should travel")
    p.add_argument("--template", default="auto", choices=("auto", *TEMPLATES),
                   help="with --tokenizer: the chat template written beside the weights (default auto: bailing_v2 "
                        "for a Ling 2.0 base, bailing otherwise)")
    _cli.add_common(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    spec = merge_lora(a.base, a.adapter, a.out, a.dtype, a.shard_size, progress=not a.quiet, tokenizer=a.tokenizer,
                      source_hf=a.source_hf, template=a.template)
    print(f"merged {a.adapter} ({describe(spec)}) into {a.base} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
