"""The training loop SFT and DPO share: build -> shard -> (resume) -> steps -> checkpoints -> export.

A task (trainer/sft.py, trainer/dpo.py) supplies the data loader and the loss of one micro-batch;
everything else lives here once: model construction on the meta device, FSDP2, the optimizer and
schedule, gradient accumulation with global normalisation, non-finite step skipping, checkpoints,
SIGTERM, logging and the final HF export.

Normalisation: a task's loss is a SUM over its units (trained tokens for SFT, pairs for DPO). The
step first counts the units of all its micro-batches on all ranks (N), then each micro-batch
backpropagates  sum_local * W / N  (FSDP averages gradients over the W ranks, so the step's gradient
is that of  sum_all / N) plus  aux / A  (the router loss averaged over the A micro-batches and the
ranks). The update is therefore the same however the step is split into micro-batches and ranks.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Protocol

import torch
import torch.distributed as dist

from moe.config import BailingMoeConfig
from moe.model import BailingMoeForCausalLM, initial_value
from trainer import parallel
from trainer.checkpoint import Checkpointer, latest_checkpoint
from trainer.metrics import RunLogger, format_metrics
from trainer.optim import build_optimizer, build_scheduler
from trainer.options import Options, dump_yaml

# Dense bf16 matmul peaks measured on the lent GPUs (benchmarks); used for MFU when not configured.
MEASURED_PEAK_TFLOPS = {"H100": 798.0, "H200": 790.0}


class Task(Protocol):
    name: str

    def adjust_model_config(self, opts: Options, cfg: BailingMoeConfig) -> BailingMoeConfig: ...
    def build_loader(self, opts: Options, info: parallel.DistInfo, accum: int, cfg: BailingMoeConfig): ...
    def before_training(self, ctx: "StepContext") -> None: ...
    def count(self, batch: dict) -> torch.Tensor: ...
    def micro_step(self, ctx: "StepContext", batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict]: ...


@dataclasses.dataclass
class StepContext:
    opts: Options
    info: parallel.DistInfo
    model: BailingMoeForCausalLM
    cfg: BailingMoeConfig
    accum: int
    logger: RunLogger
    denom: torch.Tensor | None = None  # the step's global unit count N
    balance_counts_fn: object = None


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def model_config_from_options(opts: Options, device: torch.device) -> tuple[BailingMoeConfig, object]:
    """The model config and a ``get_value(name, param, rows)`` for its initial weights (None: from scratch)."""
    m = opts.model
    backend = resolve_backend(m.expert_backend, device)
    aux_type = {"global": "micro", "micro": "micro", "sequence": "sequence", "none": "none"}.get(m.aux_loss_type)
    if aux_type is None:
        raise SystemExit(f"error: model.aux_loss_type {m.aux_loss_type!r} is not one of global, micro, sequence, none")
    extra = dict(expert_backend=backend, aux_loss_type=aux_type, z_loss_coef=m.z_loss_coef,
                 aux_loss_alpha=0.0 if m.aux_loss_type == "none" else m.aux_loss_alpha, **m.overrides)
    if not m.init_from:
        cfg = BailingMoeConfig.preset(m.preset, **extra)
        return cfg, None
    from checkpoints_convert import CheckpointError, open_checkpoint

    try:  # HF or native, validated (names, shapes, shard files) before anything is allocated
        ckpt = open_checkpoint(m.init_from, **extra)
    except CheckpointError as e:
        raise SystemExit(f"error: model.init_from: {e}") from None
    return ckpt.cfg, lambda name, p, rows: ckpt.get_native(name, rows=rows)


def build_model(opts: Options, info: parallel.DistInfo, task: Task) -> tuple[BailingMoeForCausalLM, BailingMoeConfig]:
    cfg, get_full = model_config_from_options(opts, info.device)
    cfg = task.adjust_model_config(opts, cfg)
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    if opts.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[opts.model.param_dtype] \
        if info.device.type == "cuda" else None
    parallel.shard_model(model, info.mesh, param_dtype, compile_blocks=opts.model.compile)
    if get_full is None:
        seed = opts.train.seed
        def get_full(name, p, rows):
            full = initial_value(name, tuple(p.shape), cfg, seed)
            return full if rows is None else full[rows[0]:rows[1]]
    parallel.materialize(model, info.device, get_full)
    return model, cfg


def flops_per_token(cfg: BailingMoeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (no embedding lookup) + causal attention."""
    active = cfg.num_params(active_only=True) - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len  # 12*L*d*S/2 (causal)
    return 6.0 * active + attn


def _peak_tflops(opts: Options, device: torch.device) -> float:
    if opts.train.peak_tflops > 0:
        return opts.train.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in MEASURED_PEAK_TFLOPS.items():
            if k in name:
                return v
    return 0.0


class _StopFlag:
    def __init__(self):
        self.requested = False
        self._old = None

    def install(self):
        def handler(signum, frame):
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. under some test runners)
            self._old = None

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _grad_norm(model, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def run(task: Task, opts: Options, shutdown: bool = True) -> dict:
    """Train; returns a summary (last metrics, checkpoint path). Rank 0 logs. ``shutdown=False`` keeps
    the process group for a following run in the same processes (the DPO demo's SFT warm-up)."""
    try:
        info = parallel.init_distributed(opts.train.device)
    except parallel.DeviceError as e:
        raise SystemExit(f"error: {e}") from None
    stop = _StopFlag()
    logger = None
    try:
        torch.manual_seed(opts.train.seed)
        os.makedirs(opts.output_dir, exist_ok=True)
        W, B = info.world_size, opts.data.micro_batch_size
        if opts.train.global_batch_size % (B * W):
            raise SystemExit(f"error: train.global_batch_size ({opts.train.global_batch_size}) must be a multiple "
                             f"of data.micro_batch_size x ranks ({B} x {W})")
        accum = opts.train.global_batch_size // (B * W)
        ckpt_root = os.path.join(opts.output_dir, "checkpoints")
        resume_from = latest_checkpoint(ckpt_root) if opts.checkpoint.resume else None
        resume_step = int(os.path.basename(resume_from).split("_")[1]) if resume_from else 0

        model, cfg = build_model(opts, info, task)
        logger = RunLogger(info.is_main, opts.output_dir, opts.log.wandb_project, opts.log.wandb_run_name,
                           opts.to_dict(), resume_step)
        logger.info(f"[{task.name}] {W} rank(s) on {info.device.type}, model {cfg.num_params() / 1e6:.1f}M params "
                    f"({cfg.num_params(active_only=True) / 1e6:.1f}M active), experts via {cfg.expert_backend!r}, "
                    f"global batch {opts.train.global_batch_size} = {B} x {W} ranks x {accum} accumulation")
        if info.is_main:
            with open(os.path.join(opts.output_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(opts))
        loader = task.build_loader(opts, info, accum, cfg)
        o = opts.optim
        optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, info.device)
        warmup = o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * opts.train.steps)
        scheduler = build_scheduler(optimizer, opts.train.steps, warmup, o.min_lr_ratio)
        checkpointer = Checkpointer(ckpt_root, info.rank, opts.checkpoint.keep_last)

        ctx = StepContext(opts, info, model, cfg, accum, logger)
        if opts.model.aux_loss_type == "global":
            ctx.balance_counts_fn = parallel.all_reduce_sum
        step, bad_in_a_row = 0, 0
        if resume_from:
            tstate, rstate = checkpointer.load(resume_from, model, optimizer)
            step, bad_in_a_row = tstate["step"], tstate["bad_in_a_row"]
            scheduler.load_state_dict(tstate["scheduler"])
            loader.load_state_dict(rstate["loader"])
            torch.set_rng_state(rstate["rng"])
            logger.info(f"resumed from {resume_from} at step {step}")
        task.before_training(ctx)

        def save() -> str:
            tstate = {"step": step, "bad_in_a_row": bad_in_a_row, "scheduler": scheduler.state_dict()}
            rstate = {"loader": loader.state_dict(), "rng": torch.get_rng_state()}
            path = checkpointer.save(step, model, optimizer, tstate, rstate, cfg.to_dict(), dump_yaml(opts))
            logger.info(f"saved checkpoint {path}")
            return path

        stop.install()
        peak = _peak_tflops(opts, info.device)
        fpt = flops_per_token(cfg, opts.data.seq_len)
        bar = None
        if info.is_main and opts.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=opts.train.steps, initial=step, desc=task.name, dynamic_ncols=True)
        last_metrics: dict = {}
        saved_at = -1
        while step < opts.train.steps:
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(accum)]
            local_units = sum(task.count(b) for b in batches)
            ctx.denom = parallel.all_reduce_sum(torch.as_tensor(local_units, dtype=torch.float64, device=info.device))
            sums: dict[str, torch.Tensor] = {}
            aux_total = torch.zeros((), device=info.device)
            counts_total = None
            tokens = 0
            for b in batches:
                b = {k: v.to(info.device, non_blocking=True) for k, v in b.items()}
                loss, aux, metric_sums = task.micro_step(ctx, b)
                loss.backward()
                for k, v in metric_sums.items():
                    if k == "_counts":
                        counts_total = v if counts_total is None else counts_total + v
                    elif k == "_tokens":
                        tokens += int(v)
                    else:
                        sums[k] = sums.get(k, 0) + v.detach().double()
                if aux is not None:
                    aux_total = aux_total + aux.detach()
            grad_norm = _grad_norm(model, o.grad_clip)
            # One collective carries every metric, the finite check and the stop request.
            keys = sorted(sums)
            counters = getattr(loader, "counters", {})
            extra = [aux_total.double()] + [torch.tensor(float(v), dtype=torch.float64, device=info.device) for v in
                                             (tokens, counters.get("truncated", 0), counters.get("dropped", 0),
                                              stop.requested)]
            vec = parallel.all_reduce_sum(torch.stack(
                [sums[k].to(info.device, torch.float64).reshape(()) for k in keys] + extra))
            metrics = {k: (vec[i] / ctx.denom.clamp_min(1)).item() for i, k in enumerate(keys)}
            finite = math.isfinite(grad_norm.item()) and all(math.isfinite(v) for v in metrics.values())
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                logger.info(f"step {step + 1}: non-finite loss or gradient, update skipped "
                            f"({bad_in_a_row} in a row, limit {opts.train.max_bad_steps})")
            optimizer.zero_grad(set_to_none=True)
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            global_tokens = vec[len(keys) + 1].item()
            metrics.update(aux_loss=vec[len(keys)].item() / (accum * info.world_size),
                           lr=lr_used,
                           grad_norm=grad_norm.item(), tokens_per_s=global_tokens / dt, step_time_s=dt,
                           skipped=int(not finite),
                           # Documents cut to seq_len / left out as too long, so far (all ranks): never silent.
                           data_truncated=int(vec[len(keys) + 2].item()), data_dropped=int(vec[len(keys) + 3].item()))
            if peak > 0:
                metrics["mfu"] = fpt * global_tokens / dt / (peak * 1e12 * info.world_size)
            if info.device.type == "cuda":
                metrics["memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2 ** 30
            else:  # peak resident memory of this process (rank 0's, as it is rank 0 that logs)
                import resource
                metrics["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            if counts_total is not None:
                load = parallel.all_reduce_sum(counts_total).double()  # [L, E]
                mean = load.mean(1).clamp_min(1e-9)
                metrics["expert_load_max_over_mean"] = (load.max(1).values / mean).mean().item()
                metrics["expert_load_per_layer"] = [round(x, 3) for x in (load.max(1).values / mean).tolist()]
                metrics["experts_without_tokens"] = int((load == 0).sum().item())
            last_metrics = metrics
            if step % opts.train.log_every == 0 or step == opts.train.steps:
                logger.log(step, metrics)
                if bar is None:
                    logger.info(format_metrics(step, opts.train.steps, metrics))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            if bad_in_a_row >= opts.train.max_bad_steps:
                raise SystemExit(f"error: {bad_in_a_row} consecutive steps with a non-finite loss or gradient; "
                                 f"stopping (the last good checkpoint is kept)")
            if vec[-1].item() > 0:
                logger.info(f"SIGTERM received: saving at step {step} and exiting")
                save()
                return {"metrics": last_metrics, "step": step, "stopped": True}
            if opts.checkpoint.every and step % opts.checkpoint.every == 0 and step < opts.train.steps:
                save()
                saved_at = step
        if bar is not None:
            bar.close()
        if not opts.checkpoint.save_final:
            return {"metrics": last_metrics, "step": step, "checkpoint": None}
        final = save() if saved_at != step else latest_checkpoint(ckpt_root)
        if opts.checkpoint.export_hf:
            hf_dir = os.path.join(opts.output_dir, "hf")
            if info.is_main:
                from checkpoints_convert.dcp_to_hf import dcp_to_hf

                dcp_to_hf(final, hf_dir, overwrite=True)
                logger.info(f"exported Hugging Face checkpoint to {hf_dir}")
            if dist.is_initialized():
                dist.barrier()
        return {"metrics": last_metrics, "step": step, "checkpoint": final}
    finally:
        stop.uninstall()
        if logger is not None:
            logger.close()
        if shutdown:
            parallel.shutdown_distributed()
