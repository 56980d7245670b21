"""The BailingMoe (Ling-Lite) model in plain PyTorch, on one device, and text generation for it."""
from moe.config import BailingMoeConfig, ConfigError
from moe.generation import KVCache, generate, generate_stream
from moe.heads import CausalLMOutput, CrossEntropy, Logits, TokenLogps
from moe.model import BailingMoeForCausalLM

__all__ = ["BailingMoeConfig", "ConfigError", "BailingMoeForCausalLM", "CausalLMOutput", "CrossEntropy", "KVCache",
           "Logits", "TokenLogps", "generate", "generate_stream"]
