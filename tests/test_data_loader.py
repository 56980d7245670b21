import json

import numpy as np
import pytest
import torch

from data import SFTLoader, DPOLoader, SampleStream, PreparedSFT, PreparedDPO, BATCH_KEYS, encode_dpo_pair
from data.demo import ensure_demo_data, MIXTURE
from data.tokenizer import load_tokenizer

M = -100


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")))


def _sources(demo):
    return {"general": demo["sft_general"], "reasoning": demo["sft_reasoning"]}


WEIGHTS = {"general": MIXTURE["sft_general"], "reasoning": MIXTURE["sft_reasoning"]}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contract_and_content(demo):
    loader = SFTLoader(_sources(demo), seq_len=128, micro_batch_size=3, seed=0, weights=WEIGHTS)
    ds = {"general": PreparedSFT(demo["sft_general"]), "reasoning": PreparedSFT(demo["sft_reasoning"])}
    pad = ds["general"].pad_id
    for _ in range(5):
        b = next(loader)
        assert set(b) == set(BATCH_KEYS)
        for v in b.values():
            assert v.dtype == torch.int64 and v.shape == (3, 128)
        for r, refs in enumerate(loader.last_refs):
            doc = b["document_ids"][r]
            assert len(refs) == int(doc.max()) + 1
            for d, (name, idx) in enumerate(refs):
                sel = doc == d
                ids, labels = ds[name][idx]
                assert b["input_ids"][r][sel].tolist() == ids.tolist()
                assert b["labels"][r][sel].tolist() == [M] + labels[1:].tolist()
                assert b["position_ids"][r][sel].tolist() == list(range(len(ids)))
            pad_sel = doc == -1
            assert (b["input_ids"][r][pad_sel] == pad).all() and (b["labels"][r][pad_sel] == M).all()
            assert (b["position_ids"][r][pad_sel] == 0).all()
            # document ids are contiguous runs: real tokens first, then padding
            n_real = int((doc >= 0).sum())
            assert (doc[:n_real] >= 0).all()


def test_resume_exact(demo):
    kw = dict(seq_len=96, micro_batch_size=2, seed=3, weights=WEIGHTS, window=32)
    a = SFTLoader(_sources(demo), **kw)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive plain serialization
    cont = [next(a) for _ in range(25)]  # crosses several packing windows
    b = SFTLoader(_sources(demo), **kw)
    b.load_state_dict(state)
    resumed = [next(b) for _ in range(25)]
    assert all(_same(x, y) for x, y in zip(cont, resumed))
    assert b.counters == a.counters


def test_deterministic_for_seed_and_seed_matters(demo):
    mk = lambda seed: SFTLoader(_sources(demo), seq_len=64, micro_batch_size=2, seed=seed, weights=WEIGHTS)
    a, b, c = mk(5), mk(5), mk(6)
    xs, ys, zs = ([next(l) for _ in range(4)] for l in (a, b, c))
    assert all(_same(x, y) for x, y in zip(xs, ys))
    assert not all(_same(x, z) for x, z in zip(xs, zs))


def test_state_from_other_settings_rejected(demo):
    a = SFTLoader(_sources(demo), seq_len=64, micro_batch_size=2, seed=1, weights=WEIGHTS)
    b = SFTLoader(_sources(demo), seq_len=64, micro_batch_size=2, seed=2, weights=WEIGHTS)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_ranks_disjoint_and_covering(demo):
    world, window = 3, 40
    stream = SampleStream([2000, 2000], [WEIGHTS["general"], WEIGHTS["reasoning"]], seed=11)
    names = ["general", "reasoning"]
    expected = [(names[s], i) for _, s, i in (stream.next() for _ in range(world * window))]
    seen = []
    for rank in range(world):
        l = SFTLoader(_sources(demo), seq_len=128, micro_batch_size=1, rank=rank, world_size=world, seed=11,
                      weights=WEIGHTS, window=window)
        refs = []
        while l.counters["samples"] < window:  # B=1 empties a window before the next is drawn
            next(l)
            refs += [r for row in l.last_refs for r in row]
        assert l.counters["samples"] == window
        seen.append(set(refs))
        assert set(refs) == set(expected[rank::world])
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(expected)


def test_mixture_ratio_within_sampling_error(demo):
    stream = SampleStream([50, 70], [340, 550], seed=0)
    n = 20000
    picks = np.array([stream.next()[1] for _ in range(n)])
    p = 340 / 890
    assert abs((picks == 0).mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    l = SFTLoader(_sources(demo), seq_len=256, micro_batch_size=4, seed=2, weights=WEIGHTS)
    for _ in range(100):
        next(l)
    c = l.counters["per_source"]
    total = c["general"] + c["reasoning"]
    assert total == l.counters["samples"]
    assert abs(c["general"] / total - p) < 4 * np.sqrt(p * (1 - p) / total)


def test_epochs_are_permutations_reshuffled():
    stream = SampleStream([50], [1.0], seed=4)
    e0 = [stream.next()[2] for _ in range(50)]
    e1 = [stream.next()[2] for _ in range(50)]
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    assert stream.epochs == [2]


def test_truncation_counted(demo):
    ds = PreparedSFT(demo["sft_reasoning"])
    l = SFTLoader({"reasoning": demo["sft_reasoning"]}, seq_len=60, micro_batch_size=2, seed=0)
    long = 0
    for _ in range(30):
        b = next(l)
        long += sum(int(ds.lengths()[i] > 60) for row in l.last_refs for _, i in row)
        assert int((b["document_ids"] >= 0).sum(dim=1).max()) <= 60
    assert long > 0 and l.counters["truncated"] == long
    d = SFTLoader({"reasoning": demo["sft_reasoning"]}, seq_len=60, micro_batch_size=2, seed=0, overlong="drop")
    for _ in range(30):
        next(d)
        assert all(ds.lengths()[i] <= 60 for row in d.last_refs for _, i in row)
    assert d.counters["dropped"] > 0 and d.counters["truncated"] == 0


def test_dpo_batch_matches_encoding(demo):
    tok = load_tokenizer(demo["tokenizer"])
    with open(demo["jsonl"]["dpo"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    l = DPOLoader(demo["dpo"], None, micro_batch_size=4, seed=0)
    b = next(l)
    assert set(b) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}
    S = b["chosen_input_ids"].shape[1]
    for r, idx in enumerate(b["index"].tolist()):
        want = encode_dpo_pair(tok, records[idx])
        for side in ("chosen", "rejected"):
            ids, labels = want[side]
            assert b[f"{side}_input_ids"][r].tolist() == ids + [tok.pad_id] * (S - len(ids))
            assert b[f"{side}_labels"][r].tolist() == labels + [M] * (S - len(labels))
    assert S == max(len(encode_dpo_pair(tok, records[i])[s][0]) for i in b["index"].tolist()
                    for s in ("chosen", "rejected"))
    fixed = next(DPOLoader(demo["dpo"], 128, micro_batch_size=2, seed=0))
    assert fixed["chosen_input_ids"].shape == (2, 128) and fixed["index"].dtype == torch.int64


def test_dpo_ranks_resume_and_hash(demo):
    n = len(PreparedDPO(demo["dpo"]))
    seen = []
    for rank in range(2):
        l = DPOLoader(demo["dpo"], None, 5, rank=rank, world_size=2, seed=9)
        seen.append([i for _ in range(n // 10) for i in next(l)["index"].tolist()])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(n))
    a = DPOLoader(demo["dpo"], 64, micro_batch_size=3, seed=1)
    for _ in range(400):  # past one epoch
        next(a)
    st = json.loads(json.dumps(a.state_dict()))
    cont = [next(a) for _ in range(5)]
    b = DPOLoader(demo["dpo"], 64, micro_batch_size=3, seed=1)
    b.load_state_dict(st)
    assert all(_same(x, next(b)) for x in cont)
    assert a.data_hash == PreparedDPO(demo["dpo"]).data_hash == PreparedDPO(demo["dpo"]).manifest["data_hash"]
    assert a.counters["truncated"] > 0  # some pairs exceed 64 tokens in the demo data
    all_idx = [i for batch in DPOLoader(demo["dpo"], None, 64).iter_all() for i in batch["index"].tolist()]
    assert all_idx == list(range(n))
