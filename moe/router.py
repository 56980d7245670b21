"""Top-k softmax router of a BailingMoe layer.

Legend: T tokens, E experts, K experts per token, H hidden size.

The router's top-k choice can be *recorded* on the first forward and *replayed* when activation
checkpointing recomputes the block, so the recomputed forward routes every token exactly as the
original did even if a recomputed logit differs in its last bit (a flipped tie would otherwise send
gradients through an expert that never saw the token). The replay state lives on the router module
itself and is toggled by the context managers below, never by a global switch.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.routing import expert_counts


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # router logits in the input dtype (what the reference returns)
    probs_TE: torch.Tensor  # fp32 softmax over all E experts
    topk_ids_TK: torch.Tensor  # int64 expert ids, ordered by probability (descending)
    topk_weights_TK: torch.Tensor  # fp32 combine weights (renormalised when norm_topk_prob)
    counts_E: torch.Tensor  # int64 slots routed to each expert over the kept tokens (balance loss, load)
    all_counts_E: torch.Tensor  # int64 slots per expert over every token, padding too (the experts' tables)


def kept_and_all_counts(topk_ids_TK: torch.Tensor, num_experts: int,
                        token_mask_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed slots per expert over the kept tokens and over all tokens, int64 [E] each, from ONE
    histogram. The experts compute every routed row, padding too, so their sorted tables need the
    second, while the router statistics count real tokens only. A dropped token's slots go to bins
    E..2E-1 of a [2E] histogram: kept = bins[:E], all = kept + bins[E:]. Without a mask the two
    are the same tensor."""
    if token_mask_T is None:
        counts = expert_counts(topk_ids_TK, num_experts)
        return counts, counts
    dropped_T1 = (~token_mask_T.bool()).reshape(-1, 1).to(topk_ids_TK.dtype)
    both = expert_counts(topk_ids_TK + num_experts * dropped_T1, 2 * num_experts).view(2, num_experts)
    return both[0], both[0] + both[1]


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Recorded top-k ids for activation-checkpoint recompute (see module docstring).
        self._mode: str | None = None
        self._saved: deque[torch.Tensor] = deque()

    def forward(self, x_TH: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> RouterOutput:
        logits = F.linear(x_TH, self.weight)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        # Ids come from topk, weights from gather, in every mode: the recompute then runs the same ops
        # (checkpointing checks that saved tensors match) and only the ids are swapped in on replay.
        if self._mode == "replay" and self._saved:
            topk_ids = self._saved.popleft()
        else:
            topk_ids = torch.topk(probs.detach(), self.top_k, dim=-1).indices
            if self._mode == "record":
                self._saved.append(topk_ids)
        topk_w = probs.gather(-1, topk_ids)
        if self.norm_topk_prob and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        counts, all_counts = kept_and_all_counts(topk_ids, self.num_experts, token_mask_T)
        return RouterOutput(logits, probs, topk_ids, topk_w, counts, all_counts)


@contextlib.contextmanager
def _router_mode(module: nn.Module, mode: str):
    routers = [m for m in module.modules() if isinstance(m, TopKRouter)]
    for r in routers:
        r._mode = mode
    try:
        yield
    finally:
        for r in routers:
            r._mode = None


def checkpoint_context_fn(module: nn.Module):
    """``context_fn`` for ``torch.utils.checkpoint``: record routing in forward, replay it in recompute."""
    return _router_mode(module, "record"), _router_mode(module, "replay")
