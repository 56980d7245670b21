"""BailingMoeConfig: the model's one configuration, with presets and Hugging Face config.json conversion.

Field names follow the Hugging Face ``bailing_moe`` config.json so that ``from_hf``/``to_hf`` are a
rename-free copy; the fields that only this project has (expert backend, router loss coefficients)
are grouped at the end and are not written into an HF config.
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
PresetName = Literal["ling-lite", "tiny"]  # the keys of PRESETS (tests/test_configs.py checks they agree)
EXPERT_BACKENDS = get_args(ExpertBackend)
AUX_LOSS_TYPES = get_args(AuxLossType)

# HF keys we read but that change nothing in the computation (dropouts are 0 in every release,
# sliding-window attention is off for bailing_moe); kept so a round trip preserves them.
_PASSTHROUGH_HF_KEYS = (
    "embedding_dropout", "output_dropout", "attention_dropout", "norm_softmax", "pretraining_tp",
    "output_router_logits", "use_sliding_window", "sliding_window", "max_window_layers",
    "use_cache", "transformers_version", "bos_token_id", "auto_map",
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
    # --- lingmoe only (never written to an HF config) ---
    expert_backend: str = "torch"  # "loop" (reference) | "torch" (sorted, grouped) | "triton"
    expert_recompute: bool = False  # keep no expert gate/up activations for backward; recompute them there
    attn_implementation: str = "auto"  # "auto" (flex for packed rows on CUDA, else SDPA) | "sdpa" | "flex"
    aux_loss_type: str = "micro"  # "micro" (per micro-batch) | "global" (counts given by the caller) | "sequence" | "none"
    aux_loss_alpha: float = 1e-3  # top-k load balancing; perfect balance contributes exactly alpha per layer
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE), ~1e-3 when used
    extra_hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
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

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count; ``active_only`` counts K routed experts per MoE layer instead of all E."""
        H, I, hd = self.hidden_size, self.moe_intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = H * (q + 2 * kv) + q * H
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
        mt = hf.get("model_type")
        if mt != "bailing_moe":
            raise ConfigError(f"{where}: model_type is {mt!r}, expected 'bailing_moe'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra_hf"}
        kwargs = {k: v for k, v in hf.items() if k in names}
        # Some configs write a list of eos ids; the template stops on the first.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = kwargs.get("eos_token_id", cls.eos_token_id)
        extra = {k: v for k, v in hf.items() if k not in names and k != "model_type"}
        try:
            return cls(**{**kwargs, **overrides}, extra_hf=extra)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The HF config.json dict (model_type, architectures and auto_map as the published checkpoint)."""
        out: dict[str, Any] = {
            "architectures": ["BailingMoeForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                "AutoModel": "modeling_bailing_moe.BailingMoeModel",
                "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM",
            },
            "model_type": "bailing_moe",
        }
        out.update({k: v for k, v in self.extra_hf.items() if k in _PASSTHROUGH_HF_KEYS})
        for f in dataclasses.fields(self):
            if f.name in ("expert_backend", "expert_recompute", "attn_implementation", "aux_loss_type",
                          "aux_loss_alpha", "z_loss_coef", "extra_hf"):
                continue
            out[f.name] = getattr(self, f.name)
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
}
