"""BailingMoeForCausalLM (Ling-Lite, and the Ling 2.0 family) in plain PyTorch, on one device.

Legend: B batch, S sequence, T = B*S tokens, H hidden, E experts, K experts per token, V vocabulary,
D head dim, R rotary dims (D * partial_rotary_factor).

Numerics follow the Hugging Face references (modeling_bailing_moe.py, modeling_bailing_moe_v2.py):
RMSNorm in fp32 then cast back before the weight; RoPE "rotate half" on the first R dims of each
head with fp32 frequencies; one fused query_key_value projection split [heads, kv_heads, kv_heads];
the router as moe/router.py describes it. Parameter names equal the HF checkpoint's except the
routed experts, stacked per layer as ``mlp.experts.w_gate_up`` [E, 2I, H] and ``mlp.experts.w_down``
[E, H, I]; the expert bias is the fp32 buffer ``mlp.gate.expert_bias``.

The Ling 2.0 parts are options of the same classes (moe/config.py): QK-norm (per-head RMSNorm of q
and k before RoPE) and partial RoPE in Attention, sigmoid scoring, expert bias, group-limited top-k
and routed scaling in the router, and MTP layers after the main ones. An MTP layer j (model.layers
at num_hidden_layers + j) takes the embedding of the tokens one further ahead (the ids shifted left,
id 0 entering at the right, as the reference does) and the previous hidden states (the main
trunk's after the final norm, then the previous MTP layer's), each RMSNorm-ed (enorm, hnorm),
concatenated [embedding; hidden] and projected by eh_proj, then runs a decoder layer with an MoE
block and its own final_layernorm; the shared lm_head reads it. Its loss is the cross entropy of
the labels j+1 positions further ahead, shifted within each row (and document), added times
mtp_loss_scaling_factor. The reference shifts the MTP labels a second time across the flattened
batch, so a row's last position predicts a token of the next row: that is not copied
(docs/training.md, "MTP loss").

Packed rows (several documents in one row) are given by ``document_ids`` [B, S] (padding = -1):
attention stays inside a document and ``position_ids`` restart per document. The rotary tables are
built once per forward and shared by every layer.

Incremental decoding passes a ``kv_cache`` (moe.generation.KVCache): each attention layer appends its
new keys/values (after RoPE) to the cache and attends over everything cached; see moe.generation.

A forward is the trunk, then a head. The trunk (BailingMoeModel.forward: embeddings, decoder
layers, final norm) gives the hidden states and each MoE layer's router statistics; the head
(moe.heads: Logits, CrossEntropy, TokenLogps) turns the hidden states into what the caller asked
for; the forward adds the router's loss and counts. The head is an argument of the one forward,
not a method of its own, because of FSDP2 (trainer/parallel.py): the root module's parameters
(embeddings, final norm, lm_head) are gathered by hooks on the root's forward() and on nothing else.
A ``model.token_logps(...)`` method would read them sharded unless every such method were
registered with torch.distributed.fsdp.register_fsdp_forward_method, and a trunk and a head called
one after the other from outside would be two root forwards for one step. Decoder blocks are
untouched by this, so activation checkpointing and torch.compile wrap them as before.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import BailingMoeConfig
from moe.experts import GroupedExperts
from moe.heads import CausalLMOutput, CrossEntropy, Head, Logits, mtp_labels
from moe.losses import load_balancing_loss, router_z_loss, sequence_load_balancing_loss
from moe.router import TopKRouter


@dataclass
class MoEStats:
    """What one MoE layer reports for its router losses and for logging (all small)."""
    probs_sum_E: torch.Tensor  # sum over counted tokens of router probabilities (differentiable)
    counts_E: torch.Tensor  # int64 routed slots per expert over counted tokens
    num_tokens: torch.Tensor  # counted (non-padding) tokens
    z_loss: torch.Tensor  # mean logsumexp^2 over counted tokens (differentiable)
    seq_aux: torch.Tensor | None = None  # sequence-level balance loss, when that form is chosen
    logits: torch.Tensor | None = None  # [B, S, E], only when asked
    topk_ids: torch.Tensor | None = None  # [B, S, K], only when asked


# A pytree node, so wrappers that walk a block's outputs (FSDP2's pre-backward hooks, checkpointing)
# see these tensors: gradients of the router losses reach a block through them.
torch.utils._pytree.register_dataclass(MoEStats)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(position_ids_BS: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, S, R] of the rotary embedding at the given positions (R = the rotated dims)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64,
                                             device=position_ids_BS.device).float() / rope_dim))
    freqs = position_ids_BS.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin on the first R = cos.shape[-1] dims of x, the rest as it is;
    cos/sin broadcast against x (e.g. [B, S, 1, R] over [B, S, h, D])."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot = x[..., :R]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, x[..., R:]], dim=-1)


def attention_kind(implementation: str, device_type: str, packed: bool) -> str:
    """'flex' or 'sdpa' for a forward. 'auto' takes flex for packed rows on CUDA: SDPA would need a
    dense [B, 1, S, S] boolean mask there (268 MB per 16k row, built once and read by every layer)
    and leave the flash kernel; unpacked rows keep SDPA's causal kernel, and CPU keeps SDPA (flex
    has no CPU backward)."""
    if implementation == "auto":
        return "flex" if device_type == "cuda" and packed else "sdpa"
    return implementation


def _repeat_kv_heads(t_BhSD: torch.Tensor, rep: int) -> torch.Tensor:
    """Each kv head repeated for the ``rep`` consecutive query heads it serves."""
    B, h, S, D = t_BhSD.shape
    return t_BhSD[:, :, None].expand(B, h, rep, S, D).reshape(B, h * rep, S, D)


class Attention(nn.Module):
    def __init__(self, cfg: BailingMoeConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:  # one [D] weight each, shared by all heads
            self.query_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.use_qk_norm = cfg.use_qk_norm
        self.dense = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x_BSH, rope_cos_sin, attn_mask, kv_cache=None, layer_idx: int = 0):
        """rope_cos_sin: the (cos, sin) [B, S, 1, R] of rotary_cos_sin, built once per model forward."""
        B, S, _ = x_BSH.shape
        qkv = self.query_key_value(x_BSH).view(B, S, self.nh + 2 * self.nkv, self.hd)
        qk = qkv[:, :, :self.nh + self.nkv]
        if self.use_qk_norm:  # per head, before RoPE
            qk = torch.cat([self.query_layernorm(qk[:, :, :self.nh]), self.key_layernorm(qk[:, :, self.nh:])], dim=2)
        # One rotation for the q and k heads together (elementwise: the same numbers as one each).
        qk = apply_rotary(qk, *rope_cos_sin)
        q, k = qk.split([self.nh, self.nkv], dim=2)
        v = qkv[:, :, self.nh + self.nkv:]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.nkv != self.nh  # each kv head serves nh/nkv consecutive query heads
        if kv_cache is not None:  # keys/values of every earlier position, then these (the mask is explicit)
            k, v = kv_cache.update(layer_idx, k, v)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a flex BlockMask
            o = _flex_attention()(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        elif kv_cache is not None:  # decoding: the mask is explicit (None = every key is visible; SDPA's
            # is_causal would align a short query block top-left); SDPA repeats kv heads itself
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif attn_mask is None:  # SDPA's causal (flash) kernel reads the kv heads as they are
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # With a mask only the memory-efficient and math kernels serve, and on CUDA enable_gqa
            # would send this to the math kernel: repeat the kv heads instead.
            if gqa:
                k, v = _repeat_kv_heads(k, self.nh // self.nkv), _repeat_kv_heads(v, self.nh // self.nkv)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.dense(o.transpose(1, 2).reshape(B, S, self.nh * self.hd))


_FLEX = {}


def _flex_attention():
    """flex_attention, compiled once on CUDA (uncompiled it runs a slow reference path)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX["fn"]


def build_flex_block_mask(B: int, S: int, device, attention_mask=None, document_ids=None):
    """The same rule as build_attention_mask (causal, same document, real keys, a query always sees
    itself) as a block-sparse flex BlockMask: blocks fully outside a document cost nothing."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids
    keep = attention_mask.bool() if attention_mask is not None else None

    def mask_mod(b, h, q, kv):
        ok = q >= kv
        if doc is not None:
            ok = ok & (doc[b, q] == doc[b, kv])
        if keep is not None:
            ok = ok & keep[b, kv]
        return ok | (q == kv)

    return create_block_mask(mask_mod, B, None, S, S, device=device)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, cfg: BailingMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = TopKRouter(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                               cfg.score_function, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                               expert_bias=cfg.moe_router_enable_expert_bias, fp32_logits=cfg.router_dtype == "fp32")
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.expert_backend,
                                      cfg.expert_recompute)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts, cfg.use_bias)
                               if cfg.num_shared_experts > 0 else None)

    def forward(self, x_BSH, token_mask_BS, keep_router_outputs: bool, router_stats: bool = True):
        B, S, H = x_BSH.shape
        x = x_BSH.reshape(B * S, H)
        mask_T = None if token_mask_BS is None else token_mask_BS.reshape(-1)
        r = self.gate(x, mask_T)
        y = self.experts(x, r.topk_ids_TK, r.topk_weights_TK, r.all_counts_E)  # the router's one count
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not router_stats:  # decoding: no router losses, and a step costs a few ops less
            return y.view(B, S, H), None
        probs = r.probs_TE if mask_T is None else r.probs_TE * mask_T[:, None]
        ntok = (torch.tensor(B * S, device=x.device) if mask_T is None else mask_T.sum())
        stats = MoEStats(
            probs_sum_E=probs.sum(0), counts_E=r.counts_E, num_tokens=ntok,
            z_loss=router_z_loss(r.logits_TE, mask_T) if self.cfg.z_loss_coef > 0 else x.new_zeros((), dtype=torch.float32),
        )
        if self.cfg.aux_loss_type == "sequence" and self.cfg.aux_loss_alpha > 0:
            stats.seq_aux = sequence_load_balancing_loss(
                r.probs_TE.view(B, S, -1), r.topk_ids_TK.view(B, S, -1), self.cfg.aux_loss_alpha, token_mask_BS)
        if keep_router_outputs:
            stats.logits = r.logits_TE.view(B, S, -1)
            stats.topk_ids = r.topk_ids_TK.view(B, S, -1)
        return y.view(B, S, H), stats


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BailingMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.is_moe_layer(layer_idx) or layer_idx >= cfg.num_hidden_layers  # an MTP layer is always MoE
        self.mlp = MoEBlock(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)

    def forward(self, h, rope_cos_sin, attn_mask, token_mask, keep_router_outputs: bool = False, kv_cache=None):
        h = h + self.attention(self.input_layernorm(h), rope_cos_sin, attn_mask, kv_cache, self.layer_idx)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEBlock):
            y, stats = self.mlp(x, token_mask, keep_router_outputs, router_stats=kv_cache is None)
            return h + y, stats
        return h + self.mlp(x), None


class MTPLayer(DecoderLayer):
    """A multi-token-prediction layer: [enorm(embedding); hnorm(hidden)] -> eh_proj -> a decoder layer
    (always MoE) -> final_layernorm. Names as the reference's, under model.layers.{num_hidden_layers + j}."""

    def __init__(self, cfg: BailingMoeConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.final_layernorm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, emb, h, rope_cos_sin, attn_mask, token_mask, keep_router_outputs: bool = False):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        x, stats = super().forward(x, rope_cos_sin, attn_mask, token_mask, keep_router_outputs)
        return self.final_layernorm(x), stats


def build_attention_mask(B: int, S: int, device, attention_mask=None, document_ids=None):
    """Boolean [B, 1, S, S] mask (True = may attend), or None for plain causal attention."""
    if attention_mask is None and document_ids is None:
        return None
    idx = torch.arange(S, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None]  # [1, S, S] causal
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    # A query with no visible key (left padding) would softmax over nothing: let it see itself.
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


def build_cached_attention_mask(S: int, past: int, device, attention_mask=None):
    """Boolean [B or 1, 1, S, past + S] mask for S new queries after ``past`` cached positions:
    causal over the absolute positions, real keys only (``attention_mask`` [B, past + S]), and a
    query always sees itself (the rule of build_attention_mask, so a left-padded prompt decodes as
    it would without the cache). None when one query may see every key (S = 1, no padding)."""
    if S == 1 and (attention_mask is None or bool(attention_mask.bool().all())):
        return None
    q = torch.arange(past, past + S, device=device)[:, None]
    kpos = torch.arange(past + S, device=device)[None, :]
    allowed = (kpos <= q)[None]  # [1, S, past + S]
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (kpos == q)[None]
    return allowed[:, None]


def token_and_attention_masks(cfg: BailingMoeConfig, B: int, S: int, device, attention_mask=None,
                              document_ids=None, kv_cache=None):
    """(token_mask, attn_mask) of a forward. token_mask [B, S] bool: the tokens the router statistics
    count (None = all); attn_mask: None (plain causal), a boolean [B, 1, S, keys] or a flex BlockMask."""
    if kv_cache is not None:
        if document_ids is not None or cfg.attn_implementation == "flex":
            raise ValueError("kv_cache works with SDPA attention over unpacked rows (no document_ids, no flex)")
        return None, build_cached_attention_mask(S, kv_cache.length, device, attention_mask)  # decoding keeps no stats
    token_mask = None
    if document_ids is not None:
        token_mask = document_ids >= 0
    if attention_mask is not None:
        token_mask = attention_mask.bool() if token_mask is None else token_mask & attention_mask.bool()
    if attention_kind(cfg.attn_implementation, device.type, document_ids is not None) == "flex":
        return token_mask, build_flex_block_mask(B, S, device, attention_mask, document_ids)
    return token_mask, build_attention_mask(B, S, device, attention_mask, document_ids)


class BailingMoeModel(nn.Module):
    """The trunk: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: BailingMoeConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList([*(DecoderLayer(cfg, i) for i in range(L)),
                                     *(MTPLayer(cfg, L + j) for j in range(cfg.num_nextn_predict_layers))])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                kv_cache=None, output_router_logits: bool = False,
                mtp_depth: int = 0) -> tuple[torch.Tensor, dict[int, MoEStats], list[torch.Tensor]]:
        """The final hidden states [B, S, H] (after the norm), each MoE layer's router statistics by
        layer index (none while decoding) and the hidden states of the first ``mtp_depth`` MTP layers
        (each after its final_layernorm). Arguments as BailingMoeForCausalLM.forward's."""
        cfg = self.config
        B, S = input_ids.shape
        dev = input_ids.device
        token_mask, attn_mask = token_and_attention_masks(cfg, B, S, dev, attention_mask, document_ids, kv_cache)
        if position_ids is None:
            past = 0 if kv_cache is None else kv_cache.length
            position_ids = torch.arange(past, past + S, device=dev)[None].expand(B, S)
        h = self.word_embeddings(input_ids)
        rope = tuple(t[:, :, None] for t in rotary_cos_sin(position_ids, cfg.rope_dim, cfg.rope_theta, h.dtype))
        stats: dict[int, MoEStats] = {}
        for layer in self.layers[:cfg.num_hidden_layers]:
            if kv_cache is None:  # (wrappers such as activation checkpointing see the training signature)
                h, st = layer(h, rope, attn_mask, token_mask, output_router_logits)
            else:
                h, st = layer(h, rope, attn_mask, token_mask, output_router_logits, kv_cache=kv_cache)
            if st is not None:
                stats[layer.layer_idx] = st
        if kv_cache is not None:
            kv_cache.advance(S)
        h = self.norm(h)
        mtp_h, ids, hk = [], input_ids, h
        for layer in self.layers[cfg.num_hidden_layers:cfg.num_hidden_layers + mtp_depth]:
            ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # one further ahead; id 0 enters
            hk, st = layer(self.word_embeddings(ids), hk, rope, attn_mask, token_mask, output_router_logits)
            stats[layer.layer_idx] = st
            mtp_h.append(hk)
        return h, stats, mtp_h


def initial_value(name: str, shape: tuple[int, ...], cfg: BailingMoeConfig, seed: int) -> torch.Tensor:
    """The from-scratch value of one parameter: N(0, initializer_range) for matrices, output
    projections (attention dense, MLP/expert down) scaled by 1/sqrt(2 x layers) so the residual
    stream's variance does not grow with depth, ones for norms, zeros for biases.

    Each parameter's generator is seeded from (seed, name), so a model initialised whole, or shard by
    shard on any number of ranks, gets the same values."""
    if name.endswith(("layernorm.weight", ".enorm.weight", ".hnorm.weight")) or name == "model.norm.weight":
        return torch.ones(shape)
    if name.endswith((".bias", "expert_bias")):  # expert_bias: a buffer, zero from scratch
        return torch.zeros(shape)
    std = cfg.initializer_range
    if name.endswith(("dense.weight", "down_proj.weight", "w_down")):
        std = std / math.sqrt(2 * cfg.num_hidden_layers)
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(h)) * std


class BailingMoeForCausalLM(nn.Module):
    def __init__(self, config: BailingMoeConfig):
        super().__init__()
        self.config = config
        self.model = BailingMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """From-scratch init (see ``initial_value``); ``seed=None`` draws one from torch's RNG."""
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)))
        for name, p in self.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), self.config, seed))
        for name, b in self.named_buffers():
            b.copy_(initial_value(name, tuple(b.shape), self.config, seed))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, *, head: Head | None = None, kv_cache=None,
                balance_counts_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                output_router_logits: bool = False) -> CausalLMOutput:
        """The trunk over the tokens, then ``head`` (moe.heads), then the router's loss and counts.

        input_ids [B, S]; attention_mask [B, S] (1 = real token) and/or document_ids [B, S] (packed
        rows, -1 = padding); position_ids [B, S] (default 0..S-1); labels [B, S] unshifted, -100 =
        ignored (position i's logits predict labels[i+1]), for the heads that need them.
        head: default Logits() without labels, CrossEntropy() (logits and mean loss) with them.
        kv_cache (moe.generation.KVCache) decodes incrementally: input_ids are the tokens after the
        ``kv_cache.length`` cached ones, attention_mask [B, cached + S] covers both, position_ids
        default to cached..cached+S-1; the cache grows by S. Decoding keeps no router statistics.
        balance_counts_fn (aux_loss_type 'global') maps the local expert counts [L_moe, E] to the counts
        the balance loss uses: the trainer's sums them over data-parallel ranks and over the step's
        micro-batches so far (moe.losses.CarriedCounts); without one, 'global' counts locally.
        output_router_logits adds each MoE layer's router logits and top-k ids to the output.
        MTP layers (config num_nextn_predict_layers, mtp_enabled) run when labels are given to a head
        that asks for them (CrossEntropy's ``mtp``): their cross entropies land in mtp_ce_sums /
        mtp_num_label_tokens / mtp_losses, and ``loss`` includes them times mtp_loss_scaling_factor.
        """
        if head is None:
            head = Logits() if labels is None else CrossEntropy()
        cfg = self.config
        mtp = cfg.num_nextn_predict_layers if (cfg.mtp_enabled and labels is not None and kv_cache is None
                                               and getattr(head, "mtp", False)) else 0
        h, stats, mtp_h = self.model(input_ids, attention_mask, position_ids, document_ids, kv_cache,
                                     output_router_logits, mtp)
        w = self._head_weight()
        out = head(h, w, labels)
        if mtp_h:
            self._mtp_losses(out, head, mtp_h, w, labels, document_ids)
        if stats:
            out.aux_loss = self._router_loss(stats, balance_counts_fn)
            out.expert_counts = {i: s.counts_E for i, s in stats.items()}
            if output_router_logits:
                out.router_logits = {i: s.logits for i, s in stats.items()}
                out.topk_ids = {i: s.topk_ids for i, s in stats.items()}
        return out

    def _mtp_losses(self, out: CausalLMOutput, head, mtp_h: list[torch.Tensor], w: torch.Tensor,
                    labels: torch.Tensor, document_ids: torch.Tensor | None) -> None:
        """Each MTP layer's cross entropy through the same head, on the labels j+1 further ahead
        (moe.heads.mtp_labels); loss becomes the main loss + mtp_loss_scaling_factor x their sum."""
        for j, hj in enumerate(mtp_h, start=1):
            o = head(hj, w, mtp_labels(labels, j, document_ids))
            out.mtp_ce_sums.append(o.ce_sum)
            out.mtp_num_label_tokens.append(o.num_label_tokens)
            out.mtp_losses.append(o.loss)
            if o.logits is not None:
                out.mtp_logits.append(o.logits)
        out.loss = out.loss + self.config.mtp_loss_scaling_factor * sum(out.mtp_losses)

    def _head_weight(self) -> torch.Tensor:
        w = self.lm_head.weight
        if self.config.norm_head:  # the reference normalises each hidden dimension's column
            w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-7)
        return w

    def _router_loss(self, stats: dict[int, MoEStats], balance_counts_fn) -> torch.Tensor:
        cfg = self.config
        layers = list(stats.values())
        total = layers[0].probs_sum_E.new_zeros((), dtype=torch.float32)
        if cfg.aux_loss_alpha > 0 and cfg.aux_loss_type in ("micro", "global"):
            counts = torch.stack([s.counts_E for s in layers])  # [L, E]
            if cfg.aux_loss_type == "global" and balance_counts_fn is not None:
                counts = balance_counts_fn(counts)
            probs_sum = torch.stack([s.probs_sum_E for s in layers])
            ntok = torch.stack([s.num_tokens for s in layers])
            total = total + load_balancing_loss(probs_sum, ntok[:, None], counts, cfg.aux_loss_alpha).sum()
        elif cfg.aux_loss_alpha > 0 and cfg.aux_loss_type == "sequence":
            total = total + sum(s.seq_aux for s in layers)
        if cfg.z_loss_coef > 0:
            total = total + cfg.z_loss_coef * sum(s.z_loss for s in layers)
        return total
