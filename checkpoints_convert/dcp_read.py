"""Reading torch.distributed.checkpoint (DCP) directories and per-rank state files as data only.

A checkpoint may come from someone else, and pickle runs whatever a file tells it to. torch's
own DCP reader unpickles the ``.metadata`` file with plain ``pickle.load`` and the non-tensor
items (the optimizer's param_groups) with ``torch.load(weights_only=False)``. Here:

- ``.metadata`` goes through ``_MetadataUnpickler``, whose ``find_class`` admits only DCP's
  metadata classes, ``torch.Size``, torch dtypes, torch's layout reconstructor and paths; every
  storage entry must name a file inside the checkpoint directory.
- non-tensor items and the trainer's rank_*.pt files load with ``torch.load(weights_only=True)``
  (tensors, numbers, strings, lists, tuples, dicts).
- tensors were already read with ``weights_only=True`` by DCP itself.

Anything else is refused with a CheckpointError naming the file, before it can run.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from checkpoints_convert.io import CheckpointError, MissingCheckpointError

METADATA_NAME = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_DCP_METADATA, n) for n in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                   "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                   "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),  # Python >= 3.13
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not one of torch DCP's "
                                     f"metadata classes")


def _inside(relative: object) -> bool:
    return (isinstance(relative, str) and relative not in ("", ".", "..") and os.sep not in relative
            and "/" not in relative and not os.path.isabs(relative))


def _reason(e: Exception) -> str:
    """The line of torch.load's weights_only error that says what was refused (it opens with advice
    to retry with weights_only=False, which is exactly what must not be done here)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def read_metadata(step_dir: str | os.PathLike) -> Metadata:
    """The DCP Metadata of ``step_dir``, unpickled with the allowlist above and checked."""
    path = os.path.join(os.fspath(step_dir), METADATA_NAME)
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise MissingCheckpointError(f"{path}: no such file (not a torch.distributed.checkpoint directory)") from None
    except Exception as e:  # UnpicklingError, or any error of a malformed stream
        raise CheckpointError(f"{path}: refused, not a plain DCP metadata file ({e}); checkpoints are "
                              f"read as data only (docs/checkpoints.md)") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: refused, holds a {type(meta).__name__}, not DCP Metadata")
    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path}: refused, its storage_data is a {type(storage).__name__}, not a dict")
    for key, info in storage.items():
        relative = getattr(info, "relative_path", None)
        if not _inside(relative):
            raise CheckpointError(f"{path}: refused, entry {getattr(key, 'fqn', key)!r} names data file "
                                  f"{relative!r}, which is not a file inside {step_dir}")
    return meta


def check_storage(step_dir: str | os.PathLike, meta: Metadata) -> None:
    """Every data file ``meta`` names is there and long enough for the bytes it places in it: a missing
    or cut file is named here, not met as a bare FileNotFoundError or zip error half-way through a read."""
    step_dir = os.fspath(step_dir)
    need: dict[str, int] = {}
    where = os.path.join(step_dir, METADATA_NAME)
    for info in meta.storage_data.values():
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{where}: refused, a storage entry of {info.relative_path!r} has offset "
                                  f"{offset!r} and length {length!r}")
        need[info.relative_path] = max(need.get(info.relative_path, 0), offset + length)
    for name, end in sorted(need.items()):
        path = os.path.join(step_dir, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise MissingCheckpointError(f"{path}: no such file, though {where} names it: the checkpoint is "
                                         f"incomplete (copy it again, or use an earlier step)") from None
        if size < end:
            raise CheckpointError(f"{path}: {size} bytes, but {where} places data up to byte {end}: the file is "
                                  f"truncated (copy it again, or use an earlier step)")


class RestrictedReader(FileSystemReader):
    """torch's FileSystemReader with ``.metadata`` read by ``read_metadata`` (no arbitrary pickle)."""

    def read_metadata(self) -> Metadata:  # no rank=: rank-local metadata (uncoordinated saves) is not ours
        meta = read_metadata(self.path)
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class PlainDataLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with ``weights_only=True``."""

    def __init__(self, step_dir: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.step_dir = os.fspath(step_dir)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.step_dir}: item {read_item.dest_index.fqn!r} refused, not plain data "
                                  f"({_reason(e)}); checkpoints are read as data only "
                                  f"(docs/checkpoints.md)") from None
        # What DefaultLoadPlanner.load_bytes does after its own torch.load.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state_dict: dict, step_dir: str | os.PathLike, no_dist: bool = False) -> None:
    """``dcp.load(state_dict, ...)`` from ``step_dir`` through the restricted reader and planner.

    The metadata is read (and refused if need be) up front on every rank, so a refusal is our
    CheckpointError rather than one wrapped in DCP's CheckpointException. So are missing or truncated
    data files (check_storage); a data file that is whole in size but unreadable is named too."""
    check_storage(step_dir, read_metadata(step_dir))
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
            dcp.load(state_dict, storage_reader=RestrictedReader(step_dir), planner=PlainDataLoadPlanner(step_dir),
                     no_dist=no_dist)
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise exc from None
        first = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"{os.fspath(step_dir)}: a data file could not be read ({type(first).__name__}: "
                              f"{str(first).splitlines()[0] if str(first) else ''}); the checkpoint is damaged") from None


def load_plain(path: str | os.PathLike) -> object:
    """A torch.save file that holds only tensors and plain Python data (weights_only=True)."""
    path = os.fspath(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError for anything but plain data; others for a bad file
        raise CheckpointError(f"{path}: refused, not plain data ({_reason(e)}); checkpoints are read as data only "
                              f"(docs/checkpoints.md)") from None
