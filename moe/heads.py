"""Heads: what a forward of BailingMoeForCausalLM computes from the final hidden states.

Legend: B batch, S sequence, H hidden, V vocabulary.

    model(ids, attention_mask=m)                                   # Logits(): [B, S, V]
    model(ids, attention_mask=m, labels=labels)                    # CrossEntropy(): logits and mean loss
    model(ids, document_ids=d, position_ids=p, labels=labels,
          head=CrossEntropy(chunk_size=4096))                      # SFT: summed CE, no [B, S, V] logits
    model(ids, attention_mask=m, labels=labels, head=TokenLogps())  # DPO: log p of every label token
    model(ids, kv_cache=cache, head=Logits(last_only=True))        # decoding: the last position only

A head is a small frozen value handed to the model's forward, which runs the trunk and then calls
the head with the final hidden states and the lm_head weight (normalised when the config says
norm_head). Heads hold no parameters and call no module: see moe/model.py for why every mode goes
through the one forward. Labels are unshifted, -100 = ignored: position i predicts labels[i+1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from moe.losses import chunked_cross_entropy_sum, chunked_token_logps

# Tokens per chunk of the chunked heads: a [4096, V] fp32 logits block at a time (2 GB at
# Ling-Lite's V = 126464), recomputed in backward.
CHUNK_TOKENS = 4096


@dataclass
class CausalLMOutput:
    """What a forward returns: the head's fields, and the router's when the forward had MoE layers
    and was not decoding."""
    logits: torch.Tensor | None = None  # [B, S, V] ([B, 1, V] from Logits(last_only=True))
    loss: torch.Tensor | None = None  # ce_sum / num_label_tokens
    ce_sum: torch.Tensor | None = None  # summed token cross entropy (trainers normalise globally)
    num_label_tokens: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None  # [B, S] fp32 log p(labels[i+1] | ..i), 0 where ignored
    # MTP layer j (1-based) predicts labels[i + j + 1] at position i: its summed CE, label count, mean
    # (unscaled) and logits (when the head returns logits), one entry per MTP layer run.
    mtp_ce_sums: list = field(default_factory=list)
    mtp_num_label_tokens: list = field(default_factory=list)
    mtp_losses: list = field(default_factory=list)
    mtp_logits: list = field(default_factory=list)
    aux_loss: torch.Tensor | None = None  # weighted balance loss (summed over MoE layers) + z-loss
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, S, E], when asked
    topk_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, S, K], when asked
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] int64


class Head(Protocol):
    def __call__(self, h_BSH: torch.Tensor, w_VH: torch.Tensor,
                 labels_BS: torch.Tensor | None) -> CausalLMOutput: ...


def next_token_labels(labels_BS: torch.Tensor) -> torch.Tensor:
    """[B*S]: the label position i is trained on, labels[i+1]; a row's last position has none (-100)."""
    B = labels_BS.shape[0]
    return torch.cat([labels_BS[:, 1:], labels_BS.new_full((B, 1), -100)], dim=1).reshape(-1)


def mtp_labels(labels_BS: torch.Tensor, depth: int, document_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S]: the labels an MTP layer of ``depth`` (1, 2, ..) is trained on, in the form a head takes
    (unshifted): shifted ``depth`` further left within each row (-100 enters at the right), so the
    head's own shift makes position i predict labels[i + depth + 1]. Never across rows (the
    reference's flattened second shift does that) and, in packed rows, never across documents."""
    B, S = labels_BS.shape
    k = min(depth, S)
    out = torch.cat([labels_BS[:, k:], labels_BS.new_full((B, k), -100)], dim=1)
    if document_ids_BS is not None:
        # the head reads out[i + 1] = labels[i + depth + 1] for position i: same document, or nothing
        ahead = torch.cat([document_ids_BS[:, k:], document_ids_BS.new_full((B, k), -2)], dim=1)
        same = torch.ones_like(out, dtype=torch.bool)
        same[:, 1:] = document_ids_BS[:, :-1] == ahead[:, 1:]
        out = out.masked_fill(~same, -100)
    return out


def _needs_labels(head, labels_BS) -> torch.Tensor:
    if labels_BS is None:
        raise ValueError(f"the {type(head).__name__} head needs labels")
    return next_token_labels(labels_BS)


@dataclass(frozen=True)
class Logits:
    """logits [B, S, V]. last_only: [B, 1, V] of the last position, all a decoding step reads (a
    prompt's other B*(S-1)*V logits would be computed for nothing)."""
    last_only: bool = False

    def __call__(self, h_BSH, w_VH, labels_BS=None) -> CausalLMOutput:
        return CausalLMOutput(logits=F.linear(h_BSH[:, -1:] if self.last_only else h_BSH, w_VH))


@dataclass(frozen=True)
class CrossEntropy:
    """Token cross entropy in fp32: ce_sum, num_label_tokens and loss = their ratio.

    chunk_size None: from the full [B, S, V] logits, which are returned too (the Hugging Face-like
    call). A number: that many tokens at a time, each chunk's logits recomputed in backward and none
    returned, since full fp32 logits cost 0.5 GB per 1k tokens at Ling-Lite's vocabulary.
    mtp: the model's MTP layers (when it has them and they are enabled) add their loss too."""
    chunk_size: int | None = None
    mtp: bool = True

    def __call__(self, h_BSH, w_VH, labels_BS) -> CausalLMOutput:
        labels_N = _needs_labels(self, labels_BS)
        B, S, H = h_BSH.shape
        out = CausalLMOutput()
        if self.chunk_size is None:
            out.logits = F.linear(h_BSH, w_VH)
            out.ce_sum = F.cross_entropy(out.logits.reshape(B * S, -1).float(), labels_N, ignore_index=-100,
                                         reduction="sum")
        else:
            out.ce_sum = chunked_cross_entropy_sum(h_BSH.reshape(B * S, H), w_VH, labels_N, self.chunk_size)
        out.num_label_tokens = (labels_N != -100).sum()
        out.loss = out.ce_sum / out.num_label_tokens.clamp_min(1)
        return out


@dataclass(frozen=True)
class TokenLogps:
    """token_logps [B, S] fp32: log p(labels[i+1] | tokens ..i), 0 where ignored (DPO sums them
    per answer), chunk_size tokens at a time; no logits returned."""
    chunk_size: int = CHUNK_TOKENS

    def __call__(self, h_BSH, w_VH, labels_BS) -> CausalLMOutput:
        labels_N = _needs_labels(self, labels_BS)
        B, S, H = h_BSH.shape
        logps_N = chunked_token_logps(h_BSH.reshape(B * S, H), w_VH, labels_N, self.chunk_size)
        return CausalLMOutput(token_logps=logps_N.view(B, S).clone())  # FSDP2 hooks outputs; a view would lose it
