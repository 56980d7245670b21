"""Model parity with the reference implementation's golden outputs, packing, backends, meta build."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints_convert import load_hf
from moe import BailingMoeConfig, BailingMoeForCausalLM, ConfigError, CrossEntropy, Logits, TokenLogps
from moe.router import checkpoint_context_fn
from tests.conftest import TINY_EXPECTED, TINY_HF


@pytest.fixture(scope="module")
def expected():
    return load_file(str(TINY_EXPECTED))


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_parity_with_reference(expected, backend):
    model = load_hf(TINY_HF, expert_backend=backend)
    with torch.no_grad():
        out = model(expected["input_ids"], attention_mask=expected["attention_mask"],
                    labels=expected["labels"], output_router_logits=True)
    real = expected["attention_mask"].bool()
    dlogits = (out.logits - expected["logits"])[real].abs().max().item()
    dloss = (out.loss - expected["loss"][0]).abs().item()
    print(f"{backend}: max |dlogits| {dlogits:.2e}, |dloss| {dloss:.2e}")
    assert dlogits < 1e-4
    assert dloss < 1e-5
    assert sorted(out.router_logits) == [0, 1, 2]
    for L in range(3):
        drl = (out.router_logits[L] - expected[f"router_logits.{L}"])[real].abs().max().item()
        assert drl < 1e-5, (L, drl)
        ours = out.topk_ids[L].sort(-1).values[real]
        ref = expected[f"topk_idx.{L}"].sort(-1).values[real]
        assert torch.equal(ours, ref), L
        # Counts are over real tokens only: K slots per real token.
        assert out.expert_counts[L].sum().item() == 2 * int(real.sum())


def _tiny_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                num_shared_experts=1, first_k_dense_replace=1, initializer_range=0.05, torch_dtype="float32")
    base.update(kw)
    return BailingMoeConfig(**base)


def test_packed_row_equals_separate_documents():
    torch.manual_seed(0)
    model = BailingMoeForCausalLM(_tiny_cfg())
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 3])
    pos = torch.tensor([list(range(7)) + list(range(5)) + [0] * 3])
    out = model(packed, position_ids=pos, document_ids=doc)
    la, lb = model(a).logits, model(b).logits
    assert torch.allclose(out.logits[:, :7], la, atol=1e-5)
    assert torch.allclose(out.logits[:, 7:12], lb, atol=1e-5)
    # Backward through the block-diagonal mask works on CPU.
    out.logits[:, :12].sum().backward()
    assert model.model.word_embeddings.weight.grad is not None


def test_heads_against_sums_of_the_plain_logits():
    """Each head against numbers computed by hand from the logits of a plain forward: the label
    tokens' log-probabilities one by one, their sum (the CE, chunked or not), the last position."""
    torch.manual_seed(6)
    model = BailingMoeForCausalLM(_tiny_cfg(aux_loss_alpha=0.01))
    B, S = 2, 9
    ids = torch.randint(0, 97, (B, S))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        plain = model(ids)
        logp = plain.logits.float().log_softmax(-1)
        want = torch.zeros(B, S)  # position i is scored on labels[i + 1]; the last position on nothing
        for b in range(B):
            for i in range(S - 1):
                if labels[b, i + 1] != -100:
                    want[b, i] = logp[b, i, labels[b, i + 1]]
        n = int((labels[:, 1:] != -100).sum())
        outs = [model(ids, labels=labels, head=h) for h in (CrossEntropy(), CrossEntropy(chunk_size=5))]
        for out, keeps_logits in zip(outs, (True, False)):
            assert torch.allclose(out.ce_sum, -want.sum(), atol=1e-5)
            assert int(out.num_label_tokens) == n and torch.allclose(out.loss, -want.sum() / n, atol=1e-6)
            assert (out.logits is not None) == keeps_logits
        logps = model(ids, labels=labels, head=TokenLogps(chunk_size=5))
        assert torch.allclose(logps.token_logps, want, atol=1e-5)
        last = model(ids, head=Logits(last_only=True)).logits
        assert last.shape == (B, 1, 97) and torch.allclose(last, plain.logits[:, -1:], atol=1e-5)
    # The router's part of the output comes from the trunk, whatever the head.
    assert all(torch.equal(o.aux_loss, plain.aux_loss) for o in outs + [logps])
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, head=TokenLogps())


def test_backends_agree_in_outputs_and_gradients():
    torch.manual_seed(1)
    cfg = _tiny_cfg(first_k_dense_replace=0, aux_loss_alpha=0.01, z_loss_coef=1e-3)
    ref = BailingMoeForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 9))
    grads = {}
    for backend in ("loop", "torch"):
        m = BailingMoeForCausalLM(dataclasses.replace(cfg, expert_backend=backend))
        m.load_state_dict(ref.state_dict())
        out = m(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters()}
        grads[backend]["_loss"] = out.loss.detach()
    for n, g in grads["loop"].items():
        assert torch.allclose(g, grads["torch"][n], rtol=1e-4, atol=1e-6), n


def test_triton_backend_matches_torch_backend_with_gradients():
    torch.manual_seed(3)
    cfg = _tiny_cfg(first_k_dense_replace=0, num_hidden_layers=1, aux_loss_alpha=0.01)
    ids = torch.randint(0, 97, (2, 9))
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        m = BailingMoeForCausalLM(dataclasses.replace(cfg, expert_backend=backend))
        out = m(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters()}
        grads[backend]["_logits"] = out.logits.detach()
    for n, g in grads["torch"].items():
        err = ((g - grads["triton"][n]).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        print(f"{n}: max rel err {err:.1e}")
        assert err < 1e-4, n


def test_checkpoint_recompute_replays_routing_and_matches_gradients():
    torch.manual_seed(2)
    cfg = _tiny_cfg(first_k_dense_replace=0)
    model = BailingMoeForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    layer = model.model.layers[0]
    router = layer.mlp.gate
    orig_forward = layer.forward
    calls = {"n": 0}

    def ckpt_forward(*args, **kwargs):
        def run(*a):
            calls["n"] += 1
            return orig_forward(*a, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False,
                                                 context_fn=lambda: checkpoint_context_fn(layer))
    layer.forward = ckpt_forward
    # The backend's one-time capability probe must not run inside the checkpoint's record.
    from kernels.reference import grouped_mm_available
    grouped_mm_available.cache_clear()
    out2 = model(ids, labels=ids)
    assert len(router._saved) == 1  # recorded during the forward
    out2.loss.backward()
    assert calls["n"] == 2 and len(router._saved) == 0  # recomputed once, replayed the saved ids
    for n, g in plain.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-6), n


def test_meta_build_costs_no_memory_and_counts_parameters():
    cfg = BailingMoeConfig.preset("ling-lite")
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    # Hand count from the architecture (REFERENCE section 1): 16.8B in all, 2.75B active per token.
    per_layer_attn = 2048 * (2048 + 2 * 512) + 2048 * 2048
    per_layer_moe = 64 * 3 * 2048 * 1408 + 64 * 2048 + 3 * 2048 * 2816
    hand = 28 * (per_layer_attn + per_layer_moe + 2 * 2048) + 2 * 126464 * 2048 + 2048
    assert n == hand == cfg.num_params()
    assert round(n / 1e9, 1) == 16.8
    assert round(cfg.num_params(active_only=True) / 1e9, 2) == 2.75
    assert model.model.layers[5].mlp.experts.w_gate_up.shape == (64, 2816, 2048)


def test_init_weights_after_materialising_meta_model():
    cfg = _tiny_cfg()
    with torch.device("meta"):
        m = BailingMoeForCausalLM(cfg)
    m.to_empty(device="cpu")
    m.init_weights(seed=0)
    assert torch.equal(m.model.norm.weight, torch.ones(32))
    std = m.model.layers[0].attention.query_key_value.weight.std().item()
    assert abs(std - 0.05) < 0.01
    out = m(torch.randint(0, 97, (1, 4)))
    assert torch.isfinite(out.logits).all()
    # Name-seeded: the same seed gives the same model however it was built (sharded inits rely on it).
    whole = BailingMoeForCausalLM(cfg)
    whole.init_weights(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), whole.state_dict().values()))
    whole.init_weights(seed=1)
    assert not torch.equal(m.lm_head.weight, whole.lm_head.weight)


@pytest.mark.parametrize("kw,msg", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "divisible"),
    (dict(num_experts=4, num_experts_per_tok=6), "cannot exceed"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "'yarn' is not supported"),
    (dict(expert_backend="cuda"), "expert_backend"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_validation_messages(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        BailingMoeConfig(**kw)


def test_config_hf_round_trip_and_bad_model_type(tmp_path):
    import json
    raw = json.loads((TINY_HF / "config.json").read_text())
    cfg = BailingMoeConfig.from_hf(TINY_HF)
    back = cfg.to_hf()
    for k, v in raw.items():
        assert back[k] == v, k
    assert back["auto_map"]["AutoModelForCausalLM"] == "modeling_bailing_moe.BailingMoeForCausalLM"
    assert BailingMoeConfig.from_hf(back) == cfg
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'bailing_moe'"):
        BailingMoeConfig.from_hf(tmp_path)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grouped_mm_probe_is_not_fooled_by_no_grad(mode):
    from kernels.reference import grouped_mm_available

    grouped_mm_available.cache_clear()
    # e.g. a reference-model pass, or generation (moe.generate runs under inference_mode), runs first:
    # a probe that failed there stayed cached, and the torch backend fell back to per-expert matmuls
    # (with a host sync each) for the rest of the process
    with getattr(torch, mode)():
        first = grouped_mm_available("cpu", torch.float32)
    grouped_mm_available.cache_clear()
    assert first == grouped_mm_available("cpu", torch.float32) == hasattr(torch, "_grouped_mm")


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention warns that it runs uncompiled on CPU
def test_flex_attention_matches_sdpa_on_packed_and_padded_rows():
    torch.manual_seed(4)
    cfg = _tiny_cfg(attn_implementation="sdpa")
    sdpa = BailingMoeForCausalLM(cfg)
    flex = BailingMoeForCausalLM(dataclasses.replace(cfg, attn_implementation="flex"))
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 97, (2, 12))
    doc = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 12])
    pos = torch.tensor([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))])
    with torch.no_grad():  # flex_attention's CPU path has no backward
        a = sdpa(ids, position_ids=pos, document_ids=doc).logits
        b = flex(ids, position_ids=pos, document_ids=doc).logits
        assert torch.allclose(a[doc >= 0], b[doc >= 0], atol=1e-5)
        left = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])  # left padding, as in batched generation
        a = sdpa(ids, attention_mask=left).logits
        b = flex(ids, attention_mask=left).logits
        assert torch.allclose(a[left.bool()], b[left.bool()], atol=1e-5)
        assert torch.allclose(sdpa(ids).logits, flex(ids).logits, atol=1e-5)


def test_auto_attention_takes_flex_only_for_packed_rows_on_cuda():
    from moe.model import attention_kind

    assert attention_kind("auto", "cuda", packed=True) == "flex"
    assert attention_kind("auto", "cuda", packed=False) == "sdpa"
    assert attention_kind("auto", "cpu", packed=True) == "sdpa"
    assert attention_kind("sdpa", "cuda", packed=True) == "sdpa" and attention_kind("flex", "cpu", packed=False) == "flex"


class _TrigWork(TorchDispatchMode):
    """Elements of every cos and sin a forward computes."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.cos, torch.ops.aten.sin):
            self.elements += out.numel()
        return out


def test_rotary_work_does_not_grow_with_depth():
    """What sharing the rotary tables buys: a forward evaluates cos and sin for one [B, S, D] table
    pair whatever the number of layers (the layers' attention once rebuilt them each)."""
    B, S = 2, 6
    work = {}
    for layers in (1, 4):
        model = BailingMoeForCausalLM(_tiny_cfg(num_hidden_layers=layers))
        with torch.no_grad(), _TrigWork() as trig:
            model(torch.randint(0, 97, (B, S)))
        work[layers] = trig.elements
    assert 0 < work[4] == work[1] <= 2 * B * S * model.config.head_dim, work


def test_gqa_attention_equals_attention_over_repeated_kv_heads():
    # Independent reference: plain softmax attention where query head j reads kv head j // (nh/nkv),
    # with the causal rule, and with a packed-row mask (the repeated-heads path) and without (enable_gqa).
    from moe.model import Attention, rotary_cos_sin

    torch.manual_seed(5)
    cfg = _tiny_cfg(num_attention_heads=4, num_key_value_heads=2)
    attn = Attention(cfg)
    B, S, nh, nkv, hd = 2, 7, 4, 2, cfg.head_dim
    x = torch.randn(B, S, cfg.hidden_size)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], list(range(7))])
    rope = tuple(t[:, :, None] for t in rotary_cos_sin(pos, hd, cfg.rope_theta, x.dtype))
    qkv = attn.query_key_value(x).view(B, S, nh + 2 * nkv, hd)
    cos, sin = rope
    rot = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin  # noqa: E731
    q, k, v = rot(qkv[:, :, :nh]), rot(qkv[:, :, nh:nh + nkv]), qkv[:, :, nh + nkv:]
    # Query i of row b sees key j when j <= i in the same document, written out element by element.
    d = doc.tolist()
    packed_BSS = torch.tensor([[[j <= i and d[b][j] == d[b][i] for j in range(S)] for i in range(S)] for b in range(B)])
    for mask_BSS in (packed_BSS, torch.ones(S, S).tril().bool()[None]):
        want = torch.empty(B, S, nh, hd)
        for j in range(nh):
            scores = torch.einsum("bsd,btd->bst", q[:, :, j], k[:, :, j // (nh // nkv)]) / hd ** 0.5
            scores = scores.masked_fill(~mask_BSS, float("-inf"))
            want[:, :, j] = torch.einsum("bst,btd->bsd", scores.softmax(-1), v[:, :, j // (nh // nkv)])
        want = attn.dense(want.reshape(B, S, nh * hd))
        is_causal_only = mask_BSS.shape[0] == 1
        got = attn(x, rope, None if is_causal_only else mask_BSS[:, None])
        assert torch.allclose(got, want, atol=1e-5), is_causal_only
