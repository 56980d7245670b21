"""Differentiable MoE expert MLP on the Triton grouped-GEMM kernels, as torch.library custom ops.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.

Launches per call: forward 4 (routing tables, gate_up, down, combine), backward 5 (down_bwd,
dW_down, dx, the combine of dx and d topk_w, dW_gate_up), 6 with expert recompute.

Forward (2 grouped GEMMs):
  0. routing tables in one launch (kernels._glue), from the router's counts when given.
  1. gate_up: h = silu(x[tok] @ Wg^T) * (x[tok] @ Wu^T) per sorted row, x gathered on load,
     SwiGLU in the epilogue; the pre-activation gu = [g | u] is written too.
  2. down: o = topk_w * h @ Wd^T, scattered to its flat (t, k) slot; y = sum over K in fp32
     in a fixed order by one combine kernel (no atomics, deterministic).
Backward (4 grouped GEMMs; with recompute, gate_up's GEMM once more first):
  3. dh = dy[tok] @ Wd; epilogue: d topk_w partials <dh, h>, the fused SwiGLU backward
     giving dgu = [dg | du] (w_r folded in), and hw = w_r * h (h rebuilt from gu).
  4. dWd[e] = sum_r dy[tok_r]^T hw_r: a plain gathered GEMM (gu is freed before it).
  5. dx = sum over K of dgu_r @ W_gate_up[e], written per (t, k) slot then summed in order by
     the combine kernel, which also sums the d topk_w partials.
  6. dWgu[e] = sum_r dgu_r^T x[tok_r].

Saved for backward: x, w_gate_up, w_down, topk_weights (references to the inputs), the
routing tables (a few int32 vectors of size N and ceil(N/BM)+E) and gu [N, 2I] in the
activation dtype (not with recompute). h [N, I] and the per-slot down outputs [N, H] are not kept:
h is rebuilt from gu in the backward's first kernel, and d topk_w comes from <dy @ Wd, h> instead
of the down output. In backward hw [N, I] briefly replaces gu [N, 2I].
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _grouped_gemm as gg
from ._glue import build_routing_fused, combine_k
from .routing import RoutingTables, max_tiles

__all__ = ["triton_moe_mlp", "moe_routing", "moe_mlp_fwd", "moe_mlp_bwd", "routing_block_m"]


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


# ----------------------------------------------------------------------------- the ops
# Three torch.library custom ops, so that torch.compile traces a block through the experts: each
# has a fake (meta) rule giving its outputs' shapes from its inputs' shapes, and the forward has an
# autograd rule whose backward is the third op. The compiler treats each as one opaque call (no
# graph break, no tracing into Triton), and eager runs them as plain functions.
#
# Extending the signatures (LoRA on the experts, say): add trailing optional tensors with a None
# default, e.g. ``lora_gate_up_A: Optional[Tensor] = None`` ([E, r, H]) and ``..._B`` ([E, 2I, r]),
# to moe_mlp_fwd and moe_mlp_bwd; the fake rules ignore them (shapes do not change), setup_context
# saves them, and moe_mlp_bwd returns their gradients as extra outputs (empty when None). Callers
# that pass none keep working unchanged.


def _tables(tables: list[torch.Tensor], block_m: int) -> RoutingTables:
    return RoutingTables(*tables, block_m)


@torch.library.custom_op("lingmoe::moe_routing", mutates_args=())
def moe_routing(topk_ids: torch.Tensor, counts_E: Optional[torch.Tensor], num_experts: int,
                block_m: int) -> list[torch.Tensor]:
    """The routing tables (kernels.routing.RoutingTables without block_m) in one Triton launch."""
    gg._check_device(topk_ids)
    return list(build_routing_fused(topk_ids, num_experts, block_m, counts_E, gg.interpreter_active())[:-1])


@moe_routing.register_fake
def _(topk_ids, counts_E, num_experts, block_m):
    n = topk_ids.numel()
    n_max = max_tiles(n, num_experts, block_m)
    return [topk_ids.new_empty(s, dtype=torch.int32) for s in (n, n, num_experts, num_experts + 1, n_max, n_max, 1)]


@torch.library.custom_op("lingmoe::moe_mlp_fwd", mutates_args=())
def moe_mlp_fwd(x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
                topk_weights_TK: torch.Tensor, tables: list[torch.Tensor], block_m: int,
                save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, H], gu [N, 2I] when save_preact, else [0, 2I]): the two forward GEMMs and the combine."""
    T, H = x_TH.shape
    E = w_gate_up_E2IH.shape[0]
    K = topk_weights_TK.shape[1]
    x_TH = x_TH.contiguous()
    cfg = gg.pick_config(T * K, E, x_TH.dtype)
    routing = _tables(tables, block_m)
    h_NI, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=save_preact)
    o_NH = gg.down_fwd(h_NI, w_down_EHI, topk_weights_TK.contiguous().reshape(-1), routing, cfg)
    del h_NI
    y_TH, _ = combine_k(o_NH, T, x_TH.dtype, interpret=gg.interpreter_active())
    if gu_N2I is None:
        gu_N2I = x_TH.new_empty(0, w_gate_up_E2IH.shape[1])
    return y_TH, gu_N2I


@moe_mlp_fwd.register_fake
def _(x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, tables, block_m, save_preact):
    n = topk_weights_TK.numel() if save_preact else 0
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(n, w_gate_up_E2IH.shape[1])


@torch.library.custom_op("lingmoe::moe_mlp_bwd", mutates_args=())
def moe_mlp_bwd(dy_TH: torch.Tensor, x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
                topk_weights_TK: torch.Tensor, gu_N2I: torch.Tensor, tables: list[torch.Tensor], block_m: int,
                need_x: bool, need_w_gate_up: bool, need_w_down: bool,
                need_topk_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate_up, dw_down, dtopk_w), each empty ([0]) when not needed. An empty gu (the forward
    ran with save_preact False: expert recompute) is rebuilt here by the gate_up GEMM."""
    T, H = x_TH.shape
    K = topk_weights_TK.shape[1]
    E = w_gate_up_E2IH.shape[0]
    x_TH = x_TH.contiguous()
    cfg = gg.pick_config(T * K, E, x_TH.dtype)
    routing = _tables(tables, block_m)
    tw_N = topk_weights_TK.contiguous().reshape(-1)
    dy_TH = dy_TH.to(x_TH.dtype).contiguous()
    if gu_N2I.shape[0] != T * K:  # recompute: one gate_up GEMM instead of keeping [N, 2I] from the forward
        _, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=True)
    empty = x_TH.new_empty(0)
    dgu_N2I, dtw_part_NB, hw_NI = gg.down_bwd(dy_TH, w_down_EHI, gu_N2I, tw_N, routing, cfg, store_hw=need_w_down)
    del gu_N2I
    dwd = (gg.down_wgrad(dy_TH, hw_NI, routing, cfg, E, out_dtype=w_down_EHI.dtype) if need_w_down
           else empty)
    del hw_NI
    dx = dtw = empty
    if need_x:
        dx_NH = gg.gate_up_bwd_dx(dgu_N2I, w_gate_up_E2IH, routing, cfg)
        # One launch sums the K slots of dx and the column-block partials of d topk_w.
        dx, dtw_N = combine_k(dx_NH, T, x_TH.dtype, dtw_part_NB if need_topk_weights else None,
                              interpret=gg.interpreter_active())
        del dx_NH
    elif need_topk_weights:
        dtw_N = dtw_part_NB.sum(dim=1)
    if need_topk_weights:
        dtw = dtw_N.view(T, K).to(topk_weights_TK.dtype)
    dwgu = (gg.gate_up_wgrad(dgu_N2I, x_TH, routing, cfg, E, out_dtype=w_gate_up_E2IH.dtype) if need_w_gate_up
            else empty)
    return dx, dwgu, dwd, dtw


@moe_mlp_bwd.register_fake
def _(dy_TH, x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, tables, block_m,
      need_x, need_w_gate_up, need_w_down, need_topk_weights):
    def like(t, need):
        return t.new_empty(t.shape) if need else x_TH.new_empty(0)
    return (like(x_TH, need_x), like(w_gate_up_E2IH, need_w_gate_up), like(w_down_EHI, need_w_down),
            like(topk_weights_TK, need_topk_weights))


def _setup_context(ctx, inputs, output):
    x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, tables, block_m, _ = inputs
    _, gu_N2I = output
    ctx.save_for_backward(x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, *tables)
    ctx.block_m = block_m
    # gu is an output only to be saved: no gradient flows into it, and none is to be materialised
    # (autograd would otherwise fill an [N, 2I] tensor of zeros for the backward's second argument).
    ctx.mark_non_differentiable(gu_N2I)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy_TH, _dgu):
    x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, *tables = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    grads = moe_mlp_bwd(dy_TH, x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, tables,
                        ctx.block_m, *need)
    # One None per routing table (a list input takes a list of gradients), then block_m and save_preact.
    return tuple(g if n else None for g, n in zip(grads, need)) + ([None] * len(tables), None, None)


moe_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def routing_block_m(n_rows: int, num_experts: int, dtype: torch.dtype) -> int:
    """The row-tile size the kernels will use for this problem, which moe_routing's tables must be built for."""
    return gg.pick_config(n_rows, num_experts, dtype).block_m


def triton_moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E=None, recompute=False):
    """y[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

    x [T, H]; w_gate_up [E, 2I, H] (rows [:I] gate_proj, [I:] up_proj, nn.Linear layout);
    w_down [E, H, I]; topk_ids [T, K] int32/int64 in [0, E); topk_weights [T, K] float;
    counts_E [E] rows per expert when the caller has counted them (see build_routing), else None.
    recompute: keep no pre-activation for backward (N x 2I values) and recompute it there with one
    more gate_up GEMM (2/3 of the forward's FLOPs).
    Returns y [T, H] in x's dtype. Differentiable in x, w_gate_up, w_down, topk_weights.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1. No host synchronisation anywhere, so
    forward and backward can be captured in a CUDA graph; traceable by torch.compile (custom ops).
    """
    _check_inputs(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E)
    T, K, E = x.shape[0], topk_ids.shape[1], w_gate_up.shape[0]
    block_m = routing_block_m(T * K, E, x.dtype)
    tables = moe_routing(topk_ids, counts_E, E, block_m)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, topk_weights))
    y, _ = moe_mlp_fwd(x, w_gate_up, w_down, topk_weights, tables, block_m, needs_grad and not recompute)
    return y
