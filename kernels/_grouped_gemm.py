"""Triton grouped-GEMM kernels for the MoE expert MLP, and their launchers.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.
Suffixes name shapes: x_TH [T, H], w_gate_up_E2IH [E, 2I, H] (rows [:I] gate, [I:] up),
w_down_EHI [E, H, I], gu_N2I / h_NI / dgu_N2I are in *sorted* row order (see routing.py),
o_NH / dx_NH are in *flat* (t*K + k) order so that a fixed-order sum over K combines them.

Two kinds of grid:
  * row-tile kernels: axis 0 walks the padded tile table (one BM-row tile of one expert,
    padding tiles have expert -1 and exit at once), axis 1 walks output columns.
  * weight-gradient kernel: one program per (expert, BM x BN output tile); it loops over
    all of that expert's rows itself, so every dW element is written by exactly one
    program with a fixed summation order (bitwise reproducible, no atomics).

All accumulation is fp32. Launchers check shapes/dtypes, make operands contiguous,
allocate outputs and compute grids; they hold no autograd state.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import numpy
import torch
import triton
import triton.language as tl

from .routing import RoutingTables

__all__ = [
    "KernelConfig", "pick_config", "interpreter_active",
    "gate_up_fwd", "down_fwd", "down_bwd", "gate_up_bwd_dx", "down_wgrad", "gate_up_wgrad",
    "LowRank", "rows_product", "rows_wgrad", "narrow_wgrad_config",
]


# ----------------------------------------------------------------------------- configs

class KernelConfig(NamedTuple):
    block_m: int      # rows per tile (must equal RoutingTables.block_m)
    block_n: int      # output columns per program for the single-accumulator kernels
    block_n_gu: int   # output columns per program for gate_up (it carries two accumulators)
    block_n_dbwd: int  # output columns per program for down_bwd (its SwiGLU-backward epilogue is wide)
    block_k: int      # reduction step
    wg_block_m: int   # weight-gradient tile rows
    wg_block_n: int   # weight-gradient tile cols
    wg_block_k: int   # weight-gradient reduction step (routed rows per iteration)
    num_warps: int
    num_stages: int
    dbwd_warps: int = 0    # warps for down_bwd (0: num_warps)
    wg_warps: int = 0      # warps for the weight-gradient kernel (0: num_warps)
    wg_stages: int = 0     # pipeline stages for the weight-gradient kernel (0: num_stages)
    # Launch order. 1: row-tile kernels walk all column blocks of one row tile before the next
    # tile, and the weight-gradient kernel walks all tiles of one expert before the next expert,
    # so an A tile / an expert's rows are re-read from L2 instead of HBM. 0: the old order (row
    # tiles, resp. experts, fastest), kept for A/B timing.
    tile_order: int = 1


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


CONFIG_ENV = "LINGMOE_TRITON_CONFIG"


def pick_config(n_rows: int, num_experts: int, dtype: torch.dtype) -> KernelConfig:
    """Per-shape heuristic instead of @triton.autotune (multi-config autotune cannot run under
    the interpreter, and a heuristic keeps the choice visible and deterministic).

    16-bit tiles are the largest that compile for sm_90 (triton 3.6 and 3.7) with no register
    spills (benchmarks/aot_compile_check.py reads registers and local-memory traffic off the
    machine code): with 4 warps a 64x128 single-accumulator tile and the fused dW tile at 128x128
    spill, and down_bwd spills at 128x128 even with 8 warps, so the 64-row bucket uses 64-column
    tiles and down_bwd 64 columns.
    ``LINGMOE_TRITON_CONFIG="block_n=128,num_warps=8"`` overrides fields (tuning sweeps)."""
    if interpreter_active():
        # The interpreter's cost is per program and per op, not per element; 16 is the
        # smallest legal tl.dot size and keeps tiny test shapes multi-tile.
        cfg = KernelConfig(16, 16, 16, 16, 16, 16, 16, 16, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        # fp32 tiles are twice as wide in shared memory; keep stages*tiles under ~100 KB.
        cfg = KernelConfig(64, 64, 32, 64, 32, 64, 64, 32, num_warps=4, num_stages=2)
    else:
        avg_rows = n_rows / max(num_experts, 1)
        # Small per-expert loads waste most of a 128-row tile on padding.
        if avg_rows >= 256:
            cfg = KernelConfig(128, 128, 64, 64, 64, 128, 128, 64, num_warps=8, num_stages=3)
        else:
            # down_bwd's epilogue (SwiGLU backward, d topk_w, hw) spills at 4 warps: give it 8.
            cfg = KernelConfig(64, 64, 64, 64, 64, 128, 64, 64, num_warps=4, num_stages=3, dbwd_warps=8)
    return _apply_override(cfg, os.environ.get(CONFIG_ENV, ""))


def _apply_override(cfg: KernelConfig, spec: str) -> KernelConfig:
    if not spec.strip():
        return cfg
    changes = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KernelConfig._fields:
            raise ValueError(f"{CONFIG_ENV}={spec!r}: expected comma-separated field=value with fields from "
                             f"{', '.join(KernelConfig._fields)}; got {item.strip()!r}")
        try:
            changes[key] = int(value)
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}={spec!r}: {key} must be an integer, got {value.strip()!r}") from None
    return cfg._replace(**changes)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as tf32 on Ampere+ with the default; the fp32 path is
    # the accuracy reference, so ask for full precision. Irrelevant for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _silu_parts(g):
    # Returns sigmoid(g) and silu(g) in fp32; the backward needs both.
    s = 1.0 / (1.0 + tl.exp(-g))
    return s, g * s


@triton.jit
def _tile_pid(N_TILES, N_COL_BLOCKS, TILE_ORDER: tl.constexpr):
    # One 1-D launch of N_TILES x N_COL_BLOCKS programs (no 65535 limit on a grid axis).
    pid = tl.program_id(0)
    if TILE_ORDER == 1:
        # Column blocks fastest: the programs in flight share one or a few row tiles (their A rows
        # stay in L2 across all column blocks) and one expert's weights.
        return pid // N_COL_BLOCKS, pid % N_COL_BLOCKS
    else:
        return pid % N_TILES, pid // N_TILES


@triton.jit
def _lora_add(acc, lu_ptrs, rmask, lb_ptrs, stride_lbk, cmask, R, scale,
              RB: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + (scale U) @ B: the low-rank half of a LoRA projection, accumulated into a tile's
    accumulator before its epilogue. U [BM, R] is a sorted-row activation (lu_ptrs: one pointer per
    row, [BM, 1]), B [R, BN] the tile's expert's adapter (lb_ptrs: one pointer per output column,
    [1, BN]; stride_lbk steps the rank). The rank is walked RB at a time, so any rank fits one code
    path. The scale goes on the narrow U tile (exact for a power of two, as alpha = 2r gives), not on a
    second [BM, BN] accumulator: that one spilled down_bwd's 128-row tile to local memory on sm_90."""
    js = tl.arange(0, RB)
    for j0 in range(0, R, RB):
        jmask = (j0 + js) < R
        u = tl.load(lu_ptrs + (j0 + js)[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        u = (u.to(tl.float32) * scale).to(u.dtype)
        b = tl.load(lb_ptrs + (j0 + js)[:, None].to(tl.int64) * stride_lbk, mask=jmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(u, b, acc=acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr, w_ptr, h_ptr, gu_ptr,
    tok_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    H, I,
    stride_xt, stride_we, stride_wo, stride_h, stride_gu,
    SAVE_GU: tl.constexpr,
    lu_ptr, lb_ptr, stride_lu, stride_lbe, stride_lbk, stride_lbn, R, lora_scale,
    HAS_LORA: tl.constexpr, RB: tl.constexpr,
    N_TILES, N_COL_BLOCKS, TILE_ORDER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m, pid_n = _tile_pid(N_TILES, N_COL_BLOCKS, TILE_ORDER)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    # Gather x rows while loading: the permuted copy x[sorted_token] is never materialised.
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < I
    ks = tl.arange(0, BK)

    a_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :]
    w_base = w_ptr + e.to(tl.int64) * stride_we
    # B[k, n] = W[e, n, k]: nn.Linear layout read transposed, no copy.
    bg_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wo + ks[:, None]
    bu_ptrs = bg_ptrs + I * stride_wo
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + ks) < H
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & cmask[None, :]
        bg = tl.load(bg_ptrs, mask=bmask, other=0.0)
        bu = tl.load(bu_ptrs, mask=bmask, other=0.0)
        acc_g = tl.dot(a, bg, acc=acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, bu, acc=acc_u, input_precision=DOT_PREC)
        a_ptrs += BK
        bg_ptrs += BK
        bu_ptrs += BK
    if HAS_LORA:  # LoRA: u = x A^T holds gate's R columns, then up's; B [E, 2I, R] rows as W's
        lu = lu_ptr + rows.to(tl.int64)[:, None] * stride_lu
        lb = lb_ptr + e.to(tl.int64) * stride_lbe + cols[None, :].to(tl.int64) * stride_lbn
        acc_g = _lora_add(acc_g, lu, rmask, lb, stride_lbk, cmask, R, lora_scale, RB, DOT_PREC)
        acc_u = _lora_add(acc_u, lu + R, rmask, lb + I * stride_lbn, stride_lbk, cmask, R, lora_scale, RB, DOT_PREC)

    _, silu_g = _silu_parts(acc_g)
    h = silu_g * acc_u
    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & cmask[None, :]
    h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=omask)
    if SAVE_GU:
        g_ptrs = gu_ptr + rows64[:, None] * stride_gu + cols[None, :]
        tl.store(g_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=omask)
        tl.store(g_ptrs + I, acc_u.to(gu_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr, b_ptr, out_ptr, tw_ptr,
    tok_ptr, flat_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    N_OUT, K_RED,
    stride_a, stride_be, stride_bk, stride_bn, stride_out,
    A_GATHER: tl.constexpr, SCALE: tl.constexpr, OUT_SORTED: tl.constexpr,
    lu_ptr, lb_ptr, stride_lu, stride_lbe, stride_lbk, stride_lbn, R, lora_scale,
    HAS_LORA: tl.constexpr, RB: tl.constexpr,
    N_TILES, N_COL_BLOCKS, TILE_ORDER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[flat[r], :] = (scale_r *) (A[r or tok[r], :] @ B_e (+ lora_scale * U_r @ LB_e)) for every
    routed row r; with OUT_SORTED out[r, :] instead (the sorted order, for LoRA's low-rank activations).

    B_e[k, n] = b_ptr[e*stride_be + k*stride_bk + n*stride_bn], so the same kernel reads
    w_down transposed (forward) or w_gate_up as stored (dX backward); LB_e likewise with the
    stride_lb* strides, U [N, R] in sorted rows.
    """
    pid_m, pid_n = _tile_pid(N_TILES, N_COL_BLOCKS, TILE_ORDER)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    if A_GATHER:
        arow = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        arow = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N_OUT
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + arow[:, None] * stride_a + ks[None, :]
    b_ptrs = (b_ptr + e.to(tl.int64) * stride_be
              + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K_RED, BK):
        kmask = (k0 + ks) < K_RED
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    if HAS_LORA:
        lu = lu_ptr + rows.to(tl.int64)[:, None] * stride_lu
        lb = lb_ptr + e.to(tl.int64) * stride_lbe + cols[None, :].to(tl.int64) * stride_lbn
        acc = _lora_add(acc, lu, rmask, lb, stride_lbk, cmask, R, lora_scale, RB, DOT_PREC)

    flat = tl.load(flat_ptr + rows, mask=rmask, other=0).to(tl.int64)
    if SCALE:
        tw = tl.load(tw_ptr + flat, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * tw[:, None]
    # Scatter to the flat (t, k) slot: each slot is written once, and the caller's sum over
    # K then runs in a fixed order (deterministic, unlike float atomics on y).
    if OUT_SORTED:
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    else:
        o_ptrs = out_ptr + flat[:, None] * stride_out + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _down_bwd_kernel(
    dy_ptr, w_ptr, gu_ptr, tw_ptr, dgu_ptr, dtw_part_ptr, hw_ptr,
    tok_ptr, flat_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    H, I,
    stride_dy, stride_we, stride_wo, stride_gu, stride_dgu, stride_part, stride_hw,
    STORE_HW: tl.constexpr,
    lu_ptr, lb_ptr, stride_lu, stride_lbe, stride_lbk, stride_lbn, R, lora_scale,
    HAS_LORA: tl.constexpr, RB: tl.constexpr,
    N_TILES, N_COL_BLOCKS, TILE_ORDER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dh_r = dy[tok_r] @ W_down[e] (unweighted), then in the epilogue:
    partial d(topk_w)_r = <dh_r, h_r> over this column block, the SwiGLU backward
    dg = w_r*dh*u*silu'(g), du = w_r*dh*silu(g) written as dgu (sorted rows, [N, 2I]), and, with
    STORE_HW, hw_r = w_r*h_r (sorted rows, [N, I]): the down weight gradient is then a plain
    gathered GEMM, dW_down[e] = sum_r dy[tok_r]^T hw_r, with no operand built in registers."""
    pid_m, pid_n = _tile_pid(N_TILES, N_COL_BLOCKS, TILE_ORDER)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < I
    ks = tl.arange(0, BK)
    a_ptrs = dy_ptr + tok[:, None] * stride_dy + ks[None, :]
    # W_down[e] is [H, I]: B[k, n] = W[e, k, n], already the layout dh = dy @ W needs.
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wo + cols[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + ks) < H
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)
        a_ptrs += BK
        b_ptrs += BK * stride_wo
    if HAS_LORA:  # dh += scale * (dy B_down) A_down: U = dy[tok] B_down per sorted row, A_down [E, R, I]
        lu = lu_ptr + rows.to(tl.int64)[:, None] * stride_lu
        lb = lb_ptr + e.to(tl.int64) * stride_lbe + cols[None, :].to(tl.int64) * stride_lbn
        acc = _lora_add(acc, lu, rmask, lb, stride_lbk, cmask, R, lora_scale, RB, DOT_PREC)

    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & cmask[None, :]
    g_ptrs = gu_ptr + rows64[:, None] * stride_gu + cols[None, :]
    g = tl.load(g_ptrs, mask=omask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + I, mask=omask, other=0.0).to(tl.float32)
    sig, silu_g = _silu_parts(g)
    h = silu_g * u
    flat = tl.load(flat_ptr + rows, mask=rmask, other=0).to(tl.int64)
    # Masked columns hold acc = 0 and h = 0, so they add nothing to the partial dot.
    part = tl.sum(acc * h, axis=1)
    tl.store(dtw_part_ptr + flat * stride_part + pid_n, part, mask=rmask)
    tw = tl.load(tw_ptr + flat, mask=rmask, other=0.0).to(tl.float32)
    if STORE_HW:
        hw_ptrs = hw_ptr + rows64[:, None] * stride_hw + cols[None, :]
        tl.store(hw_ptrs, (h * tw[:, None]).to(hw_ptr.dtype.element_ty), mask=omask)
    dh = acc * tw[:, None]
    du = dh * silu_g
    dg = dh * u * (sig + silu_g * (1.0 - sig))
    d_ptrs = dgu_ptr + rows64[:, None] * stride_dgu + cols[None, :]
    tl.store(d_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=omask)
    tl.store(d_ptrs + I, du.to(dgu_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _expert_wgrad_kernel(
    a_ptr, b_ptr, out_ptr,
    tok_ptr, offsets_ptr,
    M, N,
    stride_a, stride_b, stride_oe, stride_om, stride_on,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
    N_EXPERTS, M_BLOCKS, N_BLOCKS, TILE_ORDER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dW[e] = sum over expert e's rows r of A_r^T B_r, with A_r or B_r optionally gathered by token.
    Both operands go from memory to the matrix unit as loaded: an operand computed in registers
    (a scale, a rebuilt activation) would have to round-trip through shared memory each step, which
    measured 4-5x slower (benchmarks/NOTES.md)."""
    pid = tl.program_id(0)
    if TILE_ORDER == 1:
        # Expert slowest: the programs in flight share one expert's rows, read from L2 by all of its
        # output tiles instead of from HBM once per tile.
        e = pid // (M_BLOCKS * N_BLOCKS)
        rest = pid % (M_BLOCKS * N_BLOCKS)
        pid_m = rest // N_BLOCKS
        pid_n = rest % N_BLOCKS
    else:
        e = pid % N_EXPERTS
        rest = pid // N_EXPERTS
        pid_m = rest % M_BLOCKS
        pid_n = rest // M_BLOCKS
    r_begin = tl.load(offsets_ptr + e)
    r_end = tl.load(offsets_ptr + e + 1)
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    mmask = ms < M
    nmask = ns < N
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    # One program owns this output tile and walks the rows in sorted order: the fp32 sum has a
    # fixed order, so dW is bitwise identical run to run. Empty experts store zeros.
    for r0 in range(r_begin, r_end, BK):
        rr = r0 + rk
        rmask = rr < r_end
        if A_GATHER:
            arow = tl.load(tok_ptr + rr, mask=rmask, other=0).to(tl.int64)
        else:
            arow = rr.to(tl.int64)
        if B_GATHER:
            brow = tl.load(tok_ptr + rr, mask=rmask, other=0).to(tl.int64)
        else:
            brow = rr.to(tl.int64)
        a_t = tl.load(a_ptr + arow[None, :] * stride_a + ms[:, None],
                      mask=mmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(b_ptr + brow[:, None] * stride_b + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a_t, b, acc=acc, input_precision=DOT_PREC)
    o_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + ms[:, None].to(tl.int64) * stride_om
              + ns[None, :].to(tl.int64) * stride_on)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- launchers

def _check_routing(routing: RoutingTables, cfg: KernelConfig, n_rows: int) -> None:
    if routing.block_m != cfg.block_m:
        raise ValueError(f"routing built for block_m={routing.block_m}, kernels use {cfg.block_m}")
    if routing.sorted_token_ids.numel() != n_rows:
        raise ValueError("routing tables do not match the number of routed rows")


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreter_active():
        raise RuntimeError("Triton MoE kernels need a CUDA device or TRITON_INTERPRET=1 "
                           "(set before importing triton)")
    if interpreter_active():
        _check_interpreter_versions()


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.lru_cache(maxsize=None)
def _check_interpreter_versions() -> None:
    # triton 3.6's interpreter turns loop bounds into Python ints with int(1-element array),
    # which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted"); 3.7 squeezes first.
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"the Triton interpreter of triton {triton.__version__} cannot run with NumPy "
                           f"{numpy.__version__}: install triton>=3.7 (requirements.txt pins 3.7.1) or numpy<2.4")


class LowRank(NamedTuple):
    """LoRA's half of a projection, for a row-tile kernel to add before its epilogue:
    ``scale * u[r] @ B_e`` for each sorted row r of expert e, where u [N, R] holds the rows' low-rank
    activations (activation dtype, unit column stride) and B_e[j, n] = b[e] read with the strides
    ``stride_j`` (over the rank) and ``stride_n`` (over the output columns)."""
    u: torch.Tensor
    b: torch.Tensor
    stride_j: int
    stride_n: int
    scale: float


def _rank_block(rank: int) -> int:
    # tl.dot needs 16 at least; past 64 the rank is walked in steps (one code path for any rank).
    return max(16, min(64, triton.next_power_of_2(max(rank, 1))))


def _lora_kwargs(lora: Optional[LowRank], n_rows: int, dtype: torch.dtype, placeholder: torch.Tensor,
                 parts: int = 1) -> dict:
    """The kernels' LoRA arguments: the low-rank term, or placeholders that HAS_LORA=False never reads.
    parts: how many projections' activations u holds side by side (gate_up: 2), each of rank R."""
    if lora is None:
        return dict(lu_ptr=placeholder, lb_ptr=placeholder, stride_lu=0, stride_lbe=0, stride_lbk=0, stride_lbn=0,
                    R=0, lora_scale=0.0, HAS_LORA=False, RB=16)
    u, b = lora.u, lora.b
    if u.dim() != 2 or u.shape[0] != n_rows or u.stride(1) != 1:
        raise ValueError(f"LoRA activations must be [{n_rows}, R] with unit column stride, got {tuple(u.shape)}")
    if u.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"LoRA tensors must have the activation dtype {dtype}, got {u.dtype} and {b.dtype}")
    _check_device(u, b)
    rank = u.shape[1] // parts
    return dict(lu_ptr=u, lb_ptr=b, stride_lu=u.stride(0), stride_lbe=b.stride(0), stride_lbk=lora.stride_j,
                stride_lbn=lora.stride_n, R=rank, lora_scale=float(lora.scale), HAS_LORA=True, RB=_rank_block(rank))


def _tile_launch(routing: RoutingTables, n_cols: int, block_n: int, cfg: KernelConfig):
    """The 1-D grid of a row-tile kernel and its order arguments (N_TILES, N_COL_BLOCKS, TILE_ORDER)."""
    n_tiles, n_col_blocks = routing.tile_expert.numel(), triton.cdiv(n_cols, block_n)
    return (n_tiles * n_col_blocks,), dict(N_TILES=n_tiles, N_COL_BLOCKS=n_col_blocks, TILE_ORDER=cfg.tile_order)


def gate_up_fwd(x_TH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, routing: RoutingTables,
                cfg: KernelConfig, save_preact: bool, lora: Optional[LowRank] = None):
    """h_NI = silu(x[tok] @ Wg^T) * (x[tok] @ Wu^T) per sorted row; also gu_N2I = [g | u]
    when save_preact (the backward needs the pre-activation). ``lora``: u [N, 2R] = x[tok] A^T
    (gate's R columns, then up's) and b = B_gate_up [E, 2I, R], added to g and u before the SwiGLU."""
    x_TH = x_TH.contiguous()
    w = w_gate_up_E2IH.contiguous()
    _check_device(x_TH, w)
    T, H = x_TH.shape
    E, I2, H_w = w.shape
    if H_w != H or I2 % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, {H}], got {tuple(w.shape)}")
    if w.dtype != x_TH.dtype:
        raise TypeError(f"w_gate_up dtype {w.dtype} != x dtype {x_TH.dtype}")
    I = I2 // 2
    n_rows = routing.sorted_token_ids.numel()
    _check_routing(routing, cfg, n_rows)
    h_NI = torch.empty(n_rows, I, dtype=x_TH.dtype, device=x_TH.device)
    gu_N2I = torch.empty(n_rows, I2, dtype=x_TH.dtype, device=x_TH.device) if save_preact else h_NI
    grid, order = _tile_launch(routing, I, cfg.block_n_gu, cfg)
    _gate_up_fwd_kernel[grid](
        x_TH, w, h_NI, gu_N2I,
        routing.sorted_token_ids, routing.tile_expert, routing.tile_row_start, routing.expert_offsets,
        H, I,
        x_TH.stride(0), w.stride(0), w.stride(1), h_NI.stride(0), gu_N2I.stride(0),
        SAVE_GU=save_preact, **_lora_kwargs(lora, n_rows, x_TH.dtype, x_TH, parts=2), **order,
        BM=cfg.block_m, BN=cfg.block_n_gu, BK=cfg.block_k, DOT_PREC=_dot_precision(x_TH.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h_NI, (gu_N2I if save_preact else None)


def down_fwd(h_NI: torch.Tensor, w_down_EHI: torch.Tensor, topk_weights_N: torch.Tensor,
             routing: RoutingTables, cfg: KernelConfig, lora: Optional[LowRank] = None) -> torch.Tensor:
    """o_NH[flat(r)] = topk_w[flat(r)] * h_r @ W_down[e]^T, in flat (t*K + k) order. ``lora``:
    u [N, R] = h A_down^T and b = B_down [E, H, R], added before the routing weight."""
    h_NI = h_NI.contiguous()
    w = w_down_EHI.contiguous()
    tw = topk_weights_N.contiguous().reshape(-1)
    _check_device(h_NI, w, tw)
    n_rows, I = h_NI.shape
    E, H, I_w = w.shape
    if I_w != I:
        raise ValueError(f"w_down must be [E, H, {I}], got {tuple(w.shape)}")
    if w.dtype != h_NI.dtype:
        raise TypeError(f"w_down dtype {w.dtype} != activation dtype {h_NI.dtype}")
    if tw.numel() != n_rows:
        raise ValueError("topk_weights must have T*K elements")
    _check_routing(routing, cfg, n_rows)
    o_NH = torch.empty(n_rows, H, dtype=h_NI.dtype, device=h_NI.device)
    grid, order = _tile_launch(routing, H, cfg.block_n, cfg)
    _rows_gemm_kernel[grid](
        h_NI, w, o_NH, tw,
        routing.sorted_token_ids, routing.sorted_flat_ids, routing.tile_expert,
        routing.tile_row_start, routing.expert_offsets,
        H, I,
        h_NI.stride(0), w.stride(0), w.stride(2), w.stride(1), o_NH.stride(0),
        A_GATHER=False, SCALE=True, OUT_SORTED=False, **_lora_kwargs(lora, n_rows, h_NI.dtype, h_NI), **order,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, DOT_PREC=_dot_precision(h_NI.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o_NH


def down_bwd(dy_TH: torch.Tensor, w_down_EHI: torch.Tensor, gu_N2I: torch.Tensor,
             topk_weights_N: torch.Tensor, routing: RoutingTables, cfg: KernelConfig, store_hw: bool = True,
             lora: Optional[LowRank] = None):
    """Returns dgu_N2I (sorted rows, activation dtype), dtw_part_NB (fp32, flat rows, one column per
    I-block; the caller sums the columns in order to get d topk_weights) and hw_NI = topk_w * h
    (sorted rows, activation dtype; None unless store_hw), the operand of down_wgrad. ``lora``:
    u [N, R] = dy[tok] B_down and b = A_down [E, R, I]; the unweighted dh then holds the adapter's
    path too, so d topk_w = <dh, h> is the whole projection's (<dy B, A h> is the adapter's share)."""
    dy_TH = dy_TH.contiguous()
    w = w_down_EHI.contiguous()
    gu_N2I = gu_N2I.contiguous()
    tw = topk_weights_N.contiguous().reshape(-1)
    _check_device(dy_TH, w, gu_N2I, tw)
    T, H = dy_TH.shape
    E, H_w, I = w.shape
    n_rows = gu_N2I.shape[0]
    if H_w != H or gu_N2I.shape[1] != 2 * I:
        raise ValueError("down_bwd: inconsistent shapes")
    if not (dy_TH.dtype == w.dtype == gu_N2I.dtype):
        raise TypeError("down_bwd: dy, w_down and the cached pre-activation must share a dtype")
    _check_routing(routing, cfg, n_rows)
    n_blocks = triton.cdiv(I, cfg.block_n_dbwd)
    dgu_N2I = torch.empty_like(gu_N2I)
    dtw_part_NB = torch.empty(n_rows, n_blocks, dtype=torch.float32, device=dy_TH.device)
    hw_NI = torch.empty(n_rows, I, dtype=gu_N2I.dtype, device=dy_TH.device) if store_hw else dgu_N2I
    grid, order = _tile_launch(routing, I, cfg.block_n_dbwd, cfg)
    _down_bwd_kernel[grid](
        dy_TH, w, gu_N2I, tw, dgu_N2I, dtw_part_NB, hw_NI,
        routing.sorted_token_ids, routing.sorted_flat_ids, routing.tile_expert,
        routing.tile_row_start, routing.expert_offsets,
        H, I,
        dy_TH.stride(0), w.stride(0), w.stride(1), gu_N2I.stride(0), dgu_N2I.stride(0),
        dtw_part_NB.stride(0), hw_NI.stride(0), STORE_HW=store_hw, **_lora_kwargs(lora, n_rows, dy_TH.dtype, dy_TH),
        **order,
        BM=cfg.block_m, BN=cfg.block_n_dbwd, BK=cfg.block_k, DOT_PREC=_dot_precision(dy_TH.dtype),
        num_warps=cfg.dbwd_warps or cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dgu_N2I, dtw_part_NB, (hw_NI if store_hw else None)


def gate_up_bwd_dx(dgu_N2I: torch.Tensor, w_gate_up_E2IH: torch.Tensor, routing: RoutingTables,
                   cfg: KernelConfig, lora: Optional[LowRank] = None) -> torch.Tensor:
    """dx_NH[flat(r)] = [dg_r | du_r] @ W_gate_up[e] (reduction over 2I), flat order. ``lora``:
    u [N, 2R] = [dg B_gate | du B_up] and b = A_gate_up [E, 2R, H]."""
    dgu_N2I = dgu_N2I.contiguous()
    w = w_gate_up_E2IH.contiguous()
    _check_device(dgu_N2I, w)
    n_rows, I2 = dgu_N2I.shape
    E, I2_w, H = w.shape
    if I2_w != I2:
        raise ValueError("gate_up_bwd_dx: inconsistent shapes")
    if w.dtype != dgu_N2I.dtype:
        raise TypeError("gate_up_bwd_dx: dtype mismatch")
    _check_routing(routing, cfg, n_rows)
    dx_NH = torch.empty(n_rows, H, dtype=dgu_N2I.dtype, device=dgu_N2I.device)
    grid, order = _tile_launch(routing, H, cfg.block_n, cfg)
    _rows_gemm_kernel[grid](
        dgu_N2I, w, dx_NH, dgu_N2I,
        routing.sorted_token_ids, routing.sorted_flat_ids, routing.tile_expert,
        routing.tile_row_start, routing.expert_offsets,
        H, I2,
        dgu_N2I.stride(0), w.stride(0), w.stride(1), w.stride(2), dx_NH.stride(0),
        A_GATHER=False, SCALE=False, OUT_SORTED=False, **_lora_kwargs(lora, n_rows, dgu_N2I.dtype, dgu_N2I),
        **order,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, DOT_PREC=_dot_precision(w.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx_NH


def _wgrad_launch(a, b, out, routing, cfg, M, N, a_gather, b_gather):
    E = out.shape[0]
    m_blocks, n_blocks = triton.cdiv(M, cfg.wg_block_m), triton.cdiv(N, cfg.wg_block_n)
    grid = (E * m_blocks * n_blocks,)
    _expert_wgrad_kernel[grid](
        a, b, out,
        routing.sorted_token_ids, routing.expert_offsets,
        M, N,
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2),
        A_GATHER=a_gather, B_GATHER=b_gather,
        N_EXPERTS=E, M_BLOCKS=m_blocks, N_BLOCKS=n_blocks, TILE_ORDER=cfg.tile_order,
        BM=cfg.wg_block_m, BN=cfg.wg_block_n, BK=cfg.wg_block_k,
        DOT_PREC=_dot_precision(a.dtype),
        num_warps=cfg.wg_warps or cfg.num_warps, num_stages=cfg.wg_stages or cfg.num_stages,
    )
    return out


def down_wgrad(dy_TH: torch.Tensor, hw_NI: torch.Tensor, routing: RoutingTables, cfg: KernelConfig,
               num_experts: int, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """dW_down[e] = sum_r dy[tok_r]^T hw_r with hw_r = topk_w_r * h_r from down_bwd. [E, H, I]."""
    dy_TH = dy_TH.contiguous()
    hw_NI = hw_NI.contiguous()
    _check_device(dy_TH, hw_NI)
    if dy_TH.dtype != hw_NI.dtype:
        raise TypeError("down_wgrad: dtype mismatch")
    H = dy_TH.shape[1]
    I = hw_NI.shape[1]
    _check_routing(routing, cfg, hw_NI.shape[0])
    out = torch.empty(num_experts, H, I, dtype=out_dtype or dy_TH.dtype, device=dy_TH.device)
    return _wgrad_launch(dy_TH, hw_NI, out, routing, cfg, H, I, a_gather=True, b_gather=False)


def gate_up_wgrad(dgu_N2I: torch.Tensor, x_TH: torch.Tensor, routing: RoutingTables,
                  cfg: KernelConfig, num_experts: int,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """dW_gate_up[e] = sum_r [dg_r | du_r]^T x[tok_r]. [E, 2I, H]."""
    dgu_N2I = dgu_N2I.contiguous()
    x_TH = x_TH.contiguous()
    _check_device(dgu_N2I, x_TH)
    if dgu_N2I.dtype != x_TH.dtype:
        raise TypeError("gate_up_wgrad: dtype mismatch")
    I2 = dgu_N2I.shape[1]
    H = x_TH.shape[1]
    _check_routing(routing, cfg, dgu_N2I.shape[0])
    out = torch.empty(num_experts, I2, H, dtype=out_dtype or x_TH.dtype, device=x_TH.device)
    return _wgrad_launch(dgu_N2I, x_TH, out, routing, cfg, I2, H, a_gather=False, b_gather=True)


def rows_product(a: torch.Tensor, b: torch.Tensor, stride_k: int, stride_n: int, n_out: int,
                 routing: RoutingTables, cfg: KernelConfig, gather: bool, out: Optional[torch.Tensor] = None):
    """out[r] = a[tok_r if gather else r] @ B_e for every sorted row r of expert e, in sorted order, where
    B_e[k, n] = b[e] read with strides stride_k, stride_n: LoRA's narrow products (x A^T, dy B, ...) on
    the frozen GEMMs' routing tables. a may be a column slice (unit column stride) and out a slice of a
    wider buffer; out [N, n_out] is allocated when not given."""
    _check_device(a, b)
    n_rows = routing.sorted_token_ids.numel()
    if a.dim() != 2 or a.stride(1) != 1:
        raise ValueError(f"rows_product: a must be 2-D with unit column stride, got {tuple(a.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"rows_product: dtype mismatch {a.dtype} vs {b.dtype}")
    if out is None:
        out = torch.empty(n_rows, n_out, dtype=a.dtype, device=a.device)
    if out.shape != (n_rows, n_out) or out.stride(1) != 1:
        raise ValueError(f"rows_product: out must be [{n_rows}, {n_out}] with unit column stride")
    _check_routing(routing, cfg, n_rows)
    block_n = min(cfg.block_n, max(16, triton.next_power_of_2(n_out)))
    grid, order = _tile_launch(routing, n_out, block_n, cfg)
    _rows_gemm_kernel[grid](
        a, b, out, a,
        routing.sorted_token_ids, routing.sorted_flat_ids, routing.tile_expert,
        routing.tile_row_start, routing.expert_offsets,
        n_out, a.shape[1],
        a.stride(0), b.stride(0), stride_k, stride_n, out.stride(0),
        A_GATHER=gather, SCALE=False, OUT_SORTED=True, **_lora_kwargs(None, n_rows, a.dtype, a), **order,
        BM=cfg.block_m, BN=block_n, BK=cfg.block_k, DOT_PREC=_dot_precision(a.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def rows_wgrad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, routing: RoutingTables, cfg: KernelConfig,
               a_gather: bool = False, b_gather: bool = False) -> torch.Tensor:
    """out[e] = sum over expert e's sorted rows r of a_r^T b_r ([E, M, N]; a_r, b_r gathered by token when
    asked): the adapters' gradients. Operands may be column slices (unit column stride); out any view
    (a transposed one: an [R, I] gradient computed as its [I, R] transpose, so that the wide side is
    the tile's M, which Hopper's warpgroup MMA needs in multiples of 64)."""
    _check_device(a, b, out)
    if a.dtype != b.dtype:
        raise TypeError(f"rows_wgrad: dtype mismatch {a.dtype} vs {b.dtype}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("rows_wgrad: operands need a unit column stride")
    M, N = a.shape[1], b.shape[1]
    if tuple(out.shape[1:]) != (M, N):
        raise ValueError(f"rows_wgrad: out must be [E, {M}, {N}], got {tuple(out.shape)}")
    _check_routing(routing, cfg, routing.sorted_token_ids.numel())
    return _wgrad_launch(a, b, out, routing, narrow_wgrad_config(cfg, M, N), M, N, a_gather=a_gather,
                         b_gather=b_gather)


def narrow_wgrad_config(cfg: KernelConfig, M: int, N: int) -> KernelConfig:
    """The weight-gradient tiles cut down to a narrow side (an adapter's rank): a 128-wide tile over 8
    real columns would spend 16 times the matrix unit's work on padding."""
    def fit(block: int, n: int) -> int:
        return min(block, max(16, triton.next_power_of_2(n)))
    return cfg._replace(wg_block_m=fit(cfg.wg_block_m, M), wg_block_n=fit(cfg.wg_block_n, N))
