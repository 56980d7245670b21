"""Device-side routing tables for the grouped-GEMM MoE kernels, in plain torch.

The Triton op builds the same tables in one launch (kernels._glue.build_routing_fused); this
module's ``build_routing`` is the reference that kernel is tested against, bit for bit, and what
code without Triton uses.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows
(one per (token, k) pair). Suffixes name shapes: ids_N is [N], tile_expert_M is [max_tiles].

Everything here is built from torch tensor ops that never read a value back to the host
(no .item(), .cpu(), .tolist(), no bincount whose output size depends on the data), so the
caller can capture it in a CUDA graph. The price is that the tile table is sized by its
upper bound and padded with expert -1, which the kernels treat as "nothing to do".
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RoutingTables", "build_routing", "expert_counts", "max_tiles"]


class RoutingTables(NamedTuple):
    """Rows of the routed problem sorted by expert (stable, so ties keep (token, k) order).

    sorted_token_ids: [N] int32, token index t feeding sorted row r.
    sorted_flat_ids:  [N] int32, flat (t*K + k) position of sorted row r.
    expert_counts:    [E] int32, rows routed to each expert (the load histogram).
    expert_offsets:   [E+1] int32, exclusive prefix sum; expert e owns rows offsets[e]:offsets[e+1].
    tile_expert:      [max_tiles] int32, expert of each BM-row tile, -1 past the real tile count.
    tile_row_start:   [max_tiles] int32, first sorted row of each tile (0 for padding tiles).
    num_tiles:        [1] int32, the real tile count (kept on device).
    block_m:          rows per tile the tables were built for; kernels must use the same BM.
    """

    sorted_token_ids: torch.Tensor
    sorted_flat_ids: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    num_tiles: torch.Tensor
    block_m: int


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(n_e / BM) given sum_e n_e = num_rows.

    Each expert wastes less than one tile to rounding, and at most min(E, N) experts are
    non-empty, so ceil(N / BM) + min(E, N) tiles always suffice.
    """
    return -(-num_rows // block_m) + min(num_experts, num_rows)


def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: routed slots per expert (ids in [0, num_experts), any shape).

    An integer scatter-add into a fixed-size output, which reads nothing back to the host (exact
    whatever order the atomics land in). ``torch.bincount`` on CUDA copies the input's min and max
    to the host to size its output: that would stall every MoE layer's forward (and its recompute)
    until the GPU caught up."""
    ids = topk_ids_TK.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def build_routing(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                  counts_E: torch.Tensor | None = None) -> RoutingTables:
    """Sort the N = T*K routed rows by expert and build the per-tile table.

    topk_ids: [T, K] int32 or int64 with values in [0, num_experts). Values outside that range
    are not checked (checking would need a host sync); they fail inside scatter_add_.
    counts_E: [E] integer rows per expert, ``expert_counts(topk_ids, num_experts)``, when the caller
    has it already (the model's router counts once per layer); None counts here. It is trusted, not
    compared with topk_ids: the comparison would cost the count it saves.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if block_m <= 0 or num_experts <= 0:
        raise ValueError("block_m and num_experts must be positive")
    if counts_E is not None and tuple(counts_E.shape) != (num_experts,):
        raise ValueError(f"counts_E must be [{num_experts}], got shape {tuple(counts_E.shape)}")
    dev = topk_ids.device
    top_k = topk_ids.shape[1]
    ids_N = topk_ids.reshape(-1).to(torch.int64)
    n_rows = ids_N.numel()

    # stable=True keeps equal experts in flat (t, k) order, which makes the row order, and
    # therefore every reduction over an expert's rows, reproducible run to run.
    _, order_N = torch.sort(ids_N, stable=True)

    counts_E = expert_counts(topk_ids, num_experts) if counts_E is None else counts_E.to(torch.int64)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)

    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    tile_begin_E = tile_end_E - tiles_E
    n_max = max_tiles(n_rows, num_experts, block_m)
    j_M = torch.arange(n_max, dtype=torch.int64, device=dev)
    # right=True: tile j belongs to the first expert whose cumulative tile count exceeds j,
    # which skips experts with zero tiles. j past the total lands on E (padding).
    e_M = torch.searchsorted(tile_end_E, j_M, right=True)
    valid_M = e_M < num_experts
    e_safe_M = torch.where(valid_M, e_M, torch.zeros_like(e_M))
    row_start_M = offsets_E1[e_safe_M] + (j_M - tile_begin_E[e_safe_M]) * block_m
    tile_expert_M = torch.where(valid_M, e_M, torch.full_like(e_M, -1))
    tile_row_start_M = torch.where(valid_M, row_start_M, torch.zeros_like(row_start_M))

    return RoutingTables(
        sorted_token_ids=torch.div(order_N, top_k, rounding_mode="floor").to(torch.int32),
        sorted_flat_ids=order_N.to(torch.int32),
        expert_counts=counts_E.to(torch.int32),
        expert_offsets=offsets_E1.to(torch.int32),
        tile_expert=tile_expert_M.to(torch.int32),
        tile_row_start=tile_row_start_M.to(torch.int32),
        num_tiles=tile_end_E[-1:].to(torch.int32),
        block_m=block_m,
    )
