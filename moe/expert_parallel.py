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
Steps 2-5 are one torch.library custom op (and its backward another), so torch.compile traces a
decoder block with EP as one graph too.

The split sizes must be known on the host for all_to_all_single: one device-to-host copy of 2*ep
split sizes per block forward, and one per block backward.

Gloo (CPU) runs all_to_all_single with variable splits (checked on torch 2.13); NCCL does too.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor, Shard

from kernels.routing import expert_counts
from moe.experts import BACKENDS, GroupedExperts

__all__ = ["ExpertParallelExperts", "apply_expert_parallel"]


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _splits(counts_E: torch.Tensor, recv_counts: torch.Tensor, ep: int) -> tuple[list[int], list[int]]:
    """(rows this rank sends to each rank, rows it receives from each): one host copy of both."""
    host = torch.cat([counts_E.view(ep, -1).sum(1), recv_counts.view(ep, -1).sum(1)]).tolist()
    return host[:ep], host[ep:]


def _local_ids(recv_counts: torch.Tensor, ep: int, rows: int) -> torch.Tensor:
    """[R] local expert of each received row: from each source in rank order, expert 0, 1, ... of this rank."""
    El = recv_counts.numel() // ep
    return torch.arange(El, device=recv_counts.device).repeat(ep).repeat_interleave(recv_counts, output_size=rows)


@contextlib.contextmanager
def _autograd_inside_an_op():
    """Autograd records again inside a custom op's implementation, which runs with the autograd keys
    excluded (torch.library's custom_op does that). Private API (torch._C), present since torch 2.0;
    used only for the torch and loop backends' local backward."""
    with torch.enable_grad(), torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        yield


def _triton_ops():
    import kernels.moe_mlp as ops  # imported on first use: Triton only for this backend

    return ops


# The EP experts as two custom ops (forward, and its backward), so that a compiled decoder block
# traces through them as one call each, without a graph break: the split sizes come to the host and
# the collectives run inside the ops, in the same order on every rank (one forward op per block, one
# backward op). The received rows' count R is data dependent: the fake rule gives it as an unbacked
# size, and only the backward op ever reads the tensors that have it.
#
# Saved for backward: the sort order [N], the received counts, the received rows [R, H], the rows
# returned home in slot order [N, H] (d topk_w = <dy, row>), and with the triton backend the local
# pre-activation [R, 2I] (not with recompute). The torch and loop backends have no backward of their
# own here: the backward op reruns their forward under autograd on the saved rows (their local
# expert forward runs twice with EP).


@torch.library.custom_op("lingmoe::ep_experts_fwd", mutates_args=())
def ep_experts_fwd(x_TH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids_TK: torch.Tensor,
                   topk_weights_TK: torch.Tensor, counts_E: torch.Tensor, group_name: str, backend: str,
                   save_preact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """(y, order, recv_counts, recv_x, rows_home, gu) (see above)."""
    group = _resolve_process_group(group_name)
    ep = dist.get_world_size(group)
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    # 2. slots in global expert order; counts over ALL tokens (padding is computed too, as without EP)
    order = torch.argsort(topk_ids_TK.reshape(-1), stable=True)
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E, group=group)  # [ep * El]: source-major
    send, recv = _splits(counts_E, recv_counts, ep)
    # 3. the rows to their experts' ranks
    recv_x = _all_to_all(x_TH[order // K], recv, send, group)
    R = recv_x.shape[0]
    # 4. local experts on the received rows (one slot each, weight 1: the combine is done at home)
    gu = x_TH.new_empty(0, w_gate_up.shape[1])
    if R == 0:
        out = recv_x.new_empty(0, H)
    elif backend == "triton":
        ops = _triton_ops()
        local_counts = recv_counts.view(ep, -1).sum(0)
        block_m = ops.routing_block_m(R, w_gate_up.shape[0], x_TH.dtype)
        tables = ops.moe_routing(_local_ids(recv_counts, ep, R)[:, None], local_counts, w_gate_up.shape[0], block_m)
        ones = recv_x.new_ones(R, 1, dtype=torch.float32)
        out, gu, _, _ = ops.moe_mlp_fwd(recv_x, w_gate_up, w_down, ones, tables, block_m, save_preact, [], 0.0)
    else:
        out = _local_forward(backend, recv_x, w_gate_up, w_down, recv_counts, ep)
    # 5. back home, unsorted to (token, slot), weighted in fp32 and summed over slots in order
    back = _all_to_all(out, send, recv, group)
    rows_home = torch.empty_like(back).index_copy(0, order, back)
    y = (rows_home.view(T, K, H).float() * topk_weights_TK.float()[..., None]).sum(1).to(x_TH.dtype)
    return y, order, recv_counts, recv_x, rows_home, gu


def _local_forward(backend, recv_x, w_gate_up, w_down, recv_counts, ep):
    R = recv_x.shape[0]
    ones = recv_x.new_ones(R, 1, dtype=torch.float32)
    return BACKENDS[backend](recv_x, w_gate_up, w_down, _local_ids(recv_counts, ep, R)[:, None], ones,
                             recv_counts.view(ep, -1).sum(0))


@ep_experts_fwd.register_fake
def _(x_TH, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, counts_E, group_name, backend, save_preact):
    R = torch.library.get_ctx().new_dynamic_size()
    N, H = topk_ids_TK.numel(), x_TH.shape[1]
    gu_rows = R if backend == "triton" and save_preact else 0
    return (x_TH.new_empty(x_TH.shape), topk_ids_TK.new_empty(N, dtype=torch.int64), counts_E.new_empty(counts_E.shape),
            x_TH.new_empty(R, H), x_TH.new_empty(N, H), x_TH.new_empty(gu_rows, w_gate_up.shape[1]))


@torch.library.custom_op("lingmoe::ep_experts_bwd", mutates_args=())
def ep_experts_bwd(dy_TH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights_TK: torch.Tensor,
                   counts_E: torch.Tensor, order: torch.Tensor, recv_counts: torch.Tensor, recv_x: torch.Tensor,
                   rows_home: torch.Tensor, gu: torch.Tensor, group_name: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate_up, dw_down, dtopk_w): the forward's path reversed (the all-to-all's gradient is the
    reverse exchange)."""
    group = _resolve_process_group(group_name)
    ep = dist.get_world_size(group)
    T, H = dy_TH.shape
    K = topk_weights_TK.shape[1]
    send, recv = _splits(counts_E, recv_counts, ep)
    dy32 = dy_TH.float()[:, None, :]
    dtw = (rows_home.view(T, K, H).float() * dy32).sum(-1).to(topk_weights_TK.dtype)
    d_rows = (dy32 * topk_weights_TK.float()[..., None]).to(rows_home.dtype).view(T * K, H)
    d_out = _all_to_all(d_rows[order], recv, send, group)
    R = recv_x.shape[0]
    if R == 0:  # no rows here: zero gradients, as a one-device run gives experts without tokens
        d_recv, dwgu, dwd = recv_x.new_empty(0, H), torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
    elif backend == "triton":
        ops = _triton_ops()
        block_m = ops.routing_block_m(R, w_gate_up.shape[0], recv_x.dtype)
        tables = ops.moe_routing(_local_ids(recv_counts, ep, R)[:, None], recv_counts.view(ep, -1).sum(0),
                                 w_gate_up.shape[0], block_m)
        ones = recv_x.new_ones(R, 1, dtype=torch.float32)
        d_recv, dwgu, dwd, *_ = ops.moe_mlp_bwd(d_out, recv_x, w_gate_up, w_down, ones, gu, tables, block_m,
                                                True, True, True, False)
    else:
        with _autograd_inside_an_op():
            leaves = [t.detach().requires_grad_() for t in (recv_x, w_gate_up, w_down)]
            out = _local_forward(backend, *leaves, recv_counts, ep)
            # Contiguous, as the fake rule says (inductor checks the strides of an op's outputs).
            d_recv, dwgu, dwd = (g.contiguous() for g in torch.autograd.grad(out, leaves, d_out))
    d_sorted = _all_to_all(d_recv, send, recv, group)
    d_slots = torch.empty_like(d_sorted).index_copy(0, order, d_sorted)
    dx = d_slots.view(T, K, H).sum(1, dtype=torch.float32).to(dy_TH.dtype)
    return dx, dwgu, dwd, dtw


@ep_experts_bwd.register_fake
def _(dy_TH, w_gate_up, w_down, topk_weights_TK, counts_E, order, recv_counts, recv_x, rows_home, gu, group_name,
      backend):
    return (dy_TH.new_empty(dy_TH.shape), w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape),
            topk_weights_TK.new_empty(topk_weights_TK.shape))


def _ep_setup(ctx, inputs, output):
    x_TH, w_gate_up, w_down, _, topk_weights_TK, counts_E, group_name, backend, _ = inputs
    _, order, recv_counts, recv_x, rows_home, gu = output
    ctx.save_for_backward(w_gate_up, w_down, topk_weights_TK, counts_E, order, recv_counts, recv_x, rows_home, gu)
    ctx.group_name, ctx.backend = group_name, backend
    ctx.mark_non_differentiable(order, recv_counts, recv_x, rows_home, gu)
    ctx.set_materialize_grads(False)


def _ep_backward(ctx, dy_TH, *_):
    w_gate_up, w_down, tw, counts_E, order, recv_counts, recv_x, rows_home, gu = ctx.saved_tensors
    dx, dwgu, dwd, dtw = ep_experts_bwd(dy_TH, w_gate_up, w_down, tw, counts_E, order, recv_counts, recv_x,
                                        rows_home, gu, ctx.group_name, ctx.backend)
    return dx, dwgu, dwd, None, dtw, None, None, None, None


ep_experts_fwd.register_autograd(_ep_backward, setup_context=_ep_setup)


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

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str, group,
                 recompute: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r} is not one of {sorted(BACKENDS)}")
        self.group = group
        self.group_name = group.group_name  # what the custom ops take (they cannot take a group object)
        self.recompute = recompute  # triton: keep no local pre-activation; torch/loop recompute anyway
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.ep} expert-parallel ranks")
        self.num_experts, self.backend = num_experts, backend
        self.grad_scale = 1.0
        n = num_experts // self.ep
        self.w_gate_up = nn.Parameter(torch.empty(n, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(n, hidden_size, intermediate_size))

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, counts_E=None):
        """counts_E [E]: slots per global expert over all T tokens when the router has them, else None."""
        w_gu, w_d = _local(self.w_gate_up), _local(self.w_down)
        if self.grad_scale != 1.0:
            w_gu, w_d = _ScaleGrad.apply(w_gu, self.grad_scale), _ScaleGrad.apply(w_d, self.grad_scale)
        if counts_E is None:
            counts_E = expert_counts(topk_ids_TK, self.num_experts)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TH, w_gu, w_d, topk_weights_TK))
        y, *_ = ep_experts_fwd(x_TH, w_gu, w_d, topk_ids_TK, topk_weights_TK, counts_E, self.group_name,
                               self.backend, needs_grad and not self.recompute)
        return y


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
                ep_experts = ExpertParallelExperts(E, H, I2 // 2, child.backend, group, child.recompute)
            El, r = E // ep_experts.ep, ep_experts.ep_rank
            for pname in ("w_gate_up", "w_down"):
                full = getattr(child, pname)
                local = full.detach()[r * El:(r + 1) * El].clone()
                if mesh is not None:
                    local = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                               shape=full.shape, stride=full.stride())
                setattr(ep_experts, pname, nn.Parameter(local, requires_grad=full.requires_grad))
            setattr(parent, name, ep_experts)
