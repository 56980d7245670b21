"""Triton grouped-GEMM kernels for MoE expert MLPs (forward and backward).

Legend used across the package: T tokens, E experts, K top-k, H hidden, I expert width,
N = T*K routed rows; tensor-name suffixes spell shapes (x_TH, w_gate_up_E2IH, w_down_EHI).

A leaf package: it imports torch and triton only. Importing it launches nothing; to run the
kernels on a CPU set TRITON_INTERPRET=1 before triton is first imported.
"""
from .moe_mlp import moe_mlp
from .routing import Routing, build_routing

__all__ = ["moe_mlp", "build_routing", "Routing"]
