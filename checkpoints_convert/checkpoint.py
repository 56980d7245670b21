"""Checkpoints on disk, in either layout, seen as a stream of native tensors.

Two layouts, both a directory of sharded safetensors plus ``model.safetensors.index.json``:

* ``hf``: Hugging Face bailing_moe or bailing_moe_v2 (config.json with model_type "bailing_moe", or
  architectures BailingMoeV2ForCausalLM; one tensor per expert projection, e.g.
  ``model.layers.3.mlp.experts.17.up_proj.weight``).
* ``native``: lingmoe's own (config.json ``{"format": "lingmoe-native", "version": 1, "model": {...}}``,
  tensors under the model's own parameter names, routed experts stacked per layer).

``open_checkpoint`` validates a directory completely before anything reads tensor data (files present
and untruncated, index consistent, every expected tensor present and nothing else, shapes as the
config implies) and then yields native tensors one at a time. ``write_checkpoint`` writes such a
stream in either layout, shard by shard, atomically. The name map is ``adapter``'s alone.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping

import torch

from checkpoints_convert import adapter, export_files
from checkpoints_convert.io import (MODEL_ST_DTYPES, CheckpointError, MissingCheckpointError, SafetensorsReader,
                                    ShardWriter, cast, dtype_name, nbytes_of, parse_dtype, parse_size)
from data.files import OwnedTempDir
from data.template import resolve_template
from moe.config import BailingMoeConfig, ConfigError
from moe.model import BailingMoeForCausalLM

NATIVE_FORMAT = "lingmoe-native"
NATIVE_VERSION = 1
CONFIG_NAME = "config.json"
_MAX_LISTED = 50


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"({len(names)}): {shown}{more}"


def read_config(path: str | os.PathLike, **overrides) -> tuple[str, BailingMoeConfig]:
    """('hf' | 'native', config) of a checkpoint directory, from its config.json."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise MissingCheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(cfg_file):
        raise MissingCheckpointError(f"{cfg_file}: no such file (a checkpoint directory needs its config.json)")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    try:
        if raw.get("format") == NATIVE_FORMAT:
            if raw.get("version") != NATIVE_VERSION:
                raise CheckpointError(f"{cfg_file}: {NATIVE_FORMAT} version {raw.get('version')!r} is not "
                                      f"supported (this code reads version {NATIVE_VERSION})")
            if not isinstance(raw.get("model"), dict):
                raise CheckpointError(f"{cfg_file}: {NATIVE_FORMAT} config lacks its 'model' object")
            return "native", BailingMoeConfig.from_dict({**raw["model"], **overrides})
        return "hf", BailingMoeConfig.from_hf(raw, **overrides)
    except ConfigError as e:
        msg = str(e).removeprefix("<dict>: ")
        raise CheckpointError(f"{cfg_file}: {msg}") from None


def native_config(cfg: BailingMoeConfig, dtype: torch.dtype | None) -> dict:
    """The config.json of a native checkpoint."""
    model = cfg.to_dict()
    if dtype is not None:
        model["torch_dtype"] = dtype_name(dtype)
    return {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "model": model}


def hf_config(cfg: BailingMoeConfig, dtype: torch.dtype | None) -> dict:
    """The config.json of an HF checkpoint (model_type, architectures, auto_map as published)."""
    out = cfg.to_hf()
    if dtype is not None:
        out["torch_dtype"] = dtype_name(dtype)
        if "dtype" in out:  # transformers >= 4.56 writes this key instead; both must say the same
            out["dtype"] = dtype_name(dtype)
    return out


class Checkpoint:
    """A validated checkpoint directory (either layout) read as native tensors, lazily."""

    def __init__(self, path: str | os.PathLike, **overrides):
        self.path = os.fspath(path)
        self.kind, self.cfg = read_config(self.path, **overrides)
        self.config_file = os.path.join(self.path, CONFIG_NAME)
        # An expert bias the options turn on for a checkpoint that has none (a v1 model whose bias
        # training moves, say) starts at zero.
        self.zero_filled: set[str] = set()
        if self.cfg.moe_router_enable_expert_bias and not read_config(self.path)[1].moe_router_enable_expert_bias:
            self.zero_filled = {n for n in adapter.native_shapes(self.cfg) if adapter.keeps_fp32(n)}
        self.reader = SafetensorsReader(self.path)
        try:
            self._validate()
        except BaseException:
            self.reader.close()
            raise

    def _validate(self) -> None:
        r, cfg = self.reader, self.cfg
        r.check_files()
        expected = adapter.hf_shapes(cfg) if self.kind == "hf" else adapter.native_shapes(cfg)
        expected = {n: shape for n, shape in expected.items() if n not in self.zero_filled}
        present = set(r.keys())
        missing = [n for n in expected if n not in present]
        unexpected = sorted(present - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensors {_listed(missing)}")
            if unexpected:
                parts.append(f"unexpected tensors {_listed(unexpected)}")
            raise CheckpointError(f"{self.path}: tensors do not match {self.config_file}: " + "; ".join(parts))
        unusable = [f"{n} ({r.stored_dtype_name(n)}, in {r.file_of(n)})" for n in expected
                    if r.stored_dtype_name(n) not in MODEL_ST_DTYPES]
        if unusable:
            raise CheckpointError(f"{self.path}: tensors of a dtype the model cannot use {_listed(unusable)}; "
                                  f"weights must be one of {', '.join(MODEL_ST_DTYPES)} (fp8 checkpoints: "
                                  f"dequantize first)")
        for name, shape in expected.items():
            got = r.shape(name)
            if got != tuple(shape):
                raise CheckpointError(f"{r.file_of(name)}: tensor {name!r} has shape {list(got)} but "
                                      f"{self.config_file} implies {list(shape)}")
        # Stored dtype of each native tensor (the dtype shared by its HF pieces).
        self.dtypes: dict[str, torch.dtype] = {}
        for name in adapter.native_shapes(cfg):
            if name in self.zero_filled:
                self.dtypes[name] = torch.float32
                continue
            pieces = adapter.hf_names_for(name, cfg) if self.kind == "hf" else [name]
            kinds = {r.dtype(p) for p in pieces}
            if len(kinds) != 1:
                raise CheckpointError(f"{self.path}: the pieces of {name} mix dtypes "
                                      f"{sorted(dtype_name(k) for k in kinds)}")
            self.dtypes[name] = kinds.pop()

    @property
    def names(self) -> list[str]:
        """Native tensor names in model order."""
        return list(adapter.native_shapes(self.cfg))

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The most common floating dtype stored (what config.json's torch_dtype should say)."""
        floats = Counter(d for d in self.dtypes.values() if d.is_floating_point)
        return floats.most_common(1)[0][0] if floats else None

    def total_bytes(self, dtype: torch.dtype | None = None) -> int:
        shapes = adapter.native_shapes(self.cfg)
        return sum(nbytes_of(shapes[n], dtype if dtype is not None and d.is_floating_point else d)
                   for n, d in self.dtypes.items())

    def get_native(self, name: str, dtype: torch.dtype | None = None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One native tensor, cast piece by piece to ``dtype`` (None keeps the stored dtype).
        ``rows=(start, stop)`` reads only those rows of dim 0 (for stacked experts: those experts).
        The expert bias comes in fp32 whatever ``dtype`` says (adapter.keeps_fp32)."""
        if name in self.zero_filled:
            n = self.cfg.num_experts
            return torch.zeros(n if rows is None else rows[1] - rows[0], dtype=torch.float32)
        if self.kind == "native":
            return adapter.cast_for(name, self.reader.get(name, rows), dtype)
        return adapter.native_from_hf(name, lambda n, r=None: adapter.cast_for(n, self.reader.get(n, r), dtype),
                                      self.cfg, rows)

    def iter_native(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get_native(name, dtype)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str | os.PathLike, **overrides) -> Checkpoint:
    """Open and fully validate a checkpoint directory, HF or native (auto-detected from config.json)."""
    return Checkpoint(path, **overrides)


# ---------------------------------------------------------------------------------------------- write
def write_checkpoint(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: BailingMoeConfig,
                     path: str | os.PathLike, layout: str = "hf", shard_size: str | int = "5GB",
                     dtype: torch.dtype | str | None = None,
                     source_dtypes: Mapping[str, torch.dtype] | torch.dtype | None = None,
                     overwrite: bool = False, progress: bool = False,
                     extra_files: Callable[[str], None] | None = None) -> None:
    """Stream native tensors into a new checkpoint directory in ``layout`` 'hf' or 'native'.

    ``named_tensors`` yields (native_name, tensor) in ``adapter.native_shapes(cfg)`` order, each tensor
    whole (a layer's stacked experts at most); any iterator works (a model's state, another
    checkpoint, a distributed checkpoint being gathered). ``dtype`` casts floating tensors (None
    keeps them); to plan the shards before the first byte arrives the writer must know the dtypes
    it will get: ``source_dtypes`` (one dtype, or native name -> dtype; default config torch_dtype).
    Output shards are filled and closed one after another; nothing is kept in memory but the
    tensor being written. The directory appears only when complete: ``extra_files(tmp)`` writes
    what goes beside the weights (export_files) into it first. An HF config.json never keeps an
    ``auto_map`` entry whose module file is not there. Before anything is written the free space is
    checked (data.files.NoSpaceError, "needs X GB at PATH, Y GB free"); a write that still runs out
    of space raises NoSpaceError naming ``path`` and leaves nothing behind.
    """
    if layout not in ("hf", "native"):
        raise ValueError(f"layout must be 'hf' or 'native', not {layout!r}")
    dtype = parse_dtype(dtype)
    max_bytes = parse_size(shard_size)
    shapes = adapter.native_shapes(cfg)
    if source_dtypes is None:
        source_dtypes = parse_dtype(cfg.torch_dtype) if cfg.torch_dtype in ("bfloat16", "float32", "float16") \
            else torch.float32
    if isinstance(source_dtypes, torch.dtype):
        source_dtypes = dict.fromkeys(shapes, source_dtypes)
    out_dtypes = {n: (torch.float32 if adapter.keeps_fp32(n) else dtype
                      if dtype is not None and source_dtypes[n].is_floating_point else source_dtypes[n])
                  for n in shapes}
    entries = []
    for name in shapes:
        pieces = adapter.hf_shapes_for(name, cfg) if layout == "hf" else [(name, shapes[name])]
        entries += [(p, s, out_dtypes[name]) for p, s in pieces]
    floats = Counter(d for d in out_dtypes.values() if d.is_floating_point)
    config_dtype = floats.most_common(1)[0][0] if floats else None
    config = hf_config(cfg, config_dtype) if layout == "hf" else native_config(cfg, config_dtype)

    # Tensor bytes plus a generous allowance for headers, the index and config.json.
    nbytes = sum(nbytes_of(s, d) for _, s, d in entries) + 512 * len(entries) + (1 << 16)
    what = f"writing the {'HF' if layout == 'hf' else 'native'} checkpoint"
    bar = None
    with OwnedTempDir(path, replace=overwrite, nbytes=nbytes, what=what) as tmp:
        writer = ShardWriter(tmp, entries, max_bytes)
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=writer.total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                       desc=f"writing {os.path.basename(os.path.abspath(path))}")
            count = [0]

            def on_write(name, nbytes):
                count[0] += 1
                bar.update(nbytes)
                bar.set_postfix_str(f"{count[0]}/{len(entries)} tensors", refresh=False)
            writer.on_write = on_write
        try:
            seen = iter(shapes)
            for name, t in named_tensors:
                want = next(seen, None)
                if name != want:
                    raise CheckpointError(f"tensor {name!r} arrived where {want!r} was expected "
                                          f"(native tensors must come in adapter.native_shapes order)")
                if t.dtype != source_dtypes[name]:
                    raise CheckpointError(f"tensor {name!r} is {dtype_name(t.dtype)}, but the layout was planned "
                                          f"for {dtype_name(source_dtypes[name])} (pass source_dtypes)")
                if layout == "hf":
                    for hf_name, piece in adapter.hf_from_native(name, t, cfg):
                        writer.add(hf_name, adapter.cast_for(name, piece, dtype))
                    piece = None  # the last view would keep the whole stacked tensor alive
                else:
                    writer.add(name, adapter.cast_for(name, t, dtype))
                del t
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        if extra_files is not None:
            extra_files(tmp)
        if layout == "hf":
            export_files.drop_dangling_auto_map(tmp)


def convert(src: str | os.PathLike, out: str | os.PathLike, layout: str, shard_size: str | int = "5GB",
            dtype: torch.dtype | str | None = None, expect: str | None = None, progress: bool = False,
            tokenizer: str | None = None, source_hf: str | None = None, template: str = "auto") -> None:
    """Convert checkpoint ``src`` (validated first) into a new directory ``out`` in ``layout``.

    ``src``'s other files (tokenizer, model code, generation config, ...) travel unchanged;
    ``tokenizer`` (the tokenizer a run trained with) and ``source_hf`` (the HF directory the model
    came from) add what export_files.write_export_files writes for them, with chat ``template``
    ("auto": bailing_v2 for a Ling 2.0 model, else bailing)."""
    dtype = parse_dtype(dtype)
    parse_size(shard_size)
    if os.path.exists(out):
        raise CheckpointError(f"{os.path.abspath(out)}: output directory already exists (choose another or remove it)")
    export_files.check_sources(source_hf, tokenizer)
    with open_checkpoint(src) as ckpt:
        if expect is not None and ckpt.kind != expect:
            raise CheckpointError(f"{ckpt.config_file}: this is a {ckpt.kind} checkpoint, expected {expect}")
        write_checkpoint(ckpt.iter_native(dtype), ckpt.cfg, out, layout, shard_size, dtype,
                         source_dtypes={n: (torch.float32 if adapter.keeps_fp32(n) else dtype
                                            if dtype is not None and d.is_floating_point else d)
                                        for n, d in ckpt.dtypes.items()},
                         progress=progress,
                         extra_files=lambda tmp: export_files.write_export_files(
                             tmp, carry_from=os.fspath(src), model_dir=source_hf, tokenizer_dir=tokenizer,
                             model_max_length=ckpt.cfg.max_position_embeddings,
                             hf=layout == "hf", template=resolve_template(template, ckpt.cfg.family)))


# ---------------------------------------------------------------------------------------------- models
def _load(path, dtype, device, expect: str | None, overrides) -> "torch.nn.Module":
    dtype = parse_dtype(dtype)
    with open_checkpoint(path, **overrides) as ckpt:
        if expect is not None and ckpt.kind != expect:
            raise CheckpointError(f"{ckpt.config_file}: this is a {ckpt.kind} checkpoint; "
                                  f"use load_{ckpt.kind} (or load_checkpoint)")
        cfg = ckpt.cfg
        with torch.device("meta"):
            model = BailingMoeForCausalLM(cfg)
        sd = {name: t.to(device) for name, t in ckpt.iter_native(dtype)}
    model.load_state_dict(sd, assign=True, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.word_embeddings.weight
    return model


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", **config_overrides):
    """A BailingMoeForCausalLM from an HF or native checkpoint directory (auto-detected)."""
    return _load(path, dtype, device, None, config_overrides)


def load_hf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
            **config_overrides):
    """A BailingMoeForCausalLM from an HF bailing_moe directory (config.json + safetensors)."""
    return _load(path, dtype, device, "hf", config_overrides)


def load_native(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                **config_overrides):
    """A BailingMoeForCausalLM from a lingmoe-native directory (e.g. the trainer's initial weights)."""
    return _load(path, dtype, device, "native", config_overrides)


def _model_stream(model):
    cfg: BailingMoeConfig = model.config
    state = model.state_dict()
    names = list(adapter.native_shapes(cfg))
    return ((n, state[n]) for n in names), {n: state[n].dtype for n in names}


def save_hf(model, path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | str | None = None,
            overwrite: bool = False) -> None:
    """Write ``model`` (a BailingMoeForCausalLM) as an HF bailing_moe checkpoint, atomically."""
    stream, dtypes = _model_stream(model)
    write_checkpoint(stream, model.config, path, "hf", shard_size, dtype, dtypes, overwrite)


def save_native(model, path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | str | None = None,
                overwrite: bool = False) -> None:
    """Write ``model`` as a lingmoe-native checkpoint, atomically."""
    stream, dtypes = _model_stream(model)
    write_checkpoint(stream, model.config, path, "native", shard_size, dtype, dtypes, overwrite)


def write_hf_from_native(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: BailingMoeConfig,
                         path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | None = None,
                         overwrite: bool = False, source_dtypes=None, progress: bool = False,
                         extra_files=None) -> None:
    """Stream native tensors (adapter order) into an HF checkpoint directory (see write_checkpoint)."""
    write_checkpoint(named_tensors, cfg, path, "hf", shard_size, dtype, source_dtypes, overwrite, progress,
                     extra_files)


def write_native(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: BailingMoeConfig,
                 path: str | os.PathLike, shard_size: str | int = "5GB", dtype: torch.dtype | None = None,
                 overwrite: bool = False, source_dtypes=None, progress: bool = False) -> None:
    """Stream native tensors (adapter order) into a native checkpoint directory (see write_checkpoint)."""
    write_checkpoint(named_tensors, cfg, path, "native", shard_size, dtype, source_dtypes, overwrite, progress)
