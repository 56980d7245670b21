"""Plain-PyTorch MoE expert MLPs: the per-expert loop reference and the sorted grouped-GEMM MLP.

Legend: T tokens, E experts, K top-k, H hidden, I expert width, N = T*K routed rows.
Weights are stored [out, in] like nn.Linear: w_gate_up_E2IH rows [:I] are gate_proj and rows
[I:] are up_proj; w_down_EHI is down_proj.

y[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, k].

With ``lora`` (kernels.lora.ExpertLoRA) each projection adds scale * B (A dropout(x)) per expert:
the loop computes it expert by expert, the grouped MLP with grouped GEMMs over the same sorted
rows as the frozen weights. Neither forms W + scale * B A.

These are the project's only copies of each: the model's "loop" and "torch" expert backends
(moe/experts.py) call them, the kernel tests and the bench compare the Triton kernels with them,
and the bench times them as "loop" and "grouped_mm". They live here, below the model, because
kernels/ imports nothing of ours: the bench can then time the model's own torch backend without an
upward import. Importing this module imports no kernel.

Both functions compute their matmuls in the input dtype and combine the K outputs in fp32; give
them fp32 inputs for an fp32 reference. Both are differentiable through ordinary autograd.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .lora import ExpertLoRA
from .routing import expert_counts

__all__ = ["loop_moe_mlp", "grouped_mm_moe_mlp", "grouped_mm_available"]


def _dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


def _loop_lora(x_NH, a_RH, b_OR, lora: ExpertLoRA) -> torch.Tensor:
    """scale * B (A dropout(x)) of one projection of one expert, in PEFT's order of operations."""
    return (_dropped(x_NH, lora.dropout) @ a_RH.t()) @ b_OR.t() * lora.scale


def loop_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E=None,
                 lora: ExpertLoRA | None = None):
    """Per-expert loop: the most obvious correct implementation, kept deliberately simple.

    It uses only indexing, matmul and index_add, none of which share code with the Triton path or
    the grouped path. The loop over experts is a Python loop with a data-dependent gather (host sync).
    ``counts_E`` is accepted for the backends' common signature and not used: the loop finds each
    expert's rows itself.
    """
    T, H = x_TH.shape
    I = w_gate_up_E2IH.shape[1] // 2
    if lora is not None:
        lora.check(w_gate_up_E2IH, w_down_EHI)
        r = lora.rank
    y = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    for e in range(w_gate_up_E2IH.shape[0]):
        tok, slot = torch.where(topk_ids_TK == e)
        if tok.numel() == 0:
            continue
        xs = x_TH[tok]
        gu = xs @ w_gate_up_E2IH[e].t()
        if lora is not None:
            a, b = lora.a_gate_up[e].to(xs.dtype), lora.b_gate_up[e].to(xs.dtype)
            gu = gu + torch.cat([_loop_lora(xs, a[:r], b[:I], lora), _loop_lora(xs, a[r:], b[I:], lora)], dim=1)
        h = F.silu(gu[:, :I]) * gu[:, I:]
        o = h @ w_down_EHI[e].t()
        if lora is not None:
            o = o + _loop_lora(h, lora.a_down[e].to(h.dtype), lora.b_down[e].to(h.dtype), lora)
        out = o.float() * topk_weights_TK[tok, slot, None].float()
        y = y.index_add(0, tok, out)
    return y.to(x_TH.dtype)


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward AND backward for this device type and dtype (probed once).

    The op exists on CPU builds too (torch 2.13 runs it in fp32 and bf16), and not every build has
    it for every device and dtype, so the exact pair is tried rather than assumed."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The first call can come from inside a checkpointed block: identity saved-tensor hooks keep the
    # probe's tensors out of the checkpoint's record (else the recompute, which skips the probe,
    # would save fewer tensors than the forward did), and grad is forced on for its backward, even
    # under inference_mode (decoding runs there; a failed probe would stay cached for the process).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.inference_mode(False), \
            torch.enable_grad():
        try:
            a = torch.randn(32, 16, device=device_type, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
            out = torch._grouped_mm(a, b, offs=offs)
            # A dense upstream gradient, as the MLP below gives it (CPU's backward rejects a stride-0
            # one, e.g. that of a bare .sum(), which this MLP never produces).
            out.backward(torch.randn_like(out))
            ref = torch.cat([a[:16] @ b[0], a[16:] @ b[1]])
            return bool(torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2))
        except Exception:  # not built for this device/dtype: the caller falls back to segment matmuls
            return False


def _segments(x_NK: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The segment sizes must come to the host (one sync); the Triton kernels never do this.
    return torch.split(x_NK, counts_E.tolist())


def _grouped_matmul(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor,
                    offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, expert e's rows times w[e]; one kernel when _grouped_mm can."""
    if torch.compiler.is_compiling() and x_NK.dtype != torch.bfloat16:
        # _grouped_mm's fake-tensor rule accepts bf16 only, whatever the device runs, and the
        # segment loop's host read would break the graph: an opaque op keeps the block one graph.
        return grouped_matmul_op(x_NK, w_EKO, counts_E, offs_E)
    if grouped_mm_available(x_NK.device.type, x_NK.dtype):
        return torch._grouped_mm(x_NK, w_EKO, offs=offs_E)
    return torch.cat([p @ w_EKO[e] for e, p in enumerate(_segments(x_NK, counts_E))])


@torch.library.custom_op("lingmoe::grouped_matmul", mutates_args=())
def grouped_matmul_op(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor,
                      offs_E: torch.Tensor) -> torch.Tensor:
    """_grouped_matmul's eager path as one op for compiled blocks (fake rule: [N, O])."""
    if grouped_mm_available(x_NK.device.type, x_NK.dtype):
        return torch._grouped_mm(x_NK, w_EKO, offs=offs_E)
    return torch.cat([p @ w_EKO[e] for e, p in enumerate(_segments(x_NK, counts_E))])


@grouped_matmul_op.register_fake
def _(x_NK, w_EKO, counts_E, offs_E):
    return x_NK.new_empty(x_NK.shape[0], w_EKO.shape[-1])


@torch.library.custom_op("lingmoe::grouped_matmul_wgrad", mutates_args=())
def grouped_matmul_wgrad_op(x_NK: torch.Tensor, dy_NO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """dW [E, K, O]: expert e's rows of x transposed times its rows of dy (zeros for an empty expert)."""
    pairs = zip(_segments(x_NK, counts_E), _segments(dy_NO, counts_E))
    return torch.stack([a.t() @ b for a, b in pairs])


@grouped_matmul_wgrad_op.register_fake
def _(x_NK, dy_NO, counts_E):
    return x_NK.new_empty(counts_E.shape[0], x_NK.shape[1], dy_NO.shape[1])


def _grouped_matmul_setup(ctx, inputs, output):
    x_NK, w_EKO, counts_E, offs_E = inputs
    ctx.save_for_backward(x_NK, w_EKO, counts_E, offs_E)


def _grouped_matmul_backward(ctx, dy_NO):
    x_NK, w_EKO, counts_E, offs_E = ctx.saved_tensors
    dy_NO = dy_NO.contiguous()
    dx = grouped_matmul_op(dy_NO, w_EKO.transpose(1, 2), counts_E, offs_E) if ctx.needs_input_grad[0] else None
    dw = grouped_matmul_wgrad_op(x_NK, dy_NO, counts_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None


grouped_matmul_op.register_autograd(_grouped_matmul_backward, setup_context=_grouped_matmul_setup)


def _pad_rank(a_ERK: torch.Tensor, b_EOR: torch.Tensor, parts: int, dtype: torch.dtype):
    """The adapters in ``dtype`` with each of their ``parts`` rank blocks padded with zeros to a
    multiple of 16 bytes: _grouped_mm wants every stride of its operands 16-byte aligned, and a rank
    of 1 (or 4 in bf16) would not be. A zero row of A meets a zero column of B, so the products are
    the same numbers, and the padding's gradient is cut off by the slice."""
    a, b = a_ERK.to(dtype), b_EOR.to(dtype)
    r = a.shape[1] // parts
    multiple = max(1, 16 // a.element_size())
    pad = -r % multiple
    if pad == 0:
        return a, b
    E, O, K = b.shape[0], b.shape[1], a.shape[2]
    a = torch.cat([t for blk in a.split(r, dim=1) for t in (blk, a.new_zeros(E, pad, K))], dim=1)
    return a, torch.cat([b, b.new_zeros(E, O, pad)], dim=2)


def _grouped_lora(x_NK, a_ERK, b_EOR, counts, offs, lora: ExpertLoRA, parts: int) -> torch.Tensor:
    """scale * B_e (A_e dropout(x)) for every sorted row x of expert e, by grouped GEMMs. ``parts``
    adapters side by side (gate and up: 2): A's rank blocks in order, B's output rows split evenly."""
    a, b = _pad_rank(a_ERK, b_EOR, parts, x_NK.dtype)
    rp = a.shape[1] // parts
    a_blocks, b_blocks = a.split(rp, dim=1), b.split(b.shape[1] // parts, dim=1)
    if lora.dropout > 0:  # a mask per projection, as PEFT's per-projection dropout modules draw them
        u = [_grouped_matmul(F.dropout(x_NK, lora.dropout), ab.transpose(1, 2), counts, offs) for ab in a_blocks]
    else:
        u = _grouped_matmul(x_NK, a.transpose(1, 2), counts, offs).split(rp, dim=1)
    outs = [_grouped_matmul(ui, bb.transpose(1, 2), counts, offs) for ui, bb in zip(u, b_blocks)]
    return (outs[0] if parts == 1 else torch.cat(outs, dim=1)) * lora.scale


def grouped_mm_moe_mlp(x_TH, w_gate_up_E2IH, w_down_EHI, topk_ids_TK, topk_weights_TK, counts_E=None,
                       lora: ExpertLoRA | None = None):
    """Routed slots sorted by expert once, then two grouped GEMMs (torch._grouped_mm where this
    build runs it for the device and dtype, else one matmul per expert segment). The K outputs of a
    token are combined by an unsort and a sum in a fixed order: deterministic, no index_add atomics.
    ``counts_E`` [E]: slots per expert (``expert_counts(topk_ids_TK, E)``) when the caller has them;
    None counts here. ``lora``: the experts' adapters, as grouped GEMMs over the same sorted rows: one
    A GEMM for gate and up together (two when dropout draws their masks apart) and a B GEMM each,
    then an A and a B GEMM for down."""
    T, H = x_TH.shape
    E, I2, _ = w_gate_up_E2IH.shape
    K = topk_ids_TK.shape[1]
    I = I2 // 2
    flat = topk_ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot index (t*K + k) in expert order
    # with _grouped_mm, the whole MLP runs without a host sync
    counts = expert_counts(topk_ids_TK, E) if counts_E is None else counts_E
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x_TH[order // K]
    gu = _grouped_matmul(xs, w_gate_up_E2IH.transpose(1, 2), counts, offs)
    if lora is not None:
        lora.check(w_gate_up_E2IH, w_down_EHI)
        gu = gu + _grouped_lora(xs, lora.a_gate_up, lora.b_gate_up, counts, offs, lora, parts=2)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    out = _grouped_matmul(h, w_down_EHI.transpose(1, 2), counts, offs)
    if lora is not None:
        out = out + _grouped_lora(h, lora.a_down, lora.b_down, counts, offs, lora, parts=1)
    out = out.float() * topk_weights_TK.reshape(-1)[order, None].float()
    # Unsort by scattering rows back to their slot, then sum the K slots of each token in order.
    unsorted = torch.empty_like(out).index_copy(0, order, out)
    return unsorted.view(T, K, H).sum(1).to(x_TH.dtype)
