"""Ling 2.0 (BailingMoeV2) against the golden fixture made with the reference code, and the router's
corner cases against a plain per-token reference written here."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moe
from checkpoints_convert import load_hf
from moe import BailingMoeConfig, BailingMoeForCausalLM, CrossEntropy
from moe.heads import mtp_labels
from moe.router import TopKRouter
from tests.conftest import FIXTURES

V2 = FIXTURES / "bailing_moe_v2_tiny"
V2_HF = V2 / "hf"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(V2 / "expected.safetensors"))


@pytest.fixture(scope="module")
def forward(expected):
    """The fixture model's forward with labels (main + MTP), torch backend."""
    model = load_hf(V2_HF, expert_backend="torch")
    with torch.no_grad():
        out = model(expected["input_ids"], attention_mask=expected["attention_mask"], labels=expected["labels"],
                    output_router_logits=True)
    return model, out


def test_the_loader_recognises_v2_by_architectures_and_by_model_type(tmp_path):
    raw = json.loads((V2_HF / "config.json").read_text())
    for model_type in ("bailing_moe_v2", "bailing_moe", ""):  # ours, the published configs', the reference class's
        cfg = BailingMoeConfig.from_hf({**raw, "model_type": model_type})
        assert cfg.family == "bailing_moe_v2"
        assert cfg.to_hf()["architectures"] == ["BailingMoeV2ForCausalLM"]
    no_arch = {k: v for k, v in raw.items() if k != "architectures"}
    assert BailingMoeConfig.from_hf(no_arch).family == "bailing_moe_v2"
    with pytest.raises(moe.ConfigError, match="expected 'bailing_moe' or 'bailing_moe_v2'"):
        BailingMoeConfig.from_hf({**no_arch, "model_type": "llama"})
    # The config round trip keeps every key the reference wrote.
    back = BailingMoeConfig.from_hf(raw).to_hf()
    for k, v in raw.items():
        assert back[k] == v, k


@pytest.mark.parametrize("field,value,msg", [
    ("score_function", "softmax", "routes by sigmoid"),
    ("norm_topk_prob", False, "norm_topk_prob must be true"),
    ("moe_shared_expert_intermediate_size", 64, "moe_shared_expert_intermediate_size"),
])
def test_v2_configs_that_serving_would_read_otherwise_are_refused(field, value, msg):
    raw = json.loads((V2_HF / "config.json").read_text())
    with pytest.raises(moe.ConfigError, match=msg):
        BailingMoeConfig.from_hf({**raw, field: value})


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_parity_with_the_reference(expected, backend):
    model = load_hf(V2_HF, expert_backend=backend)
    with torch.no_grad():
        out = model(expected["input_ids"], attention_mask=expected["attention_mask"], labels=expected["labels"],
                    output_router_logits=True)
    real = expected["attention_mask"].bool()
    dlogits = (out.logits - expected["logits"])[real].abs().max().item()
    dmtp = (out.mtp_logits[0] - expected["mtp_logits"])[real].abs().max().item()
    print(f"{backend}: max |dlogits| {dlogits:.2e}, max |d mtp logits| {dmtp:.2e}")
    assert dlogits < 1e-4 and dmtp < 1e-4
    main = out.ce_sum / out.num_label_tokens
    assert abs(main.item() - expected["loss_main"].item()) < 1e-5
    assert abs(out.mtp_losses[0].item() - expected["loss_mtp_no_cross_row"].item()) < 1e-5
    want_total = expected["loss_main"].item() + 0.3 * expected["loss_mtp_no_cross_row"].item()
    assert abs(out.loss.item() - want_total) < 1e-5
    for L, key in ((1, "1"), (2, "2"), (3, None)):  # layer 3 is the MTP layer
        logits = expected[f"router_logits.{key}"] if key else expected["mtp_router_logits"]
        ids = expected[f"topk_idx.{key}"] if key else expected["mtp_topk_idx"]
        assert (out.router_logits[L] - logits)[real].abs().max().item() < 1e-5, L
        assert torch.equal(out.topk_ids[L][real], ids[real]), L  # same experts, in the same order
    assert sorted(out.expert_counts) == [1, 2, 3]


def test_routing_weights_and_intermediate_outputs(expected, forward):
    """Weights sum to routed_scaling_factor and equal the reference's; the MTP input path (shifted
    embedding with id 0 at the end, eh_proj over [enorm(e); hnorm(h)]) matches stage by stage."""
    model, out = forward
    ids = expected["input_ids"]
    with torch.no_grad():
        x = model.model.layers[1].post_attention_layernorm(expected["layer_out.0"] + expected["attn_out.1"])
        r = model.model.layers[1].mlp.gate(x.view(-1, 64))
        assert torch.allclose(r.topk_weights_TK.view(2, 24, 4), expected["topk_weight.1"], atol=1e-6)
        assert torch.allclose(r.topk_weights_TK.sum(-1), torch.full((48,), 2.5), atol=1e-5)
        shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        emb = model.model.word_embeddings(shifted)
        assert torch.equal(emb, expected["mtp_input_embed"])
        mtp = model.model.layers[3]
        eh = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(expected["final_norm"])], -1))
        assert (eh - expected["mtp_eh_proj_out"]).abs().max().item() < 1e-5


def test_the_references_cross_row_mtp_target_is_reproduced_and_left_out(expected, forward):
    """The reference shifts the MTP labels once per row, then again over the flattened batch: position
    (0, 23) is scored on labels[1, 1], a token of the NEXT row. From its stored target grid our MTP
    logits give the reference's loss; our per-row targets differ from the grid at that one position."""
    _, out = forward
    ref_targets = expected["mtp_targets"]
    logits = out.mtp_logits[0]
    buggy = F.cross_entropy(logits.reshape(-1, 512), ref_targets.reshape(-1), ignore_index=-100)
    # the target of position i
    ours_grid = torch.cat([mtp_labels(expected["labels"], 1)[:, 1:], torch.full((2, 1), -100)], 1)
    fair = F.cross_entropy(logits.reshape(-1, 512), ours_grid.reshape(-1), ignore_index=-100)
    differ = (ours_grid != ref_targets).nonzero().tolist()
    print(f"reference (cross-row) MTP loss {buggy.item():.6f} over {(ref_targets != -100).sum().item()} targets; "
          f"per row {fair.item():.6f} over {(ours_grid != -100).sum().item()}; differing positions {differ}")
    assert abs(buggy.item() - expected["loss_mtp"].item()) < 1e-5
    assert abs(fair.item() - expected["loss_mtp_no_cross_row"].item()) < 1e-5
    assert differ == [[0, 23]]
    assert ref_targets[0, 23].item() == expected["labels"][1, 1].item() == 403 and ours_grid[0, 23].item() == -100
    assert abs(buggy.item() - fair.item()) > 0.02  # what a user comparing with the reference sees


def test_mtp_labels_stay_inside_rows_and_documents():
    labels = torch.arange(10, 20)[None].repeat(2, 1)
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, -1]] * 2)
    got = mtp_labels(labels, 1, doc)
    # the head reads got[i + 1] for position i, i.e. labels[i + 2], only when i and i + 2 share a document
    for i in range(9):
        j = i + 2
        want = labels[0, j].item() if j < 10 and doc[0, i] == doc[0, j] else -100
        assert got[0, i + 1].item() == want, i
    assert mtp_labels(labels, 2)[0].tolist() == list(range(12, 20)) + [-100, -100]


def test_greedy_generation_equals_the_references():
    gen = json.loads((V2 / "generate_expected.json").read_text())
    model = load_hf(V2_HF, expert_backend="torch").eval()
    for case in ("row0_alone", "batch_left_padded", "row1_alone"):
        c = gen[case]
        ids = torch.tensor(c["input_ids"])
        out = moe.generate(model, ids, torch.tensor(c["attention_mask"]), max_new_tokens=12, eos_token_id=1,
                           pad_token_id=0)
        assert out[:, ids.shape[1]:].tolist() == c["new_tokens"], case


def test_mtp_switched_off_or_absent_from_the_head():
    model = BailingMoeForCausalLM(BailingMoeConfig.preset("tiny-v2", vocab_size=64, num_hidden_layers=2))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        on = model(ids, labels=ids)
        off = model(ids, labels=ids, head=CrossEntropy(mtp=False))
        model.config.mtp_enabled = False
        cfg_off = model(ids, labels=ids)
    assert len(on.mtp_losses) == 1 and sorted(on.expert_counts) == [1, 2]  # layer 2 is the MTP layer
    for o in (off, cfg_off):
        assert o.mtp_losses == [] and sorted(o.expert_counts) == [1]
        assert torch.equal(o.loss, o.ce_sum / o.num_label_tokens)
    assert abs(on.loss.item() - (off.loss + 0.1 * on.mtp_losses[0]).item()) < 1e-6


def test_activation_checkpointing_replays_routing_in_main_and_mtp_layers():
    """Every block recomputed in backward (the trainer's wrapper), the MTP layer included: the
    gradients equal a plain backward's, expert biases and groups in play."""
    from trainer.parallel import apply_activation_checkpointing

    torch.manual_seed(7)
    cfg = BailingMoeConfig.preset("tiny-v2", vocab_size=64, hidden_size=32, head_dim=16, num_attention_heads=2,
                                  num_hidden_layers=2, intermediate_size=32, moe_intermediate_size=16)
    model = BailingMoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.normal_(std=0.05)
    ids = torch.randint(0, 64, (2, 10))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_activation_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    for n, g in plain.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-6), n
    assert all(len(layer.mlp.gate._saved) == 0 for layer in model.model.layers[1:])  # every record replayed


# ---------------------------------------------------------------------------------------------- router
def plain_route(scores, bias, K, n_group, topk_group, scale, norm=True):
    """One token at a time, in Python: groups scored by the sum of their two best biased scores
    (ties: lower group first), the best topk_group groups eligible, the K best biased scores among
    them (ties: lower expert first), weights the unbiased scores normalised and scaled."""
    E = len(scores)
    size = E // n_group
    biased = [s + b for s, b in zip(scores, bias)]
    gscore = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group] if n_group > 1 else [0]
    eligible = [e for e in range(E) if e // size in groups] if n_group > 1 else list(range(E))
    ids = sorted(eligible, key=lambda e: (-biased[e], e))[:K]
    w = [scores[e] for e in ids]
    if norm and K > 1:
        total = sum(w) + 1e-20
        w = [x / total for x in w]
    return ids, [x * scale for x in w]


def _router(E, K, n_group, topk_group, scale=2.5, bias=True):
    r = TopKRouter(8, E, K, True, "sigmoid", n_group, topk_group, scale, expert_bias=bias, fp32_logits=True)
    torch.nn.init.normal_(r.weight, std=0.5)
    return r


def _check_against_plain(r, x, K, n_group, topk_group, scale):
    out = r(x)
    scores = torch.sigmoid(x.double() @ r.weight.double().T).float()
    for t in range(x.shape[0]):
        bias = r.expert_bias.tolist() if r.expert_bias is not None else [0.0] * r.num_experts
        ids, w = plain_route(scores[t].tolist(), bias, K, n_group, topk_group, scale)
        assert out.topk_ids_TK[t].tolist() == ids, t
        assert torch.allclose(out.topk_weights_TK[t], torch.tensor(w), atol=1e-6), t
    return out


@pytest.mark.parametrize("E,K,n_group,topk_group", [(16, 4, 4, 2), (16, 4, 4, 4), (16, 1, 4, 2), (12, 3, 1, 1)])
def test_router_matches_the_plain_reference(E, K, n_group, topk_group):
    torch.manual_seed(E + K + n_group + topk_group)
    r = _router(E, K, n_group, topk_group)
    r.expert_bias.normal_(std=0.1)
    _check_against_plain(r, torch.randn(32, 8), K, n_group, topk_group, 2.5)


def test_topk_group_equal_to_n_group_is_plain_top_k():
    torch.manual_seed(1)
    grouped, plain = _router(16, 4, 4, 4), _router(16, 4, 1, 1)
    plain.load_state_dict(grouped.state_dict())
    x = torch.randn(64, 8)
    assert torch.equal(grouped(x).topk_ids_TK, plain(x).topk_ids_TK)


def test_k1_weight_is_the_scaled_score_unnormalised():
    torch.manual_seed(2)
    r = _router(16, 1, 4, 2, scale=2.5)
    x = torch.randn(16, 8)
    out = _check_against_plain(r, x, 1, 4, 2, 2.5)
    s = torch.sigmoid(x @ r.weight.T).gather(-1, out.topk_ids_TK)
    assert torch.allclose(out.topk_weights_TK, 2.5 * s, atol=1e-6)


def test_tied_groups_go_to_the_lower_index():
    """Scores built so that groups 1 and 3 tie for the second kept group: group 1 is kept, in the
    plain reference and in the router."""
    r = _router(16, 2, 4, 2, bias=False)
    r.fp32_logits = True
    logit = torch.logit(torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6, 0.5, 0.1, 0.1,
                                      0.9, 0.8, 0.1, 0.1, 0.6, 0.5, 0.1, 0.1]).double()).float()
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = logit
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    out = _check_against_plain(r, x, 2, 4, 2, 2.5)
    assert out.topk_ids_TK[0].tolist() == [8, 9]
    choice = r.choose(r.scores(x)[1])
    from moe.router import group_limited_choice
    allowed = torch.isfinite(group_limited_choice(r.scores(x)[1], 4, 2))[0].nonzero().flatten().tolist()
    assert allowed == [4, 5, 6, 7, 8, 9, 10, 11] and choice.tolist() == [[8, 9]]


def test_bias_changes_the_choice_but_not_the_weights():
    torch.manual_seed(3)
    r = _router(16, 4, 4, 2)
    x = torch.randn(32, 8)
    before = r(x)
    with torch.no_grad():
        r.expert_bias[before.topk_ids_TK[:, 0]] -= 1.0  # push every token's first choice away
    after = _check_against_plain(r, x, 4, 4, 2, 2.5)
    assert not torch.equal(before.topk_ids_TK, after.topk_ids_TK)
    scores = torch.sigmoid(x @ r.weight.T)
    w = scores.gather(-1, after.topk_ids_TK)
    assert torch.allclose(after.topk_weights_TK, 2.5 * w / w.sum(-1, keepdim=True), atol=1e-6)
    assert r.expert_bias.grad is None and not r.expert_bias.requires_grad
    assert "expert_bias" not in dict(r.named_parameters()) and "expert_bias" in r.state_dict()


def test_expert_bias_stays_fp32_in_a_bf16_model(tmp_path):
    model = load_hf(V2_HF, dtype="bf16")
    bias = model.model.layers[1].mlp.gate.expert_bias
    want = load_file(str(V2_HF / "model-00002-of-00004.safetensors"))["model.layers.1.mlp.gate.expert_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, want)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    model.to(torch.float16)
    assert torch.equal(model.model.layers[1].mlp.gate.expert_bias, want)


# ---------------------------------------------------------------------------------------------- backends
def _gathered_moe(x, w_gu, w_d, ids, w):
    """An independent expert MLP: every (token, slot) pair with its own gathered weights, no sorting."""
    gu = torch.einsum("th,tkoh->tko", x, w_gu[ids])
    I = gu.shape[-1] // 2
    h = F.silu(gu[..., :I]) * gu[..., I:]
    return (torch.einsum("tki,tkhi->tkh", h, w_d[ids]) * w[..., None]).sum(1)


def _mini_routing(T, H=32, I=512):
    """Tokens routed by a Ling-mini-2.0-shaped router (E=256, K=8, 8 groups keep 4, scaling 2.5, an
    expert bias) and expert weights of width I."""
    gen = torch.Generator().manual_seed(5)
    r = TopKRouter(H, 256, 8, True, "sigmoid", 8, 4, 2.5, expert_bias=True, fp32_logits=True)
    with torch.no_grad():
        r.weight.copy_(torch.randn(256, H, generator=gen))
        r.expert_bias.copy_(0.05 * torch.randn(256, generator=gen))
    x = torch.randn(T, H, generator=gen)
    out = r(x)
    w_gu = torch.randn(256, 2 * I, H, generator=gen) / H ** 0.5
    w_d = torch.randn(256, H, I, generator=gen) / I ** 0.5
    return x, w_gu, w_d, out.topk_ids_TK, out.topk_weights_TK


def test_expert_backends_at_ling_mini_expert_shape():
    """E=256, K=8, I=512 (Ling-mini-2.0's experts) under a narrow hidden size, against the gathered
    reference: torch forward and every gradient, loop forward; triton (the interpreter, slow at
    this many experts) forward at I=32. The full shape in bf16 with gradients: the GPU test below."""
    from moe.experts import BACKENDS

    x, w_gu, w_d, ids, w = _mini_routing(8)
    assert ids.unique().numel() > 30  # spread over many experts and groups
    leaves = [t.clone().requires_grad_(True) for t in (x, w_gu, w_d, w)]
    want = _gathered_moe(*leaves[:3], ids, leaves[3])
    dy = torch.randn_like(want)
    g_want = torch.autograd.grad(want, leaves, dy)
    mine = [t.clone().requires_grad_(True) for t in (x, w_gu, w_d, w)]
    got = BACKENDS["torch"](*mine[:3], ids, mine[3])
    g_got = torch.autograd.grad(got, mine, dy)
    errs = [(got - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g_got, g_want)]
    with torch.no_grad():
        errs.append((BACKENDS["loop"](x, w_gu, w_d, ids, w) - want).abs().max().item())
        xs, gus, ds, ids_s, ws = _mini_routing(4, I=32)
        tri = BACKENDS["triton"](xs, gus, ds, ids_s, ws)
        errs.append((tri - _gathered_moe(xs, gus, ds, ids_s, ws)).abs().max().item())
    print("max abs errors (torch y, dx, dw_gate_up, dw_down, dweights; loop y; triton y):", [f"{e:.1e}" for e in errs])
    assert max(errs) < 2e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_expert_backends_at_ling_mini_shape_on_gpu(backend):
    """Every backend at Ling-mini-2.0's whole expert shape (E=256, K=8, H=2048, I=512), bf16, 4096
    tokens, forward and gradients against the fp32 gathered reference."""
    from moe.experts import BACKENDS

    x, w_gu, w_d, ids, w = (t.cuda() for t in _mini_routing(4096 if backend != "loop" else 512, H=2048))
    leaves = [t.clone().requires_grad_(True) for t in (x, w_gu, w_d, w)]
    want = _gathered_moe(*leaves[:3], ids, leaves[3]) if x.shape[0] <= 512 else None
    mine = [t.to(torch.bfloat16).requires_grad_(True) for t in (x, w_gu, w_d)] + [w.clone().requires_grad_(True)]
    got = BACKENDS[backend](*mine[:3], ids, mine[3] if backend != "triton" else mine[3].to(torch.bfloat16))
    if want is None:  # the reference in 512-token chunks (its gathered weights are large)
        want = torch.cat([_gathered_moe(leaves[0][i:i + 512], *leaves[1:3], ids[i:i + 512], leaves[3][i:i + 512])
                          for i in range(0, x.shape[0], 512)])
    rel = ((got.float() - want).norm() / want.norm()).item()
    dy = torch.randn_like(want)
    g_got = torch.autograd.grad(got.float(), mine[:3], dy)
    g_want = torch.autograd.grad(want, leaves[:3], dy)
    rels = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(g_got, g_want)]
    print(backend, f"relative error y {rel:.2e}, grads {[f'{r:.2e}' for r in rels]}")
    assert rel < 2e-2 and max(rels) < 2e-2
