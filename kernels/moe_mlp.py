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

LoRA on the experts (kernels.lora.ExpertLoRA; scale s, rank R): each projection's W x gains s B (A x)
inside the same row tiles. Forward +2 narrow launches: u_gu = x[tok] A_gu^T [N, 2R] before gate_up,
whose accumulators then add s u_gu B_gu^T ahead of the SwiGLU; u_down = h A_down^T [N, R] before down,
which adds s u_down B_down^T ahead of the routing weight. Backward: v_down = dy[tok] B_down joins dh's
accumulator as s v_down A_down (so d topk_w = <dh, h> stays whole), v_gu = [dg B_gate | du B_up] joins
dx's as s v_gu A_gu, and the adapters' gradients are narrow per-expert GEMMs on the same tables (dA
computed as its transpose, the wide side first): 8 narrow launches and 6 elementwise ones on [N, R]. No
W + s B A is formed, and the frozen weights get no gradient when they ask for none.

Saved for backward: x, w_gate_up, w_down, topk_weights (references to the inputs), the
routing tables (a few int32 vectors of size N and ceil(N/BM)+E) and gu [N, 2I] in the
activation dtype (not with recompute). h [N, I] and the per-slot down outputs [N, H] are not kept:
h is rebuilt from gu in the backward's first kernel, and d topk_w comes from <dy @ Wd, h> instead
of the down output. In backward hw [N, I] briefly replaces gu [N, 2I]. With LoRA also the adapters
(references) and u_gu, u_down: 3R values a routed row.
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
# LoRA on the experts rides on the same ops: the forward takes the four adapters as a list ([] without
# LoRA) and returns the narrow activations u_gu, u_down beside gu (saved, never differentiated); the
# backward op takes them and returns the adapters' gradients after the four it always had. The fake
# rules give those shapes from the adapters' shapes.


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


def _unpack(adapters):
    if len(adapters) not in (0, 4):
        raise ValueError("LoRA needs all four adapter tensors (a_gate_up, b_gate_up, a_down, b_down) or none, "
                         f"got {len(adapters)}")
    return tuple(adapters) if adapters else (None,) * 4


def _lora_shapes(a_gate_up, b_gate_up, a_down, b_down):
    given = [t is not None for t in (a_gate_up, b_gate_up, a_down, b_down)]
    if any(given) and not all(given):
        raise ValueError("LoRA needs all four adapter tensors (a_gate_up, b_gate_up, a_down, b_down) or none")
    return all(given)


def _times_b(u, b, scale):
    """scale * u @ B^T for a B stored [E, out, R] (b_gate_up, b_down): its [R, out] view's strides."""
    return gg.LowRank(u, b, b.stride(2), b.stride(1), scale)


def _times_a(v, a, scale):
    """scale * v @ A for an A stored [E, R, in] (a_gate_up, a_down), read as stored."""
    return gg.LowRank(v, a, a.stride(1), a.stride(2), scale)


@torch.library.custom_op("lingmoe::moe_mlp_fwd", mutates_args=())
def moe_mlp_fwd(x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
                topk_weights_TK: torch.Tensor, tables: list[torch.Tensor], block_m: int,
                save_preact: bool, adapters: list[torch.Tensor],
                lora_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, H], gu [N, 2I] when save_preact, else [0, 2I], u_gu [N, 2R], u_down [N, R]): the two forward
    GEMMs and the combine. ``adapters``: [] or the four LoRA adapters [a_gate_up, b_gate_up, a_down, b_down]
    (a list, not optional tensors: autograd's rule for a custom op matches its gradients to the inputs'
    structure, which a None input breaks). With them (kernels.lora.ExpertLoRA's layout, in x's dtype)
    each projection adds lora_scale * B (A x): the narrow products u_gu = x A_gu^T and u_down = h A_down^T
    run on the frozen GEMMs' routing tables and are kept for backward ([0] each without LoRA)."""
    T, H = x_TH.shape
    E = w_gate_up_E2IH.shape[0]
    K = topk_weights_TK.shape[1]
    x_TH = x_TH.contiguous()
    cfg = gg.pick_config(T * K, E, x_TH.dtype)
    routing = _tables(tables, block_m)
    tw_N = topk_weights_TK.contiguous().reshape(-1)
    a_gate_up, b_gate_up, a_down, b_down = _unpack(adapters)
    if a_gate_up is not None:
        # x[tok] A^T and h A^T: narrow GEMMs on the same tables (B_e[k, n] = A[e, n, k])
        u_gu = gg.rows_product(x_TH, a_gate_up, a_gate_up.stride(2), a_gate_up.stride(1), a_gate_up.shape[1],
                               routing, cfg, gather=True)
        h_NI, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=save_preact,
                                      lora=_times_b(u_gu, b_gate_up, lora_scale))
        u_down = gg.rows_product(h_NI, a_down, a_down.stride(2), a_down.stride(1), a_down.shape[1], routing, cfg,
                                 gather=False)
        o_NH = gg.down_fwd(h_NI, w_down_EHI, tw_N, routing, cfg, lora=_times_b(u_down, b_down, lora_scale))
    else:
        h_NI, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=save_preact)
        o_NH = gg.down_fwd(h_NI, w_down_EHI, tw_N, routing, cfg)
        u_gu, u_down = x_TH.new_empty(0), x_TH.new_empty(0)  # distinct: outputs may not alias
    del h_NI
    y_TH, _ = combine_k(o_NH, T, x_TH.dtype, interpret=gg.interpreter_active())
    if gu_N2I is None:
        gu_N2I = x_TH.new_empty(0, w_gate_up_E2IH.shape[1])
    return y_TH, gu_N2I, u_gu, u_down


@moe_mlp_fwd.register_fake
def _(x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, tables, block_m, save_preact, adapters, lora_scale):
    n = topk_weights_TK.numel()
    if adapters:
        r = adapters[2].shape[1]
        u_gu, u_down = x_TH.new_empty(n, 2 * r), x_TH.new_empty(n, r)
    else:
        u_gu, u_down = x_TH.new_empty(0), x_TH.new_empty(0)
    return (x_TH.new_empty(x_TH.shape), x_TH.new_empty(n if save_preact else 0, w_gate_up_E2IH.shape[1]),
            u_gu, u_down)


@torch.library.custom_op("lingmoe::moe_mlp_bwd", mutates_args=())
def moe_mlp_bwd(dy_TH: torch.Tensor, x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
                topk_weights_TK: torch.Tensor, gu_N2I: torch.Tensor, tables: list[torch.Tensor], block_m: int,
                need_x: bool, need_w_gate_up: bool, need_w_down: bool,
                need_topk_weights: bool, a_gate_up: Optional[torch.Tensor] = None,
                b_gate_up: Optional[torch.Tensor] = None, a_down: Optional[torch.Tensor] = None,
                b_down: Optional[torch.Tensor] = None, u_gu: Optional[torch.Tensor] = None,
                u_down: Optional[torch.Tensor] = None, lora_scale: float = 0.0,
                need_lora: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate_up, dw_down, dtopk_w, da_gate_up, db_gate_up, da_down, db_down), each empty ([0]) when
    not needed. An empty gu (the forward ran with save_preact False: expert recompute) is rebuilt here by
    the gate_up GEMM. With LoRA (the adapters and the forward's u_gu, u_down given) the adapters' paths
    join the frozen GEMMs' accumulators (dh and dx), and the adapters' gradients (need_lora) are narrow
    per-expert products on the same routing tables; the frozen weights need none."""
    T, H = x_TH.shape
    K = topk_weights_TK.shape[1]
    E = w_gate_up_E2IH.shape[0]
    x_TH = x_TH.contiguous()
    cfg = gg.pick_config(T * K, E, x_TH.dtype)
    routing = _tables(tables, block_m)
    tw_N = topk_weights_TK.contiguous().reshape(-1)
    dy_TH = dy_TH.to(x_TH.dtype).contiguous()
    lora = _lora_shapes(a_gate_up, b_gate_up, a_down, b_down)
    need_lora = need_lora and lora
    s = lora_scale
    if lora:
        I, r = w_down_EHI.shape[2], a_down.shape[1]
    if gu_N2I.shape[0] != T * K:  # recompute: one gate_up GEMM instead of keeping [N, 2I] from the forward
        _, gu_N2I = gg.gate_up_fwd(x_TH, w_gate_up_E2IH, routing, cfg, save_preact=True,
                                   lora=_times_b(u_gu, b_gate_up, s) if lora else None)
    empty = x_TH.new_empty  # a fresh [0] per unneeded output: a custom op's outputs may not alias
    lr_down = v_down = None
    if lora:  # v_down = dy[tok] B_down [N, R]: the adapter's share of dh is scale * v_down A_down
        v_down = gg.rows_product(dy_TH, b_down, b_down.stride(1), b_down.stride(2), b_down.shape[2], routing, cfg,
                                 gather=True)
        lr_down = _times_a(v_down, a_down, s)
    dgu_N2I, dtw_part_NB, hw_NI = gg.down_bwd(dy_TH, w_down_EHI, gu_N2I, tw_N, routing, cfg,
                                              store_hw=need_w_down or need_lora, lora=lr_down)
    del gu_N2I
    dwd = (gg.down_wgrad(dy_TH, hw_NI, routing, cfg, E, out_dtype=w_down_EHI.dtype) if need_w_down
           else empty(0))
    da_d, db_d, da_gu, db_gu = empty(0), empty(0), empty(0), empty(0)
    if need_lora:
        # dA_down[e] = scale sum_r v_r^T (w_r h_r), computed as its transpose (the wide side first);
        # dB_down[e] = sum_r dy[tok_r]^T (scale w_r u_down_r).
        da_d = torch.empty_like(a_down)
        gg.rows_wgrad(hw_NI, v_down * s, da_d.transpose(1, 2), routing, cfg)
        uw = u_down * (tw_N[routing.sorted_flat_ids.long()] * s).to(u_down.dtype)[:, None]
        db_d = gg.rows_wgrad(dy_TH, uw, torch.empty_like(b_down), routing, cfg, a_gather=True)
        del uw
    del hw_NI, v_down
    lr_gu = v_gu = None
    if lora and (need_x or need_lora):  # v_gu = [dg B_gate | du B_up] [N, 2R]
        v_gu = x_TH.new_empty(T * K, 2 * r)
        for part in (0, 1):
            b_part = b_gate_up[:, part * I:(part + 1) * I]
            gg.rows_product(dgu_N2I[:, part * I:(part + 1) * I], b_part, b_part.stride(1), b_part.stride(2), r,
                            routing, cfg, gather=False, out=v_gu[:, part * r:(part + 1) * r])
        lr_gu = _times_a(v_gu, a_gate_up, s)
    dx, dtw = empty(0), empty(0)
    if need_x:
        dx_NH = gg.gate_up_bwd_dx(dgu_N2I, w_gate_up_E2IH, routing, cfg, lora=lr_gu)
        # One launch sums the K slots of dx and the column-block partials of d topk_w.
        dx, dtw_N = combine_k(dx_NH, T, x_TH.dtype, dtw_part_NB if need_topk_weights else None,
                              interpret=gg.interpreter_active())
        del dx_NH
    elif need_topk_weights:
        dtw_N = dtw_part_NB.sum(dim=1)
    if need_topk_weights:
        dtw = dtw_N.view(T, K).to(topk_weights_TK.dtype)
    if need_lora:
        # dA_gu[e] = scale sum_r v_gu_r^T x[tok_r]; dB_gate[e] = scale sum_r dg_r^T u_gate_r (and up's alike).
        da_gu = torch.empty_like(a_gate_up)
        gg.rows_wgrad(x_TH, v_gu * s, da_gu.transpose(1, 2), routing, cfg, a_gather=True)
        us = u_gu * s
        db_gu = torch.empty_like(b_gate_up)
        for part in (0, 1):
            gg.rows_wgrad(dgu_N2I[:, part * I:(part + 1) * I], us[:, part * r:(part + 1) * r],
                          db_gu[:, part * I:(part + 1) * I], routing, cfg)
    dwgu = (gg.gate_up_wgrad(dgu_N2I, x_TH, routing, cfg, E, out_dtype=w_gate_up_E2IH.dtype) if need_w_gate_up
            else empty(0))
    return dx, dwgu, dwd, dtw, da_gu, db_gu, da_d, db_d


@moe_mlp_bwd.register_fake
def _(dy_TH, x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, tables, block_m,
      need_x, need_w_gate_up, need_w_down, need_topk_weights, a_gate_up=None, b_gate_up=None, a_down=None,
      b_down=None, u_gu=None, u_down=None, lora_scale=0.0, need_lora=False):
    def like(t, need):
        return t.new_empty(t.shape) if need else x_TH.new_empty(0)
    need_lora = need_lora and a_gate_up is not None
    return (like(x_TH, need_x), like(w_gate_up_E2IH, need_w_gate_up), like(w_down_EHI, need_w_down),
            like(topk_weights_TK, need_topk_weights), like(a_gate_up, need_lora), like(b_gate_up, need_lora),
            like(a_down, need_lora), like(b_down, need_lora))


def _setup_context(ctx, inputs, output):
    x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, tables, block_m, _, adapters, lora_scale = inputs
    _, gu_N2I, u_gu, u_down = output
    ctx.save_for_backward(x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, u_gu, u_down, *adapters,
                          *tables)
    ctx.block_m, ctx.lora_scale, ctx.n_adapters = block_m, lora_scale, len(adapters)
    # gu and the u's are outputs only to be saved: no gradient flows into them, and none is to be
    # materialised (autograd would otherwise fill an [N, 2I] tensor of zeros for the backward).
    ctx.mark_non_differentiable(gu_N2I, u_gu, u_down)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy_TH, _dgu, _du_gu, _du_down):
    x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, u_gu, u_down, *rest = ctx.saved_tensors
    adapters, tables = rest[:ctx.n_adapters], rest[ctx.n_adapters:]
    need = ctx.needs_input_grad[:4]
    need_adapters = list(ctx.needs_input_grad[7])  # a list of flags for the list input
    lora = bool(adapters)
    grads = moe_mlp_bwd(dy_TH, x_TH, w_gate_up_E2IH, w_down_EHI, topk_weights_TK, gu_N2I, tables,
                        ctx.block_m, *need, *_unpack(adapters), u_gu if lora else None, u_down if lora else None,
                        ctx.lora_scale, any(need_adapters))
    # One None per routing table (a list input takes a list of gradients), then block_m and save_preact,
    # the adapters' gradients (a list, as given), and none for the scale.
    return (tuple(g if n else None for g, n in zip(grads[:4], need)) + ([None] * len(tables), None, None)
            + ([g if n else None for g, n in zip(grads[4:], need_adapters)], None))


moe_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def routing_block_m(n_rows: int, num_experts: int, dtype: torch.dtype) -> int:
    """The row-tile size the kernels will use for this problem, which moe_routing's tables must be built for."""
    return gg.pick_config(n_rows, num_experts, dtype).block_m


def triton_moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E=None, recompute=False, lora=None):
    """y[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

    x [T, H]; w_gate_up [E, 2I, H] (rows [:I] gate_proj, [I:] up_proj, nn.Linear layout);
    w_down [E, H, I]; topk_ids [T, K] int32/int64 in [0, E); topk_weights [T, K] float;
    counts_E [E] rows per expert when the caller has counted them (see build_routing), else None.
    recompute: keep no pre-activation for backward (N x 2I values) and recompute it there with one
    more gate_up GEMM (2/3 of the forward's FLOPs).
    lora: kernels.lora.ExpertLoRA or None. Each projection then adds scale * B (A x) per routed row,
    computed on the frozen GEMMs' routing tables and added in their accumulators (no W + BA is formed);
    the adapters are cast to x's dtype. Dropout on the adapters' input is the torch backend's: the
    kernels take dropout 0 (ValueError otherwise).
    Returns y [T, H] in x's dtype. Differentiable in x, w_gate_up, w_down, topk_weights and the adapters.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1. No host synchronisation anywhere, so
    forward and backward can be captured in a CUDA graph; traceable by torch.compile (custom ops).
    """
    _check_inputs(x, w_gate_up, w_down, topk_ids, topk_weights, counts_E)
    T, K, E = x.shape[0], topk_ids.shape[1], w_gate_up.shape[0]
    adapters, scale = [], 0.0
    if lora is not None:
        lora.check(w_gate_up, w_down)
        if lora.dropout > 0:
            raise ValueError(f"the triton expert kernels compute LoRA without dropout (got {lora.dropout}); "
                             "the torch backend draws it")
        adapters, scale = [t.to(x.dtype) for t in lora[:4]], float(lora.scale)
    block_m = routing_block_m(T * K, E, x.dtype)
    tables = moe_routing(topk_ids, counts_E, E, block_m)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad
                                                 for t in (x, w_gate_up, w_down, topk_weights, *adapters))
    y = moe_mlp_fwd(x, w_gate_up, w_down, topk_weights, tables, block_m, needs_grad and not recompute,
                    adapters, scale)[0]
    return y
