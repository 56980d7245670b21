"""What the routed experts keep for backward, and expert recompute (issue 26, item 5).

The triton backend keeps, besides its inputs, the gate/up pre-activation [T*K, 2I] and the routing
tables; with recompute only the tables, and backward runs the gate/up GEMM again. The torch and
loop backends recompute under torch.utils.checkpoint. Recompute must not change a single bit of
the output or of any gradient: the same kernels run on the same inputs in the same order.
"""
import pytest
import torch

from kernels.routing import max_tiles
from moe.experts import GroupedExperts

T, H, E, K, I = 12, 32, 5, 2, 16


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g, dtype=dtype)
    probs = torch.randn(T, E, generator=g).softmax(-1)
    tw, ids = probs.topk(K, -1)
    return x, ids, tw, torch.bincount(ids.reshape(-1), minlength=E)


def _experts(backend, recompute, dtype=torch.float32):
    torch.manual_seed(0)
    m = GroupedExperts(E, H, I, backend, recompute=recompute)
    with torch.no_grad():
        m.w_gate_up.normal_(0, H ** -0.5)
        m.w_down.normal_(0, I ** -0.5)
    return m.to(dtype)


def _run(m, x, ids, tw, counts, hook=None):
    x = x.clone().requires_grad_()
    tw = tw.clone().requires_grad_()
    if hook is None:
        y = m(x, ids, tw, counts)
    else:
        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            y = m(x, ids, tw, counts)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    grads = torch.autograd.grad(y, (x, tw, m.w_gate_up, m.w_down), dy)
    return (y.detach(),) + grads


@pytest.mark.parametrize("backend", ["triton", "torch", "loop"])
def test_recompute_gives_the_same_bits(backend):
    inputs = _inputs()
    default = _run(_experts(backend, False), *inputs)
    recomputed = _run(_experts(backend, True), *inputs)
    for name, a, b in zip(("y", "dx", "dtopk_w", "dw_gate_up", "dw_down"), default, recomputed):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("recompute", [False, True])
def test_triton_saves_the_preactivation_unless_recomputing(recompute):
    # Bytes of every saved storage that is not a parameter, against the count by hand (bf16 activations:
    # the interpreter's bf16 arithmetic is wrong, but only sizes are read here).
    x, ids, tw, counts = _inputs(torch.bfloat16)
    m = _experts("triton", recompute, torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    _run(m, x.to(torch.bfloat16), ids, tw, counts, hook=pack)
    N = T * K
    tables = 4 * (N + N + E + (E + 1) + 2 * max_tiles(N, E, 16) + 1)  # int32; the interpreter's block_m is 16
    by_hand = 2 * T * H + 4 * T * K + tables + (0 if recompute else 2 * N * 2 * I)  # x, fp32 weights, tables, gu
    assert sum(saved.values()) == by_hand, (sorted(saved.values()), by_hand)
