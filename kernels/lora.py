"""What an expert backend receives for LoRA: the routed experts' low-rank adapters, beside the
frozen stacked weights.

Legend: E experts, H hidden, I expert width, r the adapter rank.

Each routed expert's three projections get an adapter pair, as PEFT gives each per-expert
nn.Linear of the reference code one (A [r, in], B [out, r]). They are stacked per layer in the
layout of the frozen weights:

  a_gate_up [E, 2r, H]  rows [:r] gate_proj's A, rows [r:] up_proj's A
  b_gate_up [E, 2I, r]  rows [:I] gate_proj's B, rows [I:] up_proj's B  (rows as in w_gate_up)
  a_down    [E, r, I]   down_proj's A
  b_down    [E, H, r]   down_proj's B

and each projection computes  W x + scale * B (A dropout(x)),  dropout drawn per routed row and per
projection (PEFT's gate_proj and up_proj have a dropout each), on the rows the backend already
sorted for the frozen GEMM. No backend ever forms W + scale * B A: that would cost a weight-sized
temporary per expert and a weight-sized gradient. The triton backend (kernels/moe_mlp.py) adds the
adapters' products inside its grouped GEMMs' accumulators and draws no dropout (it refuses p > 0).

A leaf like the rest of kernels/: torch only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ExpertLoRA"]


class ExpertLoRA(NamedTuple):
    a_gate_up: torch.Tensor  # [E, 2r, H]
    b_gate_up: torch.Tensor  # [E, 2I, r]
    a_down: torch.Tensor  # [E, r, I]
    b_down: torch.Tensor  # [E, H, r]
    scale: float  # alpha / r
    dropout: float = 0.0  # probability on A's input; 0 outside training

    @property
    def rank(self) -> int:
        return self.a_down.shape[1]

    def check(self, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor) -> None:
        """Shapes against the frozen weights they adapt (a mistake here would broadcast silently)."""
        E, I2, H = w_gate_up_E2IH.shape
        r = self.rank
        want = {"a_gate_up": (E, 2 * r, H), "b_gate_up": (E, I2, r), "a_down": (E, r, I2 // 2),
                "b_down": (E, H, r)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"LoRA {name} must be {list(shape)} for w_gate_up {list(w_gate_up_E2IH.shape)}, "
                                 f"got {list(got)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
