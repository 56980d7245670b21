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

``recompute`` (the config's expert_recompute) keeps less for backward: the triton backend drops its
gate/up pre-activation [T*K, 2I] and recomputes it with one GEMM in backward; the torch and loop
backends run under torch.utils.checkpoint (their whole MLP is recomputed, keeping only its inputs).

LoRA (moe/lora.py) adds low-rank adapters beside the frozen stacked weights: ``adapters()`` then
returns a kernels.lora.ExpertLoRA and the backend computes them on its sorted rows: the triton
backend inside its grouped GEMMs' accumulators (kernels/moe_mlp.py), without dropout on the adapters'
input, which only the loop and torch backends draw.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from data.errors import BadInputError
from kernels.reference import grouped_mm_moe_mlp, loop_moe_mlp


class BackendError(BadInputError):
    """An expert backend asked for something it cannot compute."""


TRITON_LORA_DROPOUT = ("the triton expert backend computes the routed experts' LoRA without dropout (lora.dropout "
                       "{p}): set lora.dropout 0, or expert_backend 'torch', which draws it")


def _triton_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E=None, recompute=False,
                    lora=None):
    if lora is not None and lora.dropout > 0:
        raise BackendError(TRITON_LORA_DROPOUT.format(p=lora.dropout))
    # Imported on first use: only this backend needs Triton. The op is a set of torch.library custom
    # ops, so a compiled block traces through it with no graph break (kernels/moe_mlp.py).
    from kernels.moe_mlp import triton_moe_mlp

    return triton_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E, recompute, lora)


BACKENDS = {"loop": loop_moe_mlp, "torch": grouped_mm_moe_mlp, "triton": _triton_moe_mlp}


def expert_mlp(backend: str, recompute: bool = False):
    """The backend's function with the common signature (x, w_gate_up, w_down, ids, weights, counts_E)."""
    if backend not in BACKENDS:
        raise ValueError(f"expert backend {backend!r} is not one of {sorted(BACKENDS)}")
    fn = BACKENDS[backend]
    if not recompute:
        return fn
    if backend == "triton":
        return functools.partial(fn, recompute=True)
    return functools.partial(checkpoint, fn, use_reentrant=False)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch",
                 recompute: bool = False):
        super().__init__()
        self._mlp = expert_mlp(backend, recompute)
        self.backend, self.recompute = backend, recompute
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def adapters(self):
        """The experts' LoRA adapters (kernels.lora.ExpertLoRA) to add, or None (moe.lora overrides it)."""
        return None

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, counts_E=None):
        """counts_E [E]: slots per expert over all T tokens, when the router has counted them (the
        backends then skip their own count); None lets the backend count."""
        # The weights stay fp32 (the router's): every backend combines in fp32, and a cast to the
        # activation dtype would cost a launch forward and one back.
        lora = self.adapters()
        if lora is None:
            return self._mlp(x_TH, self.w_gate_up, self.w_down, topk_ids_TK, topk_weights_TK, counts_E)
        return self._mlp(x_TH, self.w_gate_up, self.w_down, topk_ids_TK, topk_weights_TK, counts_E, lora=lora)
