"""The training loop SFT and DPO share, as a small Trainer.

    trainer = Trainer(task, opts)   # joins (or creates) the process group
    trainer.build()                 # model (meta -> FSDP2 -> materialised), logger, data, optimizer, schedule,
                                    # and the task's preparation on the initial weights (DPO's reference pass)
    trainer.resume()                # from the latest complete checkpoint, when there is one and it is asked for
    trainer.fit()                   # step() until done; checkpoints, SIGTERM, logging; final save and export
    trainer.close()

A task (trainer/sft.py, trainer/dpo.py) supplies the data loader, the loss of one micro-batch and how
its metric sums become means; everything else lives here once: model construction on the meta
device, FSDP2, the optimizer and schedule, gradient accumulation with global normalisation,
non-finite step skipping, checkpoints, SIGTERM, logging and the final HF export.

Normalisation: a task's loss is a SUM over its units (trained tokens for SFT, pairs for DPO). The
step first counts the units of all its micro-batches on all ranks (N), then each micro-batch
backpropagates  sum_local * W / N  (FSDP averages gradients over the W ranks, so the step's gradient
is that of  sum_all / N) plus  aux / A  (the router loss averaged over the A micro-batches and the
ranks). The update is therefore the same however the step is split into micro-batches and ranks.

Metrics travel by name: every rank's sums go into one all-reduce keyed by metric name
(parallel.all_reduce_by_name), and the task turns the summed values into means.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints_convert import CheckpointError, open_checkpoint
from checkpoints_convert.dcp_layout import LORA_RECORD, checkpoint_identity, read_lora_record, read_model_config
from checkpoints_convert.dcp_to_hf import dcp_to_hf, export_adapter
from data.errors import NoSpaceError
from data.files import require_space, writing
from moe.config import BailingMoeConfig
from moe.losses import CarriedCounts
from moe.model import BailingMoeForCausalLM, initial_value
from moe.router import expert_bias_update
from trainer import lora as run_lora
from trainer import parallel, rundir
from trainer.checkpoint import Checkpointer, latest_checkpoint
from trainer.errors import TrainerError
from trainer.metrics import RunLogger, format_metrics
from trainer.optim import build_optimizer, build_scheduler
from trainer.options import Options, dump_yaml
from trainer.precision import MasterWeights
from trainer.profiling import StepProfiler

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity), per GPU. MFU is model
# FLOPs over this figure, as torchtitan, nanochat and Megatron report it. Matched by device name,
# most specific first: torch.cuda.get_device_name gives e.g. "NVIDIA H100 80GB HBM3" for the SXM part.
DATASHEET_PEAK_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                         ("H200 NVL", 835.0), ("H200", 989.0), ("A100", 312.0))


# What a checkpoint writes beyond the tensors' bytes (benchmarks/checkpoint_overhead.py, 2-core CPU,
# torch 2.13, one rank): the tiny and demo models' saves wrote 1.8-2.0 kB of zip container per tensor
# in __0_0.distcp and 0.3 kB of .metadata per tensor (it grows with the names' length), plus 10 kB of
# rank state and small files; 3 kB per tensor and 128 kB per rank bound both with room for longer
# names (the demo's 18.19 MB save was 1.9% over its 17.84 MB of tensors; the check asks 18.47 MB).
DCP_BYTES_PER_TENSOR = 3072
DCP_BYTES_PER_RANK = 128 * 1024


@dataclasses.dataclass
class MicroStep:
    """What a task's micro_step returns."""
    loss: torch.Tensor  # backward() runs on this: the micro-batch's share of the step's loss
    sums: dict[str, torch.Tensor]  # metric sums over its units; summed over micro-batches and ranks by name
    aux: torch.Tensor | None = None  # router loss of this forward (logged as aux_loss, averaged)
    tokens: int = 0  # real tokens processed (throughput)
    expert_counts: torch.Tensor | None = None  # [L, E] routed slots per expert (load logging, bias update)
    expert_layers: tuple[int, ...] = ()  # the layer index of each row of expert_counts


class Task(Protocol):
    name: str

    def adjust_model_config(self, opts: Options, cfg: BailingMoeConfig, info: parallel.DistInfo) -> BailingMoeConfig: ...
    def build_loader(self, opts: Options, info: parallel.DistInfo, accum: int, cfg: BailingMoeConfig): ...
    def before_training(self, ctx: "StepContext") -> None: ...
    def count(self, batch: dict) -> dict[str, torch.Tensor]: ...  # units to normalise by, by name
    def micro_step(self, ctx: "StepContext", batch: dict) -> MicroStep: ...
    def metrics(self, sums: dict[str, float], totals: dict[str, float], aux_loss: float) -> dict[str, float]: ...


@dataclasses.dataclass
class StepContext:
    opts: Options
    info: parallel.DistInfo
    model: BailingMoeForCausalLM
    cfg: BailingMoeConfig
    accum: int
    logger: RunLogger
    totals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the step's global unit counts
    balance_counts_fn: CarriedCounts | None = None  # global-batch balancing: counts over ranks and micro-batches


@dataclasses.dataclass
class TrainState:
    """What trainer.json holds besides the schedule: identical on every rank."""
    step: int = 0
    bad_in_a_row: int = 0


def resolve_backend(name: str, device: torch.device, expert_lora_dropout: bool = False) -> str:
    """'auto': triton on CUDA, torch on CPU; and torch for LoRA with dropout on the routed experts,
    which the triton kernels do not draw."""
    if name == "auto":
        return "triton" if device.type == "cuda" and not expert_lora_dropout else "torch"
    return name


def model_overrides(opts: Options, device: torch.device) -> dict:
    """The BailingMoeConfig fields the training options set on top of a preset or a checkpoint's config."""
    m = opts.model
    spec = run_lora.lora_spec(opts)
    backend = resolve_backend(m.expert_backend, device,
                              spec is not None and "experts" in spec.targets and spec.dropout > 0)
    out = dict(expert_backend=backend, expert_recompute=m.expert_recompute, aux_loss_type=m.aux_loss_type,
               z_loss_coef=m.z_loss_coef, aux_loss_alpha=0.0 if m.aux_loss_type == "none" else m.aux_loss_alpha,
               mtp_enabled=m.mtp)
    if m.expert_bias_update_rate > 0:  # a model without a bias (v1) gets a zero one to move
        out["moe_router_enable_expert_bias"] = True
    return {**out, **m.overrides}


def model_config_from_options(opts: Options, device: torch.device) -> tuple[BailingMoeConfig, object]:
    """The model config and a ``get_value(name, param, rows)`` for its initial weights (None: from scratch)."""
    extra = model_overrides(opts, device)
    if not opts.model.init_from:
        return BailingMoeConfig.preset(opts.model.preset, **extra), None
    try:  # HF or native, validated (names, shapes, shard files) before anything is allocated
        ckpt = open_checkpoint(opts.model.init_from, **extra)
    except CheckpointError as e:
        raise TrainerError(f"model.init_from: {e}") from None
    return ckpt.cfg, lambda name, p, rows: ckpt.get_native(name, rows=rows)


def compute_dtype(opts: Options, device: torch.device) -> torch.dtype | None:
    """The dtype the model computes in: model.param_dtype on GPU; None (the fp32 weights as they are) on CPU."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[opts.model.param_dtype]


def plain_one_rank(opts: Options, info: parallel.DistInfo) -> bool:
    """A run of one rank without FSDP (parallel.one_rank 'plain'; trainer/precision.py says why).
    parallel.offload 'all' is FSDP2's offload policy, so such a run keeps FSDP2."""
    return info.world_size == 1 and opts.parallel.one_rank == "plain" and opts.parallel.offload != "all"


def build_model(opts: Options, info: parallel.DistInfo, task: Task, frozen: bool = False
                ) -> tuple[BailingMoeForCausalLM, BailingMoeConfig, MasterWeights]:
    """The model, its config and the weights an optimizer steps (``weights.module``: the model itself
    under FSDP or in fp32; its fp32 masters when one rank computes in bf16 without FSDP). ``frozen``:
    nothing trains (a DPO reference), so no masters are kept."""
    cfg, get_full = model_config_from_options(opts, info.device)
    cfg = task.adjust_model_config(opts, cfg, info)
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    dtype = compute_dtype(opts, info.device)
    plain = plain_one_rank(opts, info)
    spec = run_lora.lora_spec(opts)
    if spec is not None:  # before checkpointing and sharding see the modules: the frozen weights stored in bf16
        run_lora.prepare(model, spec, frozen_dtype=dtype)
    if opts.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    ep = opts.parallel.ep
    if ep > 1 and cfg.num_experts % ep:
        raise TrainerError(f"parallel.ep ({ep}) must divide the model's {cfg.num_experts} routed experts")
    ep_mesh = parallel.expert_mesh(info.device.type, info.world_size, ep) if ep > 1 else None
    offload_all = opts.parallel.offload == "all"
    if plain:
        if opts.model.compile:
            parallel.compile_each_block(model)
    else:
        parallel.shard_model(model, info.mesh, dtype, compile_blocks=opts.model.compile, ep_mesh=ep_mesh,
                             offload=offload_all)
    if get_full is None:
        seed = opts.train.seed
        def get_full(name, p, rows):
            full = initial_value(name, tuple(p.shape), cfg, seed)
            return full if rows is None else full[rows[0]:rows[1]]
    if spec is not None:
        get_full = run_lora.with_initial_adapters(get_full, opts.train.seed)
    # FSDP2's CPU offload keeps the sharded parameters in host memory: they are made there.
    parallel.materialize(model, torch.device("cpu") if offload_all else info.device, get_full)
    if frozen:
        model.requires_grad_(False)
    return model, cfg, MasterWeights(model, dtype if plain else None)


def flops_per_token(cfg: BailingMoeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (no embedding lookup) + causal attention.

    Convention (torchtitan's and nanochat's with the causal half taken): every matmul counts 2 FLOPs
    per multiply-add, backward twice forward; attention's two S x S matmuls count 12 * L * d * S per
    token over the full square, halved here because a causal row attends to half of it on average.
    Packed rows with several documents attend to less still, so MFU overstates for them."""
    active = cfg.num_params(active_only=True) - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len  # 12*L*d*S/2 (causal)
    return 6.0 * active + attn


def datasheet_peak_tflops(opts: Options, device: torch.device) -> float:
    """The MFU denominator: train.peak_tflops when set, else the datasheet's dense bf16 figure (0 = unknown)."""
    if opts.train.peak_tflops > 0 or device.type != "cuda":
        return opts.train.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DATASHEET_PEAK_TFLOPS if key in name), 0.0)


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
            self._old = None


def _grad_norm(model, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    meshes = {getattr(p.grad, "device_mesh", None) for p in params}
    if len(meshes) > 1:  # expert parallelism: DTensor ops cannot mix meshes, so one norm per mesh
        return _grad_norm_by_mesh(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def _grad_norm_by_mesh(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for gradients on several meshes: the total norm from each mesh's norm."""
    groups: dict = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh, []).append(p.grad)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, foreach=True)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grads in groups.values():
            for g in grads:
                g.mul_(coef)
    return norm


def _host_floats(values: dict[str, torch.Tensor]) -> dict[str, float | list]:
    """One device-to-host copy for a dict of (reduced) tensors: scalars become floats, others lists."""
    if not values:
        return {}
    names = list(values)
    flat = torch.cat([values[n].reshape(-1) for n in names]).cpu()
    out, i = {}, 0
    for n in names:
        k = values[n].numel()
        part = flat[i:i + k].view(values[n].shape)
        out[n] = part.item() if values[n].dim() == 0 else part.tolist()
        i += k
    return out


class Trainer:
    def __init__(self, task: Task, opts: Options):
        self.task, self.opts = task, opts
        rundir.die_with_launcher()
        self.info = parallel.init_distributed(opts.train.device)
        self.lock: rundir.RunLock | None = None
        self.resume_changes: dict = {}
        self.state = TrainState()
        self.logger: RunLogger | None = None
        self.stop = _StopFlag()
        self.stop_requested = False
        self.last_metrics: dict = {}
        self.saved_at = -1
        self.write_ended = False

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        opts, info = self.opts, self.info
        torch.manual_seed(opts.train.seed)
        W, B = info.world_size, opts.data.micro_batch_size
        if opts.train.global_batch_size % (B * W):
            raise TrainerError(f"train.global_batch_size ({opts.train.global_batch_size}) must be a multiple "
                               f"of data.micro_batch_size x ranks ({B} x {W})")
        self.accum = opts.train.global_batch_size // (B * W)
        self.ckpt_root = os.path.join(opts.output_dir, "checkpoints")
        # Rank 0 takes the directory and checks it before anything is written; the others wait for it.
        notes = rundir.on_rank0(self._take_run_dir)
        self.resume_from = latest_checkpoint(self.ckpt_root) if opts.checkpoint.resume else None
        resume_step = int(os.path.basename(self.resume_from).split("_")[1]) if self.resume_from else 0

        self.lora = run_lora.lora_spec(opts)
        self.model, self.cfg, self.weights = build_model(opts, info, self.task)
        # The expert biases as initialised (the checkpoint's, or zero): the drift metrics measure from
        # these, so a resumed run reports the same numbers as an uninterrupted one.
        self.bias_start = {i: b.detach().clone() for i, b in expert_biases(self.model).items()}
        self.expert_layers: tuple[int, ...] = ()
        self.logger = RunLogger(info.is_main, opts.output_dir, opts.log.wandb_project, opts.log.wandb_run_name,
                                opts.to_dict(), resume_step, resumed=opts.checkpoint.resume)
        for note in notes:
            self.logger.info(note)
        cfg = self.cfg
        self.logger.info(f"[{self.task.name}] {W} rank(s) on {info.device.type}, model {cfg.num_params() / 1e6:.1f}M "
                         f"params ({cfg.num_params(active_only=True) / 1e6:.1f}M active), experts via "
                         f"{cfg.expert_backend!r}, global batch {opts.train.global_batch_size} = {B} x {W} ranks x "
                         f"{self.accum} accumulation")
        if self.lora is not None:
            self.logger.info(run_lora.describe(self.model, self.lora))
        if info.is_main:
            with open(os.path.join(opts.output_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(opts))
        self.loader = self.task.build_loader(opts, info, self.accum, cfg)
        o = opts.optim
        self.optimizer = build_optimizer(self.weights.module, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps,
                                         torch.device("cpu") if opts.parallel.offload == "all" else info.device,
                                         host_state=opts.parallel.offload == "optimizer")
        self.scheduler = self._schedule(done_steps=0)
        self.checkpointer = Checkpointer(self.ckpt_root, info.rank, opts.checkpoint.keep_last,
                                         background=opts.checkpoint.async_, pin_memory=info.device.type == "cuda",
                                         trained_only=self.lora is not None)
        self.ctx = StepContext(opts, info, self.model, cfg, self.accum, self.logger)
        if cfg.aux_loss_type == "global":
            self.ctx.balance_counts_fn = CarriedCounts(parallel.all_reduce_sum)
        self.peak_tflops = datasheet_peak_tflops(opts, info.device)
        self.ceiling_tflops = opts.train.ceiling_tflops
        self.flops_per_token = flops_per_token(cfg, opts.data.seq_len)
        # The task's own preparation runs on the initial weights, before any resume restores trained
        # ones (DPO's reference log-probs are those of the initial model).
        self.task.before_training(self.ctx)

    def _take_run_dir(self) -> list[str]:
        """Rank 0: the lock, the removal of killed runs' temporaries, and the rules for what is already
        in the directory (docs/training.md, "Runs that are never lost"). Returns notes to log."""
        opts, notes = self.opts, []
        os.makedirs(opts.output_dir, exist_ok=True)
        self.lock = rundir.RunLock(opts.output_dir)
        stale = self.lock.acquire()
        if stale:
            notes.append(f"warning: {stale}")
        for path in rundir.sweep_temporaries(opts.output_dir):
            notes.append(f"removed {path} (left by a killed run)")
        rundir.check_run_files(opts.output_dir)
        there = rundir.existing_run(opts.output_dir)
        if not opts.checkpoint.resume and there:
            if not opts.overwrite:
                raise TrainerError(f"{opts.output_dir} holds an earlier run ({'; '.join(there)}) and "
                                   f"checkpoint.resume is false: pass --overwrite to move it aside and start over, "
                                   f"resume it (--checkpoint.resume true), or choose another --output-dir")
            notes.append(f"--overwrite: moved the earlier run ({'; '.join(there)}) to "
                         f"{rundir.move_aside(opts.output_dir)}; delete it when it is no longer needed")
        latest = latest_checkpoint(self.ckpt_root) if opts.checkpoint.resume else None
        if latest:
            step = int(os.path.basename(latest).split("_")[1])
            if step > opts.train.steps:
                raise TrainerError(f"{latest} is at step {step}, past train.steps {opts.train.steps}: raise "
                                   f"train.steps to go on, or start a new run (another --output-dir, or "
                                   f"--checkpoint.resume false --overwrite)")
            self.resume_changes = rundir.compare_options(latest, opts.to_dict(), self.info.world_size)
            if self.resume_changes:
                rundir.record_changes(opts.output_dir, step, latest, self.resume_changes)
                notes.append("resuming with changed options (recorded in "
                             f"{os.path.join(opts.output_dir, rundir.CHANGES_NAME)}): "
                             + "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in self.resume_changes.items()))
        return notes

    # ------------------------------------------------------------------ resume / save / export
    def resume(self) -> str | None:
        """Restore model, optimizer, schedule, data position and RNG from the latest complete checkpoint."""
        if self.resume_from:
            if self.lora is not None:  # the base comes from model.init_from: the one the adapters were trained on
                rundir.on_rank0(lambda: run_lora.check_base(read_lora_record(self.resume_from),
                                                            self.opts.model.init_from, self.resume_from))
            tstate, rstate = self.checkpointer.load(self.resume_from, self.weights.module, self.optimizer)
            self.weights.push()
            self.state = TrainState(step=tstate["step"], bad_in_a_row=tstate["bad_in_a_row"])
            self._apply_schedule_options(done_steps=tstate["scheduler"]["last_epoch"])
            try:
                self.loader.load_state_dict(rstate["loader"])
            except (ValueError, KeyError, TypeError) as e:  # other data (re-prepared), or a state we do not know
                raise TrainerError(f"{self.resume_from}: the data loader's position cannot be restored ({e}); the "
                                   f"data differ from those the run was saved with: prepare them as they were, or "
                                   f"start a new run (another --output-dir, or --checkpoint.resume false "
                                   f"--overwrite)") from None
            torch.set_rng_state(rstate["rng"])
            self.saved_at = self.state.step  # that step's checkpoint exists: never rewrite it
            self.logger.info(f"resumed from {self.resume_from} at step {self.state.step}")
        return self.resume_from

    def _schedule(self, done_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The options' schedule, ``done_steps`` steps in: it sets each group's lr for the next step."""
        o, steps = self.opts.optim, self.opts.train.steps
        warmup = o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * steps)
        return build_scheduler(self.optimizer, steps, warmup, o.min_lr_ratio, done_steps)

    def _apply_schedule_options(self, done_steps: int) -> None:
        """After loading the optimizer state: the options' lr and weight decay are what runs (the loaded
        state holds those the checkpoint was written with). A scheduler built ``done_steps`` in takes its
        peak from each group's initial_lr, which is set to the options' lr first."""
        o = self.opts.optim
        groups = self.optimizer.param_groups
        groups[0]["weight_decay"] = o.weight_decay  # group 1 (norms, biases) never decays
        for g in groups:
            g["initial_lr"] = o.lr
        self.scheduler = self._schedule(done_steps)

    def _state_bytes(self) -> int:
        """Bytes a checkpoint writes, summed over ranks: each rank's parameter and optimizer-state shards,
        and DCP's container and metadata around them (DCP_BYTES_PER_TENSOR, DCP_BYTES_PER_RANK)."""
        def local(t):
            t = getattr(t, "_local_tensor", t)
            return t.numel() * t.element_size()
        # What a checkpoint holds: the trained parameters (all of them without LoRA) and the optimizer state.
        tensors = [p for p in self.weights.module.parameters() if p.requires_grad or self.lora is None]
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        n = sum(local(t) for t in tensors) + DCP_BYTES_PER_TENSOR * len(tensors) + DCP_BYTES_PER_RANK
        if dist.is_initialized() and self.info.world_size > 1:
            t = torch.tensor([float(n)], device=self.info.device)
            dist.all_reduce(t)
            n = int(t.item())
        return n

    def save(self, background: bool = False) -> str:
        """A checkpoint of this step; ``background`` (checkpoint.async): staged to host memory and written
        by a thread, published by _finish_write once every rank's write is done."""
        self._finish_write()  # one write at a time, and the space check below sees what it took
        t0 = time.perf_counter()
        nbytes = self._state_bytes()
        rundir.on_rank0(lambda: require_space(self.ckpt_root, nbytes, f"checkpoint step {self.state.step}"))
        tstate = {**dataclasses.asdict(self.state), "scheduler": self.scheduler.state_dict(),
                  "world_size": self.info.world_size}
        rstate = {"loader": self.loader.state_dict(), "rng": torch.get_rng_state()}
        extra = {} if self.lora is None else {LORA_RECORD: run_lora.record(self.lora, self.opts.model.init_from)}
        path = self.checkpointer.save(self.state.step, self.weights.module, self.optimizer, tstate, rstate,
                                      self.cfg.to_dict(), dump_yaml(self.opts), background=background,
                                      extra_json=extra)
        self.saved_at = self.state.step
        if background:
            self.logger.info(f"checkpoint {path}: state copied in {time.perf_counter() - t0:.2f} s, "
                             f"writing in the background")
        else:
            self.logger.info(f"saved checkpoint {path} ({time.perf_counter() - t0:.2f} s)")
        return path

    def _finish_write(self, barrier: bool = True) -> None:
        """Wait for the background write in flight, if any, and publish it (COMPLETE, rename, pruning)."""
        pending = self.checkpointer.pending
        if pending is None:
            return
        t0 = time.perf_counter()
        path = self.checkpointer.finish(barrier)
        self.logger.info(f"saved checkpoint {path} (written in the background; waited "
                         f"{time.perf_counter() - t0:.2f} s for it)")

    def export(self, checkpoint: str) -> str:
        """The HF safetensors export of ``checkpoint`` to <output-dir>/hf, written by rank 0 (a LoRA
        run's: the base merged with its adapters, and the adapters alone in <output-dir>/adapter)."""
        hf_dir = os.path.join(self.opts.output_dir, "hf")
        rundir.on_rank0(lambda: self._export_rank0(checkpoint, hf_dir))
        return hf_dir

    def _export_rank0(self, checkpoint: str, hf_dir: str) -> None:
        """Idempotent: an export already made from ``checkpoint`` is kept (its record, written after
        the export is whole, names that very save: checkpoint_identity); a missing one, or one of an
        earlier save of the same step, is (re)written."""
        record = os.path.join(self.opts.output_dir, rundir.HF_RECORD)
        identity = checkpoint_identity(checkpoint)
        done = rundir.export_is_of(record, checkpoint, identity)
        adapter_dir = os.path.join(self.opts.output_dir, "adapter")
        if done and os.path.isdir(hf_dir) and (self.lora is None or os.path.isdir(adapter_dir)):
            self.logger.info(f"Hugging Face export {hf_dir} of {checkpoint} is already there")
            return
        if os.path.exists(record):
            os.remove(record)
        cfg = read_model_config(checkpoint)
        width = 4 if cfg.torch_dtype == "float32" else 2
        try:
            if self.lora is not None:  # small beside the merged model; written whole before it
                export_adapter(checkpoint, adapter_dir, overwrite=True)
                self.logger.info(f"exported the LoRA adapter (PEFT's format) to {adapter_dir}")
            require_space(hf_dir, cfg.num_params() * width, "the Hugging Face export")
            with writing(hf_dir):
                # What travels beside the weights is read from the checkpoint's config.yaml, the one
                # rule dcp_to_hf applies (export_files.export_sources).
                dcp_to_hf(checkpoint, hf_dir, overwrite=True)
        except NoSpaceError as e:
            raise NoSpaceError(f"{e}; the checkpoint {checkpoint} is whole: free space and run the same "
                               f"command again to finish the export") from None
        with open(record + ".tmp", "w") as f:
            json.dump({"checkpoint": os.path.basename(checkpoint), "identity": identity}, f)
        os.replace(record + ".tmp", record)
        self.logger.info(f"exported Hugging Face checkpoint to {hf_dir}")

    # ------------------------------------------------------------------ the step
    def step(self) -> dict:
        """One optimizer step over the accumulated micro-batches; returns its metrics (equal on all ranks)."""
        t0 = time.perf_counter()
        ctx, dev = self.ctx, self.info.device
        batches = [next(self.loader) for _ in range(self.accum)]
        ctx.totals = parallel.all_reduce_by_name(_sum_by_name(self.task.count(b) for b in batches), dev)
        if ctx.balance_counts_fn is not None:
            ctx.balance_counts_fn.reset()  # expert counts are carried over this step's micro-batches only
        sums: dict = {}
        for b in batches:
            out = self.task.micro_step(ctx, {k: v.to(dev, non_blocking=True) for k, v in b.items()})
            out.loss.backward()
            _add_micro_step(sums, out)
            self.expert_layers = out.expert_layers
        grad_norm = _grad_norm(self.weights.module, self.opts.optim.grad_clip).item()
        metrics, reduced = self._reduce(sums)
        finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
        lr_used = self._update(finite)
        if finite and self.opts.model.expert_bias_update_rate > 0 and "_expert_counts" in reduced:
            self._move_expert_biases(reduced["_expert_counts"])
        if self.bias_start:
            metrics.update(self._bias_metrics())
        dt = time.perf_counter() - t0
        metrics.update(lr=lr_used, grad_norm=grad_norm, tokens_per_s=reduced["_tokens"] / dt, step_time_s=dt,
                       skipped=int(not finite), **self._throughput_metrics(reduced["_tokens"] / dt))
        return metrics

    def _reduce(self, sums: dict) -> tuple[dict, dict]:
        """One all-reduce of every sum by name, with the data counters and the stop request; returns the
        task's metrics (plus aux_loss, data counters, expert load) and all reduced values."""
        counters = getattr(self.loader, "counters", {})
        sums = dict(sums, data_truncated=counters.get("truncated", 0), data_dropped=counters.get("dropped", 0),
                    stop_requested=float(self.stop.requested), checkpoint_written=float(self.checkpointer.written()))
        reduced = _host_floats(parallel.all_reduce_by_name(sums, self.info.device))
        self.stop_requested = reduced["stop_requested"] > 0
        # Every rank's background write has ended: all ranks publish it after this step, together.
        self.write_ended = reduced["checkpoint_written"] >= self.info.world_size
        aux_loss = reduced.get("aux", 0.0) / (self.accum * self.info.world_size)
        task_sums = {k: v for k, v in reduced.items() if k not in _TRAINER_SUMS}
        metrics = self.task.metrics(task_sums, _host_floats(self.ctx.totals), aux_loss)
        # Documents cut to seq_len / left out as too long, so far (all ranks): never silent.
        metrics.update(aux_loss=aux_loss, data_truncated=int(reduced["data_truncated"]),
                       data_dropped=int(reduced["data_dropped"]))
        if "_expert_counts" in reduced:
            metrics.update(_expert_load_metrics(torch.tensor(reduced["_expert_counts"], dtype=torch.float64)))
        return metrics, reduced

    def _update(self, finite: bool) -> float:
        """The optimizer step, or its skip when the loss or gradient is not finite; returns the lr used."""
        if finite:
            self.optimizer.step()
            self.weights.push()
            self.state.bad_in_a_row = 0
        else:
            self.state.bad_in_a_row += 1
            self.logger.info(f"step {self.state.step + 1}: non-finite loss or gradient, update skipped "
                             f"({self.state.bad_in_a_row} in a row, limit {self.opts.train.max_bad_steps})")
        self.optimizer.zero_grad(set_to_none=True)
        lr_used = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.step += 1
        return lr_used

    @torch.no_grad()
    def _move_expert_biases(self, counts: list) -> None:
        """Aux-loss-free balancing, after the optimizer step: each MoE layer's bias moves by the rule of
        moe.router.expert_bias_update, from the step's expert counts summed over every micro-batch and
        rank (the same numbers on every rank, so the replicated buffers stay equal)."""
        m = self.opts.model
        biases = expert_biases(self.model)
        delta = expert_bias_update(torch.tensor(counts, dtype=torch.float64), m.expert_bias_update_rate,
                                   m.expert_bias_zero_mean)
        for row, layer in enumerate(self.expert_layers):
            if layer in biases:
                biases[layer].add_(delta[row].to(biases[layer].device))

    def _bias_metrics(self) -> dict:
        """How far the expert biases moved from where they started: the mean and the largest |b - b0|
        over every MoE layer and expert (one small device-to-host copy)."""
        biases = expert_biases(self.model)
        moved = torch.cat([(biases[i] - b0).abs() for i, b0 in self.bias_start.items()])
        mean, largest = torch.stack([moved.mean(), moved.max()]).tolist()
        return {"expert_bias_drift_mean": mean, "expert_bias_drift_max": largest}

    def _throughput_metrics(self, tokens_per_s: float) -> dict:
        out = {}
        per_gpu = self.flops_per_token * tokens_per_s / self.info.world_size
        if self.peak_tflops > 0:
            out["mfu"] = per_gpu / (self.peak_tflops * 1e12)
        if self.ceiling_tflops > 0:
            out["mfu_vs_measured_peak"] = per_gpu / (self.ceiling_tflops * 1e12)
        if self.info.device.type == "cuda":
            out["memory_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2 ** 30
        else:  # peak resident memory of this process (rank 0's, as it is rank 0 that logs)
            import resource
            out["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return out

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        """Steps until train.steps, with checkpoints, SIGTERM and logging; then the final save and export."""
        opts = self.opts
        total = opts.train.steps
        self.stop.install()
        # In a with block: an error ends the bar's line before it is printed.
        with tqdm(total=total, initial=self.state.step, desc=self.task.name, dynamic_ncols=True,
                  disable=not (self.info.is_main and opts.train.progress)) as bar:
            while self.state.step < total:
                with self._profiler(self.state.step + 1):
                    metrics = self.last_metrics = self.step()
                step = self.state.step
                if step % opts.train.log_every == 0 or step == total:
                    self.logger.log(step, metrics)
                    if bar.disable:
                        self.logger.info(format_metrics(step, total, metrics))
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if self.state.bad_in_a_row >= opts.train.max_bad_steps:
                    raise TrainerError(f"{self.state.bad_in_a_row} consecutive steps with a non-finite loss or "
                                       f"gradient; stopping (the last good checkpoint is kept)")
                if self.write_ended:
                    self._finish_write()
                if opts.checkpoint.every and step % opts.checkpoint.every == 0 and step < total:
                    self.save(background=opts.checkpoint.async_)
                    # A SIGTERM that came during the save (a long one, under torchrun's grace period)
                    # finds this step saved (or being written): exit now rather than train a step and
                    # save again.
                    self.stop_requested = self.stop_requested or self._stop_requested_anywhere()
                if self.stop_requested:
                    if self.checkpointer.pending is not None:
                        self.logger.info(f"SIGTERM received: waiting for the checkpoint of step "
                                         f"{self.checkpointer.pending.step} being written")
                        self._finish_write()
                    if self.saved_at == step:
                        self.logger.info(f"SIGTERM received: step {step} is already saved; exiting")
                    else:
                        self.logger.info(f"SIGTERM received: saving at step {step} and exiting")
                        self.save()
                    return {"metrics": self.last_metrics, "step": step, "stopped": True}
        self._finish_write()
        result = {"metrics": self.last_metrics, "step": self.state.step, "checkpoint": None}
        if opts.checkpoint.save_final:
            result["checkpoint"] = self.save() if self.saved_at != self.state.step else latest_checkpoint(self.ckpt_root)
            if opts.checkpoint.export_hf:
                self.export(result["checkpoint"])
        return result

    def _stop_requested_anywhere(self) -> bool:
        """Whether any rank has received SIGTERM: one all-reduce, so every rank decides alike."""
        flag = parallel.all_reduce_by_name({"stop": float(self.stop.requested)}, self.info.device)["stop"]
        return flag.item() > 0

    def _profiler(self, step: int):
        """torch.profiler around optimizer step ``step`` when --train.profile_step names it."""
        if self.opts.train.profile_step != step:
            return contextlib.nullcontext()
        return StepProfiler(os.path.join(self.opts.output_dir, "profile"), step, self.info.rank, self.info.device,
                            self.logger if self.info.is_main else None)

    def close(self, shutdown: bool = True) -> None:
        self.stop.uninstall()
        self._settle_write()  # before the lock goes: a next run would sweep a directory still being written
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()
        if shutdown:
            self.release()
            parallel.shutdown_distributed()

    def _settle_write(self) -> None:
        """A run that ends on an error with a background write in flight: the write is waited for (the
        interpreter would wait for its thread anyway) and published if it succeeded, by rank 0 alone
        (another rank may be gone: no collective). If it failed, the earlier checkpoints stand."""
        checkpointer = self.__dict__.get("checkpointer")
        if checkpointer is None or checkpointer.pending is None:
            return
        if self.logger is not None:
            self.logger.info(f"waiting for the checkpoint of step {checkpointer.pending.step} being written "
                             f"before exiting")
        try:
            self._finish_write(barrier=False)
        except Exception as e:  # the run's own error is the one to report
            if self.logger is not None:
                self.logger.info(f"the checkpoint being written was not completed: {e}")

    def release(self) -> None:
        """Let go of everything that references the process group (model, optimizer state, meshes,
        the task's reference model), so that shutting the group down joins its threads
        (parallel.shutdown_distributed says why that matters at exit)."""
        weights = self.__dict__.pop("weights", None)
        if weights is not None:
            weights.remove()
        checkpointer = self.__dict__.get("checkpointer")
        if checkpointer is not None:
            checkpointer.close()
        for name in ("model", "optimizer", "scheduler", "checkpointer", "ctx", "loader"):
            self.__dict__.pop(name, None)
        self.info = dataclasses.replace(self.info, mesh=None)
        release = getattr(self.task, "release", None)
        if release is not None:
            release()


def _sum_by_name(dicts) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else torch.as_tensor(v)
    return out


# Sums the trainer adds beside the task's (the task's metrics() never sees them).
_TRAINER_SUMS = ("aux", "_tokens", "_expert_counts", "data_truncated", "data_dropped", "stop_requested",
                 "checkpoint_written")


def _add_micro_step(sums: dict, out: MicroStep) -> None:
    """Accumulate a micro-batch's sums beside the trainer's own (_TRAINER_SUMS)."""
    extra = {"_tokens": out.tokens}
    if out.aux is not None:
        extra["aux"] = out.aux.detach()
    if out.expert_counts is not None:
        extra["_expert_counts"] = out.expert_counts
    for k, v in {**out.sums, **extra}.items():
        v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
        sums[k] = sums[k] + v if k in sums else v


def expert_biases(model) -> dict[int, torch.Tensor]:
    """{layer index: the fp32 expert-bias buffer} of every MoE layer that has one (MTP layers too)."""
    out = {}
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and getattr(gate, "expert_bias", None) is not None:
            out[layer.layer_idx] = gate.expert_bias
    return out


def _expert_load_metrics(load_LE: torch.Tensor) -> dict:
    mean = load_LE.mean(1).clamp_min(1e-9)
    ratio = load_LE.max(1).values / mean
    return {"expert_load_max_over_mean": ratio.mean().item(),
            "expert_load_per_layer": [round(x, 3) for x in ratio.tolist()],
            "experts_without_tokens": int((load_LE == 0).sum().item())}


def run(task: Task, opts: Options, shutdown: bool = True) -> dict:
    """Train; returns a summary (last metrics, step, checkpoint path). Rank 0 logs. ``shutdown=False``
    keeps the process group for a following run in the same processes (the DPO demo's SFT warm-up)."""
    trainer = Trainer(task, opts)
    try:
        trainer.build()
        trainer.resume()
        return trainer.fit()
    finally:
        trainer.close(shutdown)
