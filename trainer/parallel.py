"""Process group, FSDP2 sharding, activation checkpointing and sharded weight materialisation.

The model itself knows nothing of distribution; everything here is applied from outside:
  init_distributed(device)    gloo on CPU, nccl on GPU; a one-rank group when not under torchrun
  apply_activation_checkpointing(model)   per decoder block, routing recorded then replayed
  shard_model(model, ...)     fully_shard per decoder block, then the root (FSDP2)
  compile_each_block(model)   torch.compile each decoder block (shard_model's, or a one-rank run's)
  materialize(model, get_value)  each rank reads or generates only its own shard of each parameter
  all_reduce_by_name(values)  sums of named values over ranks, one collective
"""
from __future__ import annotations

import gc
import os
import socket
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moe.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from moe.router import checkpoint_context_fn
from trainer.errors import TrainerError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OWN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_env_set_here = False


class DeviceError(TrainerError):
    """The requested device cannot serve this process (no CUDA, or more ranks than GPUs)."""


def init_distributed(device_type: str = "auto") -> DistInfo:
    """Join (or, for a plain `python trainer/x.py`, create) the default process group.
    ``device_type``: 'auto' (CUDA when available), 'cuda' or 'cpu' (gloo, even where a GPU is)."""
    global _env_set_here
    use_cuda = torch.cuda.is_available() if device_type == "auto" else device_type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if not torch.cuda.is_available():
            raise DeviceError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            local_world = os.environ.get("LOCAL_WORLD_SIZE", "?")
            raise DeviceError(f"local rank {local_rank} of {local_world} has no GPU: this node shows {n_gpus} "
                              f"CUDA device(s); start at most {n_gpus} processes per node (torchrun "
                              f"--nproc_per_node={n_gpus}) or use --train.device cpu")
    if "RANK" not in os.environ:  # single process: a group of one so every code path is the same
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        _env_set_here = True
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


_live_groups: list[weakref.ref] = []  # the groups the last shutdown_distributed unregistered


def shutdown_distributed() -> bool:
    """Destroy every process group and return whether each is gone from memory, its threads joined.

    ``destroy_process_group`` only unregisters a group; gloo's worker threads live until the last
    reference to the group object drops (the model's DTensors, a DeviceMesh, DPO's live reference
    all hold one). A worker still finishing a collective whose tensors' Python objects are gone must
    take the GIL to free them; if the interpreter is finalizing by then, CPython ends that thread by
    a forced unwind through a noexcept destructor and the process aborts ("terminate called without
    an active exception"). So callers drop their references first (Trainer.close), and the cycles
    that still hold one are collected here: the group's destructor then joins its threads."""
    global _env_set_here
    if dist.is_initialized():
        world = getattr(dist.distributed_c10d, "_world", None)
        groups = list(getattr(world, "pg_map", {})) or [dist.group.WORLD]
        _live_groups[:] = [weakref.ref(g) for g in groups]
        del groups
        dist.destroy_process_group()
        for let_go in (_forget_destroyed_groups_in_meshes, gc.collect):  # the cheaper first
            if groups_released():
                break
            let_go()
    if _env_set_here:  # a later run in this process picks a fresh port
        for k in _OWN_ENV:
            os.environ.pop(k, None)
        _env_set_here = False
    return groups_released()


def _forget_destroyed_groups_in_meshes() -> None:
    """DTensor's caches (sharding propagation, redistribution plans, mesh topology) keep every
    DeviceMesh a run used alive for the life of the process, and a mesh holds its groups in
    ``_pg_registry`` (torch >= 2.10; eager code resolves a mesh's groups by name, the registry is
    for torch.compile). Once the world group is destroyed every group in it is dead, so each mesh
    still in memory lets go of them. Where torch keeps them elsewhere, groups_released() says so."""
    for obj in gc.get_objects():
        if type(obj) is DeviceMesh:  # not isinstance: some torch classes hook it, slow over every object
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()


def groups_released() -> bool:
    """True when no process group that shutdown_distributed destroyed is still referenced."""
    return all(r() is None for r in _live_groups)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward. The block's router records its top-k ids in the
    forward and replays them in the recompute, so a token is never re-routed."""
    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, _layer=layer, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False,
                              context_fn=lambda: checkpoint_context_fn(_layer), **kwargs)
        layer.forward = forward


def expert_mesh(device_type: str, world_size: int, ep: int):
    """The 2-D mesh (edp, ep) for expert parallelism: ep consecutive ranks share the experts (the
    all-to-all stays inside a node when ep divides the GPUs per node), edp = world/ep copies of them."""

    if ep < 1 or world_size % ep:
        raise TrainerError(f"parallel.ep ({ep}) must divide the number of ranks ({world_size})")
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("edp", "ep"))


def shard_model(model: nn.Module, mesh, param_dtype: torch.dtype | None, compile_blocks: bool = False,
                ep_mesh=None, offload: bool = False) -> None:
    """FSDP2: each decoder block its own unit (gathered just before use, freed after), then the root
    (embeddings, final norm, lm_head). Mixed precision computes in ``param_dtype`` and reduces
    gradients in fp32. With ``ep_mesh`` (expert_mesh's), the routed experts are split over its "ep"
    dimension (moe.expert_parallel) and FSDP-sharded over "edp" as their own unit. ``offload``:
    FSDP2's CPUOffloadPolicy, the sharded parameters and their gradients in host memory (pinned on
    GPU machines; the model must then be materialised on the CPU), copied to the device for each
    unit's all-gather."""

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    if compile_blocks and ep_mesh is not None:
        # The EP experts op returns the rows this rank received, a count known only at run time; dynamo
        # breaks the graph at such an op unless told to capture it (nothing else in a block has one).
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    if ep_mesh is not None:
        apply_expert_parallel(model, mesh=ep_mesh["ep"])
    if compile_blocks:
        compile_each_block(model)
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if ep_mesh is not None and isinstance(experts, ExpertParallelExperts):
            fully_shard(experts, mesh=ep_mesh["edp"], mp_policy=mp, offload_policy=policy)
            # Each rank's expert gradient already sums the tokens of its whole EP group: FSDP divides
            # by the edp copies, 1/ep more makes it all ranks, as for the rest. (A scale in backward,
            # not FSDP's set_gradient_divide_factor: that needs PREMUL_SUM, which gloo lacks.)
            experts.grad_scale = 1.0 / ep_mesh["ep"].size()
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)


def compile_each_block(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.compile()


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, get_value) -> None:
    """Allocate a meta-built (possibly sharded) model on ``device`` and fill it.

    ``get_value(name, param, rows)`` returns rows ``start:stop`` of dim 0 of one parameter's full
    value, or all of it when ``rows`` is None (buffers, the expert biases: always all of it). A
    parameter sharded on dim 0 (FSDP2's layout) asks only for its own rows, so each rank reads only
    the part of a checkpoint it holds (for stacked experts: only its experts) and memory peaks at one
    shard, never the model.
    """

    model.to_empty(device=device)

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):  # a block of rows of dim 0 (FSDP2's Shard(0), under EP too): read only it
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            rows_only = tuple(shape[1:]) == tuple(p.shape[1:]) and not any(offset[1:])
        if isinstance(p, DTensor) and rows_only and p.to_local().shape == torch.Size(shape):
            local = p.to_local()
            start = min(p.shape[0], offset[0]) if shape[0] else p.shape[0]
            value = get_value(name, p, (start, start + local.shape[0]))
            local.copy_(value.to(device=device, dtype=local.dtype))
        elif isinstance(p, DTensor):
            full = get_value(name, p, None)
            local = distribute_tensor(full.to(device=device, dtype=p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(get_value(name, p, None).to(device=device, dtype=p.dtype))
    for name, b in model.named_buffers():  # the expert biases: fp32, whole on every rank (FSDP2 shards no buffer)
        b.copy_(get_value(name, b, None).to(device=device, dtype=b.dtype))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_by_name(values: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Sum each named value (a number or a tensor of any shape) over all ranks in ONE collective.

    Returns float64 tensors on ``device`` under the same names and shapes. The names are sorted
    before packing, so every rank packs the same layout whatever order its dict was built in."""
    names = sorted(values)
    parts = [torch.as_tensor(values[n], dtype=torch.float64, device=device) for n in names]
    if not parts:
        return {}
    flat = all_reduce_sum(torch.cat([p.reshape(-1) for p in parts]))
    out, i = {}, 0
    for n, p in zip(names, parts):
        out[n] = flat[i:i + p.numel()].view(p.shape)
        i += p.numel()
    return out
