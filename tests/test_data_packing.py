import numpy as np
import pytest
import torch

from data import pack_documents, best_fit_decreasing, BATCH_KEYS

M = -100


def test_best_fit_decreasing_hand_example():
    # capacity 10: 7 opens bin0, 6 opens bin1, 4 -> bin1 (space 4 fits exactly), 3 -> bin0, 2 -> new bin2
    assert best_fit_decreasing([3, 7, 4, 6, 2], 10) == [[1, 0], [3, 2], [4]]


def test_pack_documents_contract_by_hand():
    docs = [([11, 12, 13], [11, 12, 13]), ([21, 22], [M, 22]), ([31, 32, 33, 34, 35, 36], [31] * 6)]
    batch, info = pack_documents(docs, seq_len=6, pad_id=0, return_info=True)
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.dtype == torch.int64 and v.shape == (2, 6) for v in batch.values())
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 35, 36], [11, 12, 13, 21, 22, 0]]
    assert batch["labels"].tolist() == [[M, 31, 31, 31, 31, 31], [M, 12, 13, M, 22, M]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, -1]]
    assert info == {"documents": 3, "truncated": 0, "dropped": 0, "rows": 2}


def test_no_tokens_lost_and_first_token_untrained_random():
    rng = np.random.default_rng(0)
    docs = []
    for d in range(60):
        n = int(rng.integers(1, 40))
        ids = list(range(d * 100, d * 100 + n))
        docs.append((ids, [t if rng.random() < 0.6 else M for t in ids]))
    batch = pack_documents(docs, seq_len=64, pad_id=-7)
    ids, lab, pos, doc = (batch[k].numpy() for k in ("input_ids", "labels", "position_ids", "document_ids"))
    recovered = []
    for r in range(ids.shape[0]):
        for d in range(doc[r].max() + 1):
            sel = doc[r] == d
            seg = ids[r][sel]
            assert pos[r][sel].tolist() == list(range(sel.sum()))
            assert lab[r][sel][0] == M
            src = docs[seg[0] // 100]
            assert seg.tolist() == src[0]
            assert lab[r][sel][1:].tolist() == src[1][1:]
            recovered.append(seg[0] // 100)
        pad = doc[r] == -1
        assert (ids[r][pad] == -7).all() and (lab[r][pad] == M).all() and (pos[r][pad] == 0).all()
    assert sorted(recovered) == list(range(60))
    assert ids.shape[0] <= 60 * 20 // 64 + 3  # packed, not one document per row


def test_overlong_truncated_or_dropped_and_counted():
    long_doc = (list(range(1, 11)), list(range(1, 11)))
    prompt_only = (list(range(1, 11)), [M] * 8 + [9, 10])  # cut to 5 tokens leaves nothing trainable
    short = ([5, 6], [5, 6])
    batch, info = pack_documents([long_doc, prompt_only, short], seq_len=5, return_info=True)
    assert info["truncated"] == 1 and info["dropped"] == 1
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [5, 6, 0, 0, 0]]
    _, info = pack_documents([long_doc, short], seq_len=5, overlong="drop", return_info=True)
    assert info["truncated"] == 0 and info["dropped"] == 1 and info["rows"] == 1


def test_best_fit_rejects_oversize():
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)
