"""torch.compile over whole decoder blocks, the routed experts inside (issue 26, item 1).

The Triton expert MLP and the grouped-matmul fallback are torch.library custom ops with fake rules
and an autograd rule, so dynamo traces a MoE block as ONE graph: norms, attention, router, top-k,
the experts, the shared expert and the residual adds. These tests check that (no graph break, one
graph per block) and that the compiled blocks compute what the eager ones do, loss and every
gradient, for the torch and the triton backends (triton under the interpreter, fp32).

The compiler backend here is aot_eager: dynamo's graph capture and AOTAutograd's joint
forward/backward graph (which is where the custom ops' fake and autograd rules are used), without
inductor's code generation, which costs 30-40 s per block on 2 CPU cores. Inductor's numbers against
eager are in benchmarks/compile_and_launches_cpu.json; tests/test_trainer_gpu.py compiles with
inductor on CUDA.
"""
import copy

import pytest
import torch
import torch._dynamo.utils

from moe import BailingMoeConfig, BailingMoeForCausalLM
from moe.model import MoEBlock, rotary_cos_sin


def _model(backend, **extra):
    torch.manual_seed(0)
    cfg = BailingMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                           num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                           initializer_range=0.05, torch_dtype="float32", expert_backend=backend,
                           aux_loss_alpha=0.01, z_loss_coef=1e-3, **extra)
    return BailingMoeForCausalLM(cfg)


# Ling 2.0's parts at the same size: sigmoid router with expert bias and group-limited top-k, QK-norm,
# partial RoPE (8 of 16 head dims), an MTP layer.
V2 = dict(family="bailing_moe_v2", head_dim=16, n_group=3, topk_group=2, routed_scaling_factor=2.5,
          score_function="sigmoid", moe_router_enable_expert_bias=True, use_qk_norm=True,
          partial_rotary_factor=0.5, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.1)

PACKED = dict(position_ids=torch.tensor([list(range(9)) + list(range(5)) + [0, 0], list(range(16))]),
              document_ids=torch.tensor([[0] * 9 + [1] * 5 + [-1] * 2, [0] * 16]))


@pytest.mark.parametrize("backend,v2", [("torch", False), ("triton", False), ("triton", True)])
def test_a_moe_decoder_block_is_one_graph(backend, v2):
    torch._dynamo.reset()
    model = _model(backend, **(V2 if v2 else {}))
    layer = model.model.layers[1]
    assert isinstance(layer.mlp, MoEBlock)
    if v2:
        with torch.no_grad():  # a bias that changes the choice, as a trained one does
            layer.mlp.gate.expert_bias.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    h = torch.randn(2, 16, 32)
    rope = tuple(t[:, :, None] for t in rotary_cos_sin(PACKED["position_ids"], 8, 600000.0, h.dtype))
    token_mask = PACKED["document_ids"] >= 0
    explained = torch._dynamo.explain(layer)(h, rope, None, token_mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # 4-10 s each on 2 cores: dynamo and AOTAutograd trace two blocks
@pytest.mark.parametrize("backend,recompute,v2", [("torch", False, False), ("triton", False, False),
                                                  ("triton", True, False), ("triton", False, True)])
def test_compiled_blocks_equal_eager_loss_and_gradients(backend, recompute, v2):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _model(backend, expert_recompute=recompute, **(V2 if v2 else {}))
    if v2:
        with torch.no_grad():
            for layer in eager.model.layers[1:]:
                layer.mlp.gate.expert_bias.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    compiled = copy.deepcopy(eager)
    for layer in compiled.model.layers:
        layer.compile(backend="aot_eager")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (eager, compiled):
        out = m(ids, labels=ids, **PACKED)
        (out.loss + out.aux_loss).backward()
        losses.append((out.loss.item(), out.aux_loss.item()))
    print(backend, recompute, losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        err = ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # One graph for the dense block and one for the MoE block (the second pass reuses them), and Ling
    # 2.0's MTP layer (model.layers[-1]: its own norms and projection around a MoE block) one more.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (3 if v2 else 2)
