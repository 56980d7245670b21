"""The one place that knows how native (stacked-expert) names map to Hugging Face bailing_moe names.

Native names equal HF names except the routed experts of an MoE layer L:
  model.layers.L.mlp.experts.w_gate_up  [E, 2I, H]  <- cat(experts.e.gate_proj.weight, experts.e.up_proj.weight) for e < E
  model.layers.L.mlp.experts.w_down     [E, H, I]   <- experts.e.down_proj.weight for e < E
The same holds for bailing_moe_v2 (Ling 2.0), whose layers add attention.query_layernorm /
key_layernorm (QK-norm), mlp.gate.expert_bias, and whose MTP layers (L >= num_hidden_layers) add
enorm, hnorm, eh_proj and final_layernorm around an MoE decoder layer.

``mlp.gate.expert_bias`` is fp32 in every file and every model, whatever dtype the weights are
written or loaded in (``keeps_fp32``): the published bf16 checkpoints store it so, and a bias
rounded to bf16 (8 bits of mantissa) would lose the small steps that aux-loss-free balancing takes.

The functions are pure and work one native tensor at a time, so a streaming converter holds at most
one layer's experts (plus what it is writing) and never the model.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from checkpoints_convert.io import CheckpointError, cast
from moe.config import BailingMoeConfig

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(w_gate_up|w_down)$")
_HF_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def keeps_fp32(native_name: str) -> bool:
    """Tensors written, read and loaded in fp32 whatever dtype the rest is cast to: the expert bias."""
    return native_name.endswith(".mlp.gate.expert_bias")


def cast_for(native_name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` (floating tensors; None keeps it); the expert bias always in fp32."""
    if keeps_fp32(native_name):
        return t if t.dtype == torch.float32 else t.float()
    return cast(t, dtype)


def native_shapes(cfg: BailingMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every native tensor name with its shape, in model order (MTP layers after the main ones)."""
    H = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (cfg.vocab_size, H)}
    for L in range(cfg.num_all_layers):
        p = f"model.layers.{L}."
        mtp = L >= cfg.num_hidden_layers
        if mtp:
            out.update({p + "enorm.weight": (H,), p + "hnorm.weight": (H,), p + "eh_proj.weight": (H, 2 * H)})
        out.update(_layer_shapes(cfg, p, moe=mtp or cfg.is_moe_layer(L)))
        if mtp:
            out[p + "final_layernorm.weight"] = (H,)
    out["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, H)
    return out


def _layer_shapes(cfg: BailingMoeConfig, p: str, moe: bool) -> dict[str, tuple[int, ...]]:
    H, I, E, hd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (H,),
                                       p + "attention.query_key_value.weight": (q + 2 * kv, H)}
    if cfg.use_qkv_bias:
        out[p + "attention.query_key_value.bias"] = (q + 2 * kv,)
    if cfg.use_qk_norm:
        out[p + "attention.query_layernorm.weight"] = (hd,)
        out[p + "attention.key_layernorm.weight"] = (hd,)
    out[p + "attention.dense.weight"] = (H, q)
    if cfg.use_bias:
        out[p + "attention.dense.bias"] = (H,)
    out[p + "post_attention_layernorm.weight"] = (H,)
    if moe:
        out[p + "mlp.gate.weight"] = (E, H)
        if cfg.moe_router_enable_expert_bias:
            out[p + "mlp.gate.expert_bias"] = (E,)
        out[p + "mlp.experts.w_gate_up"] = (E, 2 * I, H)
        out[p + "mlp.experts.w_down"] = (E, H, I)
        if cfg.num_shared_experts > 0:
            S = I * cfg.num_shared_experts
            for proj, shape in (("gate_proj", (S, H)), ("up_proj", (S, H)), ("down_proj", (H, S))):
                out[p + f"mlp.shared_experts.{proj}.weight"] = shape
                if cfg.use_bias:
                    out[p + f"mlp.shared_experts.{proj}.bias"] = (shape[0],)
    else:
        D = cfg.intermediate_size
        for proj, shape in (("gate_proj", (D, H)), ("up_proj", (D, H)), ("down_proj", (H, D))):
            out[p + f"mlp.{proj}.weight"] = shape
            if cfg.use_bias:
                out[p + f"mlp.{proj}.bias"] = (shape[0],)
    return out


def hf_names_for(native_name: str, cfg: BailingMoeConfig) -> list[str]:
    """The HF tensors that make up one native tensor, in the order they are stacked."""
    m = _EXPERT_RE.match(native_name)
    if not m:
        return [native_name]
    L, kind = m.group(1), m.group(2)
    base = f"model.layers.{L}.mlp.experts"
    projs = ("gate_proj", "up_proj") if kind == "w_gate_up" else ("down_proj",)
    return [f"{base}.{e}.{p}.weight" for e in range(cfg.num_experts) for p in projs]


def hf_shapes_for(native_name: str, cfg: BailingMoeConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors (name, shape) that make up one native tensor, in the order they are stacked."""
    shape = native_shapes(cfg).get(native_name)
    if shape is None:
        raise KeyError(f"{native_name!r} is not a tensor of this model")
    m = _EXPERT_RE.match(native_name)
    if not m:
        return [(native_name, shape)]
    _, a, b = shape
    piece = (a // 2, b) if m.group(2) == "w_gate_up" else (a, b)
    return [(n, piece) for n in hf_names_for(native_name, cfg)]


def hf_shapes(cfg: BailingMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    for name in native_shapes(cfg):
        out.update(hf_shapes_for(name, cfg))
    return out


def native_from_hf(native_name: str, get_hf: Callable[..., torch.Tensor], cfg: BailingMoeConfig,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Build one native tensor, reading its HF pieces through ``get_hf(name)``.

    Stacked experts are filled piece by piece into one preallocated tensor, so building a layer's
    w_gate_up holds that tensor plus a single expert's matrix. ``rows=(start, stop)`` builds only
    those rows of dim 0 (a data-parallel shard): experts start..stop of a stacked tensor, else
    ``get_hf(name, rows)`` reads the row range.
    """
    all_names = hf_names_for(native_name, cfg)
    if len(all_names) == 1 and all_names[0] == native_name:
        return get_hf(native_name) if rows is None else get_hf(native_name, rows)
    per_expert = 2 if native_name.endswith("w_gate_up") else 1
    first, last = (0, cfg.num_experts) if rows is None else rows
    names = all_names[first * per_expert:last * per_expert]
    out = None
    if not names:  # an empty shard: shape and dtype from one expert's piece
        piece = get_hf(all_names[0])
        return piece.new_empty((0, piece.shape[0] * per_expert, *piece.shape[1:]))
    for i, name in enumerate(names):
        piece = get_hf(name)
        e, part = divmod(i, per_expert)
        if out is None:
            rows_ = piece.shape[0]
            out = torch.empty((last - first, rows_ * per_expert, *piece.shape[1:]), dtype=piece.dtype)
        rows = rows_
        if tuple(piece.shape) != (rows, *out.shape[2:]):
            raise CheckpointError(f"{name} has shape {tuple(piece.shape)}, expected {(rows, *out.shape[2:])}")
        if piece.dtype != out.dtype:
            raise CheckpointError(f"{name} is {piece.dtype} but the other pieces of {native_name} are {out.dtype}")
        out[e, part * rows:(part + 1) * rows].copy_(piece)
        del piece
    return out


def hf_from_native(native_name: str, tensor: torch.Tensor, cfg: BailingMoeConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Split one native tensor into its HF tensors (views; callers copy if they must own them)."""
    names = hf_names_for(native_name, cfg)
    if len(names) == 1 and names[0] == native_name:
        yield native_name, tensor
        return
    if native_name.endswith("w_gate_up"):
        I = tensor.shape[1] // 2
        for e in range(cfg.num_experts):
            yield names[2 * e], tensor[e, :I]
            yield names[2 * e + 1], tensor[e, I:]
    else:
        for e in range(cfg.num_experts):
            yield names[e], tensor[e]


def native_name_of_hf(hf_name: str) -> str:
    """The native tensor an HF tensor belongs to."""
    m = _HF_EXPERT_RE.match(hf_name)
    if not m:
        return hf_name
    kind = "w_down" if m.group(3) == "down_proj" else "w_gate_up"
    return f"model.layers.{m.group(1)}.mlp.experts.{kind}"
