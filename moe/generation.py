"""Text generation: a key/value cache, incremental decoding, greedy and sampled next tokens.

Legend: B batch rows, S prompt length, L cached length, D head dim, V vocabulary.

    ids = moe.generate(model, input_ids, attention_mask, max_new_tokens=64)       # greedy, [B, S + new]

Prompts are left-padded (attention_mask 0 on the left); position ids count real tokens only, so a row
decodes exactly as it would alone. The prompt runs once (prefill) and fills a KVCache; each further
step runs one token per row against it. ``use_cache=False`` reruns the whole sequence every step
instead (the slow path the cache is checked and timed against).

Stopping: a row ends at an end-of-sequence id (kept in the output) or when its generated text
contains one of ``stop_strings`` (needs ``tokenizer``); later positions of an ended row hold the pad
id, and decoding stops when every row has ended or after ``max_new_tokens``: Hugging Face's
``generate`` conventions, so the output can be compared with it token for token.

Sampling (``do_sample=True``): logits / temperature, then top-k (keep the k largest, ties included),
then top-p (keep the smallest set of most likely tokens whose probability reaches p), then a draw
from a torch.Generator seeded with ``seed``: the same seed gives the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from moe.heads import Logits


class KVCache:
    """Per-layer keys and values [B, kv_heads, max_len, D], filled left to right.

    ``length`` positions are filled. During one forward every attention layer calls ``update`` with its
    new keys/values (written at ``length``) and gets back everything cached so far; the model then
    calls ``advance`` once."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k_BhSD: torch.Tensor, v_BhSD: torch.Tensor):
        S = k_BhSD.shape[2]
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {self.length} filled + {S} new do not fit")
        self.k[layer_idx][:, :, self.length:end] = k_BhSD
        self.v[layer_idx][:, :, self.length:end] = v_BhSD
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# ---------------------------------------------------------------------------------------- sampling
def filter_logits(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with the tokens that top-k / top-p exclude set to -inf (after dividing by temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    x = logits_BV.float() / temperature
    neg = torch.finfo(x.dtype).min
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, neg)
    if top_p < 1.0:
        probs, order = torch.sort(x.softmax(-1), dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, neg)
    return x


def next_tokens(logits_BV: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Step:
    """One decoding step: the token each row gets (the pad id for rows that had ended) and which rows
    have ended (after this token)."""
    tokens_B: torch.Tensor
    ended_B: torch.Tensor


def _eos_set(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _check_prompt(input_ids, attention_mask):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("prompts must be left-padded: attention_mask has a 0 after a 1 in some row")
    if bool((m.sum(1) == 0).any()):
        raise ValueError("a prompt row has no real token (attention_mask all 0)")
    return m


@torch.inference_mode()
def generate_stream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                    pad_token_id: int | None = None, stop_strings: Sequence[str] | None = None, tokenizer=None,
                    use_cache: bool = True) -> Iterator[Step]:
    """Yield one Step per generated position; see ``generate`` for the arguments."""
    mask = _check_prompt(input_ids, attention_mask)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (anything with .decode(ids)) to read the generated text")
    eos = _eos_set(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    B, S = input_ids.shape
    device = input_ids.device
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, B, S + max_new_tokens, device, dtype) if use_cache else None
        # The mask of every position there will be, filled with 1 ahead (HF's convention: an ended row
        # keeps attending to the pad tokens it is fed; they change nothing that is returned).
        full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
        padded = not bool(mask.all())  # without padding the model needs no mask (plain causal attention)
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # real tokens before each position
        ended = torch.zeros(B, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        new: list[list[int]] = [[] for _ in range(B)]
        ids, feed = input_ids, input_ids  # the sequence so far, and what the next forward runs
        last = Logits(last_only=True)  # the next token needs the last position's logits only
        for t in range(max_new_tokens):
            L = S + t
            if use_cache:
                logits = model(feed, attention_mask=full_mask[:, :L] if padded else None, position_ids=pos,
                               kv_cache=cache, head=last).logits[:, -1]
            elif padded:
                all_pos = (full_mask[:, :L].cumsum(1) - 1).clamp_min(0)
                logits = model(ids, attention_mask=full_mask[:, :L], position_ids=all_pos, head=last).logits[:, -1]
            else:
                logits = model(ids, head=last).logits[:, -1]
            tok = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(ended, torch.full_like(tok, pad), tok)
            now_ended = (ended | torch.isin(tok, eos_t)) if eos else ended.clone()
            if stop_strings:
                for i in range(B):
                    if not ended[i]:
                        new[i].append(int(tok[i]))
                        text = tokenizer.decode(new[i])
                        if any(s in text for s in stop_strings):
                            now_ended[i] = True
            ended = now_ended
            yield Step(tok, ended.clone())
            if bool(ended.all()):
                return
            feed = tok[:, None]
            pos = pos[:, -1:] + 1
            if not use_cache:
                ids = torch.cat([ids, feed], 1)
    finally:
        model.train(was_training)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None, *,
             pad_token_id: int | None = None, stop_strings: Sequence[str] | None = None, tokenizer=None,
             use_cache: bool = True) -> torch.Tensor:
    """Continue left-padded prompts; returns [B, S + new] ids (prompt, then the generated tokens; after a
    row ends, the pad id), new <= max_new_tokens.

    input_ids [B, S]; attention_mask [B, S] (1 = real token, 0 = left padding; default all real).
    do_sample False = greedy; else temperature / top_k (0 = off) / top_p (1.0 = off) and ``seed``
    (None: torch's global generator). eos_token_id: an id or a list of ids (default the model config's;
    [] = never stop early). pad_token_id: default the config's. stop_strings end a row once its
    generated text (``tokenizer.decode``) contains one. use_cache=False recomputes the whole prefix
    every step (for checks and timing only)."""
    steps = [s.tokens_B for s in generate_stream(
        model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, seed,
        pad_token_id, stop_strings, tokenizer, use_cache)]
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, 1)], 1)
