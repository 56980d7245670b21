"""Memory per GPU and communication per step for FSDP-only and FSDP+EP layouts, and a recommendation.

    python -m trainer.tools.plan --model ling-lite --gpus 16 --gpu-memory-gib 80 --seq-len 4096 --micro-batch 1
    python -m trainer.tools.plan --model ling-mini-2.0 --gpus 8      (Ling 2.0: ling-mini-2.0, ling-flash-2.0)
    python -m trainer.tools.plan --model path/to/config.json ...     (an HF config.json or its directory)
    python -m trainer.tools.plan --model ling-lite --gpus 1 --lora-rank 8       (LoRA: --lora.rank 8)
    python -m trainer.tools.plan --model ling-lite --gpus 2 --offload all       (--parallel.offload all)

Parameter counts are exact (the model is built on the meta device). Everything else is an estimate
of the largest terms, with these assumptions:
  - sharded state: fp32 master weights, fp32 gradients, AdamW's two fp32 moments, over all ranks
    (experts are split over ep x edp = all ranks too);
  - gathered working set: two blocks in the compute dtype (the current one and FSDP2's prefetch)
    plus one block's unsharded gradient in fp32; under EP a block holds only E/ep routed experts;
  - activations: the tensors autograd keeps per token and layer (the main ones: norms, qkv,
    attention output, residuals, router probabilities, the K routed rows through the expert MLP,
    the shared expert, the fp32 combine), times the micro-batch's tokens; with activation
    checkpointing only each block's input plus one block recomputed; plus one 4096-token chunk of
    fp32 logits and their gradient;
  - all-to-all buffers: send, receive, return and unsort of one block's T*K rows (balanced routing);
  - communication (bytes each GPU sends): FSDP all-gathers in forward and backward per micro-batch
    and one reduce-scatter per step; EP's four exchanges per MoE block and micro-batch (six with
    activation checkpointing, whose recompute repeats the forward's two).
MTP layers (Ling 2.0 configs with num_nextn_predict_layers) count as MoE blocks like the others,
with one more chunk of logits each.
  - LoRA (--lora-rank R, adapter counts exact from the meta model): frozen weights sharded in the
    compute dtype with no gradient and no optimizer state, the adapters as fp32 masters with fp32
    gradients and AdamW state; the gathered blocks in the compute dtype plus one block's adapter
    gradient; activations as full training's plus each adapter's rank-R intermediate (autograd
    keeps the adapters' inputs, which the frozen products then no longer need to keep); the
    reduce-scatter carries the adapters' gradients only.
  - offload (--offload): 'optimizer' moves AdamW's two moments to host memory; 'all' (FSDP2's CPU
    offload) moves the parameter shards, their gradients and the moments; host_gib is what each GPU's
    process then holds in host memory. Host <-> GPU copies are not counted as communication.
Not counted: the CUDA context and allocator slack (a few GiB), temporary buffers inside kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from data.errors import BadInputError, exit_on_error
from moe.config import BailingMoeConfig
from moe.lora import TARGETS, LoraSpec, apply_lora, is_adapter_name, parse_targets
from moe.model import BailingMoeForCausalLM

GIB = 2 ** 30
CE_CHUNK = 4096
OFFLOADS = ("none", "optimizer", "all")


@dataclass
class Layout:
    name: str
    ep: int
    activation_checkpointing: bool
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    gathered_gib: float
    activations_gib: float
    all_to_all_gib: float
    total_gib: float
    fsdp_comm_gib_per_step: float
    all_to_all_comm_gib_per_step: float
    fits: bool
    offload: str = "none"
    host_gib: float = 0.0
    lora_rank: int = 0


def load_config(model: str) -> BailingMoeConfig:
    if os.path.isdir(model) or model.endswith(".json"):
        return BailingMoeConfig.from_hf(model)
    return BailingMoeConfig.preset(model)


def param_counts(cfg: BailingMoeConfig) -> dict:
    """Exact counts from a meta-device model: total, routed experts, the largest block without its
    routed experts (and its routed experts), the root (embeddings, norm, head)."""
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.w_gate_up", "experts.w_down")))
    blocks = []
    for layer in model.model.layers:
        r = sum(p.numel() for n, p in layer.named_parameters() if n.endswith(("experts.w_gate_up", "experts.w_down")))
        blocks.append((sum(p.numel() for p in layer.parameters()) - r, r))
    root = total - sum(a + b for a, b in blocks)
    return dict(total=total, routed=routed, blocks=blocks, root=root)


def lora_counts(cfg: BailingMoeConfig, spec: LoraSpec) -> dict:
    """Exact adapter parameter counts (meta-device model): in all, per block, per target."""
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    apply_lora(model, spec)
    kinds = {"attention": ".attention.", "shared_experts": ".shared_experts.", "experts": ".mlp.experts.lora",
             "dense_mlp": ".mlp."}
    per_target = dict.fromkeys(spec.targets, 0)
    for n, p in model.named_parameters():
        if is_adapter_name(n):
            per_target[next(t for t, k in kinds.items() if t in spec.targets and k in n)] += p.numel()
    blocks = [sum(p.numel() for n, p in layer.named_parameters() if is_adapter_name(n)) for layer in model.model.layers]
    return dict(total=sum(blocks), blocks=blocks, per_target=per_target)


def _lora_bytes_per_token(cfg: BailingMoeConfig, layer_idx: int, spec: LoraSpec, act_bytes: int) -> float:
    """What autograd keeps of a layer's adapters per token: each adapted projection's rank-R intermediate."""
    r, n = spec.rank, 0
    if "attention" in spec.targets:
        n += 2
    if cfg.is_moe_layer(layer_idx):
        n += 3 * cfg.num_experts_per_tok if "experts" in spec.targets else 0
        n += 3 if "shared_experts" in spec.targets and cfg.num_shared_experts else 0
    elif "dense_mlp" in spec.targets:
        n += 3
    return act_bytes * r * n


def activation_bytes_per_token(cfg: BailingMoeConfig, layer_idx: int, act_bytes: int) -> float:
    H, K, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_experts
    attn = 4 * H + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
        + 2 * cfg.num_attention_heads * cfg.head_dim
    if not cfg.is_moe_layer(layer_idx):
        return act_bytes * (attn + 3 * cfg.intermediate_size)
    I, Is = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.num_shared_experts
    moe = act_bytes * (K * (2 * H + 3 * I) + 3 * Is) + 4 * (K * H + 2 * E)
    return act_bytes * attn + moe


def plan(cfg: BailingMoeConfig, gpus: int, gpu_memory_gib: float, seq_len: int, micro_batch: int,
         accumulation: int = 1, ep: int = 1, activation_checkpointing: bool = False,
         compute_bytes: int = 2, lora: LoraSpec | None = None, offload: str = "none") -> Layout:
    if gpus % ep or cfg.num_experts % ep:
        raise BadInputError(f"ep {ep} must divide the GPUs ({gpus}) and the routed experts ({cfg.num_experts})")
    if offload not in OFFLOADS:
        raise BadInputError(f"offload {offload!r} is not one of {', '.join(OFFLOADS)}")
    if lora is not None and ep > 1:
        raise BadInputError("LoRA runs with ep 1 only (the trainer refuses LoRA with expert parallelism)")
    c = param_counts(cfg)
    N, edp, T = gpus, gpus // ep, seq_len * micro_batch
    unit = max([rest + routed / ep for rest, routed in c["blocks"]] + [c["root"]])
    if lora is None:
        trained = c["total"]
        params = 4 * c["total"] / N
        gathered = unit * (2 * compute_bytes + 4)
    else:  # frozen in the compute dtype, adapters as fp32 masters; one block's adapter gradient unsharded
        lc = lora_counts(cfg, lora)
        trained = lc["total"]
        params = (compute_bytes * (c["total"] - trained) + 4 * trained) / N
        gathered = unit * 2 * compute_bytes + 4 * max(lc["blocks"])
    grads, optim = 4 * trained / N, 8 * trained / N
    per_layer = [activation_bytes_per_token(cfg, i, compute_bytes) * T for i in range(cfg.num_all_layers)]
    if lora is not None:
        per_layer = [a + _lora_bytes_per_token(cfg, i, lora, compute_bytes) * T for i, a in enumerate(per_layer)]
    if activation_checkpointing:
        acts = compute_bytes * cfg.hidden_size * T * cfg.num_all_layers + max(per_layer)
    else:
        acts = sum(per_layer)
    acts += (1 + cfg.num_nextn_predict_layers) * 2 * 4 * min(CE_CHUNK, T) * cfg.vocab_size
    rows = T * cfg.num_experts_per_tok * cfg.hidden_size * compute_bytes
    a2a = 4 * rows if ep > 1 else 0.0
    rest = c["total"] - c["routed"]
    sent = rest * (N - 1) / N + c["routed"] / ep * (edp - 1) / edp  # parameters each GPU sends a share of
    reduced = sent if lora is None else trained * (N - 1) / N
    fsdp = accumulation * 2 * compute_bytes * sent + 4 * reduced
    exchanges = 6 if activation_checkpointing else 4
    moe_blocks = cfg.num_moe_layers + cfg.num_nextn_predict_layers
    a2a_comm = accumulation * moe_blocks * exchanges * rows * (ep - 1) / ep
    host = {"none": 0.0, "optimizer": optim, "all": params + grads + optim}[offload]
    total = params + grads + optim + gathered + acts + a2a - host
    name = ("FSDP" if ep == 1 else f"FSDP+EP{ep}") + (f" LoRA r{lora.rank}" if lora is not None else "")
    name += (" +AC" if activation_checkpointing else "") + ("" if offload == "none" else f" +off:{offload}")
    return Layout(name, ep, activation_checkpointing,
                  params / GIB, grads / GIB, optim / GIB, gathered / GIB, acts / GIB, a2a / GIB, total / GIB,
                  fsdp / GIB, a2a_comm / GIB, total / GIB <= 0.9 * gpu_memory_gib, offload, host / GIB,
                  lora.rank if lora is not None else 0)


def recommend(layouts: list[Layout]) -> Layout | None:
    """The layout that fits (90% of the memory) with the least communication, without offload when
    one fits without it (host copies every step), then without activation checkpointing when one
    fits without it (recompute costs a third more compute)."""
    fitting = [lay for lay in layouts if lay.fits]
    if not fitting:
        return None
    least = min(OFFLOADS.index(lay.offload) for lay in fitting)
    fitting = [lay for lay in fitting if OFFLOADS.index(lay.offload) == least]
    no_ac = [lay for lay in fitting if not lay.activation_checkpointing]
    pool = no_ac or fitting
    return min(pool, key=lambda lay: (lay.fsdp_comm_gib_per_step + lay.all_to_all_comm_gib_per_step, lay.total_gib))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m trainer.tools.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ling-lite", help="preset name (ling-lite, ling-mini-2.0, ling-flash-2.0, ...), "
                                                        "or an HF config.json (or its directory)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job, all nodes together")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU in GiB (default %(default)s: H100 80GB); a layout fits if its estimate is below it")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row (data.seq_len; default %(default)s)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="rows per micro-batch on each GPU (data.micro_batch_size; default %(default)s): sets the activations")
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per step (default %(default)s): scales the all-to-all volume per step, not the memory")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default %(default)s); the EP degrees considered divide it, so the all-to-all stays inside a node")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="plan a LoRA run of this rank (--lora.rank; default %(default)s = full training)")
    p.add_argument("--lora-target", default="all", help="--lora.target (default %(default)s)")
    p.add_argument("--offload", default="auto", choices=("auto",) + OFFLOADS,
                   help="--parallel.offload to consider: auto (default: each of none, optimizer, all; offload only "
                        "where nothing fits without it) or one of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    cfg = load_config(a.model)
    if a.lora_rank < 0:
        raise BadInputError(f"--lora-rank must be >= 0, got {a.lora_rank}")
    spec = LoraSpec(rank=a.lora_rank, targets=parse_targets(a.lora_target)) if a.lora_rank else None
    eps = [e for e in range(1, min(a.gpus, a.gpus_per_node) + 1)
           if a.gpus % e == 0 and a.gpus_per_node % e == 0 and cfg.num_experts % e == 0 and (spec is None or e == 1)]
    offloads = OFFLOADS if a.offload == "auto" else (a.offload,)
    layouts = [plan(cfg, a.gpus, a.gpu_memory_gib, a.seq_len, a.micro_batch, a.accumulation, ep, ac,
                    lora=spec, offload=off) for off in offloads for ac in (False, True) for ep in eps]
    if a.offload == "auto" and any(lay.fits for lay in layouts if lay.offload == "none"):
        layouts = [lay for lay in layouts if lay.offload == "none"]
    best = recommend(layouts)
    result = {"layouts": [asdict(lay) for lay in layouts], "recommended": best.name if best else None}
    if spec is not None:
        lc = lora_counts(cfg, spec)
        result["lora"] = {"rank": spec.rank, "alpha": spec.lora_alpha, "targets": list(spec.targets),
                          "adapter_params": lc["total"], "adapter_params_per_target": lc["per_target"],
                          "frozen_params": param_counts(cfg)["total"] - lc["total"]}
    if a.json:
        print(json.dumps(result, indent=2))
        return result
    if spec is not None:
        lo = result["lora"]
        print(f"LoRA rank {spec.rank}, alpha {spec.lora_alpha:g}, on {', '.join(spec.targets)}: "
              f"{lo['adapter_params'] / 1e6:.1f}M adapter parameters ("
              + ", ".join(f"{t} {n / 1e6:.1f}M" for t, n in lo["adapter_params_per_target"].items())
              + f"), {lo['frozen_params'] / 1e9:.2f}B frozen parameters, stored in the compute dtype")
    cols = ["params", "grads", "optimizer", "gathered", "activations", "all_to_all", "total", "host"]
    width = max(16, max(len(lay.name) for lay in layouts) + 2)
    print(f"{'layout':<{width}}" + "".join(f"{c:>12}" for c in cols) + f"{'fsdp comm':>12}{'a2a comm':>12}  fits")
    for lay in layouts:
        d = asdict(lay)
        print(f"{lay.name:<{width}}" + "".join(f"{d[c + '_gib']:>12.2f}" for c in cols)
              + f"{lay.fsdp_comm_gib_per_step:>12.2f}{lay.all_to_all_comm_gib_per_step:>12.2f}  {lay.fits}")
    print("GiB per GPU (host: held in host memory per GPU, outside the total); communication in GiB each GPU "
          "sends per step")
    print(f"recommended: {best.name}" if best else
          "recommended: none fits; use more GPUs, a shorter sequence or a smaller micro-batch, offload (--offload), "
          "or LoRA (--lora-rank 8)")
    return result


if __name__ == "__main__":
    with exit_on_error():
        main(sys.argv[1:])
