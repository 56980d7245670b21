"""LoRA adapters in PEFT's format, and an adapter merged into its base model, streaming.

An adapter directory, as PEFT's ``save_pretrained`` writes it:

  adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
                             base_model_name_or_path; modules_to_save ["mlp.gate"] when the router trained
  adapter_model.safetensors  base_model.model.<HF module path>.lora_A.weight [r, in] and .lora_B.weight
                             [out, r] (PEFT drops the adapter's name, ".default", when it saves)

Our adapter tensors (moe/lora.py) against PEFT's keys, for layer L (P = base_model.model.model.layers.L):

  model.layers.L.attention.query_key_value.lora_A     P.attention.query_key_value.lora_A.weight
  (lora_B alike; attention.dense, mlp.shared_experts.*_proj and the dense layers' mlp.*_proj alike)
  model.layers.L.mlp.experts.lora_A_gate_up [E, 2r, H] for each expert e: P.mlp.experts.e.gate_proj.lora_A.weight,
                                                        then P.mlp.experts.e.up_proj.lora_A.weight
  model.layers.L.mlp.experts.lora_B_gate_up [E, 2I, r] the same with lora_B
  model.layers.L.mlp.experts.lora_{A,B}_down           P.mlp.experts.e.down_proj.lora_{A,B}.weight
  model.layers.L.mlp.gate.weight (train_router)        P.mlp.gate.weight (PEFT's modules_to_save)

The experts' pieces stack exactly as adapter.py stacks their weights (gate's rows, then up's), so
the HF module paths come from adapter.hf_names_for, the one name map.

Merging: every adapted weight becomes  W + (B @ A) * alpha / r  (PEFT's merge_and_unload, computed
in fp32 and rounded once to the output dtype), expert by expert in place, one native tensor at a
time: memory stays at one layer's stacked experts, as for the converters.

A note on PEFT 0.13 and a trained router: when PEFT loads an adapter with modules_to_save, it finds
those modules by substring, so ["mlp.gate"] also matches a dense layer's "mlp.gate_proj" keys. Ling-
Lite has no dense layer; a model with dense layers, a trained router and dense_mlp adapters loads
here but not into PEFT 0.13.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

import torch

from checkpoints_convert import adapter, export_files
from checkpoints_convert.checkpoint import open_checkpoint, write_checkpoint
from checkpoints_convert.io import (CheckpointError, MissingCheckpointError, SafetensorsReader, ShardWriter, cast,
                                    parse_dtype, parse_size)
from data.files import OwnedTempDir
from data.template import resolve_template
from moe.config import BailingMoeConfig
from moe.lora import LoraError, LoraSpec, apply_lora, is_adapter_name, set_trainable
from moe.model import BailingMoeForCausalLM

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ROUTER_MODULE = "mlp.gate"
# The HF module names of every Linear LoRA may adapt (lm_head and the router excepted), by target.
_KIND_RE = {"attention": re.compile(r"\.attention\.(query_key_value|dense)\.lora_[AB]\.weight$"),
            "experts": re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.lora_[AB]\.weight$"),
            "shared_experts": re.compile(r"\.mlp\.shared_experts\.(gate|up|down)_proj\.lora_[AB]\.weight$"),
            "dense_mlp": re.compile(r"\.layers\.\d+\.mlp\.(gate|up|down)_proj\.lora_[AB]\.weight$")}
_MODULE_RE = {"attention": r"attention\.(query_key_value|dense)", "experts": r"mlp\.experts\.\d+\.(gate|up|down)_proj",
              "shared_experts": r"mlp\.shared_experts\.(gate|up|down)_proj", "dense_mlp": r"mlp\.(gate|up|down)_proj"}


def adapter_shapes(cfg: BailingMoeConfig, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Our adapter tensors, and the routers' weights when ``spec.train_router``, with their shapes,
    in model order (read off a meta-device model, so they are what the model really has)."""
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    apply_lora(model, spec)
    return {n: tuple(p.shape) for n, p in model.named_parameters()
            if is_adapter_name(n) or (spec.train_router and n.endswith(f".{ROUTER_MODULE}.weight"))}


def _stacked(name: str) -> bool:
    return name.endswith(("_gate_up", "_down")) and is_adapter_name(name)


def base_name_of(name: str) -> str:
    """The native base weight that adapter tensor ``name`` adapts (the router's weight is itself)."""
    if _stacked(name):
        return name.rsplit(".", 1)[0] + (".w_gate_up" if name.endswith("_gate_up") else ".w_down")
    if is_adapter_name(name):
        return name.rsplit(".", 1)[0] + ".weight"
    return name


def peft_keys_for(name: str, cfg: BailingMoeConfig) -> list[str]:
    """PEFT's keys for one of our adapter tensors, in the order they stack (one unless stacked)."""
    if not is_adapter_name(name):
        return [PREFIX + name]
    ab = "lora_A" if ".lora_A" in name else "lora_B"
    return [PREFIX + hf.removesuffix(".weight") + f".{ab}.weight" for hf in adapter.hf_names_for(base_name_of(name), cfg)]


def _per_expert(name: str) -> int:
    return 2 if name.endswith("_gate_up") else 1


def from_pieces(name: str, get_piece: Callable[[str], torch.Tensor], cfg: BailingMoeConfig) -> torch.Tensor:
    """One of our adapter tensors built from PEFT's pieces (``get_piece(key)``)."""
    keys = peft_keys_for(name, cfg)
    if not _stacked(name):
        return get_piece(keys[0])
    per = _per_expert(name)
    return torch.stack([torch.cat([get_piece(k) for k in keys[e * per:(e + 1) * per]])
                        for e in range(cfg.num_experts)])


def to_pieces(name: str, tensor: torch.Tensor, cfg: BailingMoeConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our adapter tensors as PEFT's (key, piece) pairs (views)."""
    keys = peft_keys_for(name, cfg)
    if not _stacked(name):
        yield keys[0], tensor
        return
    per = _per_expert(name)
    for e in range(cfg.num_experts):
        for j, piece in enumerate(tensor[e].chunk(per, dim=0)):
            yield keys[e * per + j], piece


# ---------------------------------------------------------------------------------------------- config
def _target_modules(cfg: BailingMoeConfig, spec: LoraSpec) -> list[str] | str:
    """PEFT's target_modules: the Linear names when every Linear of the model is adapted (what
    "all" gives on Ling-Lite, and what PEFT itself writes), else a regular expression that PEFT
    matches against whole module names, so that nothing but the adapted modules is wrapped."""
    has = {"attention": True, "experts": cfg.num_moe_layers > 0, "shared_experts": cfg.num_moe_layers > 0
           and cfg.num_shared_experts > 0, "dense_mlp": cfg.first_k_dense_replace > 0}
    if all(t in spec.targets for t, present in has.items() if present):
        return sorted({"query_key_value", "dense", "gate_proj", "up_proj", "down_proj"})
    kinds = [_MODULE_RE[t] for t in spec.targets if has[t]]
    return r"model\.layers\.\d+\.(" + "|".join(kinds) + ")"


def adapter_config(cfg: BailingMoeConfig, spec: LoraSpec, base_name_or_path: str) -> dict:
    """adapter_config.json with the fields PEFT 0.13 writes for a LoRA adapter."""
    alpha = spec.lora_alpha
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
            "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": spec.dropout,
            "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": [ROUTER_MODULE] if spec.train_router else None, "peft_type": "LORA", "r": spec.rank,
            "rank_pattern": {}, "revision": None, "target_modules": _target_modules(cfg, spec),
            "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}


def _spec_from(config: dict, keys: list[str], where: str) -> LoraSpec:
    """Our LoraSpec of a PEFT LoRA config; what it adapts is read off the saved keys."""
    def refuse(why):
        raise CheckpointError(f"{where}: {why}")
    if config.get("peft_type") != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are read")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            refuse(f"{flag} is set; only plain LoRA (scale alpha / r, weights [out, in]) is read")
    if config.get("bias", "none") != "none":
        refuse(f"bias {config.get('bias')!r}: adapters with trained biases are not read")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            refuse(f"{key} is not empty: one rank and alpha for every module is read")
    if config.get("layers_to_transform") is not None:
        refuse("layers_to_transform is set: adapters on part of the layers are not read")
    saved = config.get("modules_to_save") or []
    if any(m not in (ROUTER_MODULE, "gate") for m in saved):
        refuse(f"modules_to_save {saved}: only the router ({ROUTER_MODULE}) may be carried whole")
    targets = [t for t in _KIND_RE if any(_KIND_RE[t].search(k) for k in keys)]
    if not targets:
        refuse(f"{WEIGHTS_NAME} holds no LoRA weights of this model's modules")
    try:
        return LoraSpec(rank=int(config.get("r", 0)), alpha=float(config.get("lora_alpha", 0)),
                        dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(targets),
                        train_router=bool(saved))
    except (LoraError, TypeError, ValueError) as e:
        refuse(str(e))


class PeftAdapter:
    """A PEFT LoRA adapter directory, opened and checked against the model ``cfg`` it adapts: every
    key of the adapted modules present, nothing else, shapes as the config implies. Tensors are
    read lazily, one piece at a time."""

    def __init__(self, path: str | os.PathLike, cfg: BailingMoeConfig):
        self.path, self.cfg = os.fspath(path), cfg
        cfg_file = os.path.join(self.path, CONFIG_NAME)
        if not os.path.isfile(cfg_file):
            raise MissingCheckpointError(f"{cfg_file}: no such file (a PEFT adapter directory holds "
                                         f"{CONFIG_NAME} and {WEIGHTS_NAME})")
        self.config = export_files._read_json(cfg_file)
        self.reader = SafetensorsReader(self.path, single_name=WEIGHTS_NAME)
        try:
            self.spec = _spec_from(self.config, self.reader.keys(), cfg_file)
            self.shapes = adapter_shapes(cfg, self.spec)
            self._check()
        except BaseException:
            self.reader.close()
            raise

    def _check(self) -> None:
        expected = {k: tuple(p.shape) for n, shape in self.shapes.items()
                    for k, p in to_pieces(n, torch.empty(shape, device="meta"), self.cfg)}
        present = set(self.reader.keys())
        missing, unexpected = [k for k in expected if k not in present], sorted(present - set(expected))
        if missing or unexpected:
            parts = [f"missing {len(missing)} (e.g. {missing[:3]})"] if missing else []
            parts += [f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})"] if unexpected else []
            raise CheckpointError(f"{os.path.join(self.path, WEIGHTS_NAME)}: keys do not match a rank-{self.spec.rank} "
                                  f"LoRA of {', '.join(self.spec.targets)} on this model: " + "; ".join(parts))
        for k, shape in expected.items():
            if self.reader.shape(k) != shape:
                raise CheckpointError(f"{os.path.join(self.path, WEIGHTS_NAME)}: {k} has shape "
                                      f"{list(self.reader.shape(k))}, this model needs {list(shape)}")

    def get(self, name: str) -> torch.Tensor:
        """One of our adapter tensors (or a router weight), in fp32."""
        return from_pieces(name, lambda k: self.reader.get(k).float(), self.cfg)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_adapter(model: BailingMoeForCausalLM, path: str | os.PathLike) -> LoraSpec:
    """Adapt ``model`` (without adapters yet) as the PEFT adapter at ``path`` says, load its weights
    (and the router's, when it carries them) and freeze the rest (moe.lora.set_trainable); returns
    the adapter's LoraSpec."""
    with PeftAdapter(path, model.config) as ad:
        apply_lora(model, ad.spec)
        set_trainable(model, ad.spec)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in ad.shapes:
                params[name].copy_(ad.get(name))
    return ad.spec


def write_adapter(out: str | os.PathLike, tensors: Iterator[tuple[str, torch.Tensor]], cfg: BailingMoeConfig,
                  spec: LoraSpec, base_name_or_path: str, dtype: torch.dtype = torch.float32,
                  overwrite: bool = False) -> None:
    """Write an adapter directory in PEFT's format from our adapter tensors (``tensors`` yields every
    name of adapter_shapes, in that order), streamed into one safetensors file; the directory
    appears only when complete."""
    shapes = adapter_shapes(cfg, spec)
    entries = [(k, tuple(p.shape), dtype) for n, shape in shapes.items()
               for k, p in to_pieces(n, torch.empty(shape, device="meta"), cfg)]
    nbytes = sum(torch.Size(s).numel() * dtype.itemsize for _, s, _ in entries) + (1 << 20)
    with OwnedTempDir(out, replace=overwrite, nbytes=nbytes, what="writing the adapter") as tmp:
        writer = ShardWriter(tmp, entries, max_shard_bytes=1 << 62)
        try:
            got = iter(shapes)
            for name, t in tensors:
                if name != next(got, None):
                    raise CheckpointError(f"adapter tensor {name!r} arrived out of order")
                for key, piece in to_pieces(name, t, cfg):
                    writer.add(key, piece.to(dtype))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        os.replace(os.path.join(tmp, writer.files[0]), os.path.join(tmp, WEIGHTS_NAME))
        os.remove(os.path.join(tmp, "model.safetensors.index.json"))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(adapter_config(cfg, spec, base_name_or_path), f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------------------------------------- merge
def merge_into(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, parts: int = 1) -> torch.Tensor:
    """``weight`` + (B @ A) * scale, in fp32, rounded once to ``weight``'s dtype, in place. Stacked
    experts ([E, out, in] with A [E, parts*r, in] and B [E, out, r]) merge expert by expert, each
    of the ``parts`` row blocks (gate's, up's) with its own pair."""
    if weight.dim() == 2:
        weight.copy_(weight.float() + (b.float() @ a.float()) * scale)
        return weight
    for e in range(weight.shape[0]):
        for w_blk, a_blk, b_blk in zip(weight[e].chunk(parts), a[e].chunk(parts), b[e].chunk(parts)):
            w_blk.copy_(w_blk.float() + (b_blk.float() @ a_blk.float()) * scale)
    return weight


def merged_tensors(base, get: Callable[[str], torch.Tensor], spec: LoraSpec,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base checkpoint's native tensors (a checkpoints_convert.Checkpoint), each adapted one
    merged with its adapter pair (read through ``get(our adapter name)``), in ``dtype`` (None:
    as stored). Routers come from the adapter when it trained them."""
    shapes = adapter_shapes(base.cfg, spec)
    pairs = {base_name_of(n): (n, n.replace(".lora_A", ".lora_B")) for n in shapes if ".lora_A" in n}
    for name in base.names:
        w = base.get_native(name)
        if name in shapes:  # a trained router
            w = get(name)
        elif name in pairs:
            a_name, b_name = pairs[name]
            out = dtype if dtype is not None and w.is_floating_point() else w.dtype
            w = merge_into(w.to(torch.float32) if out != w.dtype else w, get(a_name), get(b_name), spec.scale,
                           _per_expert(a_name) if _stacked(a_name) else 1)
        yield name, cast(w, dtype if dtype is not None else base.dtypes[name])


def merge_lora(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike,
               dtype: torch.dtype | str | None = None, shard_size: str | int = "5GB", progress: bool = False,
               tokenizer: str | None = None, source_hf: str | None = None, template: str = "auto",
               overwrite: bool = False) -> LoraSpec:
    """Write the merged model (base + adapter) as an HF checkpoint at ``out``, streaming. The base's
    other files travel (tokenizer, model code, generation config), as for a conversion; ``tokenizer``
    and ``source_hf`` add what an export writes for them; ``template``: the chat template written with
    ``tokenizer`` ("auto": the base family's, data.template.resolve_template). Returns the adapter's spec."""
    dtype = parse_dtype(dtype)
    parse_size(shard_size)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{os.path.abspath(out)}: output directory already exists (choose another or remove it)")
    export_files.check_sources(source_hf, tokenizer)
    with open_checkpoint(base) as ckpt, PeftAdapter(adapter_dir, ckpt.cfg) as ad:
        write_merged(ckpt, ad.get, ad.spec, out, dtype, shard_size, progress, overwrite,
                     lambda tmp: export_files.write_export_files(
                         tmp, carry_from=os.fspath(base), model_dir=source_hf, tokenizer_dir=tokenizer,
                         template=resolve_template(template, ckpt.cfg.family),
                         model_max_length=ckpt.cfg.max_position_embeddings))
        return ad.spec


def write_merged(ckpt, get, spec: LoraSpec, out, dtype: torch.dtype | None, shard_size, progress: bool,
                 overwrite: bool, extra_files) -> None:
    """The merge of an open base checkpoint and adapter tensors from ``get``, written as HF at ``out``."""
    source = {n: (dtype if dtype is not None and d.is_floating_point else d) for n, d in ckpt.dtypes.items()}
    write_checkpoint(merged_tensors(ckpt, get, spec, dtype), ckpt.cfg, out, "hf", shard_size, dtype,
                     source_dtypes=source, overwrite=overwrite, progress=progress, extra_files=extra_files)


def describe(spec: LoraSpec) -> str:
    return (f"rank {spec.rank}, alpha {spec.lora_alpha:g} (scale {spec.scale:g}), targets {', '.join(spec.targets)}"
            f"{', router trained' if spec.train_router else ''}")


__all__ = ["PeftAdapter", "adapter_config", "adapter_shapes", "load_adapter", "merge_into", "merge_lora",
           "merged_tensors", "peft_keys_for", "write_adapter", "write_merged"]
