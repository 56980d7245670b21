"""LoRA on the model: the expert backends against merged weights, PEFT itself on the reference code
(the golden fixture tests/fixtures/bailing_moe_tiny_lora, made with PEFT 0.13.2), the initial
adapters, the switch that gives the base model back, and PEFT's adapter format both ways."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert import load_hf
from checkpoints_convert.peft import (PeftAdapter, adapter_config, adapter_shapes, load_adapter, merge_lora,
                                      to_pieces, write_adapter)
from kernels import triton_moe_mlp
from kernels.lora import ExpertLoRA
from kernels.reference import grouped_mm_available, grouped_mm_moe_mlp, loop_moe_mlp
from moe.experts import BackendError, GroupedExperts
from moe.lora import (TARGETS, LoraError, LoraSpec, _adapt_linear, adapters_disabled, apply_lora, initial_adapter_value,
                      is_adapter_name, parse_targets, set_trainable)
from tests.conftest import FIXTURES, TINY_EXPECTED, TINY_HF

LORA_FIXTURE = FIXTURES / "bailing_moe_tiny_lora"
BACKENDS = {"loop": loop_moe_mlp, "torch": grouped_mm_moe_mlp}
# the Triton kernels, on CPU through the interpreter (tests/conftest.py), in fp32
KERNELS = {**BACKENDS, "triton": triton_moe_mlp, "triton_recompute": lambda *a, **k: triton_moe_mlp(*a, recompute=True, **k)}


def _expert_problem(rank: int, seed: int = 0, E=4, T=7, H=16, I=8, K=2, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4
    ids = torch.randint(0, E - 1, (T, K), generator=g)  # expert E-1 gets no token
    if skew:  # every token's first choice is expert 0: more rows than one 16-row tile of the interpreter's kernels
        ids[:, 0] = 0
    ids[:, 1] = (ids[:, 0] + 1) % (E - 1)  # two distinct experts per token
    tw = torch.rand(T, K, generator=g)
    adapters = [torch.randn(E, 2 * rank, H, generator=g) / 3, torch.randn(E, 2 * I, rank, generator=g) / 3,
                torch.randn(E, rank, I, generator=g) / 3, torch.randn(E, H, rank, generator=g) / 3]
    return x, w_gu, w_d, ids, tw, adapters


def _merged_reference(x, w_gu, w_d, ids, tw, adapters, scale):
    """Each expert's W + scale * B A formed explicitly (gate, up and down apart), then the plain
    per-expert loop without adapters: an independent route to the same function."""
    a_gu, b_gu, a_d, b_d = adapters
    r, I = a_d.shape[1], w_d.shape[2]
    gate = w_gu[:, :I] + scale * b_gu[:, :I] @ a_gu[:, :r]
    up = w_gu[:, I:] + scale * b_gu[:, I:] @ a_gu[:, r:]
    down = w_d + scale * b_d @ a_d
    return loop_moe_mlp(x, torch.cat([gate, up], dim=1), down, ids, tw)


@pytest.mark.parametrize("rank", [1, 3, 12])  # 12 > the expert width 8; 1 and 3 need padding for _grouped_mm
@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_expert_backends_match_the_merged_weights(backend, rank, monkeypatch):
    x, w_gu, w_d, ids, tw, adapters = _expert_problem(rank)
    calls = []
    grouped_mm_available("cpu", torch.float32)  # the probe's own call, made once, before counting
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    scale = 2.0

    def run(fn):
        xs = x.clone().requires_grad_()
        tws = tw.clone().requires_grad_()
        ads = [a.clone().requires_grad_() for a in adapters]
        y = fn(xs, tws, ads)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        return y, [xs.grad, tws.grad] + [a.grad for a in ads]

    y, grads = run(lambda xs, tws, ads: KERNELS[backend](xs, w_gu, w_d, ids, tws, lora=ExpertLoRA(*ads, scale)))
    y_ref, grads_ref = run(lambda xs, tws, ads: _merged_reference(xs, w_gu, w_d, ids, tws, ads, scale))
    # relative to each tensor's largest entry
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip([y] + grads, [y_ref] + grads_ref)]
    print(f"{backend} rank {rank}: max relative |diff| output {errs[0]:.2e}, grads {max(errs[1:]):.2e}")
    assert max(errs) < 1e-5
    empty = adapters[0].shape[0] - 1  # the expert without tokens: its adapters get exactly zero gradient
    assert all(bool((g[empty] == 0).all()) for g in grads[2:])
    assert all(g.abs().sum() > 0 for g in grads[2:])
    # The torch backend stays on _grouped_mm (no per-expert fallback, which syncs with the host) for
    # every rank: two frozen GEMMs, A then B of gate and up together (1 + 2), A and B of down (2).
    assert len(calls) == (7 if backend == "torch" else 0)


def test_dropout_draws_only_in_training_and_only_on_the_adapters():
    x, w_gu, w_d, ids, tw, adapters = _expert_problem(4)
    plain = grouped_mm_moe_mlp(x, w_gu, w_d, ids, tw, lora=ExpertLoRA(*adapters, 2.0))
    for fn in BACKENDS.values():
        torch.manual_seed(0)
        dropped = fn(x, w_gu, w_d, ids, tw, lora=ExpertLoRA(*adapters, 2.0, dropout=0.5))
        base = fn(x, w_gu, w_d, ids, tw)
        assert not torch.allclose(dropped, plain)
        # Every adapter output dropped entirely (p -> 1 would): what remains is the base.
        assert torch.allclose(fn(x, w_gu, w_d, ids, tw, lora=ExpertLoRA(*adapters, 2.0, dropout=0.999999)), base,
                              atol=1e-5)
    lin = load_hf(TINY_HF).model.layers[0].attention.dense
    _adapt_linear(lin, LoraSpec(rank=2, dropout=0.25))
    with torch.no_grad():
        for p in (lin.lora_A, lin.lora_B):
            p.copy_(torch.randn(p.shape))
        h = torch.randn(5, 64)
        torch.manual_seed(3)
        lin.train()
        got = lin(h)
        torch.manual_seed(3)
        mask_h = torch.nn.functional.dropout(h, 0.25)
        assert torch.allclose(got, h @ lin.weight.T + (mask_h @ lin.lora_A.T) @ lin.lora_B.T * 2, atol=1e-5)
        lin.eval()
        assert torch.allclose(lin(h), h @ lin.weight.T + (h @ lin.lora_A.T) @ lin.lora_B.T * 2, atol=1e-5)


@pytest.mark.parametrize("rank,shape", [(70, dict(T=5, H=16, I=8)),  # the kernels walk a rank past 64 in steps
                                        (4, dict(T=20, H=40, I=24, E=5, K=3, skew=True))])  # ragged, multi-tile
@pytest.mark.parametrize("backend", ["triton", "triton_recompute"])
def test_triton_lora_at_more_shapes_and_with_expert_recompute(backend, rank, shape):
    x, w_gu, w_d, ids, tw, adapters = _expert_problem(rank, seed=5, **shape)
    dy = torch.randn(x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(2))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in [x, tw, *adapters]]
        y = fn(leaves[0], w_gu, w_d, ids, leaves[1], lora=ExpertLoRA(*leaves[2:], 0.5))
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    got, want = run(KERNELS[backend]), run(lambda *a, lora: _merged_reference(*a, list(lora[:4]), lora.scale))
    errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    print(backend, rank, shape, [f"{e:.1e}" for e in errs])
    assert max(errs) < 1e-5


def test_the_frozen_stacked_weights_get_no_gradient_and_triton_refuses_dropout():
    x, w_gu, w_d, ids, tw, adapters = _expert_problem(2)
    for fn in (grouped_mm_moe_mlp, triton_moe_mlp):
        ads = [a.clone().requires_grad_() for a in adapters]
        lora = ExpertLoRA(*ads, 2.0)
        fn(x, w_gu, w_d, ids, tw, lora=lora).sum().backward()
        assert w_gu.grad is None and w_d.grad is None and all(a.grad is not None for a in ads)
    experts = GroupedExperts(4, 16, 8, backend="triton")
    experts.adapters = lambda: ExpertLoRA(*adapters, 2.0, dropout=0.1)
    with pytest.raises(BackendError, match=r"without dropout \(lora.dropout 0.1\)"):
        experts(x, ids, tw)
    # the same adapters without dropout (what eval passes): computed
    experts.adapters = lambda: ExpertLoRA(*adapters, 2.0)
    with torch.no_grad():
        experts.w_gate_up.copy_(w_gu)
        experts.w_down.copy_(w_d)
        assert torch.allclose(experts(x, ids, tw), _merged_reference(x, w_gu, w_d, ids, tw, adapters, 2.0), atol=1e-5)
    with pytest.raises(ValueError, match="a_down must be"):
        loop_moe_mlp(x, w_gu, w_d, ids, tw, lora=ExpertLoRA(adapters[0], adapters[1], adapters[2][:, :, :3],
                                                            adapters[3], 1.0))


def _fixture_model(backend: str):
    model = load_hf(TINY_HF, expert_backend=backend)
    spec = load_adapter(model, LORA_FIXTURE / "adapter")
    return model, spec


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_equals_peft_on_the_reference_code(backend):
    """Logits, loss, router outputs and the gradient of all 174 adapter tensors of PEFT 0.13.2 on the
    reference modeling code (fp32), and the base model back with the adapters disabled."""
    exp = load_file(str(LORA_FIXTURE / "expected.safetensors"))
    model, spec = _fixture_model(backend)
    assert spec == LoraSpec(rank=4, alpha=8, targets=("attention", "shared_experts", "experts"))
    model.train()  # all dropouts are 0: the mode the fixture's gradients were taken in
    out = model(exp["input_ids"], attention_mask=exp["attention_mask"], labels=exp["labels"], output_router_logits=True)
    real = exp["attention_mask"].bool()
    d_logits = (out.logits - exp["logits"])[real].abs().max().item()
    d_loss = abs(out.loss.item() - exp["loss"].item())
    out.loss.backward()
    grads = {k: g for n, p in model.named_parameters() if is_adapter_name(n) for k, g in to_pieces(n, p.grad, model.config)}
    assert len(grads) == 174 and set("grad." + k for k in grads) == {k for k in exp if k.startswith("grad.")}
    d_grad = max((g - exp["grad." + k]).abs().max().item() for k, g in grads.items())
    d_router = max((out.router_logits[L] - exp[f"router_logits.{L}"])[real].abs().max().item() for L in range(3))
    print(f"{backend}: logits {d_logits:.2e}, loss {d_loss:.2e}, grads {d_grad:.2e}, router logits {d_router:.2e}")
    assert d_logits <= 1e-5 and d_loss <= 1e-5 and d_grad <= 1e-6 and d_router <= 1e-5
    for L in range(3):
        assert torch.equal(out.topk_ids[L][real].sort(-1).values, exp[f"topk_idx.{L}"][real].sort(-1).values)
    frozen = [n for n, p in model.named_parameters() if not is_adapter_name(n)]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad(), adapters_disabled(model):
        base = model(exp["input_ids"], attention_mask=exp["attention_mask"]).logits
    assert (base - exp["logits_adapter_disabled"])[real].abs().max() <= 1e-5
    with torch.no_grad():  # switched back on afterwards
        assert torch.equal(model(exp["input_ids"], attention_mask=exp["attention_mask"]).logits, out.logits.detach())


def test_initial_adapters_leave_the_base_model_unchanged_and_draw_a_as_peft():
    base = load_hf(TINY_HF)
    model = load_hf(TINY_HF)
    spec = LoraSpec(rank=3, dropout=0.1)
    apply_lora(model, spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_name(n):
                p.copy_(initial_adapter_value(n, tuple(p.shape), seed=7))
    ids = load_file(str(TINY_EXPECTED))["input_ids"]
    model.train()  # dropout on, and still exact: B is zero
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base.eval()(ids).logits)
    # PEFT draws A with kaiming_uniform_(a=sqrt(5)) per [r, in] matrix: U(-1/sqrt(in), 1/sqrt(in)).
    a = initial_adapter_value("model.layers.0.mlp.experts.lora_A_gate_up", (64, 6, 2048), seed=7)
    assert a.abs().max() <= 1 / math.sqrt(2048) and a.abs().max() > 0.99 / math.sqrt(2048)
    assert abs(a.std().item() - 1 / math.sqrt(3 * 2048)) < 0.01 / math.sqrt(2048)
    assert not torch.equal(a[0, :3], a[0, 3:])  # gate's and up's drawn apart
    assert torch.equal(a, initial_adapter_value("model.layers.0.mlp.experts.lora_A_gate_up", (64, 6, 2048), seed=7))
    assert not initial_adapter_value("x.lora_B_down", (2, 4, 3), seed=7).any()


def test_targets_trainable_parameters_and_the_spec():
    model = load_hf(TINY_HF)
    spec = LoraSpec(rank=2, targets=("experts",), train_router=True)
    adapted = apply_lora(model, spec)
    assert adapted == [f"model.layers.{L}.mlp.experts" for L in range(3)]
    set_trainable(model, spec)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"model.layers.{L}.mlp.experts.lora_{ab}_{w}" for L in range(3) for ab in "AB"
                                for w in ("gate_up", "down")] + [f"model.layers.{L}.mlp.gate.weight" for L in range(3)])
    assert parse_targets("all") == TARGETS and parse_targets("experts, attention") == ("attention", "experts")
    assert LoraSpec(rank=8).scale == 2.0 and LoraSpec(rank=8, alpha=8).scale == 1.0
    for bad in (dict(rank=0), dict(rank=2, targets=("mlp",)), dict(rank=2, dropout=1.0), dict(rank=2, alpha=0)):
        with pytest.raises(LoraError):
            LoraSpec(**bad)
    with pytest.raises(LoraError, match="already"):
        apply_lora(model, spec)


def test_merge_equals_peft_merge_and_unload(tmp_path):
    merge_lora(TINY_HF, LORA_FIXTURE / "adapter", tmp_path / "merged")
    want = load_file(str(LORA_FIXTURE / "merged.safetensors"))
    got = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"merged weights vs PEFT's merge_and_unload: max |diff| {worst:.2e}")
    assert worst <= 1e-7
    exp = load_file(str(LORA_FIXTURE / "expected.safetensors"))
    with torch.no_grad():
        logits = load_hf(tmp_path / "merged")(exp["input_ids"], attention_mask=exp["attention_mask"]).logits
    assert (logits - exp["logits_merged"])[exp["attention_mask"].bool()].abs().max() <= 1e-5


def test_written_adapter_is_pefts_format_and_loads_back(tmp_path):
    model, spec = _fixture_model("torch")
    params = dict(model.named_parameters())
    shapes = adapter_shapes(model.config, spec)
    write_adapter(tmp_path / "adapter", ((n, params[n].detach()) for n in shapes), model.config, spec,
                  base_name_or_path="tests/fixtures/bailing_moe_tiny/hf")
    ours, peft = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), \
        load_file(str(LORA_FIXTURE / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == peft.keys() and all(torch.equal(ours[k], peft[k]) for k in peft)
    cfg_ours = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg_peft = json.loads((LORA_FIXTURE / "adapter" / "adapter_config.json").read_text())
    assert {k: v for k, v in cfg_ours.items() if k != "target_modules"} == \
        {k: v for k, v in cfg_peft.items() if k != "target_modules"}
    assert sorted(cfg_ours["target_modules"]) == sorted(cfg_peft["target_modules"])
    fresh = load_hf(TINY_HF)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters())


def test_partial_targets_name_exactly_the_adapted_modules_for_peft():
    cfg = load_hf(TINY_HF).config
    wrapped = json.loads((LORA_FIXTURE / "make_report.json").read_text())["wrapped"]  # PEFT's module names
    for targets in [("attention",), ("experts",), ("shared_experts",), ("attention", "shared_experts")]:
        pattern = adapter_config(cfg, LoraSpec(rank=2, targets=targets), "base")["target_modules"]
        matched = {m for m in wrapped if re.fullmatch(pattern, m)}
        want = {m for m in wrapped if any(k in m for k in {"attention": [".attention."],
                                                               "experts": [".mlp.experts."],
                                                               "shared_experts": [".shared_experts."]}[targets[0]])}
        if len(targets) == 1:
            assert matched == want, (targets, pattern)
        assert not any(re.fullmatch(pattern, m) for m in ("lm_head", "model.layers.0.mlp.gate"))
    everything = adapter_config(cfg, LoraSpec(rank=2), "base")["target_modules"]
    assert everything == ["dense", "down_proj", "gate_proj", "query_key_value", "up_proj"]


def test_a_foreign_or_partial_adapter_is_refused(tmp_path):
    import shutil

    from checkpoints_convert.io import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(LORA_FIXTURE / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cfg = load_hf(TINY_HF).config
    with pytest.raises(CheckpointError, match="use_dora"):
        PeftAdapter(bad, cfg)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.2.mlp.experts.7.down_proj.lora_B.weight"]
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1"):
        PeftAdapter(bad, cfg)


def test_the_lora_expert_bench_checks_before_it_times(tmp_path):
    """benchmarks/lora_experts.py on the interpreter's tiny shape: every LoRA row compared with another
    implementation first (the GPU run's numbers are only as good as this check)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_experts", FIXTURES.parent.parent / "benchmarks" / "lora_experts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--tiny", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["triton_lora", "torch_lora", "loop_lora", "triton_full"]
    assert all("ms_median" in r and "wrong" not in r and "error" not in r for r in rows), rows
    vs = {r["impl"]: r.get("rel_err_vs") for r in rows}
    assert vs == {"triton_lora": "torch_lora", "torch_lora": "loop_lora", "loop_lora": "torch_lora", "triton_full": None}
    assert all(r["max_rel_err"] < 1e-5 for r in rows if r["impl"] != "triton_full")
