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


def _step_rows(loader, batches):
    """The rows (as tuples of sample references) of ``batches`` micro-batches."""
    rows = []
    for _ in range(batches):
        next(loader)
        rows += [tuple(map(tuple, row)) for row in loader.last_refs]
    return rows


@pytest.mark.parametrize("world, micro_batch, accum", [(2, 3, 1), (3, 1, 2), (6, 1, 1)])
def test_a_steps_rows_do_not_depend_on_the_number_of_ranks(demo, world, micro_batch, accum):
    # One process with 6 rows a step, and W ranks x B rows x A micro-batches = 6: every step trains on
    # the same 6 rows, the ranks' rows disjoint. (Tight windows and truncation, so packing matters.)
    kw = dict(seq_len=96, seed=3, weights=WEIGHTS, window=20)
    one = SFTLoader(_sources(demo), micro_batch_size=6, **kw)
    ranks = [SFTLoader(_sources(demo), micro_batch_size=micro_batch, rank=r, world_size=world, **kw)
             for r in range(world)]
    for step in range(6):
        want = _step_rows(one, 1)
        got = [_step_rows(l, accum) for l in ranks]
        assert sorted(r for rows in got for r in rows) == sorted(want), step
    assert sum(l.counters["samples"] for l in ranks) == one.counters["samples"]
    assert sum(l.counters["truncated"] for l in ranks) == one.counters["truncated"] > 0


@pytest.mark.parametrize("world", [2, 4])
def test_dpo_pairs_of_a_step_do_not_depend_on_the_number_of_ranks_with_drops(demo, world):
    # Pairs longer than 64 tokens (about two thirds) are dropped: ranks must still share out the same kept pairs.
    one = DPOLoader(demo["dpo"], seq_len=64, micro_batch_size=4, seed=5, overlong="drop")
    ranks = [DPOLoader(demo["dpo"], seq_len=64, micro_batch_size=4 // world, rank=r, world_size=world, seed=5,
                       overlong="drop") for r in range(world)]
    for step in range(40):
        want = next(one)["index"].tolist()
        got = [i for l in ranks for i in next(l)["index"].tolist()]
        assert sorted(got) == sorted(want), step
    assert one.counters["dropped"] > 0
    assert sum(l.counters["dropped"] for l in ranks) in (one.counters["dropped"], one.counters["dropped"] - 1,
                                                         one.counters["dropped"] + 1)


def _v1_fixture(tmp_path):
    """The version-1 fixture (tests/fixtures/loader_v1) and the same records prepared today."""
    import pathlib
    import sys

    from data import prepare_data

    here = pathlib.Path(__file__).parent / "fixtures" / "loader_v1"
    sys.path.insert(0, str(here))
    try:
        from make_loader_v1_fixture import records
    finally:
        sys.path.remove(str(here))
    fixture = json.loads((here / "loader_v1.json").read_text())
    dirs = {}
    for name, rows in records().items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs[name] = str(tmp_path / name)
        m = prepare_data([str(path)], ensure_demo_data.__globals__["TOKENIZER_DIR"], dirs[name],
                         kind="dpo" if name == "dpo" else "sft")
        assert {k: v["sha256"] for k, v in m["arrays"].items()} == fixture["arrays"][name]  # the same bytes
    return fixture, dirs


def _with_data_hash(state, loader):
    # The same arrays, but today's data_hash also covers the prepared format's version (2 now).
    return dict(state, config=dict(state["config"], data_hash=loader.data_hash))


def test_a_version_1_loader_state_resumes_exactly_and_one_process_deals_as_before(tmp_path):
    # A run saved by lingmoe d7f86e2 (samples dealt to ranks before packing) resumes with the very
    # batches that version would have given; one process packs and deals exactly as it did.
    fixture, dirs = _v1_fixture(tmp_path)
    sft = {"general": dirs["general"], "reasoning": dirs["reasoning"]}
    for case in fixture["sft"]:
        if case["world_size"] == 1:
            fresh = SFTLoader(sft, **case["kwargs"])
            assert [(next(fresh), fresh.last_refs)[1] for _ in range(4)] == \
                [[[tuple(r) for r in row] for row in b] for b in case["first"]]
        loader = SFTLoader(sft, **case["kwargs"])
        loader.load_state_dict(_with_data_hash(case["state"], loader))
        got = [[[list(r) for r in row] for row in (next(loader), loader.last_refs)[1]] for _ in range(4)]
        assert got == case["after"], case["world_size"]
        assert loader.state_dict()["version"] == (1 if case["world_size"] > 1 else 2)
    for case in fixture["dpo"]:
        if case["world_size"] == 1:
            fresh = DPOLoader(dirs["dpo"], **case["kwargs"])
            assert [next(fresh)["index"].tolist() for _ in range(5)] == case["first"]
        loader = DPOLoader(dirs["dpo"], **case["kwargs"])
        loader.load_state_dict(_with_data_hash(case["state"], loader))
        assert [next(loader)["index"].tolist() for _ in range(5)] == case["after"], case["world_size"]


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
