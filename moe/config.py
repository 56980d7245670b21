"""BailingMoeConfig: the model's one configuration, with presets and Hugging Face config.json conversion.

Field names follow the Hugging Face config.json of ``bailing_moe`` (Ling, Ling-Lite) and
``bailing_moe_v2`` (Ling 2.0: Ling-mini-2.0, Ling-flash-2.0) so that ``from_hf``/``to_hf`` are a
rename-free copy; the fields that only this project has (expert backend, router loss coefficients)
are grouped at the end and are not written into an HF config.

One model, two families. ``family`` says which Hugging Face architecture an export claims
(``BailingMoeForCausalLM`` or ``BailingMoeV2ForCausalLM``); the parts are options of the one model:
the router's scoring (softmax | sigmoid), an expert bias used for selection only, group-limited
top-k, a routed scaling factor, QK-norm, partial RoPE and multi-token-prediction (MTP) layers. A
V2 checkpoint is recognised by ``architectures`` (as vLLM does) or by model_type
``bailing_moe_v2``: the reference config class leaves model_type empty and the published configs
say ``bailing_moe``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from data.errors import BadInputError

# The Literal types are the one source of each set of names (the training options are typed with
# them); the tuples are read off them for membership checks and messages.
ExpertBackend = Literal["loop", "torch", "triton"]
AuxLossType = Literal["micro", "global", "sequence", "none"]
# The keys of PRESETS (tests/test_options.py checks they agree).
PresetName = Literal["ling-lite", "tiny", "ling-mini-2.0", "ling-flash-2.0", "tiny-v2"]
Family = Literal["bailing_moe", "bailing_moe_v2"]
ScoreFunction = Literal["softmax", "sigmoid"]
EXPERT_BACKENDS = get_args(ExpertBackend)
AUX_LOSS_TYPES = get_args(AuxLossType)
FAMILIES = get_args(Family)
SCORE_FUNCTIONS = get_args(ScoreFunction)

# What an HF config.json of each family says about itself.
_ARCHITECTURES = {"bailing_moe": "BailingMoeForCausalLM", "bailing_moe_v2": "BailingMoeV2ForCausalLM"}
_AUTO_MAP = {
    "bailing_moe": {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                    "AutoModel": "modeling_bailing_moe.BailingMoeModel",
                    "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"},
    "bailing_moe_v2": {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                       "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
                       "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"},
}
# A V2 config.json that leaves a key out means the reference config class's default
# (configuration_bailing_moe_v2.py of inclusionAI/Ling-V2; partial_rotary_factor is read with
# getattr, default 1.0). Absent v1 keys take this dataclass's defaults, which are Ling-Lite's.
_V2_HF_DEFAULTS = dict(
    vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=16,
    num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    max_position_embeddings=32768, rope_theta=600000.0, pad_token_id=156892, eos_token_id=156892,
    num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    moe_intermediate_size=512, first_k_dense_replace=1, head_dim=128, use_qk_norm=True,
    num_nextn_predict_layers=0, mtp_loss_scaling_factor=0.0, moe_router_enable_expert_bias=True,
    routed_scaling_factor=1.0, partial_rotary_factor=1.0,
)
# Architecture fields that a v1 (bailing_moe) config.json never had: written for a v1 model only
# when they differ from the default (a v1 model trained with an expert bias, say).
_V2_FIELDS = ("score_function", "router_dtype", "n_group", "topk_group", "routed_scaling_factor",
              "moe_router_enable_expert_bias", "use_qk_norm", "partial_rotary_factor", "num_nextn_predict_layers",
              "mtp_loss_scaling_factor")
# lingmoe's own fields: never written to an HF config.
_LINGMOE_ONLY = ("family", "expert_backend", "expert_recompute", "attn_implementation", "aux_loss_type",
                 "aux_loss_alpha", "z_loss_coef", "mtp_enabled", "extra_hf")

# HF keys we read but that change nothing in the computation (dropouts are 0 in every release,
# sliding-window attention is off for bailing_moe); kept so a round trip preserves them.
_PASSTHROUGH_HF_KEYS = (
    "embedding_dropout", "output_dropout", "attention_dropout", "norm_softmax", "pretraining_tp",
    "output_router_logits", "use_sliding_window", "sliding_window", "max_window_layers",
    "use_cache", "transformers_version", "bos_token_id", "auto_map", "dtype",
)


class ConfigError(BadInputError):
    """A model configuration that cannot describe a valid BailingMoe model (exit code 2)."""


@dataclass
class BailingMoeConfig:
    # --- architecture (names as in the HF config.json) ---
    vocab_size: int = 126464
    hidden_size: int = 2048
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    intermediate_size: int = 1408  # width of dense MLP layers (layer < first_k_dense_replace)
    moe_intermediate_size: int = 1408
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    norm_head: bool = False
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    initializer_range: float = 0.006
    torch_dtype: str = "bfloat16"
    # --- the parts Ling 2.0 (bailing_moe_v2) added; the defaults are v1's (off) ---
    score_function: str | None = None  # "softmax" | "sigmoid"; None = the family's (v1 softmax, v2 sigmoid)
    router_dtype: str | None = None  # "fp32": router logits from fp32 copies of x and W (v2); None = the input dtype
    n_group: int = 1  # group-limited top-k: experts in n_group contiguous groups, ...
    topk_group: int = 1  # ... the topk_group groups with the largest sum of their top-2 scores are eligible
    routed_scaling_factor: float = 1.0  # routed weights (normalised) times this
    moe_router_enable_expert_bias: bool | None = None  # fp32 per-expert bias, selection only; None = v2 on, v1 off
    use_qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * this dims of each head
    num_nextn_predict_layers: int = 0  # MTP layers after the main ones (model.layers.{L..L+n-1})
    mtp_loss_scaling_factor: float = 0.0  # each MTP layer's loss is added times this
    # --- lingmoe only (never written to an HF config) ---
    family: str = "bailing_moe"  # the HF architecture exports claim: "bailing_moe" (v1) or "bailing_moe_v2"
    expert_backend: str = "torch"  # "loop" (reference) | "torch" (sorted, grouped) | "triton"
    expert_recompute: bool = False  # keep no expert gate/up activations for backward; recompute them there
    attn_implementation: str = "auto"  # "auto" (flex for packed rows on CUDA, else SDPA) | "sdpa" | "flex"
    aux_loss_type: str = "micro"  # "micro" (per micro-batch) | "global" (counts given by the caller) | "sequence" | "none"
    aux_loss_alpha: float = 1e-3  # top-k load balancing; perfect balance contributes exactly alpha per layer
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE), ~1e-3 when used
    mtp_enabled: bool = True  # run the MTP layers and add their loss when a forward is given labels
    extra_hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        v2 = self.family == "bailing_moe_v2"
        if self.score_function is None:
            self.score_function = "sigmoid" if v2 else "softmax"
        if self.moe_router_enable_expert_bias is None:
            self.moe_router_enable_expert_bias = v2
        if self.router_dtype is None and v2:
            self.router_dtype = "fp32"
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
                     "num_experts_per_tok"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace ({self.first_k_dense_replace}) must lie in [0, num_hidden_layers]")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            raise ConfigError(f"rope_scaling type {kind!r} is not supported; Ling-Lite uses rope_scaling null")
        need(self.expert_backend in EXPERT_BACKENDS,
             f"expert_backend {self.expert_backend!r} is not one of {EXPERT_BACKENDS}")
        need(self.attn_implementation in ("auto", "sdpa", "flex"),
             f"attn_implementation {self.attn_implementation!r} is not one of ('auto', 'sdpa', 'flex')")
        need(self.aux_loss_type in AUX_LOSS_TYPES,
             f"aux_loss_type {self.aux_loss_type!r} is not one of {AUX_LOSS_TYPES}")
        need(self.aux_loss_alpha >= 0 and self.z_loss_coef >= 0, "router loss coefficients must be >= 0")
        self._validate_v2_parts(need)

    def _validate_v2_parts(self, need) -> None:
        need(self.family in FAMILIES, f"family {self.family!r} is not one of {FAMILIES}")
        need(self.score_function in SCORE_FUNCTIONS,
             f"score_function {self.score_function!r} is not one of {SCORE_FUNCTIONS}")
        need(self.router_dtype in (None, "fp32"),
             f"router_dtype {self.router_dtype!r} is not supported (null or 'fp32')")
        E, K = self.num_experts, self.num_experts_per_tok
        need(isinstance(self.n_group, int) and self.n_group >= 1 and E % self.n_group == 0,
             f"n_group ({self.n_group}) must be a positive divisor of num_experts ({E})")
        need(self.n_group == 1 or E // self.n_group >= 2,
             f"group-limited routing scores a group by its top-2 experts: num_experts / n_group must be >= 2, "
             f"got {E} / {self.n_group}")
        need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group,
             f"topk_group ({self.topk_group}) must lie in [1, n_group ({self.n_group})]")
        need(K <= self.topk_group * (E // self.n_group),
             f"num_experts_per_tok ({K}) cannot exceed the experts of the topk_group ({self.topk_group}) kept "
             f"groups ({self.topk_group * (E // self.n_group)})")
        need(self.routed_scaling_factor > 0, f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        need(0 < self.partial_rotary_factor <= 1,
             f"partial_rotary_factor must lie in (0, 1], got {self.partial_rotary_factor}")
        need(self.rope_dim >= 2 and self.rope_dim % 2 == 0,
             f"head_dim x partial_rotary_factor ({self.head_dim} x {self.partial_rotary_factor}) must give an even "
             f"number of rotary dims >= 2, got {self.rope_dim}")
        need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be an integer >= 0, got {self.num_nextn_predict_layers!r}")
        need(self.mtp_loss_scaling_factor >= 0,
             f"mtp_loss_scaling_factor must be >= 0, got {self.mtp_loss_scaling_factor}")
        if self.family == "bailing_moe_v2":
            # The reference (BailingMoeV2Gate) always scores by sigmoid and renormalises the top-k; an
            # export claiming that architecture must compute what the reference computes.
            need(self.score_function == "sigmoid",
                 f"family 'bailing_moe_v2' routes by sigmoid scores (the reference's BailingMoeV2Gate); "
                 f"score_function {self.score_function!r} is not what it computes")
            need(self.norm_topk_prob, "family 'bailing_moe_v2' always renormalises the top-k weights: "
                                      "norm_topk_prob must be true")

    @property
    def rope_dim(self) -> int:
        """Rotary dims of each head: the first head_dim * partial_rotary_factor."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def num_all_layers(self) -> int:
        """Main layers and MTP layers: the length of model.layers."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def num_params(self, active_only: bool = False, include_mtp: bool = True) -> int:
        """Parameter count; ``active_only`` counts K routed experts per MoE layer instead of all E;
        ``include_mtp`` False leaves the MTP layers out (the published totals do). The expert bias is
        a buffer, not a parameter."""
        H, I, hd = self.hidden_size, self.moe_intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = H * (q + 2 * kv) + q * H + (2 * hd if self.use_qk_norm else 0)
        if self.use_qkv_bias:
            attn += q + 2 * kv
        if self.use_bias:
            attn += H
        per_expert = 3 * H * I
        experts = self.num_experts_per_tok if active_only else self.num_experts
        moe = experts * per_expert + H * self.num_experts + 3 * H * I * self.num_shared_experts
        dense = 3 * H * self.intermediate_size
        layers = sum(attn + 2 * H + (moe if self.is_moe_layer(i) else dense)
                     for i in range(self.num_hidden_layers))
        if include_mtp:  # enorm, hnorm, eh_proj [H, 2H], final_layernorm around an MoE decoder layer
            layers += self.num_nextn_predict_layers * (attn + 2 * H + moe + 3 * H + 2 * H * H)
        emb = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return layers + emb + head + H

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BailingMoeConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> "BailingMoeConfig":
        """Build from an HF ``config.json`` (a path to the file or its directory, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            hf, where = dict(path_or_dict), "<dict>"
        else:
            where = os.fspath(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.exists(where):
                raise ConfigError(f"{where}: no such config file")
            try:
                with open(where) as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: line {e.lineno}: not valid JSON ({e.msg})") from None
        family = family_of_hf(hf)
        if family is None:
            raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, expected 'bailing_moe' or "
                              f"'bailing_moe_v2' (or architectures ['BailingMoeV2ForCausalLM'])")
        names = {f.name for f in dataclasses.fields(cls)} - set(_LINGMOE_ONLY)
        kwargs = {k: v for k, v in hf.items() if k in names}
        if "torch_dtype" not in kwargs and isinstance(hf.get("dtype"), str):  # transformers >= 4.56 writes dtype
            kwargs["torch_dtype"] = hf["dtype"]
        if family == "bailing_moe_v2":
            kwargs = {**_V2_HF_DEFAULTS, **kwargs}
            _check_v2_fields_the_reference_ignores(hf, kwargs, where)
        # Some configs write a list of eos ids; the template stops on the first.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = kwargs.get("eos_token_id", cls.eos_token_id)
        extra = {k: v for k, v in hf.items() if k not in names and k != "model_type"}
        if family == "bailing_moe_v2" and hf.get("model_type"):
            extra["model_type"] = hf["model_type"]  # published V2 configs say "bailing_moe": kept as it was
        try:
            return cls(**{**kwargs, "family": family, **overrides}, extra_hf=extra)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The HF config.json dict: model_type, architectures and auto_map as the published checkpoints
        of the family have them, every architecture field, and for V2 the fields vLLM and SGLang read
        beside the reference's (use_rmsnorm, moe_shared_expert_intermediate_size, score_function,
        router_dtype, moe_router_enable_expert_bias)."""
        fam = self.family
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[fam]], "auto_map": dict(_AUTO_MAP[fam]),
                               "model_type": self.extra_hf.get("model_type") or fam}
        out.update({k: v for k, v in self.extra_hf.items() if k in _PASSTHROUGH_HF_KEYS})
        v1_defaults = {"score_function": "softmax", "moe_router_enable_expert_bias": False}
        for f in dataclasses.fields(self):
            if f.name in _LINGMOE_ONLY:
                continue
            value = getattr(self, f.name)
            if fam == "bailing_moe" and f.name in _V2_FIELDS and value == v1_defaults.get(f.name, f.default):
                continue  # a v1 config.json never had it
            out[f.name] = value
        if fam == "bailing_moe_v2":
            out.update(use_rmsnorm=True, moe_shared_expert_intermediate_size=self.moe_intermediate_size)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ native (our own) form
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BailingMoeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def family_of_hf(hf: dict) -> str | None:
    """'bailing_moe_v2' for a config.json whose architectures name BailingMoeV2ForCausalLM or whose
    model_type is bailing_moe_v2 (vLLM goes by the architectures: the reference writes model_type
    '' and the published V2 configs 'bailing_moe'); 'bailing_moe' for model_type bailing_moe
    otherwise; None for anything else."""
    arch = hf.get("architectures") or []
    arch = arch if isinstance(arch, list) else [arch]
    mt = hf.get("model_type")
    if "BailingMoeV2ForCausalLM" in arch or mt == "bailing_moe_v2":
        return "bailing_moe_v2"
    if mt == "bailing_moe":
        return "bailing_moe"
    return None


def _check_v2_fields_the_reference_ignores(hf: dict, kwargs: dict, where: str) -> None:
    """Fields the V2 reference never reads but serving stacks do: where they would make vLLM/SGLang
    compute something else than the reference, the config is refused rather than guessed at."""
    shared = hf.get("moe_shared_expert_intermediate_size")
    if shared is not None and shared != kwargs["moe_intermediate_size"]:
        raise ConfigError(f"{where}: moe_shared_expert_intermediate_size ({shared}) differs from "
                          f"moe_intermediate_size ({kwargs['moe_intermediate_size']}): the reference sizes the "
                          f"shared expert by moe_intermediate_size, vLLM by the other")
    if hf.get("use_rmsnorm") is False and kwargs.get("use_qk_norm"):
        raise ConfigError(f"{where}: use_rmsnorm false with use_qk_norm: the reference's QK-norm is an RMSNorm")


PRESETS: dict[PresetName, dict[str, Any]] = {
    # The real Ling-lite-1.5 config.json values.
    "ling-lite": {},
    # A model that trains in minutes on a laptop CPU, with every structural feature of Ling-Lite
    # (GQA, top-k routing with renormalisation, shared experts, one dense layer in front).
    "tiny": dict(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=2048, eos_token_id=0, pad_token_id=0, initializer_range=0.02,
        torch_dtype="float32",
    ),
    # Ling 2.0 (BailingMoeV2). Sizes of the public configs: Ling-mini-2.0 is the reference config
    # class's defaults (16.26B parameters, 1.43B active, as the Ling 2.0 report gives them); for
    # Ling-flash-2.0 the count these sizes give, 102,889,697,280 bf16 parameters plus 7,936 fp32
    # expert-bias values (31 MoE layers x 256), is the one its Hugging Face listing states. The
    # published checkpoints ship without MTP layers (num_nextn_predict_layers 0); Ling-mini-2.0's
    # pretraining had one, with an MTP loss factor of 0.1.
    "ling-mini-2.0": dict(
        family="bailing_moe_v2", vocab_size=157184, hidden_size=2048, num_hidden_layers=20,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=5120,
        moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
        first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, use_qk_norm=True,
        partial_rotary_factor=0.5, rope_theta=600000.0, max_position_embeddings=32768,
        eos_token_id=156892, pad_token_id=156892, initializer_range=0.02,
    ),
    "ling-flash-2.0": dict(
        family="bailing_moe_v2", vocab_size=157184, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=9216,
        moe_intermediate_size=1024, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
        first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, use_qk_norm=True,
        partial_rotary_factor=0.5, rope_theta=600000.0, max_position_embeddings=32768,
        eos_token_id=156892, pad_token_id=156892, initializer_range=0.02,
    ),
    # The tiny model with every part of Ling 2.0: sigmoid routing with an expert bias over 4 groups
    # of 4 experts (2 kept), routed scaling, QK-norm, half RoPE and one MTP layer.
    "tiny-v2": dict(
        family="bailing_moe_v2", vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=16,
        num_experts_per_tok=4, num_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, use_qk_norm=True, partial_rotary_factor=0.5, num_nextn_predict_layers=1,
        mtp_loss_scaling_factor=0.1, max_position_embeddings=2048, eos_token_id=0, pad_token_id=0,
        initializer_range=0.02, torch_dtype="float32",
    ),
}
