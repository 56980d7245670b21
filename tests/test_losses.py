"""Router losses and chunked cross entropy against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe.losses import (chunked_cross_entropy_sum, load_balancing_loss, router_z_loss,
                        sequence_load_balancing_loss, topk_load_balancing_loss)
from tests.trainer_utils import free_port

ALPHA = 0.01


def test_perfect_balance_gives_alpha():
    E, K, T = 8, 2, 16
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)  # every expert 4 slots
    assert torch.bincount(ids.flatten(), minlength=E).eq(4).all()
    assert topk_load_balancing_loss(probs, ids, ALPHA).item() == pytest.approx(ALPHA, rel=1e-6)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_everything_on_the_same_experts_gives_alpha_E_over_K(K):
    E, T = 8, 10
    probs = torch.zeros(T, E)
    probs[:, :K] = 1.0 / K  # all mass on the chosen experts
    ids = torch.arange(K).expand(T, K)
    # f_i = 1/K on K experts, P_i = 1/K there: alpha * E * K * (1/K^2) = alpha * E / K.
    assert topk_load_balancing_loss(probs, ids, ALPHA).item() == pytest.approx(ALPHA * E / K, rel=1e-6)


def test_hand_example_and_global_counts():
    # E=2, K=1, T=2: probs (0.75, 0.25) for both tokens, both routed to expert 0.
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    ids = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.75, 0.25): alpha * 2 * 0.75
    assert topk_load_balancing_loss(probs, ids, 1.0).item() == pytest.approx(1.5)
    # Global counts from another rank that sent 2 tokens to expert 1: f = (0.5, 0.5) -> 2*(0.375+0.125)
    g = load_balancing_loss(probs.sum(0), 2, torch.tensor([2, 2]), 1.0)
    assert g.item() == pytest.approx(1.0)


def test_balance_loss_gradient_reaches_probabilities_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    ids = probs.topk(2, -1).indices
    loss = topk_load_balancing_loss(probs, ids, 1.0)
    loss.backward()
    # d/dlogits of alpha*E*sum f_i * mean p_i: check against a finite difference.
    eps = 1e-6  # counts (f) stay fixed: the routing of the same ids is reused below
    with torch.no_grad():
        l2 = logits.clone()
        l2[0, 0] += eps
        p2 = l2.softmax(-1)
        num = (topk_load_balancing_loss(p2, ids, 1.0) - loss) / eps
    assert logits.grad[0, 0].item() == pytest.approx(num.item(), rel=1e-5, abs=1e-9)
    assert logits.grad.abs().sum() > 0


def test_sequence_level_matches_per_sequence_mean():
    torch.manual_seed(0)
    probs = torch.rand(3, 5, 4).softmax(-1)
    ids = probs.topk(2, -1).indices
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    got = sequence_load_balancing_loss(probs, ids, ALPHA, mask)
    per = [topk_load_balancing_loss(probs[b][mask[b]], ids[b][mask[b]], ALPHA) for b in range(3)]
    assert got.item() == pytest.approx(sum(p.item() for p in per) / 3, rel=1e-6)


def test_z_loss_hand_value():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, 0) = ln 4.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)
    assert router_z_loss(logits, torch.tensor([True, False])).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_chunked_cross_entropy_equals_full():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    full = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = chunked_cross_entropy_sum(h, w, labels, chunk_size=8)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(gh, ch, atol=1e-5) and torch.allclose(gw, cw, atol=1e-5)


# Global-batch balancing, 2 ranks x 2 micro-batches, E=2, K=1, alpha=1, 2 tokens per micro-batch:
#   rank 0: mb 1 probs (.75,.25) both tokens -> expert 0; mb 2 probs (.6,.4) -> expert 0
#   rank 1: mb 1 probs (.5,.5)  both tokens -> expert 1; mb 2 probs (.2,.8) -> expert 0
# mb 1: counts over ranks (2, 2), f = (.5, .5): rank 0  2*(.5*.75 + .5*.25) = 1.0, rank 1  2*(.5*.5 + .5*.5) = 1.0
# mb 2: counts carried (2, 2) + (4, 0) = (6, 2), f = (.75, .25):
#       rank 0  2*(.75*.6 + .25*.4) = 1.1, rank 1  2*(.75*.2 + .25*.8) = 0.7
# (per micro-batch only, mb 2 would use f = (1, 0): 1.2 and 0.4). The next step starts from zero again.
_GLOBAL_CASE = {0: [((0.75, 0.25), 0), ((0.6, 0.4), 0)], 1: [((0.5, 0.5), 1), ((0.2, 0.8), 0)]}
_GLOBAL_WANT = {0: [1.0, 1.1], 1: [1.0, 0.7]}


def test_global_balance_is_n_times_megatrons_global_aux_loss_by_hand():
    # Megatron-Core 0.16.1's global_aux_loss (router.py _apply_global_aux_loss, moe_utils.py
    # switch_load_balancing_loss_func), written out: at micro-batch m of a step, with c the expert
    # counts summed over the N data-parallel ranks and micro-batches 1..m, and T the micro-batch's
    # local tokens,  L = coeff * E * sum_i (sum_x p_i(x)) * (c_i / m) / (K * (N * T)^2).
    # On the case above (N = 2, T = 2, E = 2, K = 1, coeff 1) ours is N x that at every micro-batch:
    # a coefficient from a Megatron run acts N times stronger here (docs/training.md).
    from moe.losses import CarriedCounts

    N, T, E, K = 2, 2, 2, 1
    carried = CarriedCounts(lambda c: c)  # the ranks' sum, formed here by hand
    for m in range(2):
        both = sum(torch.bincount(torch.tensor([_GLOBAL_CASE[r][m][1]] * T), minlength=E) for r in (0, 1))
        c = carried(both).double()
        for r in (0, 1):
            p = torch.tensor([_GLOBAL_CASE[r][m][0]] * T, dtype=torch.float64)
            ours = load_balancing_loss(p.sum(0), T, c, 1.0).item()
            megatron = (E * (p.sum(0) * c / (m + 1)).sum() / (K * (N * T) ** 2)).item()
            assert ours == pytest.approx(_GLOBAL_WANT[r][m], rel=1e-12)
            assert ours == pytest.approx(N * megatron, rel=1e-12), (r, m, ours, megatron)


def _global_balance_rank(rank, port, out):
    import torch.distributed as dist

    from moe.losses import CarriedCounts
    from trainer.parallel import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        carried = CarriedCounts(all_reduce_sum)
        got = []
        for step in range(2):
            carried.reset()
            for probs, expert in _GLOBAL_CASE[rank]:
                p = torch.tensor([probs, probs], dtype=torch.float64)
                counts = torch.bincount(torch.tensor([expert, expert]), minlength=2)
                got.append(load_balancing_loss(p.sum(0), 2, carried(counts), 1.0).item())
        out[rank] = got
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_batch_balance_two_ranks_two_micro_batches_by_hand():
    import torch.multiprocessing as mp

    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(_global_balance_rank, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank] == pytest.approx(_GLOBAL_WANT[rank] * 2, rel=1e-12), (rank, out[rank])
