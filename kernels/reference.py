"""Plain-PyTorch MoE expert MLPs: the independent reference for tests and the bench baselines.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.
Weights are stored [out, in] like nn.Linear: w_gate_up_E2IH rows [:I] are gate_proj and rows
[I:] are up_proj; w_down_EHI is down_proj.

y[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, k].
Both functions are differentiable through ordinary autograd.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["moe_mlp", "grouped_mm_moe_mlp", "has_grouped_mm", "grouped_mm_available"]


def moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK):
    """Per-expert loop: the most obvious correct implementation, kept deliberately simple.

    It uses only indexing, matmul and index_add_, none of which share code with the Triton
    path. The loop over experts is a Python loop with a data-dependent gather (host sync).
    """
    T, H = x_TH.shape
    E = w_gate_up_E2IH.shape[0]
    I = w_gate_up_E2IH.shape[1] // 2
    y_TH = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    for e in range(E):
        tok, slot = torch.nonzero(topk_ids_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x_TH[tok].float()
        g = xe @ w_gate_up_E2IH[e, :I].float().t()
        u = xe @ w_gate_up_E2IH[e, I:].float().t()
        out = (F.silu(g) * u) @ w_down_EHI[e].float().t()
        out = out * topk_weights_TK[tok, slot].float()[:, None]
        y_TH = y_TH.index_add(0, tok, out)
    return y_TH.to(x_TH.dtype)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device: torch.device, dtype: torch.dtype, with_backward: bool) -> bool:
    # The attribute exists on CPU builds too, but there the backward fails (torch 2.13) and
    # some dtypes/devices are unsupported, so probe the exact (device, dtype, pass) once.
    if not has_grouped_mm():
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        b = torch.ones(2, 16, 16, dtype=dtype, device=device, requires_grad=with_backward)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        if with_backward:
            out.float().sum().backward()
        return True
    except Exception:
        return False


def grouped_mm_available(x: torch.Tensor, with_backward: bool) -> bool:
    """True when torch._grouped_mm runs here for x's device/dtype (and its backward, if asked)."""
    return _grouped_mm_works(x.device, x.dtype, with_backward)


def grouped_mm_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK):
    """Sort rows by expert once, then two torch._grouped_mm calls (falls back to a loop of
    plain matmuls over the same sorted layout where the build/device lacks _grouped_mm).

    Autograd flows through torch's own _grouped_mm backward; the combine is index_add_ in
    fp32, which is not bitwise deterministic on CUDA but serves as a speed baseline.
    """
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E = w_gate_up_E2IH.shape[0]
    ids_N = topk_ids_TK.reshape(-1).to(torch.int64)
    _, order_N = torch.sort(ids_N, stable=True)
    tok_N = order_N // K
    counts_E = torch.zeros(E, dtype=torch.int64, device=x_TH.device).scatter_add_(
        0, ids_N, torch.ones_like(ids_N))
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    xs_NH = x_TH[tok_N]
    needs_grad = torch.is_grad_enabled() and (
        x_TH.requires_grad or w_gate_up_E2IH.requires_grad or w_down_EHI.requires_grad)
    if grouped_mm_available(x_TH, needs_grad):
        gu_N2I = torch._grouped_mm(xs_NH, w_gate_up_E2IH.transpose(-2, -1), offs=offs_E)
        g, u = gu_N2I.chunk(2, dim=-1)
        h_NI = F.silu(g) * u
        o_NH = torch._grouped_mm(h_NI, w_down_EHI.transpose(-2, -1), offs=offs_E)
    else:
        starts = [0] + offs_E.tolist()
        pieces = []
        for e in range(E):
            a = xs_NH[starts[e]:starts[e + 1]]
            g, u = (a @ w_gate_up_E2IH[e].t()).chunk(2, dim=-1)
            pieces.append((F.silu(g) * u) @ w_down_EHI[e].t())
        o_NH = torch.cat(pieces, 0)
    w_N = topk_weights_TK.reshape(-1)[order_N]
    o_NH = o_NH.float() * w_N.float()[:, None]
    y_TH = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device).index_add(0, tok_N, o_NH)
    return y_TH.to(x_TH.dtype)
