"""Read-only views over prepared directories (see data/prepare.py for the layout).

Arrays are opened with np.memmap on first use, so constructing a dataset is cheap, every rank
shares the page cache, and no sample text is ever held in Python.
"""
import json
import os

import numpy as np

from .errors import DataError
from .template import IGNORE_INDEX

FORMAT_NAME = "lingmoe-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(directory):
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise DataError("not a prepared data directory (no manifest.json); run python -m data.prepare",
                        file=directory)
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    if m.get("format") != FORMAT_NAME or m.get("version") != FORMAT_VERSION:
        raise DataError(f"unsupported prepared format {m.get('format')!r} v{m.get('version')}", file=path)
    return m


class _Prepared:
    kind = None

    def __init__(self, directory):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manifest = read_manifest(self.directory)
        if self.manifest["kind"] != self.kind:
            raise DataError(f"expected prepared {self.kind} data, found {self.manifest['kind']}", file=self.directory)
        self._arrays = {}

    def _array(self, name):
        a = self._arrays.get(name)
        if a is None:
            info = self.manifest["arrays"][name]
            path = os.path.join(self.directory, name + ".bin")
            if info["length"] == 0:
                a = np.zeros(0, dtype=np.dtype(info["dtype"]))
            else:
                a = np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r", shape=(info["length"],))
            self._arrays[name] = a
        return a

    def __getstate__(self):
        # memmaps are reopened lazily in the receiving process instead of being pickled.
        d = dict(self.__dict__)
        d["_arrays"] = {}
        return d

    def __len__(self):
        return self.manifest["num_samples"]

    @property
    def data_hash(self):
        return self.manifest["data_hash"]

    @property
    def pad_id(self):
        return self.manifest["tokenizer"]["pad_id"]

    @property
    def eos_id(self):
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def domains(self):
        return list(self.manifest["domains"])

    def domain_ids(self):
        return np.asarray(self._array("domain"), dtype=np.int64)

    def _seq(self, prefix, i):
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range [0, {n})")
        off = self._array(prefix + "offsets")
        a, b = int(off[i]), int(off[i + 1])
        ids = np.asarray(self._array(prefix + "tokens")[a:b], dtype=np.int64)
        mask = np.asarray(self._array(prefix + "mask")[a:b], dtype=bool)
        labels = np.where(mask, ids, IGNORE_INDEX)
        return ids, labels

    def _lengths(self, prefix):
        return np.diff(np.asarray(self._array(prefix + "offsets"), dtype=np.int64))


class PreparedSFT(_Prepared):
    """Prepared SFT samples: ``ds[i] -> (input_ids, labels)`` as int64 numpy arrays."""
    kind = "sft"

    def __getitem__(self, i):
        return self._seq("", int(i))

    def lengths(self):
        return self._lengths("")


class PreparedDPO(_Prepared):
    """Prepared preference pairs: ``ds[i] -> {"chosen": (ids, labels), "rejected": (ids, labels)}``."""
    kind = "dpo"

    def __getitem__(self, i):
        i = int(i)
        return {"chosen": self._seq("chosen_", i), "rejected": self._seq("rejected_", i)}

    def lengths(self):
        return np.maximum(self._lengths("chosen_"), self._lengths("rejected_"))


def open_prepared(directory):
    """PreparedSFT or PreparedDPO, whichever the manifest says."""
    kind = read_manifest(directory)["kind"]
    return PreparedSFT(directory) if kind == "sft" else PreparedDPO(directory)
