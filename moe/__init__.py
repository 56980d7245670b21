"""The BailingMoe (Ling-Lite) model in plain PyTorch, on one device."""
from moe.config import BailingMoeConfig, ConfigError
from moe.model import BailingMoeForCausalLM, CausalLMOutput

__all__ = ["BailingMoeConfig", "ConfigError", "BailingMoeForCausalLM", "CausalLMOutput"]
