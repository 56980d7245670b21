"""Routed experts as stacked parameters, computed by one of three interchangeable backends.

Legend: T tokens, E experts, K experts per token, H hidden size, I expert width.
  w_gate_up_E2IH [E, 2I, H]: rows [:I] are each expert's gate_proj, rows [I:] its up_proj ([out, in]).
  w_down_EHI     [E, H, I]:  each expert's down_proj.
y[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

Backends (all give the same outputs):
  "loop"   one masked pass per expert: the plain reference (kernels.reference.loop_moe_mlp).
  "torch"  tokens sorted by expert once, then two grouped GEMMs (torch._grouped_mm where the build
           supports the device/dtype, else one matmul per contiguous expert segment); the K outputs
           of a token are combined by an unsort and a sum in a fixed order, so results are
           deterministic (kernels.reference.grouped_mm_moe_mlp, the function the kernel bench times).
  "triton" our Triton kernels (kernels.triton_moe_mlp), on GPU or under the Triton interpreter.
The plain-PyTorch backends live in kernels/reference.py (which imports no kernel), so that the kernel
bench times exactly these functions while kernels/ stays a leaf.

LoRA (moe/lora.py) adds low-rank adapters beside the frozen stacked weights: ``adapters()`` then
returns a kernels.lora.ExpertLoRA and the backend computes them on its sorted rows. The loop and
torch backends do; the triton backend's adapter path is not written yet and refuses.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from data.errors import BadInputError
from kernels.reference import grouped_mm_moe_mlp, loop_moe_mlp


class BackendError(BadInputError):
    """An expert backend asked for something it cannot compute."""


TRITON_LORA_MISSING = ("LoRA on the routed experts is not yet computed by the triton expert backend; use "
                       "expert_backend 'torch' (grouped GEMMs, no host sync) or 'loop'")


@torch.compiler.disable  # our kernels run eagerly; a compiled block breaks its graph around them
def _eager_triton_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E=None,
                          lora=None):
    if lora is not None:
        raise BackendError(TRITON_LORA_MISSING)
    import kernels  # imported lazily: Triton is needed only by this backend

    return kernels.triton_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E)


BACKENDS = {"loop": loop_moe_mlp, "torch": grouped_mm_moe_mlp, "triton": _eager_triton_moe_mlp}


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r} is not one of {sorted(BACKENDS)}")
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def adapters(self):
        """The experts' LoRA adapters (kernels.lora.ExpertLoRA) to add, or None (moe.lora overrides it)."""
        return None

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, counts_E=None):
        """counts_E [E]: slots per expert over all T tokens, when the router has counted them (the
        backends then skip their own count); None lets the backend count."""
        w = topk_weights_TK.to(x_TH.dtype) if self.backend == "triton" else topk_weights_TK
        lora = self.adapters()
        extra = {} if lora is None else {"lora": lora}
        return BACKENDS[self.backend](x_TH, self.w_gate_up, self.w_down, topk_ids_TK, w, counts_E, **extra)
