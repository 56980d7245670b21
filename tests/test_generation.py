"""moe.generate: the KV-cache decoder against the reference's generate(), against rerunning the
whole prefix, and against a plain argmax loop; sampling filters by hand; seeds; stopping."""
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe
from checkpoints_convert import load_hf
from moe import BailingMoeConfig, BailingMoeForCausalLM
from moe.generation import KVCache, filter_logits, next_tokens
from tests.conftest import FIXTURES, TINY_HF

GENERATE_EXPECTED = FIXTURES / "bailing_moe_tiny" / "generate_expected.json"


@pytest.fixture(autouse=True)
def _one_thread():
    # Decoding is hundreds of tiny ops: a second intra-op thread gains nothing, and on a shared
    # 2-core machine each op can wait a whole time slice for it (a 20x slowdown seen here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small_model(backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                num_shared_experts=1, first_k_dense_replace=1, initializer_range=0.3, torch_dtype="float32",
                eos_token_id=1, pad_token_id=0, expert_backend=backend)
    base.update(kw)
    return BailingMoeForCausalLM(BailingMoeConfig(**base)).eval()


def _left_pad(rows, pad=0):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return ids, mask


def _argmax_loop(model, prompt, n, eos):
    """The independent reference: one unpadded row, the whole sequence rerun for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_equals_reference_generate_on_golden_fixture(backend):
    """generate_expected.json holds the reference implementation's generate(do_sample=False,
    use_cache=True) on the fixture (make_generate_expected.py), batched and left-padded, one case
    stopping on an eos id while the other row goes on."""
    record = json.loads(GENERATE_EXPECTED.read_text())
    model = load_hf(TINY_HF, expert_backend=backend)
    assert len(record["cases"]) >= 5
    for case in record["cases"]:
        ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
        eos = [] if case["eos_token_id"] is None else case["eos_token_id"]
        for use_cache in (True, False):
            out = moe.generate(model, ids, mask, max_new_tokens=case["max_new_tokens"], eos_token_id=eos,
                               pad_token_id=case["pad_token_id"], use_cache=use_cache)
            assert out.tolist() == case["output"], (case["name"], use_cache)


class _VocabRows(TorchDispatchMode):
    """The most rows of V-wide values (logits) any op of the recorded code produced."""

    def __init__(self, V):
        super().__init__()
        self.V, self.most = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == self.V:
            self.most = max(self.most, out.numel() // self.V)
        return out


def test_decoding_computes_the_last_positions_logits_only():
    """The next token reads one row of logits per sequence; a prompt's [B, S, V] logits would cost
    B*S*V values for nothing (4 GB in bf16 for 8 rows of 2k tokens at Ling-Lite's V = 126464)."""
    model = _small_model()
    ids, mask = _left_pad([[5, 6, 7, 8, 9, 10, 11], [3, 4]])
    for use_cache in (True, False):
        with _VocabRows(model.config.vocab_size) as rec:
            moe.generate(model, ids, mask, max_new_tokens=3, eos_token_id=[], use_cache=use_cache)
        assert rec.most == 2, (use_cache, rec.most)  # B rows, whatever the prompt length


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_cache_equals_no_cache_and_argmax_loop_batched(backend):
    model = _small_model(backend)
    prompts = [[5, 6, 7, 8], [9], [3, 4, 5, 6, 7, 8, 10], [11, 12]]
    n = 6 if backend == "triton" else 10  # the interpreter is slow
    ids, mask = _left_pad(prompts)
    cached = moe.generate(model, ids, mask, max_new_tokens=n)
    rerun = moe.generate(model, ids, mask, max_new_tokens=n, use_cache=False)
    assert torch.equal(cached, rerun)
    assert cached.shape[0] == 4 and cached.shape[1] <= ids.shape[1] + n
    S = ids.shape[1]
    for i, p in enumerate(prompts):
        ref = _argmax_loop(model, p, n, eos=1)
        got = cached[i, S:].tolist()
        assert got[:len(ref)] == ref, (i, got, ref)
        assert all(t == 0 for t in got[len(ref):])  # after its eos a row holds the pad id
    assert len({tuple(r) for r in cached[:, S:].tolist()}) > 1  # the rows really differ


def test_cached_logits_match_full_forward():
    """Every step's logits (not just their argmax) equal those of the whole padded sequence."""
    model = _small_model("torch", seed=3)
    ids, mask = _left_pad([[5, 6, 7, 8, 9], [13, 14]])
    full = torch.cat([ids, torch.tensor([[20, 21, 22], [23, 24, 25]])], 1)
    fmask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    pos = (fmask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        want = model(full, attention_mask=fmask, position_ids=pos).logits
        cache = KVCache(model.config, 2, full.shape[1])
        got = [model(ids, attention_mask=mask, position_ids=pos[:, :5], kv_cache=cache).logits]
        for j in range(5, 8):
            got.append(model(full[:, j:j + 1], attention_mask=fmask[:, :j + 1], position_ids=pos[:, j:j + 1],
                             kv_cache=cache).logits)
    got = torch.cat(got, 1)
    real = fmask.bool()
    assert cache.length == 8
    assert (got - want)[real].abs().max().item() < 1e-5


def test_filter_logits_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    finite = lambda x: torch.isfinite(x) & (x > -1e30)  # noqa: E731
    assert finite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # top-p keeps the most likely tokens until their mass reaches p: 0.5 + 0.25 reaches 0.7 and 0.75.
    assert finite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert finite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert finite(filter_logits(logits, top_p=0.76)).tolist() == [[True, True, True, False]]
    assert finite(filter_logits(logits, top_p=0.3)).tolist() == [[True, False, False, False]]
    # Order does not matter: the same tokens survive when the vocabulary is permuted.
    perm = torch.tensor([2, 0, 3, 1])
    assert finite(filter_logits(logits[:, perm], top_p=0.7)).tolist() == [[False, True, False, True]]
    # Temperature divides the logits: ratio of kept probabilities is (0.5/0.25)^(1/T).
    p = filter_logits(logits, temperature=2.0).softmax(-1)
    assert abs(p[0, 0] / p[0, 1] - math.sqrt(2.0)) < 1e-5
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0.0)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = next_tokens(logits.expand(40000, -1), True, 2.0, 3, 1.0, g)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    e = torch.exp(logits[:3].double() / 2.0)
    want = torch.cat([e / e.sum(), torch.zeros(2, dtype=torch.float64)])
    assert (freq - want).abs().max().item() < 0.01, (freq, want)


def test_sampling_is_reproducible_for_a_seed_and_cache_independent():
    model = _small_model("torch", seed=5, initializer_range=0.05)  # small logits: a flat distribution
    ids, mask = _left_pad([[5, 6, 7], [8, 9, 10, 11]])
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, eos_token_id=[])
    a = moe.generate(model, ids, mask, seed=7, **kw)
    b = moe.generate(model, ids, mask, seed=7, **kw)
    c = moe.generate(model, ids, mask, seed=8, **kw)
    d = moe.generate(model, ids, mask, seed=7, use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)
    greedy = moe.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert not torch.equal(a, greedy)
    # top_k=1 is greedy whatever the seed.
    one = moe.generate(model, ids, mask, seed=3, **dict(kw, top_k=1))
    assert torch.equal(one, greedy)


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_strings_end_a_row_and_pad_it():
    model = _small_model("torch", seed=1)
    ids, mask = _left_pad([[5, 6, 7, 8], [9, 10]])
    free = moe.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    S = ids.shape[1]
    text0 = _CharTokenizer().decode(free[0, S:].tolist())
    text1 = _CharTokenizer().decode(free[1, S:].tolist())
    stop = text0[2:4]  # row 0 first completes it at its 4th token (unless earlier: find where)
    end0 = next(j for j in range(1, 9) if stop in text0[:j])
    stopped = moe.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], stop_strings=[stop],
                           tokenizer=_CharTokenizer())
    assert stopped[0, S:S + end0].tolist() == free[0, S:S + end0].tolist()
    assert all(t == 0 for t in stopped[0, S + end0:].tolist())
    if stop not in text1:  # row 1 never produces it: untouched
        assert stopped[1, S:].tolist() == free[1, S:stopped.shape[1]].tolist()
    with pytest.raises(ValueError, match="tokenizer"):
        moe.generate(model, ids, mask, max_new_tokens=2, stop_strings=["x"])


def test_eos_list_and_config_default():
    model = _small_model("torch", seed=2)
    ids, mask = _left_pad([[5, 6, 7]])
    free = moe.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])[0, 3:].tolist()
    first = free[2]
    j = free.index(first)  # where that id first appears
    out = moe.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[999, first])
    assert out[0, 3:].tolist() == free[:j + 1]  # ends at (and keeps) the eos; stops: nothing left to decode
    # eos_token_id=None takes the config's (1 here).
    cfg_eos = moe.generate(model, ids, mask, max_new_tokens=8)
    new = cfg_eos[0, 3:].tolist()
    assert 1 not in new[:-1] and (len(new) == 8 or new[-1] == 1)


def test_prompt_checks():
    model = _small_model("torch")
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        moe.generate(model, ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no real token"):
        moe.generate(model, ids, torch.tensor([[0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="must match"):
        moe.generate(model, ids, torch.tensor([[1, 1]]), max_new_tokens=2)
    assert moe.generate(model, ids, max_new_tokens=0).tolist() == ids.tolist()
