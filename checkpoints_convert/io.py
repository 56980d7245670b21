"""Lazy reading and streaming writing of safetensors checkpoints.

Reading goes through ``safe_open`` one tensor at a time (headers of every shard are checked when a
checkpoint is opened, so a truncated or inconsistent file is reported before anything is written).

Writing is planned: the caller states every output tensor (name, shape, dtype) up front, the writer
assigns them to shards, writes each shard's safetensors header first and then streams each tensor's
bytes to disk as it arrives. No shard is ever assembled in memory, so converting holds one tensor
(one layer's stacked experts at most) plus small buffers, whatever the shard size.

Whole checkpoints are written into a temporary directory beside the target that is renamed into
place only when all succeeded (``data.files.OwnedTempDir``): on any failure it is removed, so no
partial output is left, and one left by a killed process is removed by the next writer.

Reading and writing whole checkpoints (load_hf, save_hf, ...) is ``checkpoints_convert.checkpoint``'s,
built on this module.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import sys

import torch
from safetensors import safe_open

from data.errors import BadInputError, MissingFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}

# torch dtype <-> the dtype string of the safetensors header
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
# What the model's weights may be stored in (the safetensors spelling). Integers, bool, complex and
# fp8 (which would need its scales: dequantize first) are refused before anything is written.
MODEL_ST_DTYPES = ("BF16", "F16", "F32", "F64")


class CheckpointError(BadInputError):
    """A checkpoint that is truncated, unreadable or does not match its config (exit code 2)."""


class MissingCheckpointError(CheckpointError, MissingFileError):
    """A checkpoint directory or one of its files that is not there (exit code 3)."""

    exit_code = MissingFileError.exit_code

    def __init__(self, message: str):
        MissingFileError.__init__(self, message)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not m:
        raise BadInputError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise BadInputError(f"size {text!r} must be positive")
    return size


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' | 'fp32' | 'fp16' | 'keep'/None (keep the stored dtype); a torch.dtype passes through."""
    if text is None or isinstance(text, torch.dtype):
        return text
    if text == "keep":
        return None
    if text not in DTYPES:
        raise BadInputError(f"unknown dtype {text!r}; choose from {sorted(DTYPES)} or 'keep'")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` (floating tensors only; None keeps it)."""
    return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)


def nbytes_of(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- read
class SafetensorsReader:
    """Name -> tensor, read lazily from a directory of (possibly sharded) safetensors files.

    Each shard is first opened with ``safe_open`` (which checks the header and that the file is not
    truncated), then tensors are read with plain positioned reads into freshly allocated tensors.
    Reading through safe_open's memory map instead would leave every touched page of the input
    resident in this process (a whole 5 GB shard counted in RSS by the end of it); with reads the
    only memory is the tensors the caller still holds.
    """

    _READ_CHUNK = 256 << 20

    def __init__(self, path: str | os.PathLike, single_name: str = SINGLE_NAME):
        """``single_name``: the one file read when there is no index (PEFT's adapter_model.safetensors)."""
        self.path = os.fspath(path)
        self._files: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        if not os.path.isdir(self.path):
            raise MissingCheckpointError(f"{self.path}: not a directory")
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise KeyError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                self._check_inside(index, name, fname)
            self.weight_map: dict[str, str] = weight_map
        elif os.path.exists(os.path.join(self.path, single_name)):
            self.weight_map = {}
            self.weight_map = {k: single_name for k in self._open(single_name) if k != "__metadata__"}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor {single_name} found")
        for fname in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(self.path, fname)):
                raise MissingCheckpointError(f"{os.path.join(self.path, fname)}: shard named in {INDEX_NAME} is missing")

    def _roots(self) -> list[str]:
        """Where this checkpoint's files may really be: its directory, and for a Hugging Face hub
        cache snapshot (<repo>/snapshots/<rev>/, files symlinked to ../../blobs/) the repo's blobs/."""
        real = os.path.realpath(self.path)
        roots = [real]
        if os.path.basename(os.path.dirname(real)) == "snapshots":
            roots.append(os.path.join(os.path.dirname(os.path.dirname(real)), "blobs"))
        return roots

    def _check_inside(self, index: str, name: str, fname: object) -> None:
        """Refuse an index entry that names a file outside the checkpoint directory."""
        def refuse(why: str):
            raise CheckpointError(f"{index}: weight_map entry {name!r} names {fname!r}, {why}; refused (an index "
                                  f"may only name files inside {self.path})")
        if not isinstance(fname, str) or not fname:
            refuse("not a file name")
        if os.path.isabs(fname):
            refuse("an absolute path")
        if ".." in fname.replace("\\", "/").split("/"):
            refuse("a path through '..'")
        real = os.path.realpath(os.path.join(self.path, fname))
        if not any(os.path.commonpath([real, root]) == root for root in self._roots()):
            refuse(f"a symlink that leads outside (to {real})")

    def _open(self, fname: str) -> dict:
        """The parsed header of shard ``fname`` (validated by safetensors), opening the file once."""
        if fname not in self._headers:
            full = os.path.join(self.path, fname)
            try:
                with safe_open(full, framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own error type for bad/truncated headers
                raise CheckpointError(f"{full}: cannot read safetensors file, truncated or corrupt? ({e})") from None
            f = open(full, "rb", buffering=0)
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except Exception as e:
                f.close()
                raise CheckpointError(f"{full}: cannot parse safetensors header ({e})") from None
            header.pop("__metadata__", None)
            for info in header.values():
                info["data_offsets"] = [8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]]
            self._files[fname], self._headers[fname] = f, header
        return self._headers[fname]

    def _info(self, name: str) -> dict:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        fname = self.weight_map[name]
        header = self._open(fname)
        if name not in header:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: {INDEX_NAME} names tensor {name!r} "
                                  f"but this file does not contain it")
        return header[name]

    def check_files(self) -> None:
        """Open every shard's header (catches truncation) and check the index's tensors are where it says."""
        for fname in sorted(set(self.weight_map.values())):
            self._open(fname)
        for name in self.weight_map:
            self._info(name)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def stored_dtype_name(self, name: str) -> str:
        """The dtype as the header spells it (BF16, I32, F8_E4M3, ...), known to us or not."""
        return str(self._info(name)["dtype"])

    def dtype(self, name: str) -> torch.dtype:
        st = self._info(name)["dtype"]
        if st not in TORCH_DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype {st}")
        return TORCH_DTYPES[st]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows ``start:stop`` of its first dim (one contiguous byte range)."""
        info = self._info(name)
        shape = self.shape(name)
        t = torch.empty(shape, dtype=self.dtype(name))
        begin, end = info["data_offsets"]
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else b""
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} spans {end - begin} bytes, "
                                  f"its shape and dtype need {len(buf)}")
        if rows is not None:
            start, stop = rows
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            t = torch.empty((stop - start, *shape[1:]), dtype=t.dtype)
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else b""
        if t.numel() == 0:
            return t
        f = self._files[self.weight_map[name]]
        done = 0
        while done < len(buf):
            got = os.preadv(f.fileno(), [buf[done:done + self._READ_CHUNK]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} unreadable: file ends early "
                                      f"(truncated?)")
            done += got
        return t

    def close(self):
        for f in self._files.values():
            f.close()
        self._files, self._headers = {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fingerprint_weights(directory: str, content_limit: int = 1 << 30) -> str:
    """A hash of a weights directory that changes when any file in it is rewritten, even in place: of
    every file's content when they hold ``content_limit`` bytes or fewer in all, else of each file's
    size, mtime, inode and (for safetensors) header, which any rewrite or re-save changes."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)]
    stats = [os.stat(p) for p in files]
    by_content = sum(st.st_size for st in stats) <= content_limit
    h = hashlib.sha256()
    for p, st in zip(files, stats):
        h.update(f"{os.path.relpath(p, directory)}|{st.st_size}|".encode())
        with open(p, "rb") as f:
            if by_content:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
                continue
            h.update(f"{st.st_mtime_ns}|{st.st_ino}|".encode())
            if p.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))  # dtypes, shapes, offsets, metadata
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- write
def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[tuple]]:
    """Group (name, shape, dtype) in order into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[tuple]] = []
    size = 0
    for e in entries:
        n = nbytes_of(e[1], e[2])
        if not shards or (shards[-1] and size + n > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _header(entries: list[tuple], metadata: dict[str, str]) -> bytes:
    """The safetensors header for tensors stored back to back in ``entries`` order."""
    head: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        n = nbytes_of(shape, dtype)
        head[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Streams tensors, in the planned order, into model-0000i-of-0000N.safetensors under ``out_dir``.

    ``entries`` lists every tensor (name, shape, dtype) in the order ``add`` will receive them; each
    shard's header is written when its first tensor arrives, each tensor's bytes go straight to disk.
    ``finish()`` checks that everything arrived and writes model.safetensors.index.json.
    """

    def __init__(self, out_dir: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int,
                 metadata: dict | None = None, on_write=None):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors is little-endian; writing from a big-endian machine is not supported")
        self.dir = out_dir
        self.metadata = dict(metadata or {"format": "pt"})
        self.shards = plan_shards(list(entries), max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self.total = sum(nbytes_of(e[1], e[2]) for _, e in self._order)
        self._next = 0
        self._file = None
        self.on_write = on_write

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise CheckpointError(f"unexpected extra tensor {name!r}: all planned tensors were already written")
        s, (want, shape, dtype) = self._order[self._next]
        if name != want:
            raise CheckpointError(f"tensor {name!r} arrived where {want!r} was expected (tensors must come in "
                                  f"the adapter's order)")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(f"tensor {name!r} is {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, "
                                  f"the layout planned {tuple(shape)} {dtype_name(dtype)}")
        if self._file is None:
            self._file = open(os.path.join(self.dir, self.files[s]), "wb")
            self._file.write(_header(self.shards[s], self.metadata))
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != s:
            self._file.close()
            self._file = None
        if self.on_write is not None:
            self.on_write(name, t.numel() * t.element_size())

    def finish(self) -> dict[str, str]:
        if self._next != len(self._order):
            missing = [e[0] for _, e in self._order[self._next:]]
            raise CheckpointError(f"the tensor stream ended early; never received {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''}")
        weight_map = {e[0]: self.files[s] for s, e in self._order}
        with open(os.path.join(self.dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return weight_map

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
