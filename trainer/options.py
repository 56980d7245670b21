"""Training configuration: one dataclass per section, YAML recipes, and a CLI generated from the fields.

    --config FILE.yaml          a recipe (sections as YAML mappings)
    --section.key VALUE         override one field; VALUE is read as YAML (numbers, true/false, lists)
    --output-dir DIR            where checkpoints, metrics.jsonl and the resolved config go

Precedence: defaults < recipe < command line. Unknown sections or keys are errors that list the valid
ones. The resolved config is written next to every checkpoint.

A run's options are an ``Options`` (SFT, and all that the shared loop reads) or a ``DPORunOptions``
(the same plus the ``dpo`` section), each section a typed field: ``opts.train.steps`` is an int.
Every value is checked in one place, ``validate``: its type from the field's annotation (a fixed set
of names is a ``typing.Literal``, read off the annotation, so a new one needs no code here), its
bounds from ``opt(..., ge=, gt=, le=, lt=)``, floats finite, then the rules that join two options.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import operator
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args, get_origin

import yaml

from data.errors import BadInputError
from moe.config import AuxLossType, BailingMoeConfig, ExpertBackend, PresetName
from moe.lora import LoraError, parse_targets
from trainer.errors import TrainerError


def opt(default, help: str, *, key: str | None = None, ge=None, gt=None, le=None, lt=None):
    """A field with its --help text and the bounds ``validate`` holds its value to. ``key``: the
    option's name on the command line, in recipes and in config.yaml when the field's own name
    cannot be it (``async`` is a Python keyword: the field is ``async_``)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta = {"help": help, "bounds": bounds, **({"key": key} if key else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_key(f: dataclasses.Field) -> str:
    """The name users give a field (``opt``'s key, else the field's name)."""
    return f.metadata.get("key", f.name)


def _section_dict(section) -> dict:
    return {option_key(f): copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(section)}


def _section(cls: type, values: dict):
    """``cls`` built from values keyed by option_key."""
    names = {option_key(f): f.name for f in dataclasses.fields(cls)}
    return cls(**{names[k]: v for k, v in values.items()})


ParamDtype = Literal["bf16", "fp16", "fp32"]
Device = Literal["auto", "cuda", "cpu"]
DPOLossType = Literal["sigmoid", "ipo", "hinge"]
DPOReference = Literal["precomputed", "live"]
DPONllAverage = Literal["sequence", "token", "trl"]
OneRank = Literal["plain", "fsdp"]
Offload = Literal["none", "optimizer", "all"]
DPO_LOSS_TYPES = get_args(DPOLossType)

MAX_SEED = 2 ** 32 - 1  # numpy's and the synthetic rows' seed arithmetic stay in range below this


@dataclass
class ModelOptions:
    preset: PresetName = opt("tiny", "model preset when not initialised from a checkpoint: 'tiny', 'ling-lite', "
                                     "'tiny-v2', 'ling-mini-2.0' or 'ling-flash-2.0'")
    init_from: str = opt("", "initial weights: an HF bailing_moe or bailing_moe_v2 (Ling 2.0) directory, a lingmoe "
                             "native directory, or '' for a from-scratch init")
    expert_backend: Literal["auto", ExpertBackend] = opt(
        "auto", "routed-expert compute: 'auto' (triton on CUDA, torch on CPU), 'triton', 'torch' or 'loop'")
    overrides: dict[str, Any] = opt({}, "BailingMoeConfig fields to override, e.g. {num_hidden_layers: 2}")
    aux_loss_type: AuxLossType = opt("global", "load balancing: 'global' (expert counts summed over the "
                                               "data-parallel ranks and the step's micro-batches so far, carried as "
                                               "Megatron's global_aux_loss carries them; the loss is N ranks x "
                                               "Megatron's, see model.aux_loss_alpha), 'micro' (per rank and "
                                               "micro-batch), 'sequence' (per row, DeepSeek-V3), or 'none'")
    aux_loss_alpha: float = opt(1e-3, "load-balancing coefficient (perfect balance adds exactly alpha per MoE "
                                      "layer). From a Megatron-Core global_aux_loss run on N data-parallel ranks, "
                                      "use its moe_aux_loss_coeff / N: Megatron's global loss is 1/N of ours "
                                      "(NVIDIA/Megatron-LM#3672)", ge=0)
    z_loss_coef: float = opt(0.0, "router z-loss coefficient (ST-MoE; ~1e-3 when used)", ge=0)
    expert_bias_update_rate: float = opt(
        0.0, "aux-loss-free balancing (DeepSeek-V3, Megatron's moe_router_bias_update_rate): after each optimizer "
             "step every MoE layer's expert bias moves by rate x sign(mean load - load), the loads counted over "
             "all ranks and micro-batches of the step; 0 = the bias stays as loaded (NVIDIA's Ling-V2 fine-tuning "
             "recipes freeze it). A model without a bias (v1) gets one, starting at zero, when > 0", ge=0)
    expert_bias_zero_mean: bool = opt(True, "subtract each update's mean over the experts, so the bias as a whole "
                                            "does not drift (Ling 2.0's pretraining did)")
    mtp: bool = opt(True, "train the model's MTP layers (num_nextn_predict_layers) with their loss x "
                          "mtp_loss_scaling_factor in SFT; false = they are not run and stay as loaded")
    activation_checkpointing: bool = opt(False, "recompute each decoder block in backward (routing replayed, not re-decided)")
    compile: bool = opt(False, "torch.compile each decoder block whole (the routed experts are custom ops inside "
                               "the graph); not with activation_checkpointing")
    expert_recompute: bool = opt(False, "keep no gate/up activations of the routed experts for backward ([T*K, 2I] "
                                        "per MoE layer) and recompute them there: one more gate/up GEMM (the triton "
                                        "backend), or the whole expert MLP (torch, loop)")
    param_dtype: ParamDtype = opt("bf16", "parameter/compute dtype on GPU (FSDP2 mixed precision; grads reduced in "
                                          "fp32); CPU always computes in fp32")


@dataclass
class DataOptions:
    sources: list[str | dict[str, Any]] = opt([], "training data: a list of {path: FILE.jsonl or prepared dir, "
                                                  "weight: W}; empty = the generated demo corpus")
    tokenizer: str = opt("", "tokenizer directory (tokenizer.json); empty = the demo tokenizer")
    seq_len: int = opt(256, "tokens per packed row", ge=2)  # one to predict from, one to predict
    micro_batch_size: int = opt(4, "rows per micro-batch on each rank", ge=1)
    cache_dir: str = opt("", "where prepared (tokenized) data is cached; empty = <output-dir>/prepared")
    skip_bad: bool = opt(False, "skip malformed samples (counted in the summary) instead of stopping")
    eos_every_turn: bool = opt(False, "train <|endoftext|> after every assistant turn of multi-turn data, as "
                                      "LLaMA-Factory's bailing template (Ling's recommended fine-tuning) does; "
                                      "false = only after the last one")
    template: Literal["auto", "bailing", "bailing_v2"] = opt(
        "auto", "chat template: 'bailing' (Ling, Ling-Lite), 'bailing_v2' (Ling 2.0: every turn closed by "
                "<|role_end|>, a system block first, records may carry 'tools'), or 'auto' (the model family's)")
    synthetic: bool = opt(False, "random token rows instead of real data (benchmarks and tests)")
    synthetic_docs_per_row: Literal[1, 2] = opt(2, "documents packed in each synthetic row (1 or 2); 1 = one "
                                                   "causal sequence per row, which takes SDPA's plain causal kernel")


@dataclass
class OptimOptions:
    lr: float = opt(1e-3, "peak learning rate", ge=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine decay)", ge=0, le=1)
    warmup_steps: int = opt(-1, "linear warm-up steps; -1 = warmup_ratio x steps", ge=-1)
    warmup_ratio: float = opt(0.1, "warm-up as a fraction of the steps when warmup_steps is -1", ge=0, le=1)
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (not applied to norms and biases)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)  # 0 turns a never-updated moment's 0/0 into NaN weights
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", ge=0)


@dataclass
class TrainOptions:
    steps: int = opt(200, "optimizer steps", ge=1)
    global_batch_size: int = opt(8, "packed rows per optimizer step over all ranks; gradient accumulation "
                                    "= global_batch_size / (micro_batch_size x ranks)", ge=1)
    seed: int = opt(1234, "seed for init, data order and dropout-free randomness", ge=0, le=MAX_SEED)
    log_every: int = opt(1, "print and record metrics every N steps", ge=1)
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient", ge=1)
    peak_tflops: float = opt(0.0, "dense bf16 peak per GPU for MFU; 0 = the datasheet figure for known GPUs "
                                  "(H100/H200 SXM 989)", ge=0)
    ceiling_tflops: float = opt(0.0, "dense bf16 matmul rate measured on this GPU (benchmarks/ceilings.py, TFLOP/s); "
                                     "when set, model FLOPs over it are logged as mfu_vs_measured_peak beside MFU "
                                     "(a ceiling reachable in practice, never MFU itself); 0 = not logged", ge=0)
    progress: bool = opt(True, "show a progress bar on rank 0")
    profile_step: int = opt(0, "record optimizer step N under torch.profiler: <output-dir>/profile/ gets rank 0's "
                               "Chrome trace and each rank's summary (GPU busy share, top kernels, host waits); "
                               "0 = no profile")
    device: Device = opt("auto", "'auto' (one GPU per rank when CUDA is available, else CPU), 'cuda' or 'cpu' "
                                 "(CPU and gloo even on a GPU machine: debugging, exact fp32 comparisons)")


@dataclass
class ParallelOptions:
    ep: int = opt(1, "expert parallelism: each group of ep consecutive ranks splits the routed experts (E/ep "
                     "whole experts per rank, tokens sent by all-to-all); expert weights are FSDP-sharded over the "
                     "other world/ep ranks, everything else over all ranks. 1 = no expert parallelism", ge=1)
    one_rank: OneRank = opt("plain", "how a run of one rank trains: 'plain' (no FSDP: the model computes in "
                                     "model.param_dtype from its own parameters and the optimizer steps fp32 master "
                                     "weights, with no parameter copies per micro-batch) or 'fsdp' (FSDP2 as on many "
                                     "ranks, which casts and copies every parameter per micro-batch; for comparison). "
                                     "Numerically the same; ignored with more than one rank")
    offload: Offload = opt("none", "host memory for training state, to fit on fewer GPUs: 'optimizer' (AdamW's "
                                   "two moments live in host memory, brought to the GPU a parameter at a time for "
                                   "the step), 'all' (FSDP2's CPUOffloadPolicy: the fp32 parameter shards, their "
                                   "gradients and AdamW's state live in host memory and the step runs on the CPU; "
                                   "the GPU holds the gathered blocks and activations), or 'none'")


@dataclass
class LoraOptions:
    rank: int = opt(0, "LoRA rank: low-rank adapters of this rank train beside frozen weights (bf16 on GPU, no "
                       "gradient, no optimizer state); 0 = full fine-tuning. Needs model.init_from", ge=0)
    alpha: float = opt(0.0, "LoRA alpha: the adapters' output is scaled by alpha / rank; 0 = 2 x rank "
                            "(LLaMA-Factory's default)", ge=0)
    dropout: float = opt(0.0, "dropout on the adapters' input, in training", ge=0, lt=1)
    target: str = opt("all", "what gets adapters: 'all', or a comma list of attention (query_key_value, dense), "
                             "shared_experts, experts (the routed experts: an adapter pair per expert, computed "
                             "inside the grouped GEMMs), dense_mlp")
    train_router: bool = opt(False, "train the routers' weights in full beside the adapters (exported as PEFT's "
                                    "modules_to_save); false = frozen, its balance losses still computed and logged")


@dataclass
class CheckpointOptions:
    every: int = opt(100, "save a checkpoint every N steps (and always at the end); 0 = only at the end", ge=0)
    keep_last: int = opt(2, "checkpoints to keep (older ones are deleted after a successful save)", ge=1)
    resume: bool = opt(True, "resume from the latest checkpoint in <output-dir>/checkpoints when there is one")
    export_hf: bool = opt(True, "write an HF safetensors export to <output-dir>/hf at the end")
    save_final: bool = opt(True, "save a checkpoint when training ends; false only for throughput "
                                 "benchmarks (nothing is kept, so it needs export_hf false)")
    async_: bool = opt(False, "write periodic checkpoints in the background: the state is copied to host memory "
                              "(pinned on CUDA) at the save and written by a thread while training goes on; "
                              "COMPLETE, the rename and pruning follow once every rank has written. One write at "
                              "a time (the next save, SIGTERM and the end wait for it); needs host memory for a "
                              "copy of each rank's state", key="async")


@dataclass
class LogOptions:
    wandb_project: str = opt("", "Weights & Biases project; empty = no wandb")
    wandb_run_name: str = opt("", "wandb run name (default: the output directory's name)")


@dataclass
class DPOOptions:
    loss_type: DPOLossType = opt("sigmoid", "'sigmoid' (DPO), 'ipo' or 'hinge'")
    beta: float = opt(0.1, "DPO beta", gt=0)  # ipo divides by it; at 0 sigmoid and hinge have no gradient
    nll_coef: float = opt(0.0, "weight of an NLL term on the chosen answer (RPO / pref_ftx); 0 = off", ge=0)
    nll_average: DPONllAverage = opt("sequence", "the NLL term's mean: 'sequence' (each chosen answer's token mean, "
                                                 "then over pairs: LLaMA-Factory's pref_ftx), 'token' (over all chosen "
                                                 "tokens of the step, every micro-batch and rank together; TRL's sft "
                                                 "loss only when a step is one micro-batch on one rank) or 'trl' (each "
                                                 "micro-batch's token mean, averaged over micro-batches and ranks: "
                                                 "TRL's sft loss and rpo_alpha term exactly)")
    reference: DPOReference = opt("precomputed", "'precomputed' (a first pass stores reference log-probs) or 'live' "
                                                 "(a frozen reference model stays resident)")


class OptionsError(BadInputError, TrainerError):
    """An unknown or wrongly typed option, or options that do not go together."""


@dataclass
class Options:
    """An SFT run's options, and the sections every run has (what trainer/loop.py reads)."""
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    log: LogOptions = field(default_factory=LogOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    output_dir: str = "runs/sft"
    overwrite: bool = False  # --overwrite: move an earlier run in output_dir aside (not part of the config)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """{section name: its dataclass}, in the order config.yaml lists them."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}

    def to_dict(self) -> dict:
        d = {name: _section_dict(getattr(self, name)) for name in self.sections()}
        d["output_dir"] = self.output_dir
        return d


@dataclass
class DPORunOptions(Options):
    """A DPO run's options: an SFT run's and the ``dpo`` section."""
    output_dir: str = "runs/dpo"
    dpo: DPOOptions = field(default_factory=DPOOptions)


# ---------------------------------------------------------------- validation: the one place

_BOUND_TESTS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"),
                "le": (operator.le, "<="), "lt": (operator.lt, "<")}
# BailingMoeConfig fields that model.* options set: an override of one would be given twice.
_SET_BY_MODEL_OPTIONS = ("expert_backend", "expert_recompute", "aux_loss_type", "aux_loss_alpha", "z_loss_coef",
                         "mtp_enabled")


def _one_of(allowed) -> str:
    names = [str(a) for a in allowed]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _typed(name: str, hint, v: Any, where: str) -> Any:
    """``v`` as the field's type says: a member of its Literal, or an instance of its class (an int is
    taken for a float, and so is a string that reads as one: YAML reads "1e-5", with no dot, as text)."""
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if not any(type(v) is type(a) and v == a for a in allowed):
            raise OptionsError(f"{where}: {name} must be {_one_of(allowed)}, got {v!r}")
        return v
    want = get_origin(hint) or hint
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if want is float and isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    if not isinstance(v, want) or (want in (int, float) and isinstance(v, bool)):
        raise OptionsError(f"{where}: {name} must be {want.__name__}, got {v!r}")
    return v


def _check_bounds(name: str, v: Any, bounds: dict, where: str) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise OptionsError(f"{where}: {name} must be a finite number, got {v!r}")
    if not all(_BOUND_TESTS[k][0](v, b) for k, b in bounds.items()):
        allowed = " and ".join(f"{_BOUND_TESTS[k][1]} {b}" for k, b in bounds.items())
        raise OptionsError(f"{where}: {name} must be {allowed}, got {v!r}")


def validate(opts: Options, origin: Callable[[str], str] = lambda name: "options") -> Options:
    """Check every option of ``opts`` (converting ints and numeric strings given for floats in place);
    raises OptionsError naming the first bad one and where it came from (``origin("train.steps")``:
    the recipe's path, "command line", ...). Returns ``opts``."""
    for sec, cls in type(opts).sections().items():
        section, hints = getattr(opts, sec), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f"{sec}.{option_key(f)}"
            v = _typed(name, hints[f.name], getattr(section, f.name), origin(name))
            _check_bounds(name, v, f.metadata.get("bounds", {}), origin(name))
            setattr(section, f.name, v)
    _check_combinations(opts, origin)
    return opts


def _check_combinations(opts: Options, origin: Callable[[str], str]) -> None:
    ck, train, model = opts.checkpoint, opts.train, opts.model
    if not ck.save_final and ck.export_hf:
        raise OptionsError(f"{origin('checkpoint.save_final')}: checkpoint.save_final false needs checkpoint.export_hf "
                           f"false (the HF export is written from the final checkpoint)")
    if not 0 <= train.profile_step <= train.steps:
        raise OptionsError(f"{origin('train.profile_step')}: train.profile_step must be a step in 1..train.steps "
                           f"({train.steps}), or 0 for none; got {train.profile_step}")
    if model.compile and model.activation_checkpointing:
        # Dynamo cannot trace the checkpoint's context_fn (routing recorded, then replayed), and a block
        # compiled inside the checkpoint recomputes through a second graph that saves other tensors.
        raise OptionsError(f"{origin('model.compile')}: model.compile true cannot be combined with "
                           f"model.activation_checkpointing true yet; turn one of them off "
                           f"(model.expert_recompute true saves the experts' activations instead)")
    known = {f.name for f in dataclasses.fields(BailingMoeConfig)} - {"extra_hf", *_SET_BY_MODEL_OPTIONS}
    for key in model.overrides:
        if key in _SET_BY_MODEL_OPTIONS:
            raise OptionsError(f"{origin('model.overrides')}: model.overrides cannot set {key}: use model.{key}")
        if key not in known:
            raise OptionsError(f"{origin('model.overrides')}: model.overrides: unknown model config field {key!r}; "
                               f"valid fields: {sorted(known)}")
    if opts.data.template == "bailing_v2" and opts.data.eos_every_turn:
        raise OptionsError(f"{origin('data.eos_every_turn')}: data.eos_every_turn is a choice of the bailing template: "
                           f"bailing_v2 ends every turn with <|role_end|> already")
    _check_lora(opts, origin)
    if not isinstance(opts.output_dir, str) or not opts.output_dir:
        raise OptionsError(f"{origin('output_dir')}: output_dir must be a directory name, got {opts.output_dir!r}")


def _check_lora(opts: Options, origin: Callable[[str], str]) -> None:
    lora = opts.lora
    try:
        targets = parse_targets(lora.target)
    except LoraError as e:
        raise OptionsError(f"{origin('lora.target')}: {e}") from None
    if lora.rank == 0:
        return
    if not opts.model.init_from:
        raise OptionsError(f"{origin('lora.rank')}: lora.rank {lora.rank} adapts existing weights: set model.init_from "
                           f"(an HF or native checkpoint), or lora.rank 0 for full training")
    if opts.parallel.ep > 1:
        raise OptionsError(f"{origin('parallel.ep')}: LoRA with expert parallelism (parallel.ep {opts.parallel.ep}) "
                           f"is not supported yet: use parallel.ep 1 (LoRA's frozen experts shard under FSDP alone)")
    if opts.model.expert_backend == "triton" and "experts" in targets and lora.dropout > 0:
        raise OptionsError(f"{origin('model.expert_backend')}: the triton expert backend computes the routed experts' "
                           f"LoRA without dropout (lora.dropout {lora.dropout}): set lora.dropout 0, or "
                           f"model.expert_backend torch (or auto, which takes torch then)")


# ---------------------------------------------------------------- recipe and command line

def _merge(sections: dict[str, type], values: dict, where: str, into: dict[str, dict], origin: dict[str, str]) -> None:
    for sec, body in values.items():
        if sec == "output_dir":
            into.setdefault("_", {})["output_dir"] = body
            continue
        if sec not in sections:
            raise OptionsError(f"{where}: unknown section {sec!r}; valid sections: {sorted(sections)} and output_dir")
        if not isinstance(body, dict):
            raise OptionsError(f"{where}: section {sec!r} must be a mapping of keys to values")
        valid = {option_key(f) for f in dataclasses.fields(sections[sec])}
        for k, v in body.items():
            if k not in valid:
                raise OptionsError(f"{where}: unknown key {sec}.{k}; valid keys in {sec}: {sorted(valid)}")
            into.setdefault(sec, {})[k] = v
            origin[f"{sec}.{k}"] = where


def build_parser(prog: str, options: type[Options], description: str,
                 defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe; command-line options override it")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<script name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --checkpoint.resume false over a directory holding a run: move that run "
                        "(checkpoints, metrics, export) aside to <output-dir>.replaced-<time> first")
    for sec, cls in options.sections().items():
        g = p.add_argument_group(f"{sec} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = option_key(f)
            default = (defaults or {}).get(sec, {}).get(key, default)
            g.add_argument(f"--{sec}.{key}", dest=f"{sec}.{key}", default=None, metavar="V",
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")
    return p


def _read_recipe(path: str) -> dict:
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise OptionsError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        raise OptionsError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(recipe, dict):
        raise OptionsError(f"{path}: a recipe must be a mapping of sections")
    return recipe


def parse_options(argv: list[str] | None, prog: str, options: type[Options], description: str,
                  default_output: str, defaults: dict | None = None) -> Options:
    """An ``options`` (Options or DPORunOptions) from a recipe and the command line, validated.
    ``defaults`` ({section: {key: value}}) replaces a script's field defaults (DPO's learning rate,
    say) below the recipe and the command line, and is what --help shows."""
    sections = options.sections()
    parser = build_parser(prog, options, description, defaults)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = [u for u in unknown if u.startswith("--")]
        valid = sorted(f"--{s}.{option_key(f)}" for s, c in sections.items() for f in dataclasses.fields(c))
        parser.error(f"unknown option(s) {bad or unknown}; valid options: --config, --output-dir, " + ", ".join(valid))
    values: dict[str, dict] = {sec: dict(body) for sec, body in (defaults or {}).items()}
    origin = {f"{sec}.{k}": f"{prog} defaults" for sec, body in values.items() for k in body}
    if args.config:
        _merge(sections, _read_recipe(args.config), args.config, values, origin)
    for key, raw in vars(args).items():
        if "." not in key or raw is None:
            continue
        sec, name = key.split(".", 1)
        try:
            v = yaml.safe_load(raw)
        except yaml.YAMLError:
            v = raw
        values.setdefault(sec, {})[name] = raw if v is None else v
        origin[key] = "command line"
    out = args.output_dir or values.get("_", {}).get("output_dir") or default_output
    origin["output_dir"] = "command line" if args.output_dir else args.config or "defaults"
    opts = options(**{sec: _section(cls, values.get(sec, {})) for sec, cls in sections.items()},
                   output_dir=out, overwrite=args.overwrite)
    return validate(opts, lambda name: origin.get(name, "defaults"))


def dump_yaml(options: Options) -> str:
    return yaml.safe_dump(options.to_dict(), sort_keys=False)


if __name__ == "__main__":  # pragma: no cover - a quick look at the resolved defaults
    print(dump_yaml(parse_options(sys.argv[1:], "options", Options, "", "runs/x")))
