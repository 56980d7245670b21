"""LoRA for BailingMoe: low-rank adapters beside frozen weights, with PEFT's numerics.

Legend: E experts, H hidden, I expert width, r the rank, s = alpha / r the scale.

    spec = LoraSpec(rank=8)                     # alpha 2r, every target, no dropout
    apply_lora(model, spec)                     # in place, on a meta-device or a real model
    set_trainable(model, spec)                  # adapters (and the router, when asked) train; the rest is frozen
    with adapters_disabled(model): ...          # the base model again (DPO's reference), no second copy

What each target adapts, as PEFT adapts the reference code's nn.Linear modules:
  attention       attention.query_key_value (ONE adapter over the fused q, k, v, as PEFT wraps the
                  fused Linear) and attention.dense
  shared_experts  mlp.shared_experts.{gate,up,down}_proj
  experts         the routed experts: an adapter pair per expert and projection (PEFT wraps each
                  expert's nn.Linear), stacked beside w_gate_up / w_down (kernels.lora.ExpertLoRA) and
                  computed by the expert backend on the rows it already sorted
  dense_mlp       mlp.{gate,up,down}_proj of the dense layers (layer < first_k_dense_replace)
The router (mlp.gate) gets no adapter: PEFT cannot wrap it either (it is not an nn.Linear in the
reference code). ``train_router`` trains its weight in full instead.

An adapted projection computes  x W^T + b + s * (dropout(x) A^T) B^T  with A [r, in], B [out, r], in
PEFT's order of operations. Initial values are PEFT's: A Kaiming-uniform with a = sqrt(5), which is
U(-1/sqrt(in), 1/sqrt(in)), B zero, so an adapted model starts equal to its base, bit for bit.

Parameter names: an adapted Linear keeps ``weight`` (and ``bias``) and gains ``lora_A`` [r, in] and
``lora_B`` [out, r]; the routed experts gain ``lora_A_gate_up`` [E, 2r, H], ``lora_B_gate_up``
[E, 2I, r], ``lora_A_down`` [E, r, I] and ``lora_B_down`` [E, H, r]. checkpoints_convert.peft maps
them to and from PEFT's adapter files.

Adapting changes a module's class in place (nn.Linear -> LoraLinear, GroupedExperts ->
LoraGroupedExperts) and adds parameters to it: the module keeps its own weights and attributes,
so a model built on the meta device and sharded afterwards sees ordinary parameters.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.errors import BadInputError
from kernels.lora import ExpertLoRA
from moe.experts import GroupedExperts
from moe.router import TopKRouter

Target = Literal["attention", "shared_experts", "experts", "dense_mlp"]
TARGETS: tuple[str, ...] = get_args(Target)
# Our adapter parameters' names end so; nothing else in the model does.
_ADAPTER_RE = re.compile(r"\.lora_[AB](_gate_up|_down)?$")


class LoraError(BadInputError):
    """A LoRA setting that cannot be used (exit code 2)."""


def parse_targets(text: str) -> tuple[str, ...]:
    """'all' or a comma list of TARGETS -> the targets, in TARGETS order."""
    if text.strip() == "all":
        return TARGETS
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise LoraError(f"LoRA target {text!r}: use 'all' or a comma list of {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float | None = None  # None: 2 x rank (LLaMA-Factory's default)
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    train_router: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", parse_targets(",".join(self.targets)))

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.lora_alpha, "dropout": self.dropout,
                "targets": list(self.targets), "train_router": self.train_router}


class _Adapted:
    """What both adapted module kinds share: the scale, the dropout and the on/off switch."""
    scale: float
    lora_dropout: float
    adapter_enabled: bool

    def _set_lora(self, scale: float, dropout: float) -> None:
        self.scale, self.lora_dropout, self.adapter_enabled = scale, dropout, True


class LoraLinear(nn.Linear, _Adapted):
    """nn.Linear plus  s * (dropout(x) A^T) B^T."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        if self.training and self.lora_dropout > 0:  # (dropout of p=0 would still copy x and keep a mask)
            x = F.dropout(x, self.lora_dropout)
        u = F.linear(x, self.lora_A)
        return y + F.linear(u, self.lora_B) * self.scale


class LoraGroupedExperts(GroupedExperts, _Adapted):
    """GroupedExperts whose backend adds the stacked adapters (kernels.lora.ExpertLoRA)."""

    def adapters(self) -> ExpertLoRA | None:
        if not self.adapter_enabled:
            return None
        return ExpertLoRA(self.lora_A_gate_up, self.lora_B_gate_up, self.lora_A_down, self.lora_B_down,
                          self.scale, self.lora_dropout if self.training else 0.0)


def _new(shape, like: torch.Tensor) -> nn.Parameter:
    # fp32 masters (a bf16 base stays bf16: the trainer casts only frozen weights)
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=torch.float32))


def _adapt_linear(lin: nn.Linear, spec: LoraSpec) -> None:
    lin.__class__ = LoraLinear
    lin.lora_A = _new((spec.rank, lin.in_features), lin.weight)
    lin.lora_B = _new((lin.out_features, spec.rank), lin.weight)
    lin._set_lora(spec.scale, spec.dropout)


def _adapt_experts(experts: GroupedExperts, spec: LoraSpec) -> None:
    E, I2, H = experts.w_gate_up.shape
    r = spec.rank
    experts.__class__ = LoraGroupedExperts
    experts.lora_A_gate_up = _new((E, 2 * r, H), experts.w_gate_up)
    experts.lora_B_gate_up = _new((E, I2, r), experts.w_gate_up)
    experts.lora_A_down = _new((E, r, I2 // 2), experts.w_gate_up)
    experts.lora_B_down = _new((E, H, r), experts.w_gate_up)
    experts._set_lora(spec.scale, spec.dropout)


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Adapt ``model`` (a BailingMoeForCausalLM) in place; returns the adapted modules' names. New
    adapter parameters are uninitialised fp32 tensors on the model's device (meta stays meta):
    fill them with ``initial_adapter_value`` or load them."""
    if any(isinstance(m, _Adapted) for m in model.modules()):
        raise LoraError("the model already has LoRA adapters")
    adapted: list[str] = []
    for layer in model.model.layers:
        p = f"model.layers.{layer.layer_idx}."
        named: list[tuple[str, nn.Module]] = []
        if "attention" in spec.targets:
            named += [("attention.query_key_value", layer.attention.query_key_value),
                      ("attention.dense", layer.attention.dense)]
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is not None:  # an MoE layer
            if "experts" in spec.targets:
                if not isinstance(experts, GroupedExperts):
                    raise LoraError(f"LoRA on the routed experts needs the stacked GroupedExperts, not "
                                    f"{type(experts).__name__} (expert parallelism with LoRA is not supported yet)")
                named.append(("mlp.experts", experts))
            if "shared_experts" in spec.targets and mlp.shared_experts is not None:
                named += [(f"mlp.shared_experts.{n}", getattr(mlp.shared_experts, n))
                          for n in ("gate_proj", "up_proj", "down_proj")]
        elif "dense_mlp" in spec.targets:
            named += [(f"mlp.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        for name, module in named:
            if isinstance(module, GroupedExperts):
                _adapt_experts(module, spec)
            else:
                _adapt_linear(module, spec)
            adapted.append(p + name)
    if not adapted:
        raise LoraError(f"LoRA targets {', '.join(spec.targets)} match no module of this model")
    return adapted


def is_adapter_name(name: str) -> bool:
    """Whether a parameter (or state dict) name is one of our adapters'."""
    return _ADAPTER_RE.search(name) is not None


def set_trainable(model: nn.Module, spec: LoraSpec) -> None:
    """Adapters train; everything else is frozen, except the router's weight with train_router."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    if spec.train_router:
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.weight.requires_grad_(True)


def initial_adapter_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """An adapter parameter's initial value: zero for B, PEFT's Kaiming-uniform for A, drawn matrix
    by matrix ([r, in] each: every expert's gate, up and down A apart, as PEFT draws each Linear's)
    from a generator seeded by (seed, name), so any number of ranks builds the same adapters."""
    if not is_adapter_name(name):
        raise KeyError(f"{name!r} is not a LoRA adapter parameter")
    if ".lora_B" in name:
        return torch.zeros(shape)
    out = torch.empty(shape)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    if len(shape) == 2:  # a Linear's A [r, in]
        blocks = [out]
    else:  # stacked: [E, 2r, H] holds gate's and up's A per expert, [E, r, I] down's
        parts = 2 if name.endswith("gate_up") else 1
        blocks = [blk for e in range(shape[0]) for blk in out[e].chunk(parts, dim=0)]
    for blk in blocks:
        nn.init.kaiming_uniform_(blk, a=math.sqrt(5), generator=g)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: every adapter of ``model`` is skipped, so the model computes its base exactly."""
    modules = [m for m in model.modules() if isinstance(m, _Adapted)]
    before = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, was in zip(modules, before):
            m.adapter_enabled = was


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, _Adapted) for m in model.modules())
