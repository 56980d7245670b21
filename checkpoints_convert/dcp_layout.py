"""The on-disk layout of a training run's checkpoints, and reading the model out of one.

The trainer writes (trainer/checkpoint.py) and the exporter reads (dcp_to_hf.py) the same layout,
so it is named once, here, below both:

    <output-dir>/checkpoints/step_00000100/
      .metadata, __*.distcp     model and optimizer (torch.distributed.checkpoint), sharded by rank
      trainer.json              step, schedule position, consecutive bad steps (same on all ranks) and
                                save_id, new at every save (what an export names, checkpoint_identity)
      rank_00000.pt ...         per-rank state: data loader position, RNG
      model_config.json         the model's BailingMoeConfig
      config.yaml               the resolved training configuration
      lora.json                 LoRA runs only: the adapters' spec and the base model they adapt;
                                the model state then holds the trained tensors only (adapters, and
                                the routers when trained): the base weights are the base's
      COMPLETE                  written last: a directory without it is not a checkpoint

Reading needs no process group: tensors come out of the sharded files one decoder layer at a time.
Everything is read as data only (checkpoints_convert.dcp_read): no pickle from a checkpoint runs code.
"""
from __future__ import annotations

import json
import os
import re

import torch

from checkpoints_convert import adapter, dcp_read
from checkpoints_convert.io import MODEL_ST_DTYPES, TORCH_DTYPES, CheckpointError, dtype_name
from moe.config import BailingMoeConfig

TRAINER_STATE = "trainer.json"
MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "config.yaml"
LORA_RECORD = "lora.json"
COMPLETE = "COMPLETE"
MODEL_DTYPES = {TORCH_DTYPES[st] for st in MODEL_ST_DTYPES}
_STEP_RE = re.compile(r"^step_(\d{8})$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """Completed checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.exists(os.path.join(root, name, COMPLETE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(root: str) -> str | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def resolve_step_dir(path: str) -> str:
    """A step directory as given, or the latest complete one inside a run's checkpoints/ directory."""
    if os.path.exists(os.path.join(path, MODEL_CONFIG)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint step directory (no {MODEL_CONFIG}) "
                              f"nor a directory holding complete step_* checkpoints")
    return latest


def checkpoint_identity(step_dir: str) -> str:
    """A name for this very save of ``step_dir``: its directory name and the save_id its trainer.json
    records, so a step saved again (the same name, other weights) has another identity. Checkpoints
    written before save_id existed fall back on COMPLETE's modification time."""
    try:
        with open(os.path.join(step_dir, TRAINER_STATE)) as f:
            save_id = json.load(f).get("save_id")
    except (OSError, ValueError, AttributeError):
        save_id = None
    if save_id is None:
        save_id = f"mtime:{os.stat(os.path.join(step_dir, COMPLETE)).st_mtime_ns}"
    return f"{os.path.basename(os.path.normpath(step_dir))}:{save_id}"


def read_model_config(step_dir: str) -> BailingMoeConfig:
    with open(os.path.join(step_dir, MODEL_CONFIG)) as f:
        return BailingMoeConfig.from_dict(json.load(f))


def read_lora_record(step_dir: str) -> dict | None:
    """A LoRA run's record ({"spec": ..., "base": ..., "base_fingerprint": ...}), None for a full run."""
    path = os.path.join(step_dir, LORA_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise CheckpointError(f"{path}: not a LoRA record")
    return record


def read_model_tensors(step_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named model tensors of a checkpoint, whole, in one DCP read (data only)."""
    meta = _metadata(step_dir)
    want = {}
    for n in names:
        if f"model.{n}" not in meta:
            raise CheckpointError(f"{step_dir}: checkpoint has no tensor {n!r}")
        md = meta[f"model.{n}"]
        want[n] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp_read.load({"model": want}, step_dir, no_dist=True)
    return want


def _metadata(step_dir: str):
    return dcp_read.read_metadata(step_dir).state_dict_metadata


def stored_dtypes(step_dir: str, cfg: BailingMoeConfig) -> dict[str, torch.dtype]:
    """Each model tensor's stored dtype, after checking that the checkpoint holds every tensor
    ``cfg`` (its model_config.json) implies, at that shape: a config that does not describe the
    weights is named here, before anything is converted."""
    meta = _metadata(step_dir)
    out = {}
    config, where = os.path.join(step_dir, MODEL_CONFIG), os.path.join(step_dir, dcp_read.METADATA_NAME)
    for n, shape in adapter.native_shapes(cfg).items():
        if f"model.{n}" not in meta:
            raise CheckpointError(f"{step_dir}: checkpoint has no tensor {n!r}, which {config} implies; the config "
                                  f"does not describe these weights")
        stored = tuple(getattr(meta[f"model.{n}"], "size", ()))
        if stored != tuple(shape):
            raise CheckpointError(f"{config} implies {n} of shape {tuple(shape)}, but {where} stores "
                                  f"{stored}: the config does not describe these weights")
        out[n] = meta[f"model.{n}"].properties.dtype
    unusable = [f"{n} ({dtype_name(d)})" for n, d in out.items() if d not in MODEL_DTYPES]
    if unusable:
        raise CheckpointError(f"{step_dir}: tensors of a dtype the model cannot use: {', '.join(unusable[:20])}"
                              f"{' ...' if len(unusable) > 20 else ''}")
    return out


def layer_groups(names) -> list[list[str]]:
    """Names in runs of one decoder layer each (names outside the layers each on their own)."""
    groups: list[list[str]] = []
    last = None
    for name in names:
        m = _LAYER_RE.match(name)
        key = m.group(1) if m else name
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(name)
    return groups


def iter_native_tensors(step_dir: str, cfg: BailingMoeConfig):
    """Yield (native_name, tensor) in model order, loading one layer's tensors per DCP read."""
    meta = _metadata(step_dir)
    for names in layer_groups(adapter.native_shapes(cfg)):
        missing = [n for n in names if f"model.{n}" not in meta]
        if missing:
            raise CheckpointError(f"{step_dir}: checkpoint has no tensor {missing[0]!r}")
        yield from read_model_tensors(step_dir, names).items()
