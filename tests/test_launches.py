"""Kernel launches per MoE layer, forward and backward (issue 26, item 4), so that they cannot creep back.

Counted on CPU by tests/dispatch_utils.Launches: every aten op that would launch a kernel on a GPU
(views and allocations are not counted) and every Triton kernel launch, inside our custom ops too.
The triton backend runs under the interpreter; what is counted is what a GPU would launch.

Before issue 26 (commit d7f86e2, benchmarks/compile_and_launches_cpu.json "before"), the triton
backend's expert MLP took 34 launches forward (the routing tables alone ~20 torch ops, the
K-way combine a sum and, in bf16, a cast) and 6 backward (36 and 9 in bf16). Now: the routing tables are one
Triton kernel fed with the router's counts, the combine is one kernel (in backward it also sums the
d topk_w partials), and the routing weights stay fp32 (no cast either way).
"""
import pytest
import torch

from moe import BailingMoeConfig
from moe.model import MoEBlock
from tests.dispatch_utils import Launches

GEMMS_FWD = {"_gate_up_fwd_kernel": 1, "_rows_gemm_kernel": 1}
GEMMS_BWD = {"_down_bwd_kernel": 1, "_expert_wgrad_kernel": 2, "_rows_gemm_kernel": 1}


def _block(dtype, recompute=False):
    cfg = BailingMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                           num_shared_experts=1, torch_dtype="float32", expert_backend="triton",
                           expert_recompute=recompute)
    torch.manual_seed(0)
    block = MoEBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block.to(dtype)


def _count(block, dtype, experts_only):
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    fwd, bwd = Launches(), Launches()
    if experts_only:
        x_TH = x.detach().view(-1, 32)
        r = block.gate(x_TH)
        x_TH.requires_grad_()
        w = r.topk_weights_TK.detach().requires_grad_()
        with fwd.watching_triton():
            y = block.experts(x_TH, r.topk_ids_TK, w, r.all_counts_E)
    else:
        with fwd.watching_triton():
            y, _ = block(x, None, False)
    dy = torch.randn_like(y)
    with bwd.watching_triton():
        y.backward(dy)
    return fwd, bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_expert_mlp_launches_four_kernels_forward_and_five_backward(dtype):
    fwd, bwd = _count(_block(dtype), dtype, experts_only=True)
    print(dtype, dict(fwd.aten), dict(fwd.triton), dict(bwd.aten), dict(bwd.triton))
    assert not fwd.aten and not bwd.aten, (dict(fwd.aten), dict(bwd.aten))
    assert dict(fwd.triton) == {"_routing_kernel": 1, "_combine_kernel": 1, **GEMMS_FWD}
    assert dict(bwd.triton) == {"_combine_kernel": 1, **GEMMS_BWD}


def test_expert_recompute_costs_one_gemm_launch():
    fwd, bwd = _count(_block(torch.float32, recompute=True), torch.float32, experts_only=True)
    assert fwd.total == 4 and not bwd.aten
    assert dict(bwd.triton) == {"_combine_kernel": 1, **GEMMS_BWD, "_gate_up_fwd_kernel": 1}


def test_a_moe_layer_launches_at_most_this_many():
    # The whole MoE block: router (linear, softmax, top-k, weights, the one histogram), the experts, the
    # shared expert and the sum. Before issue 26: 52 forward, 30 backward (fp32; "before" in the JSON,
    # at the tiny preset's shape: the counts do not depend on the sizes).
    fwd, bwd = _count(_block(torch.float32), torch.float32, experts_only=False)
    print(fwd.total, dict(fwd.aten), bwd.total, dict(bwd.aten))
    assert fwd.total <= 22, dict(fwd.aten)
    assert bwd.total <= 29, dict(bwd.aten)


def test_lora_on_the_experts_adds_narrow_launches_and_drops_the_frozen_weight_gradients():
    """LoRA on the triton backend (kernels/moe_mlp.py): forward, two narrow products (x A_gu^T, h A_down^T)
    beside the four launches; backward, the two weight-gradient GEMMs of the frozen weights go, and come:
    v_down = dy B_down, v_gu's two halves and the adapters' five gradient reductions (8 narrow launches),
    plus a few elementwise ops on [N, r] (the scale and the routing weight on the narrow operands)."""
    from kernels import triton_moe_mlp
    from kernels.lora import ExpertLoRA

    g = torch.Generator().manual_seed(0)
    T, E, K, H, I, r = 16, 6, 2, 32, 16, 4
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g) / 6, torch.randn(E, H, I, generator=g) / 4
    tw, ids = torch.rand(T, E, generator=g).topk(K, dim=-1)
    tw.requires_grad_()
    adapters = [torch.randn(*s, generator=g, requires_grad=True) for s in ((E, 2 * r, H), (E, 2 * I, r), (E, r, I),
                                                                          (E, H, r))]
    fwd, bwd = Launches(), Launches()
    with fwd.watching_triton():
        y = triton_moe_mlp(x, w_gu, w_d, ids, tw, lora=ExpertLoRA(*adapters, 2.0))
    dy = torch.randn(y.shape, generator=g)
    with bwd.watching_triton():
        y.backward(dy)
    print(dict(fwd.aten), dict(fwd.triton), dict(bwd.aten), dict(bwd.triton))
    assert not fwd.aten
    assert dict(fwd.triton) == {"_routing_kernel": 1, "_combine_kernel": 1, "_gate_up_fwd_kernel": 1,
                                "_rows_gemm_kernel": 3}
    assert dict(bwd.triton) == {"_combine_kernel": 1, "_down_bwd_kernel": 1, "_rows_gemm_kernel": 4,
                                "_expert_wgrad_kernel": 5}
    assert dict(bwd.aten) == {"mul": 5, "index": 1}  # s v_down, s v_gu, s u_gu; u_down's routing weight: index, 2 mul
    assert w_gu.grad is None and w_d.grad is None
