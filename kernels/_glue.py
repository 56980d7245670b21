"""The two small kernels around the grouped GEMMs: the routing tables in one launch, and the K-way
combine (with the d topk_w reduction in backward) in one launch.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.

Routing (``build_routing_fused``): one launch replaces the ~20 torch ops of
``kernels.routing.build_routing`` (sort, cumsum, searchsorted, where, casts), which stays the
reference this kernel is tested against. It is a stable counting sort with no global
synchronisation and no atomics: program p owns a chunk of the flat rows and first counts, per
expert, the rows of every chunk before its own (each program rereads that prefix: O(N x programs)
int reads, a few MB at Ling-Lite's N, served from L2, histogrammed 1024 rows at a time). A row's sorted position is then
offsets[e] + rows of e in earlier chunks + rows of e earlier in its own chunk, which is exactly
``torch.sort(stable=True)``'s order. Each program also writes its share of the tile table, which
depends only on the per-expert counts.

Combine (``combine_k``): y[t] = sum over k = 0..K-1 of o[t*K + k] in fp32, in that fixed order,
written once in the output dtype (before: an fp32 sum over a [T, K, H] view, then a cast, two
launches). In backward the same launch also sums the per-column-block partials of d topk_w.
Fusing the sum into the down-projection's epilogue would need atomics: the K rows of a token sit
in K different experts' tiles, written by different programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import RoutingTables, max_tiles

__all__ = ["build_routing_fused", "combine_k"]


@triton.jit
def _block_onehot(ids_ptr, r0, row_end, es, BLOCK: tl.constexpr):
    # [BLOCK, E_PAD] int32: row r of the block is one-hot at its expert; rows past row_end are all zero.
    rows = r0 + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + rows, mask=rows < row_end, other=-1)
    return (e[:, None] == es[None, :]).to(tl.int32), rows


@triton.jit
def _block_hist(ids_ptr, r0, BLOCK_H: tl.constexpr, E_PAD: tl.constexpr):
    # Rows per expert among BLOCK_H rows that all exist (no mask: callers keep whole blocks in range).
    e = tl.load(ids_ptr + r0 + tl.arange(0, BLOCK_H))
    return tl.histogram(e.to(tl.int32), E_PAD)


@triton.jit
def _routing_kernel(
    ids_ptr, counts_ptr,
    sorted_tok_ptr, sorted_flat_ptr, counts_out_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr,
    N, E, K, BLOCK_M, N_TILES_MAX, ROWS_PER_PROG, TILES_PER_PROG,
    HAVE_COUNTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    es = tl.arange(0, E_PAD)
    emask = es < E
    chunk_begin = pid * ROWS_PER_PROG
    chunk_end = tl.minimum(chunk_begin + ROWS_PER_PROG, N)

    # Rows per expert in the chunks before this one: whole BLOCK_H-row blocks (chunks are multiples of
    # BLOCK_H), histogrammed. This prefix is the kernel's longest loop, N / BLOCK_H steps at most.
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for r0 in range(0, chunk_begin, BLOCK_H):
        before += _block_hist(ids_ptr, r0, BLOCK_H, E_PAD)
    if HAVE_COUNTS:
        total = tl.load(counts_ptr + es, mask=emask, other=0).to(tl.int32)
    else:  # every row counted: the whole blocks, then the last partial one with a mask
        total = tl.zeros([E_PAD], dtype=tl.int32)
        n_whole = (N // BLOCK_H) * BLOCK_H
        for r0 in range(0, n_whole, BLOCK_H):
            total += _block_hist(ids_ptr, r0, BLOCK_H, E_PAD)
        for r0 in range(n_whole, N, BLOCK):
            onehot, _ = _block_onehot(ids_ptr, r0, N, es, BLOCK)
            total += tl.sum(onehot, axis=0)
    offsets = tl.cumsum(total, axis=0) - total  # exclusive prefix sum: expert e's first sorted row

    # This chunk's rows to their sorted places, in flat order within each expert (a stable sort).
    for r0 in range(chunk_begin, chunk_end, BLOCK):
        onehot, rows = _block_onehot(ids_ptr, r0, chunk_end, es, BLOCK)
        earlier_here = tl.cumsum(onehot, axis=0) - onehot  # same-expert rows earlier in this block
        pos = tl.sum(onehot * (earlier_here + (offsets + before)[None, :]), axis=1)
        live = rows < chunk_end
        tl.store(sorted_flat_ptr + pos, rows, mask=live)
        tl.store(sorted_tok_ptr + pos, rows // K, mask=live)
        before += tl.sum(onehot, axis=0)

    # This program's share of the tile table: tile j belongs to the first expert whose cumulative
    # tile count exceeds j (experts with no tiles are skipped); past the real count, expert -1.
    tiles = (total + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    first_row_minus = offsets - (tile_end - tiles) * BLOCK_M  # row_start(j) = this[e] + j * BLOCK_M
    j_begin = pid * TILES_PER_PROG
    j_end = tl.minimum(j_begin + TILES_PER_PROG, N_TILES_MAX)
    for j0 in range(j_begin, j_end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        e_j = tl.sum(((tile_end[None, :] <= js[:, None]) & emask[None, :]).to(tl.int32), axis=1)
        valid = e_j < E
        at = (es[None, :] == e_j[:, None]).to(tl.int32)
        row_start = tl.sum(at * first_row_minus[None, :], axis=1) + js * BLOCK_M
        jm = js < j_end
        tl.store(tile_expert_ptr + js, tl.where(valid, e_j, -1), mask=jm)
        tl.store(tile_row_ptr + js, tl.where(valid, row_start, 0), mask=jm)

    if pid == 0:
        tl.store(counts_out_ptr + es, total, mask=emask)
        tl.store(offsets_ptr + es, offsets, mask=emask)
        tl.store(offsets_ptr + E, tl.sum(total, axis=0))
        tl.store(num_tiles_ptr, tl.sum(tiles, axis=0))


def _routing_blocks(n_rows: int, num_experts: int, interpret: bool):
    """(E_PAD, BLOCK, BLOCK_H, rows per program): one-hot blocks of at most 4096 int32 (32 per thread
    at 4 warps; 8192 compiled to 255 registers for sm_90, at the edge of spilling) for the rank within a chunk, histogram blocks of BLOCK_H rows for the prefix, and about
    32 programs: the last one's prefix is all the rows before it, whatever the count, and fewer
    programs would each sort a longer chunk one block at a time."""
    e_pad = triton.next_power_of_2(num_experts)
    block = max(16, min(16 if interpret else 64, 4096 // e_pad))
    block_h = 32 if interpret else 1024
    per_prog = block_h * max(1, triton.cdiv(triton.cdiv(n_rows, 32), block_h))
    return e_pad, block, block_h, per_prog


def build_routing_fused(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                        counts_E: torch.Tensor | None = None, interpret: bool = False) -> RoutingTables:
    """``kernels.routing.build_routing`` in one Triton launch: the same tables, bit for bit.

    topk_ids [T, K] int32/int64 in [0, num_experts) (not checked: a host sync); counts_E [E] rows per
    expert when the caller has counted them (trusted), else counted here from topk_ids."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if block_m <= 0 or num_experts <= 0:
        raise ValueError("block_m and num_experts must be positive")
    if counts_E is not None and tuple(counts_E.shape) != (num_experts,):
        raise ValueError(f"counts_E must be [{num_experts}], got shape {tuple(counts_E.shape)}")
    dev = topk_ids.device
    ids = topk_ids.contiguous()
    n_rows, top_k = ids.numel(), ids.shape[1]
    n_max = max_tiles(n_rows, num_experts, block_m)
    e_pad, block, block_h, per_prog = _routing_blocks(n_rows, num_experts, interpret)
    programs = max(1, triton.cdiv(n_rows, per_prog))
    tiles_per_prog = triton.cdiv(n_max, programs)
    i32 = dict(dtype=torch.int32, device=dev)
    tok, flat = torch.empty(n_rows, **i32), torch.empty(n_rows, **i32)
    counts_out, offsets = torch.empty(num_experts, **i32), torch.empty(num_experts + 1, **i32)
    tile_expert, tile_row = torch.empty(n_max, **i32), torch.empty(n_max, **i32)
    num_tiles = torch.empty(1, **i32)
    counts_in = counts_E.contiguous() if counts_E is not None else counts_out  # unread without counts
    _routing_kernel[(programs,)](
        ids, counts_in, tok, flat, counts_out, offsets, tile_expert, tile_row, num_tiles,
        n_rows, num_experts, top_k, block_m, n_max, per_prog, tiles_per_prog,
        HAVE_COUNTS=counts_E is not None, E_PAD=e_pad, BLOCK=block, BLOCK_H=block_h, BLOCK_J=min(64, block),
        num_warps=4,
    )
    return RoutingTables(tok, flat, counts_out, offsets, tile_expert, tile_row, num_tiles, block_m)


@triton.jit
def _combine_kernel(
    o_ptr, y_ptr, part_ptr, dtw_ptr,
    T, H, K, NB,
    stride_o, stride_y, stride_part,
    HAS_PART: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, NB_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    n_hblocks = tl.cdiv(H, BH)
    pid_t = pid // n_hblocks
    pid_h = pid % n_hblocks
    toks = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    cols = pid_h * BH + tl.arange(0, BH)
    tmask = toks < T
    m = tmask[:, None] & (cols[None, :] < H)
    acc = tl.zeros([BT, BH], dtype=tl.float32)
    for k in range(0, K):  # slot order: the same sum whatever the launch order
        o = tl.load(o_ptr + (toks * K + k)[:, None] * stride_o + cols[None, :], mask=m, other=0.0)
        acc += o.to(tl.float32)
    tl.store(y_ptr + toks[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)
    if HAS_PART:
        if pid_h == 0:  # d topk_w[t, k] = sum over the column-block partials, in block order
            bs = tl.arange(0, NB_PAD)
            for k in range(0, K):
                slot = toks * K + k
                p = tl.load(part_ptr + slot[:, None] * stride_part + bs[None, :],
                            mask=tmask[:, None] & (bs[None, :] < NB), other=0.0)
                tl.store(dtw_ptr + slot, tl.sum(p, axis=1), mask=tmask)


def combine_k(o_NH: torch.Tensor, num_tokens: int, out_dtype: torch.dtype,
              part_NB: torch.Tensor | None = None, interpret: bool = False):
    """y [T, H] (out_dtype) = the fp32 sum over each token's K consecutive rows of o_NH [T*K, H];
    with part_NB [T*K, B] fp32 also dtw [T*K] fp32 = part_NB summed over B. Returns (y, dtw or None)."""
    o = o_NH.contiguous()
    n_rows, H = o.shape
    if n_rows % num_tokens:
        raise ValueError(f"{n_rows} rows are not K rows for each of {num_tokens} tokens")
    K = n_rows // num_tokens
    y = torch.empty(num_tokens, H, dtype=out_dtype, device=o.device)
    has_part = part_NB is not None
    part = part_NB.contiguous() if has_part else o
    dtw = torch.empty(n_rows, dtype=torch.float32, device=o.device) if has_part else y
    nb = part.shape[1] if has_part else 1
    bt, bh = (16, 16) if interpret else (16, 256)
    grid = (triton.cdiv(num_tokens, bt) * triton.cdiv(H, bh),)
    _combine_kernel[grid](
        o, y, part, dtw, num_tokens, H, K, nb, o.stride(0), y.stride(0), part.stride(0),
        HAS_PART=has_part, BT=bt, BH=bh, NB_PAD=triton.next_power_of_2(nb), num_warps=4,
    )
    return y, (dtw if has_part else None)
