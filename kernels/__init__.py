"""Triton grouped-GEMM kernels for MoE expert MLPs (forward and backward), and their plain-PyTorch
references (kernels.reference).

Legend used across the package: T tokens, E experts, K top-k, H hidden, I expert width,
N = T*K routed rows; tensor-name suffixes spell shapes (x_TH, w_gate_up_E2IH, w_down_EHI).

A leaf package: it imports torch and triton only. Importing it launches nothing, and the kernel
modules are imported (their @triton.jit decoration run) only when ``kernels.triton_moe_mlp`` is first
used, so the model can use kernels.reference without deciding anything about Triton. To run the
kernels on a CPU set TRITON_INTERPRET=1 before that first use.
"""
from .routing import RoutingTables, build_routing

__all__ = ["triton_moe_mlp", "build_routing", "RoutingTables"]


def __getattr__(name):
    if name == "triton_moe_mlp":  # the Triton op: imports triton (and decorates the kernels) on first use
        from .moe_mlp import triton_moe_mlp

        globals()["triton_moe_mlp"] = triton_moe_mlp  # later lookups skip this hook
        return triton_moe_mlp
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
