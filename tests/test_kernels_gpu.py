"""GPU-only checks of the Triton MoE kernels: 16-bit accuracy against an fp32 reference,
fp32 exactness (ieee dots), bitwise determinism and CUDA-graph capture/replay.

Legend: T tokens, E experts, K top-k, H hidden, I expert width.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

DEV = "cuda"


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _make(T, H, I, E, K, dtype, seed=0, skew=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w_gu = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w_d = torch.randn(E, H, I, generator=gen) / I ** 0.5
    probs = torch.ones(E) if skew == 0 else 1.0 / torch.arange(1, E + 1).float() ** skew
    ids = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=gen)
    tw = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    dy = torch.randn(T, H, generator=gen)
    cast = lambda t: t.to(DEV, dtype)  # noqa: E731
    return cast(x), cast(w_gu), cast(w_d), ids.to(DEV), tw.to(DEV), cast(dy)


def _fwd_bwd(fn, x, w_gu, w_d, ids, tw, dy, upcast=False):
    conv = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = [conv(t).detach().clone().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    grads = torch.autograd.grad(y, leaves, conv(dy))
    return (y.detach(),) + grads


SHAPES = [
    (77, 200, 136, 8, 3, 0.0),          # ragged everything, small
    (512, 2048, 1408, 64, 6, 0.0),      # Ling-Lite widths, BM=64 heuristic
    (4096, 2048, 1408, 64, 6, 1.2),     # Ling-Lite, skewed, BM=128 heuristic
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_accuracy_vs_fp32_reference(shape, dtype, tol):
    T, H, I, E, K, skew = shape
    inputs = _make(T, H, I, E, K, dtype, skew=skew)
    got = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    want = _fwd_bwd(reference.loop_moe_mlp, *inputs, upcast=True)
    names = ["y", "dx", "dw_gate_up", "dw_down", "dtopk_w"]
    errs = {n: _rel(a, b) for n, a, b in zip(names, got, want)}
    print(shape, dtype, errs)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for n in names:
        assert errs[n] < tol, (n, errs[n])


def test_bitwise_deterministic_gpu():
    inputs = _make(1024, 512, 384, 16, 4, torch.bfloat16, seed=1, skew=1.5)
    a = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    b = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_cuda_graph_capture_and_replay():
    T, H, I, E, K = 256, 256, 192, 8, 2
    x, w_gu, w_d, ids, tw, dy = _make(T, H, I, E, K, torch.bfloat16, seed=2)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
    s_ids, s_dy = ids.clone(), dy.clone()

    def step():
        y = kernels.triton_moe_mlp(leaves[0], leaves[1], leaves[2], s_ids, leaves[3])
        return (y,) + torch.autograd.grad(y, leaves, s_dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels outside capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    # New routing and new values, written in place: a replay is only right if nothing
    # (tile counts, offsets) was baked into the graph from the capture-time routing.
    x2, w_gu2, w_d2, ids2, tw2, dy2 = _make(T, H, I, E, K, torch.bfloat16, seed=3, skew=2.0)
    for dst, src in zip(leaves, (x2, w_gu2, w_d2, tw2)):
        with torch.no_grad():
            dst.copy_(src)
    s_ids.copy_(ids2)
    s_dy.copy_(dy2)
    graph.replay()
    torch.cuda.synchronize()
    eager = _fwd_bwd(kernels.triton_moe_mlp, x2, w_gu2, w_d2, ids2, tw2, dy2)
    for got, want in zip(outs, eager):
        assert torch.equal(got, want)
