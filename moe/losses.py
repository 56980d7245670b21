"""Router losses (load balancing, z-loss) and a memory-bounded cross entropy.

Legend: T tokens, E experts, K experts per token, B sequences, V vocabulary.

Load balancing, top-k Switch/GShard form: f_i = count_i / (K*T) is the fraction of routed slots that
went to expert i, P_i the mean router probability of expert i, and L = alpha * E * sum_i f_i * P_i.
Perfect balance (f_i = P_i = 1/E) gives exactly alpha; every token sending its K slots to the same K
experts with all probability on them gives alpha * E / K, the maximum.

Global-batch balancing (Qwen, arXiv 2501.11873; Megatron's global_aux_loss) forms f_i from counts
summed over the data-parallel ranks and over the micro-batches of the optimizer step while P_i stays
local and differentiable: callers pass ``counts_E`` from wherever they summed them, and
``CarriedCounts`` keeps the running sum over a step's micro-batches (micro-batch m sees the counts of
micro-batches 1..m, as Megatron carries them forward: the last one sees the whole step's).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .router import expert_counts


def load_balancing_loss(probs_sum_E: torch.Tensor, num_tokens: torch.Tensor | int,
                        counts_E: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * E * sum_i f_i * P_i with P_i = probs_sum_E / num_tokens and f_i = counts_E / counts_E.sum().

    ``counts_E.sum()`` equals K * T for the tokens counted, so f_i = count_i / (K*T) without passing K.
    Returns 0 when no token was counted (an all-padding micro-batch).
    """
    E = probs_sum_E.shape[-1]
    dt = torch.promote_types(probs_sum_E.dtype, torch.float32)  # at least fp32
    counts = counts_E.to(dt)
    total = counts.sum(-1, keepdim=True)
    f = counts / total.clamp_min(1)
    P = probs_sum_E.to(dt) / torch.as_tensor(num_tokens, dtype=dt, device=probs_sum_E.device).clamp_min(1)
    return alpha * E * (f * P).sum(-1)


class CarriedCounts:
    """The counts global-batch balancing uses: each call adds a micro-batch's counts, reduced over the
    data-parallel ranks by ``reduce``, to those of the step's earlier micro-batches and returns the
    running total. ``reset()`` at the start of every optimizer step. (Megatron keeps the running mean
    and divides by the micro-batch's token count; f_i = count_i / sum(counts) is the same fraction
    when micro-batches hold equally many tokens, and the exact one when padding makes them differ.)"""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.reduce = reduce
        self.total: torch.Tensor | None = None

    def reset(self) -> None:
        self.total = None

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        c = self.reduce(counts) if self.reduce is not None else counts
        self.total = c if self.total is None else self.total + c
        return self.total


def topk_load_balancing_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, alpha: float) -> torch.Tensor:
    """Micro-batch form straight from router outputs (all T tokens counted)."""
    E = probs_TE.shape[-1]
    return load_balancing_loss(probs_TE.sum(0), probs_TE.shape[0], expert_counts(topk_ids_TK, E), alpha)


def sequence_load_balancing_loss(probs_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor, alpha: float,
                                 mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise form: the loss per sequence, averaged over sequences with any token."""
    B, S, E = probs_BSE.shape
    if mask_BS is None:
        mask_BS = torch.ones(B, S, dtype=torch.bool, device=probs_BSE.device)
    m = mask_BS.to(torch.float32)
    probs_sum = (probs_BSE.float() * m[..., None]).sum(1)  # [B, E]
    # Each sequence's routed slots per expert over its kept tokens: a scatter-add into [B, E] (no [B, S, E]
    # one-hot, and nothing read back to the host). Whole numbers below 2^24 are exact in fp32.
    K = topk_ids_BSK.shape[-1]
    kept = m[..., None].expand(B, S, K).reshape(B, S * K)
    counts = probs_BSE.new_zeros(B, E, dtype=torch.float32).scatter_add_(1, topk_ids_BSK.reshape(B, S * K), kept)
    ntok = m.sum(1)  # [B]
    per_seq = load_balancing_loss(probs_sum, ntok[:, None], counts, alpha)  # [B]
    has = ntok > 0
    return (per_seq * has).sum() / has.sum().clamp_min(1)


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, in fp32."""
    z = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    if mask_T is None:
        return z.mean()
    m = mask_T.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1)


def _ce_sum_chunk(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h_NH, w_VH).float()
    return F.cross_entropy(logits, labels_N, ignore_index=-100, reduction="sum")


def chunked_cross_entropy_sum(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor,
                              chunk_size: int = 4096) -> torch.Tensor:
    """Sum of token cross entropies without holding [N, V] fp32 logits: each chunk's logits are
    recomputed in backward (Ling-Lite's V=126464 makes full logits 0.5 GB per 1k tokens in fp32)."""
    total = h_NH.new_zeros((), dtype=torch.float32)
    for s in range(0, h_NH.shape[0], chunk_size):
        lab = labels_N[s:s + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum_chunk, h_NH[s:s + chunk_size], w_VH, lab, use_reentrant=False)
        else:
            total = total + _ce_sum_chunk(h_NH[s:s + chunk_size], w_VH, lab)
    return total


def _token_logps_chunk(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(F.linear(h_NH, w_VH).float(), dim=-1)
    valid = labels_N != -100
    picked = logp.gather(-1, labels_N.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


def chunked_token_logps(h_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor,
                        chunk_size: int = 4096) -> torch.Tensor:
    """log p(label) per token (0 where the label is -100), chunked and recomputed like the cross entropy."""
    outs = []
    for s in range(0, h_NH.shape[0], chunk_size):
        args = (h_NH[s:s + chunk_size], w_VH, labels_N[s:s + chunk_size])
        outs.append(checkpoint(_token_logps_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _token_logps_chunk(*args))
    return torch.cat(outs)
