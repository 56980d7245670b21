"""The BailingMoe (Ling-Lite) model in plain PyTorch, on one device, and text generation for it."""
from moe.config import BailingMoeConfig, ConfigError
from moe.generation import KVCache, generate, generate_stream
from moe.model import BailingMoeForCausalLM, CausalLMOutput

__all__ = ["BailingMoeConfig", "ConfigError", "BailingMoeForCausalLM", "CausalLMOutput", "KVCache", "generate",
           "generate_stream"]
