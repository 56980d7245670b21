"""One rank without FSDP: the model computes in its own parameters, and the optimizer steps fp32
master weights.

At world size 1 FSDP2 has nothing to shard, yet on every micro-batch it casts each fp32 parameter
to the compute dtype and copies it into the unsharded parameter (for the forward, and again for the
backward of every block it resharded), then folds each gradient back through a copy-in buffer and
a copy into the sharded gradient (torch 2.13, ``_fsdp_param_group.py`` wait_for_unshard and
``_fsdp_collectives.py`` foreach_reduce). ``MasterWeights`` does the same arithmetic with none of
those copies:

    weights = MasterWeights(model, torch.bfloat16)    # the model's parameters become bf16
    optimizer = build_optimizer(weights.module, ...)  # fp32 masters, under the model's names
    loss.backward()       # each bf16 gradient is added into its master's fp32 .grad as soon as
                          # autograd has it, and freed
    optimizer.step(); weights.push()                  # masters -> bf16 parameters, once a step

Numerically this is FSDP2's mixed precision at one rank: the bf16 parameters are the masters
rounded once per step (the same cast FSDP makes per gather), gradients are computed in bf16, summed
over micro-batches in fp32 (FSDP casts to its fp32 reduce dtype, then adds; the first micro-batch's
gradient is the cast itself), and AdamW updates fp32 weights. With ``dtype=None`` (fp32 compute, as
on CPU) the masters are the model's own parameters and nothing is added at all.

Memory: a trained parameter costs its fp32 master and its bf16 copy, 6 bytes, where FSDP at one
rank holds 4 and gathers one block at a time in bf16. A frozen parameter (a DPO reference, LoRA's
base weights) gets no master: 2 bytes, against FSDP's 4.

``weights.module`` holds the masters under the model's parameter names (tied parameters stay tied)
and shares the model's buffers, so checkpoints, clipping and the optimizer see the same names,
shapes and fp32 values as with FSDP: a checkpoint written by either path resumes under the other.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MasterWeights:
    """fp32 masters for a model that computes in ``dtype`` (see the module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        self.model = model
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (compute parameter, its master)
        self._hooks = []
        if dtype is None:
            self.module = model
            return
        self.module = nn.Module()
        split: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # by the original's id: tied stay tied
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in split:
                split[id(p)] = self._split(p, dtype)
            low, master = split[id(p)]
            _put(model, name, low)
            _put(self.module, name, master)
        for name, b in model.named_buffers(remove_duplicate=False):
            owner, leaf = _owner(model, name)
            _put(self.module, name, b, persistent=leaf not in owner._non_persistent_buffers_set)

    def _split(self, p: nn.Parameter, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
        """(compute copy, master) of ``p``. A trained parameter keeps ``p`` itself as master (its fp32
        values, not copied) and its copy gets a hook that folds each gradient into it; a frozen one
        is only the copy, its own master."""
        low = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        if not p.requires_grad or p.dtype == dtype:
            return low, low
        self.pairs.append((low, p))
        self._hooks.append(low.register_post_accumulate_grad_hook(_fold_into(p)))
        return low, p

    @torch.no_grad()
    def push(self) -> None:
        """The masters' values into the compute parameters (after an optimizer step or a load)."""
        if self.pairs:
            torch._foreach_copy_([low for low, _ in self.pairs], [m for _, m in self.pairs])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _fold_into(master: nn.Parameter):
    def fold(low: torch.Tensor) -> None:
        g = low.grad
        if master.grad is None:
            master.grad = g.to(master.dtype)
        else:
            master.grad.add_(g)
        low.grad = None  # no bf16 gradient outlives its fold
    return fold


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding dotted ``name`` under ``root`` (plain containers created on the way), and
    the last part of the name."""
    *path, leaf = name.split(".")
    m = root
    for part in path:
        sub = m._modules.get(part)
        if sub is None:
            sub = nn.Module()
            m.add_module(part, sub)
        m = sub
    return m, leaf


def _put(root: nn.Module, name: str, t: torch.Tensor, persistent: bool | None = None) -> None:
    """``t`` at dotted ``name``: a parameter (replaced in place, the order kept), or with
    ``persistent`` given a buffer."""
    m, leaf = _owner(root, name)
    if persistent is None:
        m._parameters[leaf] = t
    else:
        m.register_buffer(leaf, t, persistent=persistent)
