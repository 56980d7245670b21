"""moe.expert_parallel on real gloo ranks: outputs, losses and every gradient equal a one-process run
of the same global batch (fp32, 1e-5), for the loop, torch and triton (interpreter) backends, with
an expert that gets no tokens and with every token sent to one rank's experts."""
import copy

import pytest
import torch
import torch._dynamo.utils

from tests.trainer_utils import free_port

CASES = ("random", "empty_expert", "all_to_rank0")


def _groups(world: int, ep: int):
    """The EP group of this rank (ep consecutive ranks) and its dp group (same ep index)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ep_group = dp_group = None
    for d in range(world // ep):  # every rank must create every group, in the same order
        g = dist.new_group(list(range(d * ep, (d + 1) * ep)))
        if rank // ep == d:
            ep_group = g
    for e in range(ep):
        g = dist.new_group(list(range(e, world, ep)))
        if rank % ep == e:
            dp_group = g
    return ep_group, dp_group


def _inputs(case: str, T: int, H: int, I: int, E: int, K: int, El: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen)
    w_gu = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w_d = torch.randn(E, H, I, generator=gen) / I ** 0.5
    allowed = {"random": list(range(E)), "empty_expert": [e for e in range(E) if e != 1],
               "all_to_rank0": list(range(El))}[case]
    allowed = torch.tensor(allowed)
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(T)])
    tw = torch.rand(T, K, generator=gen) + 0.1
    dy = torch.randn(T, H, generator=gen)
    return x, w_gu, w_d, ids, tw, dy


def _module_check(world, ep, backend, case, dp_group, ep_group):
    """Max abs error of y and of every gradient against the reference on the global batch."""
    import torch.distributed as dist

    from kernels.reference import loop_moe_mlp
    from moe.expert_parallel import ExpertParallelExperts

    rank = dist.get_rank()
    T, H, I, E, K = 4 * world, 16, 8, 8, 2
    El = E // ep
    x, w_gu, w_d, ids, tw, dy = _inputs(case, T, H, I, E, K, El)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
    y_ref = loop_moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    g_ref = torch.autograd.grad(y_ref, leaves, dy)

    mod = ExpertParallelExperts(E, H, I, backend, ep_group)
    r = mod.ep_rank
    with torch.no_grad():
        mod.w_gate_up.copy_(w_gu[r * El:(r + 1) * El])
        mod.w_down.copy_(w_d[r * El:(r + 1) * El])
    rows = slice(rank * 4, rank * 4 + 4)  # this rank's tokens of the global batch
    xl, twl = x[rows].clone().requires_grad_(True), tw[rows].clone().requires_grad_(True)
    y = mod(xl, ids[rows], twl)
    gx, gw_gu, gw_d, gtw = torch.autograd.grad(y, [xl, mod.w_gate_up, mod.w_down, twl], dy[rows])
    for g in (gw_gu, gw_d):  # an expert's gradient: the sum over the data-parallel copies of it
        dist.all_reduce(g, group=dp_group)
    errs = {"y": (y - y_ref[rows]).abs().max(), "dx": (gx - g_ref[0][rows]).abs().max(),
            "dw_gate_up": (gw_gu - g_ref[1][r * El:(r + 1) * El]).abs().max(),
            "dw_down": (gw_d - g_ref[2][r * El:(r + 1) * El]).abs().max(),
            "dtopk_w": (gtw - g_ref[3][rows]).abs().max()}
    if case == "all_to_rank0" and r > 0:  # experts that got no token anywhere: exactly zero gradient
        errs["nonzero_grad_of_idle_experts"] = torch.tensor(float(gw_gu.abs().sum() + gw_d.abs().sum()))
    return {k: float(v) for k, v in errs.items()}


def _model_cfg(E: int, backend: str, v2: bool = False):
    from moe import BailingMoeConfig

    if v2:  # Ling-mini-2.0's routing and expert shape (E=256, K=8, 8 groups keep 4, I=512), an MTP layer
        return BailingMoeConfig.preset("ling-mini-2.0", vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                       num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.1, torch_dtype="float32",
                                       expert_backend=backend, aux_loss_type="global", aux_loss_alpha=0.01,
                                       z_loss_coef=1e-3)
    return BailingMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=E,
                            num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                            initializer_range=0.05, torch_dtype="float32", expert_backend=backend,
                            aux_loss_type="global", aux_loss_alpha=0.01, z_loss_coef=1e-3)


def _model_check(world, ep, backend, dp_group, ep_group, v2=False, compiled=False):
    """The whole model: loss (CE over the global batch + global-batch balance loss + z-loss), expert
    counts and every parameter's gradient against one process on the global batch. ``compiled``:
    each EP decoder block compiled (aot_eager), which must trace as one graph (no graph break)."""
    import torch.distributed as dist

    from moe import BailingMoeForCausalLM
    from moe.expert_parallel import apply_expert_parallel
    from moe.heads import CHUNK_TOKENS, CrossEntropy

    rank, E, B, S = dist.get_rank(), 256 if v2 else 8, 2 * world, 12
    El = E // ep
    torch.manual_seed(0)
    model = BailingMoeForCausalLM(_model_cfg(E, backend, v2))
    if v2:
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.expert_bias.normal_(std=0.02, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 97, (B, S), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids, head=CrossEntropy(chunk_size=CHUNK_TOKENS))
    n = out.num_label_tokens
    mtp_n = out.mtp_num_label_tokens[0] if v2 else None
    mtp = 0.1 * out.mtp_ce_sums[0] / mtp_n if v2 else 0.0
    (out.ce_sum / n + mtp + out.aux_loss).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    ref_loss = float(out.ce_sum / n + mtp + out.aux_loss)
    ref_counts = torch.stack(list(out.expert_counts.values()))

    ep_model = copy.deepcopy(model)
    ep_model.zero_grad(set_to_none=True)
    apply_expert_parallel(ep_model, group=ep_group)
    if compiled:  # as trainer/parallel.shard_model does for compiled blocks with EP
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        for layer in ep_model.model.layers:
            layer.compile(backend="aot_eager")

    def all_ranks_counts(c):
        c = c.clone()
        dist.all_reduce(c)
        return c

    rows = slice(rank * 2, rank * 2 + 2)
    o = ep_model(ids[rows], labels=ids[rows], head=CrossEntropy(chunk_size=CHUNK_TOKENS),
                 balance_counts_fn=all_ranks_counts)
    # The trainer's normalisation: CE over the global token count, the router loss averaged over ranks.
    loss = o.ce_sum / n + o.aux_loss / world
    if v2:
        loss = loss + 0.1 * o.mtp_ce_sums[0] / mtp_n
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    counts = all_ranks_counts(torch.stack(list(o.expert_counts.values())))
    errs = {"loss": abs(float(total) - ref_loss), "counts": float((counts - ref_counts).abs().max())}
    r = dist.get_rank(ep_group)
    for k, p in ep_model.named_parameters():
        g = p.grad.clone()
        if k.endswith(("experts.w_gate_up", "experts.w_down")):
            dist.all_reduce(g, group=dp_group)
            want = ref[k][r * El:(r + 1) * El]
        else:
            dist.all_reduce(g)
            want = ref[k]
        errs[k] = float((g - want).abs().max())
    if compiled:
        errs["graph_breaks"] = float(sum(torch._dynamo.utils.counters["graph_break"].values()))
    return errs


def _worker(rank, world, port, plans, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for ep, what, backend, case in plans:
            ep_group, dp_group = _groups(world, ep)
            if what == "module":
                errs = _module_check(world, ep, backend, case, dp_group, ep_group)
            else:
                errs = _model_check(world, ep, backend, dp_group, ep_group, v2=what == "model_v2",
                                    compiled=what == "compiled")
            out[(rank, ep, what, backend, case)] = errs
    finally:
        dist.destroy_process_group()


def _run(world, plans):
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), plans, out), nprocs=world, join=True)
    bad = {}
    for key, errs in sorted(out.items()):
        worst = max(errs.values())
        print(key, f"max err {worst:.2e}")
        if worst > 1e-5:
            bad[key] = {k: v for k, v in errs.items() if v > 1e-5}
    assert len(out) == world * len(plans)
    assert not bad, bad


@pytest.mark.slow
def test_two_ranks_ep2_equal_one_process():
    plans = [(2, "module", b, c) for b in ("loop", "torch", "triton") for c in CASES]
    plans += [(2, "model", b, "") for b in ("loop", "torch")]
    plans += [(2, "model_v2", "torch", "")]  # Ling-mini-2.0's experts: E=256, K=8, I=512
    plans += [(2, "compiled", b, "") for b in ("torch", "triton")]
    _run(2, plans)


@pytest.mark.slow
def test_four_ranks_ep2_x_dp2_and_ep4_equal_one_process():
    plans = [(ep, "module", b, c) for ep in (2, 4) for b in ("loop", "torch") for c in CASES]
    plans += [(ep, "model", b, "") for ep in (2, 4) for b in ("loop", "torch")]
    _run(4, plans)


def test_a_group_of_one_equals_the_torch_backend():
    import torch.distributed as dist

    from moe.expert_parallel import ExpertParallelExperts

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        # A group of one holds every expert: the same numbers as GroupedExperts' torch backend.
        from kernels.reference import grouped_mm_moe_mlp

        x, w_gu, w_d, ids, tw, _ = _inputs("random", 6, 8, 4, 4, 2, 4)
        mod = ExpertParallelExperts(4, 8, 4, "torch", dist.new_group([0]))
        with torch.no_grad():
            mod.w_gate_up.copy_(w_gu)
            mod.w_down.copy_(w_d)
        assert torch.allclose(mod(x, ids, tw), grouped_mm_moe_mlp(x, w_gu, w_d, ids, tw), atol=1e-6)
    finally:
        dist.destroy_process_group()
