"""Expert parallelism: the routed experts spread over the ranks of an EP group, tokens sent to them
by all-to-all. A drop-in for GroupedExperts, swapped into each MoE block from outside
(``apply_expert_parallel``), so the model files stay single-device; this is the one module of moe
that communicates (torch.distributed collectives only), kept here so it can be used and tested
without the trainer.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed slots,
ep ranks in the EP group, El = E/ep experts per rank (rank r holds experts [r*El, (r+1)*El)).

Forward of one MoE block on every rank of the group, in lockstep:
  1. route locally (the router runs before this module: its counts, balance losses and load
     metrics never see the dispatch, so they are those of a run without EP);
  2. slots sorted by global expert id (stable); per-expert counts [E] (the router's, over every
     token) exchanged with one all_to_all_single (each rank receives, from every source, the counts
     of its own El experts);
  3. the sorted rows all_to_all_single'd with variable splits: rank r receives, from each source
     in rank order, that source's rows for expert r*El, then r*El+1, ...;
  4. the local experts run on the received rows with the chosen backend (loop / torch / triton),
     each row as a one-slot token of weight 1;
  5. outputs all_to_all'd back (the exact reverse splits), unsorted to their (token, slot) place,
     weighted by the top-k weights in fp32 and summed over the K slots in slot order (the combine
     of kernels.reference.grouped_mm_moe_mlp): deterministic, no atomics.
Backward runs the same path reversed: the all-to-all's gradient is the reverse all-to-all.

The split sizes must be known on the host for all_to_all_single: one device-to-host copy of the
[ep + ep*El] counts per block forward.

Gloo (CPU) runs all_to_all_single with variable splits (checked on torch 2.13); NCCL does too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from kernels.routing import expert_counts
from moe.experts import BACKENDS, GroupedExperts

__all__ = ["ExpertParallelExperts", "all_to_all", "apply_expert_parallel"]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows of ``x`` [sum(in_splits), ...] sent to the group's ranks in ``in_splits`` blocks; returns
    the rows received, [sum(out_splits), ...], in source-rank order. Differentiable."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight: the local shard of a DTensor, or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


class ExpertParallelExperts(nn.Module):
    """GroupedExperts' forward (x_TH, topk_ids_TK with global ids, topk_weights_TK, counts_E) -> y_TH
    with this rank's El experts stored as ``w_gate_up`` [El, 2I, H] and ``w_down`` [El, H, I]: plain
    tensors, or DTensors of global shape [E, ...] sharded Shard(0) over a 1-D ep mesh (what DCP and
    FSDP2 need; ``apply_expert_parallel(..., mesh=...)`` makes them). Parameter names equal
    GroupedExperts'.

    ``grad_scale`` multiplies the weights' gradients: a data-parallel wrapper that averages expert
    gradients over the world/ep copies of an expert while the rest is averaged over all ranks sets
    1/ep (each expert's gradient already sums the tokens of its whole EP group)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str, group):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r} is not one of {sorted(BACKENDS)}")
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.ep} expert-parallel ranks")
        self.num_experts, self.backend = num_experts, backend
        self.grad_scale = 1.0
        n = num_experts // self.ep
        self.w_gate_up = nn.Parameter(torch.empty(n, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(n, hidden_size, intermediate_size))

    # Eager: split sizes come to the host and the collectives run in order on every rank; a compiled
    # block breaks its graph around this module.
    @torch.compiler.disable
    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, counts_E=None):
        """counts_E [E]: slots per global expert over all T tokens when the router has them, else None."""
        T, H = x_TH.shape
        K = topk_ids_TK.shape[1]
        E, ep = self.num_experts, self.ep
        El = E // ep
        w_gu, w_d = _local(self.w_gate_up), _local(self.w_down)
        if self.grad_scale != 1.0:
            w_gu, w_d = _ScaleGrad.apply(w_gu, self.grad_scale), _ScaleGrad.apply(w_d, self.grad_scale)
        # 2. slots in global expert order; counts over ALL tokens (padding is computed too, as without EP)
        flat = topk_ids_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        if counts_E is None:
            counts_E = expert_counts(topk_ids_TK, E)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)  # [ep * El]: source-major
        # One host copy of every split this block needs.
        host = torch.cat([counts_E.view(ep, El).sum(1), recv_counts]).tolist()
        send_splits, recv_counts_host = host[:ep], host[ep:]
        recv_splits = [sum(recv_counts_host[s * El:(s + 1) * El]) for s in range(ep)]
        # 3. the rows to their experts' ranks
        recv_x = all_to_all(x_TH[order // K], recv_splits, send_splits, self.group)
        # 4. local experts on the received rows (one slot each, weight 1: the combine is done at home)
        if recv_x.shape[0] == 0:
            # Nothing to compute here; empty slices keep both weights in the graph (zero gradient, as a
            # one-device run gives experts without tokens), so every rank's FSDP sees the same grads.
            out = recv_x + (w_gu.reshape(-1)[:0].sum() + w_d.reshape(-1)[:0].sum()).to(recv_x.dtype)
        else:
            local_ids = torch.arange(El, device=x_TH.device).repeat(ep).repeat_interleave(
                recv_counts, output_size=recv_x.shape[0])
            ones = torch.ones(recv_x.shape[0], 1, dtype=x_TH.dtype if self.backend == "triton" else torch.float32,
                              device=x_TH.device)
            # The received rows per local expert are already known: no second count.
            out = BACKENDS[self.backend](recv_x, w_gu, w_d, local_ids[:, None], ones, recv_counts.view(ep, El).sum(0))
        # 5. back home, unsorted to (token, slot), weighted in fp32 and summed over slots in order
        back = all_to_all(out, send_splits, recv_splits, self.group)
        slots = torch.empty_like(back).index_copy(0, order, back)
        y = slots.view(T, K, H).float() * topk_weights_TK.float()[..., None]
        return y.sum(1).to(x_TH.dtype)


def apply_expert_parallel(model: nn.Module, group=None, mesh=None) -> None:
    """Replace every GroupedExperts of ``model`` by an ExpertParallelExperts over the EP group (or
    the 1-D DeviceMesh ``mesh``, whose group it then uses), in place. Each rank keeps only its own
    experts' rows of the existing weights (a meta model stays on meta). With ``mesh`` the weights
    become DTensors [E, ...] placed Shard(0) over it."""
    if (group is None) == (mesh is None):
        raise ValueError("give exactly one of group and mesh")
    if mesh is not None:
        if mesh.ndim != 1:
            raise ValueError("the expert-parallel mesh must be 1-D")
        group = mesh.get_group()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, GroupedExperts):
                continue
            E, I2, H = child.w_gate_up.shape
            dev = child.w_gate_up.device
            with torch.device(dev):
                ep_experts = ExpertParallelExperts(E, H, I2 // 2, child.backend, group)
            El, r = E // ep_experts.ep, ep_experts.ep_rank
            for pname in ("w_gate_up", "w_down"):
                full = getattr(child, pname)
                local = full.detach()[r * El:(r + 1) * El].clone()
                if mesh is not None:
                    local = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                               shape=full.shape, stride=full.stride())
                setattr(ep_experts, pname, nn.Parameter(local, requires_grad=full.requires_grad))
            setattr(parent, name, ep_experts)
