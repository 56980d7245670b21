"""Export a training checkpoint (torch.distributed.checkpoint) to a Hugging Face bailing_moe directory.

    python -m checkpoints_convert.dcp_to_hf CKPT OUT [--dtype bf16|fp32|keep] [--shard-size 5GB]

CKPT is a step directory written by the trainer (it holds model_config.json), or a run's
checkpoints/ directory (the latest complete step is taken). Tensors are read from the sharded
checkpoint one decoder layer at a time, in a single process with no process group, so exporting
never holds more than a layer plus the output shard being filled.

Beside the weights go the run's tokenizer with the chat template it trained with, a
generation_config.json and, when the run started from an HF directory, that directory's model code
(see checkpoints_convert/export_files.py). Which tokenizer and source the run used is read from
the step's config.yaml (data.tokenizer, model.init_from; relative paths resolve from the current
directory); --tokenizer and --source-hf override it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

from checkpoints_convert import _cli, dcp_read, export_files
from checkpoints_convert.checkpoint import write_hf_from_native
from checkpoints_convert.dcp_layout import (RUN_CONFIG, iter_native_tensors, read_model_config, resolve_step_dir,
                                            stored_dtypes)
from checkpoints_convert.io import CheckpointError, parse_dtype
from data.errors import run_cli
from data.template import TEMPLATES, resolve_template


def run_sources(step_dir: str, family: str = "bailing_moe") -> dict:
    """{tokenizer, source_hf, template} of the run that wrote ``step_dir``, from its config.yaml
    (export_files.export_sources; nothing when the step has no config.yaml)."""
    path = os.path.join(step_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return {"tokenizer": None, "source_hf": None, "template": resolve_template("auto", family)}
    try:
        with open(path) as f:
            run = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({e})") from None
    return export_files.export_sources(run, family)


def dcp_to_hf(ckpt: str, out: str, dtype: torch.dtype | str = "auto", shard_size: str = "5GB",
              overwrite: bool = False, progress: bool = False, tokenizer: str | None = "auto",
              source_hf: str | None = "auto", template: str = "auto") -> str:
    """dtype: "auto" = the model config's torch_dtype (bf16 for Ling-Lite, not the fp32 master
    weights), "keep" = as stored, or a dtype / its name. tokenizer / source_hf: "auto" = as the
    run's config.yaml says, None = none."""
    ckpt = resolve_step_dir(ckpt)
    cfg = read_model_config(ckpt)
    if dtype == "auto":
        dtype = parse_dtype(cfg.torch_dtype)
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    run = run_sources(ckpt, cfg.family)
    template = run["template"] if template == "auto" else resolve_template(template, cfg.family)
    tokenizer = run["tokenizer"] if tokenizer == "auto" else tokenizer
    source_hf = run["source_hf"] if source_hf == "auto" else source_hf
    tokenizer, source_hf = tokenizer or None, source_hf or None  # '' = none
    export_files.check_sources(source_hf, tokenizer)  # before any weight is written
    dcp_read.check_storage(ckpt, dcp_read.read_metadata(ckpt))  # every data file there, and whole in size
    source_dtypes = stored_dtypes(ckpt, cfg)  # and every tensor the config implies, at its shape

    def extra_files(tmp):
        export_files.write_export_files(tmp, model_dir=source_hf, tokenizer_dir=tokenizer,
                                        template=template,
                                        model_max_length=cfg.max_position_embeddings)
    write_hf_from_native(iter_native_tensors(ckpt, cfg), cfg, out, shard_size, dtype, overwrite,
                         source_dtypes=source_dtypes, progress=progress, extra_files=extra_files)
    return ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_convert.dcp_to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 on success, 2 on any error (message on stderr, no output left behind).")
    p.add_argument("ckpt", help="a step_N checkpoint directory, or a checkpoints/ directory (latest step)")
    p.add_argument("out", help="output HF directory (must not exist)")
    _cli.add_common(p, dtype_default="auto", dtype_choices=("auto", "keep", "bf16", "fp32", "fp16"),
                    dtype_help="dtype of the tensors written: auto (default: the model config's torch_dtype, bf16 "
                               "for Ling-Lite, not the fp32 master weights), keep (as stored), bf16, fp32 or fp16")
    p.add_argument("--tokenizer", metavar="DIR", default="auto",
                   help="the tokenizer the run trained with (default: as the step's config.yaml says; '' = none)")
    p.add_argument("--source-hf", metavar="DIR", default="auto",
                   help="the HF directory the run started from, whose model code and generation config travel "
                        "(default: model.init_from of the step's config.yaml; '' = none)")
    p.add_argument("--template", default="auto", choices=("auto", *TEMPLATES),
                   help="the chat template written beside the weights (default: as the run trained, data.template; "
                        "its 'auto' is bailing_v2 for Ling 2.0 models, bailing otherwise)")
    a = p.parse_args(argv)
    src = dcp_to_hf(a.ckpt, a.out, a.dtype, a.shard_size, progress=not a.quiet, tokenizer=a.tokenizer,
                    source_hf=a.source_hf, template=a.template)
    print(f"exported {src} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
