"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine schedule.

``HostStateAdamW`` (--parallel.offload optimizer) keeps AdamW's two moments in host memory.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostStateAdamW(torch.optim.AdamW):
    """AdamW whose moments (exp_avg, exp_avg_sq: 8 bytes per trained parameter) live in host memory.

    Parameters and gradients stay on the device. The step takes one parameter at a time: its
    moments come to the device, the decoupled-decay AdamW update runs there (torch's single-tensor
    AdamW, operation for operation), and they go back (pinned memory, copies in stream order; one
    synchronisation per step). The state is torch AdamW's (step, exp_avg, exp_avg_sq, sharded like
    the parameter), so checkpoints are those of a run without offload, and loading one keeps the
    moments in host memory: torch's load_state_dict would first put every moment on the device."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False, fused=False)

    @staticmethod
    def _on_host(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``value`` (a moment, shaped and sharded like ``like``) in host memory."""
        local = _local(value)
        if local.device.type != "cpu":
            host = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
            local = host.copy_(local)
        if isinstance(like, DTensor):
            return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                      stride=like.stride())
        return local

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_gpu = False
        for group in self.param_groups:
            (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = self._on_host(torch.zeros_like(_local(p)), p)
                    st["exp_avg_sq"] = self._on_host(torch.zeros_like(_local(p)), p)
                st["step"] += 1
                t = st["step"].item()
                param, grad = _local(p), _local(p.grad)
                on_gpu |= param.is_cuda
                m = _local(st["exp_avg"]).to(param.device, non_blocking=True)
                v = _local(st["exp_avg_sq"]).to(param.device, non_blocking=True)
                param.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                param.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                _local(st["exp_avg"]).copy_(m, non_blocking=True)
                _local(st["exp_avg_sq"]).copy_(v, non_blocking=True)
        if on_gpu:  # the host copies are complete before anyone reads them (a checkpoint)
            torch.cuda.synchronize()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for pid, st in state_dict["state"].items():
            p = by_id[pid]
            self.state[p] = {k: (v if k == "step" else self._on_host(v, p)) for k, v in st.items()}


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device, host_state: bool = False) -> torch.optim.Optimizer:
    """AdamW over the parameters that train; ``device`` is where the parameters live (the CPU under
    FSDP2's CPU offload), ``host_state`` keeps the moments in host memory (HostStateAdamW)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm gains and biases are 1-D; decaying them only pulls the model away from identity.
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if host_state:
        return HostStateAdamW(groups, lr=lr, betas=betas, eps=eps)
    kw = dict(lr=lr, betas=betas, eps=eps)
    if device.type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float, done_steps: int = 0):
    """The schedule after ``done_steps`` optimizer steps; it sets each group's lr for the next one. From
    step 0 the peak is each group's lr; later (a resume) it is each group's initial_lr, which
    LRScheduler requires then."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup_steps, min_lr_ratio), last_epoch=done_steps - 1)
