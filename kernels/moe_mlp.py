"""Differentiable MoE expert MLP on the Triton grouped-GEMM kernels.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.

Forward (2 grouped GEMMs):
  1. gate_up: h = silu(x[tok] @ Wg^T) * (x[tok] @ Wu^T) per sorted row, x gathered on load,
     SwiGLU in the epilogue; the pre-activation gu = [g | u] is written too.
  2. down: o = topk_w * h @ Wd^T, scattered to its flat (t, k) slot; y = sum over K in fp32
     in a fixed order (no atomics, deterministic).
Backward (4 grouped GEMMs, no recompute of GEMMs):
  3. dh = dy[tok] @ Wd; epilogue: d topk_w partials <dh, h>, the fused SwiGLU backward
     giving dgu = [dg | du] (w_r folded in), and hw = w_r * h (h rebuilt from gu).
  4. dWd[e] = sum_r dy[tok_r]^T hw_r: a plain gathered GEMM (gu is freed before it).
  5. dx = sum over K of dgu_r @ W_gate_up[e], written per (t, k) slot then summed in order.
  6. dWgu[e] = sum_r dgu_r^T x[tok_r].

Saved for backward: x, w_gate_up, w_down, topk_weights (references to the inputs), the
routing tables (a few int32 vectors of size N and ceil(N/BM)+E) and gu [N, 2I] in the
activation dtype. h [N, I] and the per-slot down outputs [N, H] are not kept: h is rebuilt
from gu in the backward's first kernel, and d topk_w comes from <dy @ Wd, h> instead of the down
output. In backward hw [N, I] briefly replaces gu [N, 2I].
"""
from __future__ import annotations

import torch

from . import _grouped_gemm as gg
from .routing import RoutingTables, build_routing

__all__ = ["triton_moe_mlp"]


def _check_inputs(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E):
    if x_TH.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x_TH.shape)}")
    T, H = x_TH.shape
    if T == 0:
        raise ValueError("x must have at least one token")
    if w_gate_up_E2IH.dim() != 3 or w_gate_up_E2IH.shape[2] != H or w_gate_up_E2IH.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, {H}], got {tuple(w_gate_up_E2IH.shape)}")
    E, I2, _ = w_gate_up_E2IH.shape
    if tuple(w_down_EHI.shape) != (E, H, I2 // 2):
        raise ValueError(f"w_down must be [{E}, {H}, {I2 // 2}], got {tuple(w_down_EHI.shape)}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T:
        raise ValueError(f"topk_ids must be [{T}, K], got {tuple(topk_ids_TK.shape)}")
    if tuple(topk_weights_TK.shape) != tuple(topk_ids_TK.shape):
        raise ValueError("topk_weights must have the shape of topk_ids")
    if not topk_weights_TK.is_floating_point():
        raise TypeError("topk_weights must be floating point")
    if not (x_TH.dtype == w_gate_up_E2IH.dtype == w_down_EHI.dtype):
        raise TypeError(f"x, w_gate_up, w_down must share a dtype, got {x_TH.dtype}, "
                        f"{w_gate_up_E2IH.dtype}, {w_down_EHI.dtype}")
    if x_TH.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x_TH.dtype}")
    if counts_E is not None and tuple(counts_E.shape) != (E,):
        raise ValueError(f"counts_E must be [{E}], got {tuple(counts_E.shape)}")


class _MoEMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E):
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        E = w_gate_up_E2IH.shape[0]
        x_TH = x_TH.contiguous()
        w_gate_up_E2IH = w_gate_up_E2IH.contiguous()
        w_down_EHI = w_down_EHI.contiguous()
        tw_N = topk_weights_TK.contiguous().reshape(-1)
        cfg = gg.pick_config(T * K, E, x_TH.dtype)
        routing = build_routing(topk_ids_TK, E, cfg.block_m, counts_E)
        needs_grad = any(ctx.needs_input_grad)
        h_NI, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=needs_grad)
        o_NH = gg.down_fwd(h_NI, w_down_EHI, tw_N, routing, cfg)
        del h_NI
        # Fixed-order fp32 sum over the K slots of each token: the deterministic combine.
        y_TH = o_NH.view(T, K, H).sum(dim=1, dtype=torch.float32).to(x_TH.dtype)
        if needs_grad:
            ctx.save_for_backward(x_TH, w_gate_up_E2IH, w_down_EHI, tw_N, gu_N2I, *routing[:-1])
            ctx.block_m = routing.block_m
            ctx.cfg = cfg
            ctx.shape = (T, K, E, H)
            ctx.tw_dtype = topk_weights_TK.dtype
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):
        x_TH, w_gate_up_E2IH, w_down_EHI, tw_N, gu_N2I, *tables = ctx.saved_tensors
        routing = RoutingTables(*tables, ctx.block_m)
        cfg = ctx.cfg
        T, K, E, H = ctx.shape
        need_x, need_wgu, need_wd, _, need_tw, _ = ctx.needs_input_grad
        dy_TH = dy_TH.to(x_TH.dtype).contiguous()

        dx = dwgu = dwd = dtw = None
        dgu_N2I, dtw_part_NB, hw_NI = gg.down_bwd(dy_TH, w_down_EHI, gu_N2I, tw_N, routing, cfg,
                                                  store_hw=need_wd)
        del gu_N2I
        if need_tw:
            dtw = dtw_part_NB.sum(dim=1).view(T, K).to(ctx.tw_dtype)
        if need_wd:
            dwd = gg.down_wgrad(dy_TH, hw_NI, routing, cfg, E, out_dtype=w_down_EHI.dtype)
        del hw_NI
        if need_x:
            dx_NH = gg.gate_up_bwd_dx(dgu_N2I, w_gate_up_E2IH, routing, cfg)
            dx = dx_NH.view(T, K, H).sum(dim=1, dtype=torch.float32).to(x_TH.dtype)
        if need_wgu:
            dwgu = gg.gate_up_wgrad(dgu_N2I, x_TH, routing, cfg, E,
                                    out_dtype=w_gate_up_E2IH.dtype)
        return dx, dwgu, dwd, None, dtw, None


def triton_moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E=None):
    """y[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

    x [T, H]; w_gate_up [E, 2I, H] (rows [:I] gate_proj, [I:] up_proj, nn.Linear layout);
    w_down [E, H, I]; topk_ids [T, K] int32/int64 in [0, E); topk_weights [T, K] float;
    counts_E [E] rows per expert when the caller has counted them (see build_routing), else None.
    Returns y [T, H] in x's dtype. Differentiable in x, w_gate_up, w_down, topk_weights.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1. No host synchronisation anywhere, so
    forward and backward can be captured in a CUDA graph.
    """
    _check_inputs(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E)
    return _MoEMLPFunction.apply(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E)
