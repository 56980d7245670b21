"""Routed experts as stacked parameters, computed by one of three interchangeable backends.

Legend: T tokens, E experts, K experts per token, H hidden size, I expert width.
  w_gate_up_E2IH [E, 2I, H]: rows [:I] are each expert's gate_proj, rows [I:] its up_proj ([out, in]).
  w_down_EHI     [E, H, I]:  each expert's down_proj.
y[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

Backends (all give the same outputs):
  "loop"   one masked pass per expert: the plain reference.
  "torch"  tokens sorted by expert once, then two grouped GEMMs (torch._grouped_mm where the build
           supports the device/dtype, else one matmul per contiguous expert segment); the K outputs
           of a token are combined by an unsort and a sum in a fixed order, so results are
           deterministic (no index_add atomics).
  "triton" our Triton kernels (kernels.moe_mlp), on GPU or under the Triton interpreter.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def loop_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK):
    T, H = x_TH.shape
    E, I2, _ = w_gate_up_E2IH.shape
    I = I2 // 2
    y = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    for e in range(E):
        tok, slot = torch.where(topk_ids_TK == e)
        if tok.numel() == 0:
            continue
        gu = x_TH[tok] @ w_gate_up_E2IH[e].t()
        h = F.silu(gu[:, :I]) * gu[:, I:]
        out = (h @ w_down_EHI[e].t()).float() * topk_weights_TK[tok, slot, None].float()
        y = y.index_add(0, tok, out)
    return y.to(x_TH.dtype)


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward for this device and dtype (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The first call can come from inside a checkpointed block: identity saved-tensor hooks keep the
    # probe's tensors out of the checkpoint's record (else the recompute, which skips the probe,
    # would save fewer tensors than the forward did), and grad is forced on for its backward.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
        return _probe_grouped_mm(device_type, dtype)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        a = torch.randn(32, 16, device=device_type, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        out.backward(torch.randn_like(out))
        ref = torch.cat([a[:16] @ b[0], a[16:] @ b[1]])
        return bool(torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except Exception:  # not built for this device/dtype: fall back to segment matmuls
        return False


def _grouped_matmul(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor,
                    offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, expert e's rows times w[e]; one kernel when _grouped_mm can."""
    # Under torch.compile the op's fake-tensor rule accepts bf16 only, whatever the device runs.
    traceable = x_NK.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if traceable and _grouped_mm_works(x_NK.device.type, x_NK.dtype):
        return torch._grouped_mm(x_NK, w_EKO, offs=offs_E)
    # The fallback needs segment sizes on the host (one sync); the Triton backend never does.
    pieces = torch.split(x_NK, counts_E.tolist())
    return torch.cat([p @ w_EKO[e] for e, p in enumerate(pieces)]) if pieces else x_NK.new_zeros(0, w_EKO.shape[-1])


def sorted_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK):
    T, H = x_TH.shape
    E, I2, _ = w_gate_up_E2IH.shape
    K = topk_ids_TK.shape[1]
    I = I2 // 2
    flat = topk_ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot index (t*K + k) in expert order
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x_TH[order // K]
    gu = _grouped_matmul(xs, w_gate_up_E2IH.transpose(1, 2), counts, offs)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    out = _grouped_matmul(h, w_down_EHI.transpose(1, 2), counts, offs)
    out = out.float() * topk_weights_TK.reshape(-1)[order, None].float()
    # Unsort by scattering rows back to their slot, then sum the K slots of each token in order.
    unsorted = torch.empty_like(out).index_copy(0, order, out)
    return unsorted.view(T, K, H).sum(1).to(x_TH.dtype)


@torch.compiler.disable  # our kernels run eagerly; a compiled block breaks its graph around them
def triton_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK):
    import kernels  # imported lazily: Triton is needed only by this backend

    return kernels.moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK)


BACKENDS = {"loop": loop_moe_mlp, "torch": sorted_moe_mlp, "triton": triton_moe_mlp}


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r} is not one of {sorted(BACKENDS)}")
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK):
        w = topk_weights_TK.to(x_TH.dtype) if self.backend == "triton" else topk_weights_TK
        return BACKENDS[self.backend](x_TH, self.w_gate_up, self.w_down, topk_ids_TK, w)
