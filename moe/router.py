"""The router of a BailingMoe layer: top-k over softmax (v1) or sigmoid (v2) scores.

Legend: T tokens, E experts, K experts per token, H hidden size, G expert groups.

    logits  = x W^T                         (in fp32 when router_dtype is "fp32", as the v2 reference)
    scores  = softmax(logits) | sigmoid(logits), fp32
    choice  = scores + expert_bias          (the bias only chooses; DeepSeek-V3's aux-loss-free balancing)
    groups  : the E experts in G contiguous groups, a group scored by the sum of its top-2 choice
              values; the topk_group best groups stay, the others' experts are out (n_group > 1)
    ids     = top-k of the choice values among the experts left, descending
    weights = the UNBIASED scores of those ids, divided by their sum (+1e-20) when norm_topk_prob
              and K > 1, times routed_scaling_factor

Ties between groups go to the lower group index (a stable sort). The expert bias is an fp32 buffer,
never a parameter: no gradient and no optimizer state. Trainers move it between steps by
``expert_bias_update``, with the step's expert counts over every rank and micro-batch.

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
    logits_TE: torch.Tensor  # router logits (what the reference returns; fp32 with router_dtype "fp32")
    probs_TE: torch.Tensor  # fp32 probabilities over all E experts for the balance loss: the softmax, or the
    #                         sigmoid scores divided by their sum (Megatron's and DeepSeek-V3's form for sigmoid)
    topk_ids_TK: torch.Tensor  # int64 expert ids, ordered by (biased) score, descending
    topk_weights_TK: torch.Tensor  # fp32 combine weights (renormalised when norm_topk_prob, then scaled)
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


def group_limited_choice(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``choice_TE`` with the experts outside each token's topk_group best groups set to -inf. A group
    is scored by the sum of its two largest values; ties between groups go to the lower index."""
    T, E = choice_TE.shape
    grouped = choice_TE.view(T, n_group, E // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    return grouped.masked_fill(~allowed[:, :, None], float("-inf")).view(T, E)


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 score_function: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, expert_bias: bool = False, fp32_logits: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.score_function, self.n_group, self.topk_group = score_function, n_group, topk_group
        self.routed_scaling_factor, self.fp32_logits = routed_scaling_factor, fp32_logits
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A saved buffer in fp32 whatever the model's dtype (bf16 rounding would swallow updates of 1e-3
        # to a bias near 1); moe.model keeps it fp32 through .to(dtype) and the loaders never cast it.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32) if expert_bias else None)
        # Recorded top-k ids for activation-checkpoint recompute (see module docstring).
        self._mode: str | None = None
        self._saved: deque[torch.Tensor] = deque()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts buffers too: the bias comes back fp32 from its old value
        # (never from a rounded copy), on the device the cast chose.
        old = self._buffers.get("expert_bias")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("expert_bias")
        if old is not None and new is not None and new.dtype != torch.float32:
            self._buffers["expert_bias"] = old.to(device=new.device, dtype=torch.float32)
        return out

    def scores(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, fp32 scores) of every expert."""
        logits = F.linear(x_TH.float(), self.weight.float()) if self.fp32_logits else F.linear(x_TH, self.weight)
        if self.score_function == "sigmoid":
            return logits, torch.sigmoid(logits.float())
        return logits, logits.softmax(dim=-1, dtype=torch.float32)

    def choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """int64 [T, K]: the chosen experts, by biased score within the allowed groups, descending."""
        choice = scores_TE.detach()
        if self.expert_bias is not None:
            choice = choice + self.expert_bias.float()
        if self.n_group > 1:
            choice = group_limited_choice(choice, self.n_group, self.topk_group)
        return torch.topk(choice, self.top_k, dim=-1).indices

    def forward(self, x_TH: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> RouterOutput:
        logits, scores = self.scores(x_TH)
        # Ids come from topk, weights from gather, in every mode: the recompute then runs the same ops
        # (checkpointing checks that saved tensors match) and only the ids are swapped in on replay.
        if self._mode == "replay" and self._saved:
            topk_ids = self._saved.popleft()
        else:
            topk_ids = self.choose(scores)
            if self._mode == "record":
                self._saved.append(topk_ids)
        topk_w = scores.gather(-1, topk_ids)
        if self.norm_topk_prob and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            topk_w = topk_w * self.routed_scaling_factor
        probs = scores if self.score_function == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        counts, all_counts = kept_and_all_counts(topk_ids, self.num_experts, token_mask_T)
        return RouterOutput(logits, probs, topk_ids, topk_w, counts, all_counts)


def expert_bias_update(counts_E: torch.Tensor, rate: float, zero_mean: bool) -> torch.Tensor:
    """The change of an expert bias after a step: rate * sign(mean load - load), per expert (DeepSeek-V3,
    Megatron's moe_router_bias_update_rate), ``counts_E`` ([..., E]) the routed slots of the whole
    step (every rank, every micro-batch). ``zero_mean`` subtracts the change's mean over experts
    (Ling 2.0's pretraining), so the bias as a whole does not drift. fp32, same shape as counts_E."""
    load = counts_E.to(torch.float32)
    delta = rate * torch.sign(load.mean(-1, keepdim=True) - load)
    if zero_mean:
        delta = delta - delta.mean(-1, keepdim=True)
    return delta


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
