"""A LoRA run (``--lora.rank R``): the model made ready before sharding, what its checkpoints hold and
what it exports. The adapters themselves are moe/lora.py's; their file format checkpoints_convert/peft.py's.

    spec = lora_spec(opts)                              # None: full fine-tuning
    prepare(model, spec, frozen_dtype)                  # on the meta model, before checkpointing and FSDP2
    get_value = with_initial_adapters(get_value, seed)  # what materialize fills the adapters with

Memory. The frozen weights are cast to the compute dtype (bf16 on GPU) before FSDP2 shards the
model, so their shards are stored in bf16: no fp32 master copy, gathered without a cast, no
gradient, no optimizer state. The adapters (and a trained router) stay fp32 masters that FSDP2's
mixed precision casts for compute, like any trained parameter. On CPU everything computes in fp32.

Checkpoints hold the trained tensors and their optimizer state only (DCP without frozen parameters)
and lora.json: the spec, the base (model.init_from) and the base's fingerprint. A resume rebuilds the
base from model.init_from, refuses a base whose files changed, and loads the rest. The export writes
<output-dir>/adapter/ (PEFT's format) and <output-dir>/hf/ (the base merged with the adapters).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from checkpoints_convert.io import fingerprint_weights
from moe.lora import LoraGroupedExperts, LoraLinear, LoraSpec, apply_lora, initial_adapter_value, is_adapter_name, parse_targets, set_trainable
from trainer.errors import TrainerError
from trainer.options import Options, OptionsError


def lora_spec(opts: Options) -> LoraSpec | None:
    o = opts.lora
    if o.rank == 0:
        return None
    return LoraSpec(rank=o.rank, alpha=o.alpha or None, dropout=o.dropout, targets=parse_targets(o.target),
                    train_router=o.train_router)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Every frozen parameter in ``dtype`` (the same Parameter object wherever it is shared, as a
    tied embedding is); returns how many were cast."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad or p.dtype == dtype:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[name] = new[id(p)]
    return len(new)


def prepare(model: nn.Module, spec: LoraSpec, frozen_dtype: torch.dtype | None) -> list[str]:
    """Adapters on ``model`` (moe.lora.apply_lora), everything else frozen, the frozen weights in
    ``frozen_dtype`` (None: as they are). Returns the adapted modules' names."""
    adapted = apply_lora(model, spec)
    set_trainable(model, spec)
    if frozen_dtype is not None:
        cast_frozen(model, frozen_dtype)
    return adapted


def with_initial_adapters(get_value, seed: int):
    """``get_value(name, param, rows)`` for parallel.materialize: adapters from their initial values
    (moe.lora.initial_adapter_value, seeded by name: the same on any number of ranks), the rest as
    ``get_value`` gives it."""
    def get(name, p, rows):
        if not is_adapter_name(name):
            return get_value(name, p, rows)
        full = initial_adapter_value(name, tuple(p.shape), seed)
        return full if rows is None else full[rows[0]:rows[1]]
    return get


def record(spec: LoraSpec, init_from: str) -> dict:
    """lora.json of a checkpoint: what the adapters are and which weights they adapt."""
    return {"spec": spec.to_dict(), "base": init_from, "base_fingerprint": fingerprint_weights(init_from)}


def check_base(saved: dict | None, init_from: str, step_dir: str) -> None:
    """Refuse to resume adapters onto weights other than those they were trained on."""
    if saved is None:
        raise TrainerError(f"{step_dir} holds a full model (no lora.json): a LoRA run cannot resume it; start a new "
                           f"run (another --output-dir, or --overwrite)")
    if saved.get("base_fingerprint") != fingerprint_weights(init_from):
        raise OptionsError(f"model.init_from {init_from} is not the base {step_dir} was trained on (its files "
                           f"changed since): adapters apply only to the weights they were trained with")


def describe(model: nn.Module, spec: LoraSpec) -> str:
    adapted = sum(1 for m in model.modules() if isinstance(m, (LoraLinear, LoraGroupedExperts)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {spec.rank}, alpha {spec.lora_alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g} on "
            f"{', '.join(spec.targets)} ({adapted} modules){', router trained' if spec.train_router else ''}: "
            f"{trained / 1e6:.2f}M trained parameters of {total / 1e6:.1f}M ({100 * trained / total:.2f}%)")
