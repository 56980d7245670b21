"""Training configuration: one dataclass per section, YAML recipes, and a CLI generated from the fields.

    --config FILE.yaml          a recipe (sections as YAML mappings)
    --section.key VALUE         override one field; VALUE is read as YAML (numbers, true/false, lists)
    --output-dir DIR            where checkpoints, metrics.jsonl and the resolved config go

Precedence: defaults < recipe < command line. Unknown sections or keys are errors that list the valid
ones. The resolved config is written next to every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from data.errors import BadInputError
from trainer.errors import TrainerError


def opt(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelOptions:
    preset: str = opt("tiny", "model preset when not initialised from a checkpoint: 'tiny' or 'ling-lite'")
    init_from: str = opt("", "initial weights: an HF bailing_moe directory, a lingmoe native directory, "
                             "or '' for a from-scratch init")
    expert_backend: str = opt("auto", "routed-expert compute: 'auto' (triton on CUDA, torch on CPU), "
                                      "'triton', 'torch' or 'loop'")
    overrides: dict = opt({}, "BailingMoeConfig fields to override, e.g. {num_hidden_layers: 2}")
    aux_loss_type: str = opt("global", "load balancing: 'global' (expert counts summed over the data-parallel "
                                       "ranks and the step's micro-batches so far, as Megatron's global_aux_loss), "
                                       "'micro' (per rank and micro-batch), 'sequence' (per row, DeepSeek-V3), "
                                       "or 'none'")
    aux_loss_alpha: float = opt(1e-3, "load-balancing coefficient (perfect balance adds exactly alpha per MoE layer)")
    z_loss_coef: float = opt(0.0, "router z-loss coefficient (ST-MoE; ~1e-3 when used)")
    activation_checkpointing: bool = opt(False, "recompute each decoder block in backward (routing replayed, not re-decided)")
    compile: bool = opt(False, "torch.compile each decoder block")
    param_dtype: str = opt("bf16", "parameter/compute dtype on GPU (FSDP2 mixed precision; grads reduced in "
                                   "fp32); CPU always computes in fp32")


@dataclass
class DataOptions:
    sources: list = opt([], "training data: a list of {path: FILE.jsonl or prepared dir, weight: W}; "
                            "empty = the generated demo corpus")
    tokenizer: str = opt("", "tokenizer directory (tokenizer.json); empty = the demo tokenizer")
    seq_len: int = opt(256, "tokens per packed row")
    micro_batch_size: int = opt(4, "rows per micro-batch on each rank")
    cache_dir: str = opt("", "where prepared (tokenized) data is cached; empty = <output-dir>/prepared")
    skip_bad: bool = opt(False, "skip malformed samples (counted in the summary) instead of stopping")
    eos_every_turn: bool = opt(False, "train <|endoftext|> after every assistant turn of multi-turn data, as "
                                      "LLaMA-Factory's bailing template (Ling's recommended fine-tuning) does; "
                                      "false = only after the last one")
    synthetic: bool = opt(False, "random token rows instead of real data (benchmarks and tests)")
    synthetic_docs_per_row: int = opt(2, "documents packed in each synthetic row (1 or 2); 1 = one causal "
                                         "sequence per row, which takes SDPA's plain causal kernel")


@dataclass
class OptimOptions:
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = opt(-1, "linear warm-up steps; -1 = warmup_ratio x steps")
    warmup_ratio: float = opt(0.1, "warm-up as a fraction of the steps when warmup_steps is -1")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (not applied to norms and biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")


@dataclass
class TrainOptions:
    steps: int = opt(200, "optimizer steps")
    global_batch_size: int = opt(8, "packed rows per optimizer step over all ranks; gradient accumulation "
                                    "= global_batch_size / (micro_batch_size x ranks)")
    seed: int = opt(1234, "seed for init, data order and dropout-free randomness")
    log_every: int = opt(1, "print and record metrics every N steps")
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    peak_tflops: float = opt(0.0, "dense bf16 peak per GPU for MFU; 0 = the datasheet figure for known GPUs "
                                  "(H100/H200 SXM 989)")
    progress: bool = opt(True, "show a progress bar on rank 0")
    profile_step: int = opt(0, "record optimizer step N under torch.profiler: <output-dir>/profile/ gets rank 0's "
                               "Chrome trace and each rank's summary (GPU busy share, top kernels, host waits); "
                               "0 = no profile")
    device: str = opt("auto", "'auto' (one GPU per rank when CUDA is available, else CPU), 'cuda' or 'cpu' "
                              "(CPU and gloo even on a GPU machine: debugging, exact fp32 comparisons)")


@dataclass
class ParallelOptions:
    ep: int = opt(1, "expert parallelism: each group of ep consecutive ranks splits the routed experts (E/ep "
                     "whole experts per rank, tokens sent by all-to-all); expert weights are FSDP-sharded over the "
                     "other world/ep ranks, everything else over all ranks. 1 = no expert parallelism")


@dataclass
class CheckpointOptions:
    every: int = opt(100, "save a checkpoint every N steps (and always at the end); 0 = only at the end")
    keep_last: int = opt(2, "checkpoints to keep (older ones are deleted after a successful save)")
    resume: bool = opt(True, "resume from the latest checkpoint in <output-dir>/checkpoints when there is one")
    export_hf: bool = opt(True, "write an HF safetensors export to <output-dir>/hf at the end")
    save_final: bool = opt(True, "save a checkpoint when training ends; false only for throughput "
                                 "benchmarks (nothing is kept, so it needs export_hf false)")


@dataclass
class LogOptions:
    wandb_project: str = opt("", "Weights & Biases project; empty = no wandb")
    wandb_run_name: str = opt("", "wandb run name (default: the output directory's name)")


@dataclass
class DPOOptions:
    loss_type: str = opt("sigmoid", "'sigmoid' (DPO), 'ipo' or 'hinge'")
    beta: float = opt(0.1, "DPO beta")
    nll_coef: float = opt(0.0, "weight of an NLL term on the chosen answer (RPO / pref_ftx); 0 = off")
    nll_average: str = opt("sequence", "the NLL term's mean: 'sequence' (each chosen answer's token mean, then "
                                       "over pairs: LLaMA-Factory's pref_ftx) or 'token' (over all chosen tokens "
                                       "of the step: TRL's sft loss)")
    reference: str = opt("precomputed", "'precomputed' (a first pass stores reference log-probs) or 'live' "
                                        "(a frozen reference model stays resident)")


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DPO_REFERENCES = ("precomputed", "live")
DPO_NLL_AVERAGES = ("sequence", "token")

SFT_SECTIONS = dict(model=ModelOptions, data=DataOptions, optim=OptimOptions, train=TrainOptions,
                    checkpoint=CheckpointOptions, log=LogOptions,
                    parallel=ParallelOptions)
DPO_SECTIONS = dict(SFT_SECTIONS, dpo=DPOOptions)


class OptionsError(BadInputError, TrainerError):
    """An unknown or wrongly typed option, or options that do not go together."""


@dataclass
class Options:
    sections: dict[str, Any]
    output_dir: str
    overwrite: bool = False  # --overwrite: move an earlier run in output_dir aside (not part of the config)

    def __getattr__(self, name):
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        d = {k: dataclasses.asdict(v) for k, v in self.sections.items()}
        d["output_dir"] = self.output_dir
        return d


def _merge(sections: dict[str, type], values: dict, where: str, into: dict[str, dict]) -> None:
    for sec, body in values.items():
        if sec == "output_dir":
            into.setdefault("_", {})["output_dir"] = body
            continue
        if sec not in sections:
            raise OptionsError(f"{where}: unknown section {sec!r}; valid sections: {sorted(sections)} and output_dir")
        if not isinstance(body, dict):
            raise OptionsError(f"{where}: section {sec!r} must be a mapping of keys to values")
        valid = {f.name for f in dataclasses.fields(sections[sec])}
        for k, v in body.items():
            if k not in valid:
                raise OptionsError(f"{where}: unknown key {sec}.{k}; valid keys in {sec}: {sorted(valid)}")
            into.setdefault(sec, {})[k] = v


def _coerce(sec: str, f: dataclasses.Field, v: Any, where: str) -> Any:
    want = type(f.default) if f.default is not dataclasses.MISSING else type(f.default_factory())
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if want is float and isinstance(v, str):
        try:
            return float(v)  # YAML reads "1e-5" (no dot) as a string
        except ValueError:
            pass
    if not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise OptionsError(f"{where}: {sec}.{f.name} must be {want.__name__}, got {v!r}")
    return v


def build_parser(prog: str, sections: dict[str, type], description: str,
                 defaults: dict | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe; command-line options override it")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<script name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --checkpoint.resume false over a directory holding a run: move that run "
                        "(checkpoints, metrics, export) aside to <output-dir>.replaced-<time> first")
    for sec, cls in sections.items():
        g = p.add_argument_group(f"{sec} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = (defaults or {}).get(sec, {}).get(f.name, default)
            g.add_argument(f"--{sec}.{f.name}", dest=f"{sec}.{f.name}", default=None, metavar="V",
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")
    return p


def parse_options(argv: list[str] | None, prog: str, sections: dict[str, type], description: str,
                  default_output: str, defaults: dict | None = None) -> Options:
    """``defaults`` ({section: {key: value}}) replaces a script's field defaults (DPO's learning rate,
    say) below the recipe and the command line, and is what --help shows."""
    parser = build_parser(prog, sections, description, defaults)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = [u for u in unknown if u.startswith("--")]
        valid = sorted(f"--{s}.{f.name}" for s, c in sections.items() for f in dataclasses.fields(c))
        parser.error(f"unknown option(s) {bad or unknown}; valid options: --config, --output-dir, " + ", ".join(valid))
    values: dict[str, dict] = {sec: dict(body) for sec, body in (defaults or {}).items()}
    if args.config:
        try:
            with open(args.config) as f:
                recipe = yaml.safe_load(f) or {}
        except OSError as e:
            raise OptionsError(f"{args.config}: cannot read recipe ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}:" if mark else ""
            raise OptionsError(f"{args.config}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(recipe, dict):
            raise OptionsError(f"{args.config}: a recipe must be a mapping of sections")
        _merge(sections, recipe, args.config, values)
    for key, raw in vars(args).items():
        if "." not in key or raw is None:
            continue
        sec, name = key.split(".", 1)
        try:
            v = yaml.safe_load(raw)
        except yaml.YAMLError:
            v = raw
        values.setdefault(sec, {})[name] = raw if v is None else v
    built = {}
    for sec, cls in sections.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = values.get(sec, {})
        kw = {k: _coerce(sec, fields[k], v, args.config or "command line") for k, v in given.items()}
        built[sec] = cls(**kw)
    _check_combinations(built, args.config or "command line")
    out = args.output_dir or values.get("_", {}).get("output_dir") or default_output
    return Options(built, out, overwrite=args.overwrite)


def _check_combinations(built: dict, where: str) -> None:
    ck, data = built.get("checkpoint"), built.get("data")
    if ck is not None and not ck.save_final and ck.export_hf:
        raise OptionsError(f"{where}: checkpoint.save_final false needs checkpoint.export_hf false "
                           f"(the HF export is written from the final checkpoint)")
    train = built.get("train")
    if train is not None and not 0 <= train.profile_step <= train.steps:
        raise OptionsError(f"{where}: train.profile_step must be a step in 1..train.steps ({train.steps}), "
                           f"or 0 for none; got {train.profile_step}")
    if train is not None and train.device not in ("auto", "cuda", "cpu"):
        raise OptionsError(f"{where}: train.device must be auto, cuda or cpu, got {train.device!r}")
    dpo = built.get("dpo")
    if dpo is not None and dpo.loss_type not in DPO_LOSS_TYPES:
        raise OptionsError(f"{where}: dpo.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {dpo.loss_type!r}")
    if dpo is not None and dpo.reference not in DPO_REFERENCES:
        raise OptionsError(f"{where}: dpo.reference must be one of {', '.join(DPO_REFERENCES)}, got {dpo.reference!r}")
    if dpo is not None and dpo.nll_average not in DPO_NLL_AVERAGES:
        raise OptionsError(f"{where}: dpo.nll_average must be one of {', '.join(DPO_NLL_AVERAGES)}, "
                           f"got {dpo.nll_average!r}")
    if data is not None and data.synthetic_docs_per_row not in (1, 2):
        raise OptionsError(f"{where}: data.synthetic_docs_per_row must be 1 or 2, got {data.synthetic_docs_per_row}")


def dump_yaml(options: Options) -> str:
    return yaml.safe_dump(options.to_dict(), sort_keys=False)


if __name__ == "__main__":  # pragma: no cover - a quick look at the resolved defaults
    print(dump_yaml(parse_options(sys.argv[1:], "options", SFT_SECTIONS, "", "runs/x")))
