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
