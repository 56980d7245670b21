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

A LoRA run's checkpoint holds its adapters only (lora.json names the base): the export is then the
base model merged with them (checkpoints_convert.peft), streaming the base one tensor at a time,
after checking that the base is the one the adapters were trained on (its fingerprint).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

from checkpoints_convert import _cli, dcp_read, export_files
from checkpoints_convert.checkpoint import open_checkpoint, write_hf_from_native
from checkpoints_convert.dcp_layout import (RUN_CONFIG, iter_native_tensors, layer_groups, read_lora_record,
                                            read_model_config, read_model_tensors, resolve_step_dir, stored_dtypes)
from checkpoints_convert.io import CheckpointError, MissingCheckpointError, fingerprint_weights, parse_dtype
from checkpoints_convert.peft import adapter_shapes, write_adapter, write_merged
from data.errors import run_cli
from data.template import TEMPLATES, resolve_template
from moe.lora import LoraSpec


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

    def extra_files(tmp):
        export_files.write_export_files(tmp, model_dir=source_hf, tokenizer_dir=tokenizer,
                                        template=template,
                                        model_max_length=cfg.max_position_embeddings)
    lora = read_lora_record(ckpt)
    if lora is not None:  # the adapters only: the base's tensors come from the base
        spec, base = lora_base(ckpt, lora)
        with open_checkpoint(base) as base_ckpt:
            write_merged(base_ckpt, adapter_reader(ckpt, base_ckpt.cfg, spec), spec, out, dtype, shard_size, progress,
                         overwrite, extra_files)
        return ckpt
    source_dtypes = stored_dtypes(ckpt, cfg)  # every tensor the config implies there, at its shape
    write_hf_from_native(iter_native_tensors(ckpt, cfg), cfg, out, shard_size, dtype, overwrite,
                         source_dtypes=source_dtypes, progress=progress, extra_files=extra_files)
    return ckpt


def lora_base(step_dir: str, record: dict) -> tuple[LoraSpec, str]:
    """A LoRA step's spec and base directory, the base checked to be the one it was trained on."""
    s = record["spec"]
    spec = LoraSpec(rank=s["rank"], alpha=s["alpha"], dropout=s["dropout"], targets=tuple(s["targets"]),
                    train_router=s["train_router"])
    base = record.get("base") or ""
    if not os.path.isdir(base):
        raise MissingCheckpointError(f"{base}: the base model of the LoRA checkpoint {step_dir} is not there "
                                     f"(relative paths resolve from the current directory)")
    if record.get("base_fingerprint") and fingerprint_weights(base) != record["base_fingerprint"]:
        raise CheckpointError(f"{base} changed since the LoRA checkpoint {step_dir} was trained on it (its files' "
                              f"fingerprint differs): adapters apply only to the weights they were trained with")
    return spec, base


def adapter_reader(step_dir: str, cfg, spec: LoraSpec):
    """``get(name)`` of a LoRA step's trained tensors, read one decoder layer's at a time."""
    groups = {n: names for names in layer_groups(adapter_shapes(cfg, spec)) for n in names}
    held: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in held:
            held.clear()
            held.update(read_model_tensors(step_dir, groups[name]))
        return held[name].float()
    return get


def export_adapter(ckpt: str, out: str, overwrite: bool = False) -> str:
    """A LoRA step's adapters as a PEFT adapter directory at ``out`` (base_model_name_or_path: the base)."""
    ckpt = resolve_step_dir(ckpt)
    record = read_lora_record(ckpt)
    if record is None:
        raise CheckpointError(f"{ckpt}: not a LoRA checkpoint (no lora.json): it holds the whole model")
    spec, base = lora_base(ckpt, record)
    cfg = read_model_config(ckpt)
    get = adapter_reader(ckpt, cfg, spec)
    write_adapter(out, ((n, get(n)) for n in adapter_shapes(cfg, spec)), cfg, spec, base, overwrite=overwrite)
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
