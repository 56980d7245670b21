"""Lazy reading and shard-by-shard writing of safetensors checkpoints, and load_hf / save_hf.

Reading goes through ``safe_open`` one tensor at a time; writing fills one output shard at a time
into a temporary directory beside the target, renamed into place only when everything succeeded,
so a failure never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints_convert import adapter
from moe.config import BailingMoeConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or does not match its config."""


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not m:
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def parse_dtype(text: str | None) -> torch.dtype | None:
    """'bf16' | 'fp32' | 'fp16' | 'keep'/None (keep the stored dtype)."""
    if text is None or text == "keep":
        return None
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; choose from {sorted(DTYPES)} or 'keep'")
    return DTYPES[text]


class SafetensorsReader:
    """Name -> tensor, read lazily from a directory of (possibly sharded) safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory")
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif os.path.exists(os.path.join(self.path, SINGLE_NAME)):
            self.weight_map = {}
            self._open(SINGLE_NAME)
            self.weight_map = {k: SINGLE_NAME for k in self._handles[SINGLE_NAME].keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        for fname in sorted(set(self.weight_map.values())):
            if not os.path.exists(os.path.join(self.path, fname)):
                raise CheckpointError(f"{os.path.join(self.path, fname)}: shard named in {INDEX_NAME} is missing")

    _handles: dict

    def _open(self, fname: str):
        if not hasattr(self, "_stack"):
            self._stack, self._handles = ExitStack(), {}
        if fname not in self._handles:
            full = os.path.join(self.path, fname)
            try:
                self._handles[fname] = self._stack.enter_context(safe_open(full, framework="pt"))
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise CheckpointError(f"{full}: cannot read safetensors file ({e})") from None
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        fname = self.weight_map[name]
        h = self._open(fname)
        if name not in h.keys():
            raise CheckpointError(f"{os.path.join(self.path, fname)}: index names tensor {name!r} but the file lacks it")
        try:
            return h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: tensor {name!r} unreadable, "
                                  f"file truncated? ({e})") from None

    def close(self):
        if hasattr(self, "_stack"):
            self._stack.close()
            self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes named tensors into shards of at most ``max_shard_bytes`` as they fill, then an index.

    Files are written under ``tmp_dir``; ``finish()`` names them model-0000i-of-0000N.safetensors
    once N is known and writes model.safetensors.index.json.
    """

    def __init__(self, tmp_dir: str, max_shard_bytes: int, metadata: dict | None = None):
        self.dir, self.max = tmp_dir, max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self.flush()
        # Own contiguous storage: views of a stacked tensor would otherwise share (and save) it all.
        self.pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self.pending_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        idx = len(self.shards)
        save_file(self.pending, os.path.join(self.dir, f"shard-{idx:05d}.tmp"), metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f"shard-{i:05d}.tmp"), os.path.join(self.dir, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return weight_map


class AtomicDir:
    """A temporary directory beside ``target`` that becomes ``target`` on success, vanishes on failure."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = os.path.abspath(os.fspath(target))
        if os.path.exists(self.target) and not overwrite:
            raise CheckpointError(f"{self.target}: output directory already exists (choose another or remove it)")
        self.overwrite = overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.target) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.target) and self.overwrite:
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)
        return False


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def load_hf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
            **config_overrides):
    """Build a BailingMoeForCausalLM from an HF bailing_moe directory (config.json + safetensors)."""
    from moe.model import BailingMoeForCausalLM

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    cfg = BailingMoeConfig.from_hf(path, **config_overrides)
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    shapes = adapter.native_shapes(cfg)
    sd = {}
    with SafetensorsReader(path) as reader:
        expected = set(adapter.hf_shapes(cfg))
        present = set(reader.keys())
        missing, unexpected = sorted(expected - present), sorted(present - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path}: checkpoint does not match config.json: missing {missing[:20]}"
                                  f"{' ...' if len(missing) > 20 else ''}, unexpected {unexpected[:20]}"
                                  f"{' ...' if len(unexpected) > 20 else ''}")
        for name, shape in shapes.items():
            t = adapter.native_from_hf(name, reader.get, cfg)
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, config.json implies {shape}")
            sd[name] = _cast(t, dtype).to(device)
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.word_embeddings.weight
    return model


def save_hf(model, path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | str | None = None,
            overwrite: bool = False) -> None:
    """Write ``model`` (a BailingMoeForCausalLM) as an HF bailing_moe checkpoint, atomically."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    cfg: BailingMoeConfig = model.config
    state = model.state_dict()
    write_hf_from_native(((n, state[n]) for n in adapter.native_shapes(cfg)), cfg, path, shard_size, dtype, overwrite)


def write_hf_from_native(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: BailingMoeConfig,
                         path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | None = None,
                         overwrite: bool = False, on_tensor=None) -> None:
    """Stream native tensors into an HF checkpoint directory (used by save_hf and the CLIs)."""
    hf_cfg = cfg.to_hf()
    stored = dtype
    if stored is None:
        first = None
    with AtomicDir(path, overwrite) as tmp:
        writer = ShardWriter(tmp, parse_size(shard_size))
        for name, t in named_tensors:
            if stored is None and first is None and t.is_floating_point():
                first = t.dtype
            for hf_name, piece in adapter.hf_from_native(name, t, cfg):
                writer.add(hf_name, _cast(piece, dtype))
            if on_tensor is not None:
                on_tensor(name, t)
        writer.finish()
        out_dtype = stored or first
        if out_dtype is not None:
            hf_cfg["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
