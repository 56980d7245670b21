"""Infinite, resumable, rank-split loaders over prepared data.

SFTLoader packs documents (best-fit decreasing within a window of drawn samples) into rows of
``seq_len`` and yields the batch contract of data/packing.py. DPOLoader yields padded preference
pairs. Both are deterministic functions of (data, seed, rank, world_size, settings), and
``state_dict()`` captures the exact position so a restored loader yields the same next batch.

Rows (and pairs) are dealt independently of the world size: every rank walks the same global
stream, packs the same global windows into the same global sequence of rows, and rank r of W takes
rows r, r + W, r + 2W, ... So with the same global batch (W x micro-batch x accumulation rows), the
step's rows are the same set for any number of ranks: one process and two ranks train on the same
rows. (Loader states of version 1 dealt samples to ranks before packing, each rank packing its own
windows; a run saved that way with several ranks resumes that way, exactly.)
"""
import hashlib
import json
import os

import numpy as np
import torch

from .dataset import PreparedSFT, PreparedDPO
from .errors import DataError
from .mixture import SampleStream
from .packing import best_fit_decreasing, build_rows, fit_document
from .template import IGNORE_INDEX

_STATE_VERSION = 2  # 2: rows dealt after global packing; 1: samples dealt before per-rank packing
_ROW_ORDER_TAG = 0x726F7773


def _as_sources(sources, weights, cls):
    """Normalize to (names, datasets, weights)."""
    if isinstance(sources, (str, os.PathLike, PreparedSFT, PreparedDPO)):
        sources = [sources]
    if isinstance(sources, dict):
        names = list(sources)
        items = [sources[n] for n in names]
    else:
        items = list(sources)
        names = None
    datasets = [x if isinstance(x, cls) else cls(x) for x in items]
    if names is None:
        names = [os.path.basename(d.directory.rstrip(os.sep)) for d in datasets]
        if len(set(names)) != len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
    if weights is None:
        w = [1.0] * len(datasets)
    elif isinstance(weights, dict):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"no mixture weight for {missing}")
        w = [float(weights[n]) for n in names]
    else:
        w = [float(x) for x in weights]
        if len(w) != len(datasets):
            raise ValueError(f"{len(w)} weights for {len(datasets)} sources")
    pads = {d.pad_id for d in datasets}
    if len(pads) != 1:
        raise DataError(f"sources were prepared with different pad ids {sorted(pads)}")
    prints = {d.manifest["tokenizer"]["fingerprint"] for d in datasets}
    if len(prints) != 1:
        raise DataError("sources were prepared with different tokenizers")
    return names, datasets, w


def _combined_hash(datasets, weights):
    h = hashlib.sha256()
    for d, w in zip(datasets, weights):
        h.update(f"{d.data_hash}:{w!r};".encode())
    return h.hexdigest()


def _check_state(state, kind, what, config):
    """A saved loader state must come from the same kind of loader and the same settings and data."""
    if state.get("version") not in (1, _STATE_VERSION) or state.get("kind") != kind:
        raise ValueError(f"not {what} state of a known version")
    diff = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
    if diff:
        raise ValueError(f"loader state was saved with different settings/data: {diff}")


def _check_rank(rank, world_size):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")


class SFTLoader:
    """Packed SFT micro-batches from one or more prepared sources, forever.

    Args:
        sources: a prepared directory, a list of them, or {name: directory} (datasets work too).
        seq_len: tokens per row (S); micro_batch_size: rows per batch (B).
        rank, world_size: this rank's share of the global rows (rows r, r + W, ... of every window).
        seed: fixes mixture draws, per-source epoch orders and row order.
        weights: per-sample mixture weights (list, or {name: weight}); default equal.
        window: samples of the global stream per packing window (the same for any world size);
            larger packs tighter.
        overlong: "truncate" or "drop" documents longer than seq_len (both counted).
        pad_id: padding token; default the prepared data's pad id.

    ``counters`` has samples/tokens/trained_tokens emitted, truncated and dropped documents and
    per-source sample counts for this rank. ``last_refs`` lists (source name, sample index) per
    row of the last batch.
    """

    def __init__(self, sources, seq_len, micro_batch_size, rank=0, world_size=1, seed=0, weights=None,
                 window=256, overlong="truncate", pad_id=None):
        _check_rank(rank, world_size)
        if overlong not in ("truncate", "drop"):
            raise ValueError("overlong must be 'truncate' or 'drop'")
        self.names, self.datasets, self.weights = _as_sources(sources, weights, PreparedSFT)
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.window, self.overlong = int(window), overlong
        self.pad_id = self.datasets[0].pad_id if pad_id is None else int(pad_id)
        self.data_hash = _combined_hash(self.datasets, self.weights)
        self._lengths = [d.lengths() for d in self.datasets]
        self._stream = SampleStream([len(d) for d in self.datasets], self.weights, self.seed)
        self._window_no = 0
        self._rows = []  # this rank's pending rows, each a list of [source, index]
        self._next_row = 0  # the global number of the next row packed (rows are dealt by it)
        self._per_rank = False  # state version 1's dealing (samples to ranks, then per-rank windows)
        self.counters = self._zero_counters()
        self.last_refs = []
        self._drops_in_a_row = 0

    def _zero_counters(self):
        return {"samples": 0, "tokens": 0, "trained_tokens": 0, "padding_tokens": 0, "batches": 0,
                "truncated": 0, "dropped": 0, "per_source": {n: 0 for n in self.names}}

    def __iter__(self):
        return self

    def _next_sample(self):
        """(global draw number, source, index): every draw, or (version 1 dealing) only this rank's."""
        while True:
            g, s, idx = self._stream.next()
            if not self._per_rank or g % self.world_size == self.rank:
                return g, s, idx

    def _fill_window(self):
        refs, lens = [], []
        while len(refs) < self.window:
            g, s, idx = self._next_sample()
            n = int(self._lengths[s][idx])
            if n > self.seq_len:
                ids, labels = self.datasets[s][idx]
                _, _, status = fit_document(ids, labels, self.seq_len, self.overlong)
                if status == "dropped":
                    if self._per_rank or g % self.world_size == self.rank:  # counted once over the ranks
                        self.counters["dropped"] += 1
                    self._drops_in_a_row += 1
                    if self._drops_in_a_row > sum(len(d) for d in self.datasets):
                        raise DataError(f"every document is dropped at seq_len {self.seq_len}; nothing to train on")
                    continue
                n = self.seq_len
            self._drops_in_a_row = 0
            refs.append([s, idx])
            lens.append(n)
        bins = best_fit_decreasing(lens, self.seq_len)
        # Best-fit emits the long-document rows first; shuffle so batches do not trend in length. (The
        # 0 stood for the rank in version 1, where each rank shuffled its own window: one process
        # packs and orders exactly as it did then.)
        who = self.rank if self._per_rank else 0
        order = np.random.default_rng([self.seed, _ROW_ORDER_TAG, who, self._window_no]).permutation(len(bins))
        for b in order:
            row = [refs[i] for i in bins[b]]
            if self._per_rank or self._next_row % self.world_size == self.rank:
                self._rows.append(row)
            self._next_row += 1
        self._window_no += 1

    def __next__(self):
        while len(self._rows) < self.micro_batch_size:
            self._fill_window()
        rows = self._rows[:self.micro_batch_size]
        del self._rows[:self.micro_batch_size]
        docs, layout = [], []
        for row in rows:
            idxs = []
            for s, idx in row:
                ids, labels = self.datasets[s][idx]
                if len(ids) > self.seq_len:
                    ids, labels = ids[:self.seq_len], labels[:self.seq_len]
                    self.counters["truncated"] += 1
                self.counters["per_source"][self.names[s]] += 1
                idxs.append(len(docs))
                docs.append((ids, labels))
            layout.append(idxs)
        arrays = build_rows(docs, layout, self.seq_len, self.pad_id)
        c = self.counters
        c["samples"] += len(docs)
        real = int((arrays["document_ids"] >= 0).sum())
        c["tokens"] += real
        c["padding_tokens"] += arrays["document_ids"].size - real
        c["trained_tokens"] += int((arrays["labels"] != IGNORE_INDEX).sum())
        c["batches"] += 1
        self.last_refs = [[(self.names[s], idx) for s, idx in row] for row in rows]
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def _config(self):
        return {"data_hash": self.data_hash, "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed, "window": self.window,
                "overlong": self.overlong}

    def state_dict(self):
        """Plain-Python (JSON-serializable) state; restoring it yields the same next batch."""
        state = {"version": 1 if self._per_rank else _STATE_VERSION, "kind": "sft", "config": self._config(),
                 "stream": self._stream.state_dict(), "window_no": self._window_no,
                 "rows": [[list(r) for r in row] for row in self._rows],
                 "counters": json.loads(json.dumps(self.counters))}
        if not self._per_rank:
            state["next_row"] = self._next_row
        return state

    def load_state_dict(self, state):
        """Restore a state_dict; one of version 1 saved with several ranks goes on with that version's
        dealing (with one rank the two dealings are the same)."""
        _check_state(state, "sft", "an SFTLoader", self._config())
        self._stream.load_state_dict(state["stream"])
        self._window_no = int(state["window_no"])
        self._rows = [[[int(s), int(i)] for s, i in row] for row in state["rows"]]
        self.counters = json.loads(json.dumps(state["counters"]))
        self._per_rank = state["version"] == 1 and self.world_size > 1
        self._next_row = int(state.get("next_row", 0))


def collate_dpo(pairs, pad_id, seq_len=None):
    """Right-pad a list of {"chosen": (ids, labels), "rejected": (ids, labels)} into int64 [B, S].

    S is ``seq_len`` when given (sequences must already fit), else the longest sequence present.
    """
    longest = max(max(len(p["chosen"][0]), len(p["rejected"][0])) for p in pairs)
    S = longest if seq_len is None else int(seq_len)
    if longest > S:
        raise ValueError(f"a sequence of {longest} tokens does not fit seq_len {S}")
    out = {}
    for side in ("chosen", "rejected"):
        ids_a = np.full((len(pairs), S), pad_id, dtype=np.int64)
        lab_a = np.full((len(pairs), S), IGNORE_INDEX, dtype=np.int64)
        for r, p in enumerate(pairs):
            ids, labels = p[side]
            ids_a[r, :len(ids)] = ids
            lab_a[r, :len(labels)] = labels
        out[f"{side}_input_ids"] = torch.from_numpy(ids_a)
        out[f"{side}_labels"] = torch.from_numpy(lab_a)
    return out


class DPOLoader:
    """Micro-batches of preference pairs from one prepared DPO directory, forever.

    Batch: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (int64 [B, S],
    right-padded with pad id / -100; labels -100 on the prompt) and index (int64 [B], the pair's
    position in the prepared data, stable across runs, for looking up reference log-probs).

    With an integer ``seq_len`` every batch is padded to it and longer sides are truncated (or
    the pair dropped, ``overlong="drop"``), counted in ``counters``; with ``seq_len=None``
    batches pad to their longest sequence (fewer wasted tokens, shapes vary). The global order is
    epoch after epoch of permutation(seed, epoch); of the pairs kept in it (not dropped), rank r takes
    the r-th, (r + W)-th, ..., so any number of ranks shares out the same pairs.
    """

    def __init__(self, source, seq_len, micro_batch_size, rank=0, world_size=1, seed=0,
                 overlong="truncate", pad_id=None):
        _check_rank(rank, world_size)
        self.dataset = source if isinstance(source, PreparedDPO) else PreparedDPO(source)
        self.micro_batch_size = int(micro_batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.seq_len = None if seq_len is None else int(seq_len)
        self.overlong = overlong
        self.pad_id = self.dataset.pad_id if pad_id is None else int(pad_id)
        self.data_hash = self.dataset.data_hash
        self._p = 0  # next global position of the order to look at
        self._k = 0  # pairs kept (not dropped) before it: the kept pair number k goes to rank k % W
        self._per_rank = False  # state version 1's dealing: positions r, r + W, ..., drops skipped per rank
        self._drops_in_a_row = 0
        self._lengths = self.dataset.lengths()
        self._perm = (None, None)
        self.counters = {"samples": 0, "batches": 0, "truncated": 0, "dropped": 0, "epoch": 0}

    def __iter__(self):
        return self

    def _index_at(self, g):
        n = len(self.dataset)
        epoch = g // n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 0x64706F, epoch]).permutation(n))
        return int(self._perm[1][g % n]), epoch

    def _fit(self, pair):
        if self.seq_len is None:
            return pair, "ok"
        out, status = {}, "ok"
        for side in ("chosen", "rejected"):
            ids, labels, st = fit_document(pair[side][0], pair[side][1], self.seq_len, self.overlong)
            if st == "dropped":
                return None, "dropped"
            if st == "truncated":
                status = "truncated"
            out[side] = (ids, labels)
        return out, status

    def _next_pair(self):
        """(index, fitted pair, status) of this rank's next pair, walking the global order."""
        while True:
            p = self._p
            idx, self.counters["epoch"] = self._index_at(p)
            self._p += self.world_size if self._per_rank else 1
            if not self._per_rank and self.seq_len is not None and self._lengths[idx] <= self.seq_len:
                pair, status = None, "ok"  # fits: no need to read it unless it is this rank's
            else:
                pair, status = self._fit(self.dataset[idx])
            if status == "dropped":
                if self._per_rank or p % self.world_size == self.rank:  # counted once over the ranks
                    self.counters["dropped"] += 1
                self._drops_in_a_row += 1
                if self._drops_in_a_row > len(self.dataset):
                    raise DataError("every pair is too long for seq_len; nothing to train on",
                                    file=self.dataset.directory)
                continue
            self._drops_in_a_row = 0
            if not self._per_rank:
                mine = self._k % self.world_size == self.rank
                self._k += 1
                if not mine:
                    continue
            if pair is None:
                pair, status = self._fit(self.dataset[idx])
            return idx, pair, status

    def __next__(self):
        pairs, index = [], []
        while len(pairs) < self.micro_batch_size:
            idx, pair, status = self._next_pair()
            if status == "truncated":
                self.counters["truncated"] += 1
            pairs.append(pair)
            index.append(idx)
        batch = collate_dpo(pairs, self.pad_id, self.seq_len)
        batch["index"] = torch.tensor(index, dtype=torch.int64)
        self.counters["samples"] += len(pairs)
        self.counters["batches"] += 1
        return batch

    def _config(self):
        return {"data_hash": self.data_hash, "micro_batch_size": self.micro_batch_size, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "seq_len": self.seq_len,
                "overlong": self.overlong}

    def state_dict(self):
        if self._per_rank:
            return {"version": 1, "kind": "dpo", "config": self._config(), "g": self._p,
                    "counters": dict(self.counters)}
        return {"version": _STATE_VERSION, "kind": "dpo", "config": self._config(), "p": self._p, "k": self._k,
                "drops_in_a_row": self._drops_in_a_row, "counters": dict(self.counters)}

    def load_state_dict(self, state):
        """Restore a state_dict; version 1 with several ranks goes on with that version's dealing
        (with one rank, position g of version 1 is position g of this one)."""
        _check_state(state, "dpo", "a DPOLoader", self._config())
        if state["version"] == 1:
            self._per_rank = self.world_size > 1
            self._p, self._k, self._drops_in_a_row = int(state["g"]), 0, 0
        else:
            self._per_rank = False
            self._p, self._k = int(state["p"]), int(state["k"])
            self._drops_in_a_row = int(state["drops_in_a_row"])
        self.counters = dict(state["counters"])

    def iter_all(self, batch_size=None):
        """Every pair once, in index order and not rank-split (pass 0..N-1 for reference log-probs).

        Uses the same seq_len/overlong handling as training; dropped pairs are skipped, so read
        ``index`` rather than assuming contiguity.
        """
        bs = batch_size or self.micro_batch_size
        pairs, index = [], []
        for i in range(len(self.dataset)):
            pair, status = self._fit(self.dataset[i])
            if status == "dropped":
                continue
            pairs.append(pair)
            index.append(i)
            if len(pairs) == bs:
                batch = collate_dpo(pairs, self.pad_id, self.seq_len)
                batch["index"] = torch.tensor(index, dtype=torch.int64)
                yield batch
                pairs, index = [], []
        if pairs:
            batch = collate_dpo(pairs, self.pad_id, self.seq_len)
            batch["index"] = torch.tensor(index, dtype=torch.int64)
            yield batch
