"""Best-fit packing of documents into fixed-length rows, and the SFT batch contract.

Batch contract (every tensor torch.int64, shape [B, S]):
    input_ids     tokens; padding = pad id
    labels        unshifted targets, -100 = not trained; the first token of every document and
                  all padding are -100 (the model shifts: logits at i predict labels[i+1], so a
                  -100 on a document's first token stops it being learned from the previous
                  document's last token)
    position_ids  0, 1, 2, ... restarting at every document; padding 0
    document_ids  0, 1, 2, ... per document within the row; padding -1 (the model blocks
                  attention between different ids)
"""
import bisect

import numpy as np
import torch

from .template import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def best_fit_decreasing(lengths, capacity):
    """Assign items to bins of ``capacity``: longest first, each into the fullest bin it fits.

    Returns a list of bins, each a list of item indices. Deterministic: ties are broken by item
    index and by bin creation order. Items longer than ``capacity`` must be cut beforehand.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins = []
    # Sorted (remaining space, bin number) so the tightest fitting bin is a bisect away.
    free = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            space -= n
        else:
            b = len(bins)
            bins.append([i])
            space = capacity - n
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def build_rows(docs, rows, seq_len, pad_id):
    """Materialize rows (lists of doc indices into ``docs``) as numpy int64 [R, S] arrays."""
    r = len(rows)
    out = {
        "input_ids": np.full((r, seq_len), pad_id, dtype=np.int64),
        "labels": np.full((r, seq_len), IGNORE_INDEX, dtype=np.int64),
        "position_ids": np.zeros((r, seq_len), dtype=np.int64),
        "document_ids": np.full((r, seq_len), -1, dtype=np.int64),
    }
    for ri, row in enumerate(rows):
        at = 0
        for d, di in enumerate(row):
            ids, labels = docs[di]
            n = len(ids)
            if at + n > seq_len:
                raise ValueError(f"row {ri} overflows seq_len {seq_len}")
            out["input_ids"][ri, at:at + n] = ids
            out["labels"][ri, at:at + n] = labels
            out["labels"][ri, at] = IGNORE_INDEX
            out["position_ids"][ri, at:at + n] = np.arange(n)
            out["document_ids"][ri, at:at + n] = d
            at += n
    return out


def fit_document(ids, labels, seq_len, overlong="truncate"):
    """(ids, labels, status) with status in {"ok", "truncated", "dropped"}.

    A document cut so that nothing trainable is left is dropped instead (keeping it would
    produce rows with no loss at all).
    """
    n = len(ids)
    if n <= seq_len:
        return ids, labels, "ok"
    if overlong == "drop":
        return None, None, "dropped"
    if overlong != "truncate":
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    ids, labels = ids[:seq_len], labels[:seq_len]
    # Position 0 never counts as a target once packed, so look from 1 on.
    if not np.any(np.asarray(labels[1:]) != IGNORE_INDEX):
        return None, None, "dropped"
    return ids, labels, "truncated"


def pack_documents(docs, seq_len, pad_id=0, overlong="truncate", return_info=False):
    """Pack (input_ids, labels) pairs into a batch dict of torch.int64 [R, seq_len] tensors.

    Documents longer than ``seq_len`` are truncated or dropped (``overlong``); the counts come
    back in ``info`` when ``return_info`` is set, and are never silently discarded by callers
    that use the loader (which keeps running totals).
    """
    kept, info = [], {"documents": len(docs), "truncated": 0, "dropped": 0, "rows": 0}
    for ids, labels in docs:
        ids, labels, status = fit_document(list(ids), list(labels), seq_len, overlong)
        if status == "truncated":
            info["truncated"] += 1
        elif status == "dropped":
            info["dropped"] += 1
            continue
        kept.append((ids, labels))
    rows = best_fit_decreasing([len(d[0]) for d in kept], seq_len)
    info["rows"] = len(rows)
    arrays = build_rows(kept, rows, seq_len, pad_id)
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return (batch, info) if return_info else batch
