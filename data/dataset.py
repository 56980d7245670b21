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
# 2: mask.bin may hold MASK_EOS (a label that is the EOS id, not the token). Version 1 masks are read
# too (0/1 only); a version 1 reader refuses version 2 instead of misreading its masks.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MASK_TOKEN, MASK_EOS = 1, 2
# The template's encoding, manifest "template.version" (absent = 1). 2: no EOS in the input between
# turns (eos_every_turn trains it as the label of the next turn's <role>, as LLaMA-Factory does) and
# DPO prompts untrained, earlier answers included. Version 1 data made with eos_every_turn, or DPO
# pairs, were encoded differently and are refused (_check_encoding); version 1 SFT data made
# without eos_every_turn is the same as version 2's and stays usable.
TEMPLATE_VERSION = 2


def read_manifest(directory):
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise DataError("not a prepared data directory (no manifest.json); run python -m data.prepare",
                        file=directory)
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    if m.get("format") != FORMAT_NAME or m.get("version") not in READABLE_VERSIONS:
        raise DataError(f"unsupported prepared format {m.get('format')!r} v{m.get('version')}", file=path)
    _check_encoding(m, path)
    return m


def _check_encoding(manifest, path):
    """Refuse data the template encoded differently from today's (see TEMPLATE_VERSION)."""
    template = manifest.get("template") or {}
    if template.get("version", 1) >= TEMPLATE_VERSION:
        return
    if manifest.get("kind") == "dpo":
        why = "its DPO pairs trained the earlier answers held in a prompt"
    elif template.get("eos_every_turn"):
        why = "with eos_every_turn it wrote <|endoftext|> into the input between turns"
    else:
        return
    raise DataError(f"prepared by an older lingmoe whose encoding differs ({why}); prepare it again "
                    f"with python -m data.prepare", file=path)


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
        mask = np.asarray(self._array(prefix + "mask")[a:b])
        labels = np.where(mask == MASK_TOKEN, ids, np.where(mask == MASK_EOS, self.eos_id, IGNORE_INDEX))
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
