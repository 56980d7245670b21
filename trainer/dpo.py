"""Direct preference optimisation of a BailingMoe (Ling-Lite) model with FSDP2, on the SFT loop.

    torchrun --nproc_per_node=N trainer/dpo.py [--config configs/ling_lite_dpo.yaml] [--section.key value ...]
    python trainer/dpo.py                # one process; with no options: the tiny CPU demo

With no options it starts from the SFT demo's export (runs/sft/hf) when there is one, otherwise it
first runs a short SFT warm-up of the tiny model on the demo corpus, then optimises the demo
preference pairs, whose rejected answers carry the formatting errors of the Ring-Lite-Distill
report (unclosed <think>, unpaired <tool_call>, invalid tool JSON).

Reference log-probs: by default a first pass computes log p_ref(y|x) for every pair with the same
sharded model before training and stores them next to the prepared data (a safetensors file), keyed by
everything they depend on (the data, the reference weights' content, seq_len and the overlong policy,
the template, the tokenizer, the compute dtype), so a single model is resident while training ("--dpo.reference live" keeps
a frozen reference model instead). Chosen and rejected run in one forward pass; log-probs are summed
over completion tokens only.

Losses (margin d = beta * ((lp_w - ref_w) - (lp_l - ref_l))):
  sigmoid  -log sigmoid(d)                                    (default, beta 0.1)
  ipo      ((lp_w - ref_w)/|y_w| - (lp_l - ref_l)/|y_l| - 1/(2 beta))^2
  hinge    relu(1 - d)
plus dpo.nll_coef x an NLL term on the chosen answers, and the policy's load-balancing loss. The NLL
term (dpo.nll_average) is 'sequence': each chosen answer's mean token NLL, averaged over pairs
(LLaMA-Factory's pref_ftx, which Ling's recipes use), 'token': the mean over all chosen tokens of
the step, or 'trl': each micro-batch's token mean, averaged over micro-batches and ranks (TRL's "sft"
loss; 'token' equals it only when a step is one micro-batch on one rank). Logged as TRL users
expect: loss (the total) = loss/dpo + nll_coef x loss/nll + loss/aux.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

if __package__ in (None, ""):  # run as a file (torchrun trainer/dpo.py): import from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints_convert.io import fingerprint_weights
from data import DPOLoader
from data.errors import exit_on_error
from data.files import owned_temp_file, sweep_stale_temp_files, writing
from moe.heads import TokenLogps
from moe.lora import adapters_disabled, has_adapters
from trainer import demo, parallel
from trainer.errors import TrainerError, finish_process
from trainer.loop import MicroStep, StepContext, build_model, run
from trainer.options import DPO_LOSS_TYPES as LOSS_TYPES, DPORunOptions, parse_options
from trainer.sft import SFTTask
from trainer.sources import sources_and_vocab


def dpo_loss(pol_w, pol_l, ref_w, ref_l, len_w, len_l, beta: float, loss_type: str = "sigmoid"):
    """Per-pair loss and rewards. pol_*/ref_* are summed completion log-probs, len_* completion lengths."""
    dw, dl = pol_w - ref_w, pol_l - ref_l
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (dw - dl))
    elif loss_type == "ipo":
        loss = (dw / len_w - dl / len_l - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - beta * (dw - dl))
    else:
        raise ValueError(f"dpo.loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    return loss, beta * dw.detach(), beta * dl.detach()


def chosen_nll_sum(logp_chosen: torch.Tensor, len_chosen: torch.Tensor, average: str) -> torch.Tensor:
    """A micro-batch's NLL on its chosen answers, as the step's term sums it: each answer's mean token
    NLL ('sequence', summed over pairs), every token's NLL ('token', summed), or the micro-batch's own
    token mean ('trl')."""
    if average == "sequence":
        return (-logp_chosen / len_chosen.clamp_min(1)).sum()
    if average == "trl":
        return -logp_chosen.sum() / len_chosen.sum().clamp_min(1)
    return -logp_chosen.sum()


# What chosen_nll_sum's sums are divided by over the step (the task's count() keys): the pairs, the
# chosen tokens, or the micro-batches of every rank (TRL: loss / accumulation, averaged over ranks).
NLL_DIVISOR = {"sequence": "pairs", "token": "chosen_tokens", "trl": "micro_batches"}


def _real_mask(labels: torch.Tensor) -> torch.Tensor:
    """Right-padded rows: real tokens run up to the last trained one (the answer's final EOS)."""
    S = labels.shape[1]
    pos = torch.arange(S, device=labels.device)
    last = torch.where(labels != -100, pos, torch.full_like(pos, -1)).max(1).values
    return pos[None] <= last[:, None]


def _pad_to(t: torch.Tensor, S: int, value: int) -> torch.Tensor:
    return t if t.shape[1] == S else F.pad(t, (0, S - t.shape[1]), value=value)


def sequence_logps(model, b: dict, pad_id: int, balance_counts_fn=None, grad: bool = True):
    """One forward over chosen and rejected stacked on the batch dimension.

    Returns (logp_chosen [B], logp_rejected [B], len_chosen [B], len_rejected [B], model output)."""
    S = max(b["chosen_input_ids"].shape[1], b["rejected_input_ids"].shape[1])
    ids = torch.cat([_pad_to(b["chosen_input_ids"], S, pad_id), _pad_to(b["rejected_input_ids"], S, pad_id)])
    labels = torch.cat([_pad_to(b["chosen_labels"], S, -100), _pad_to(b["rejected_labels"], S, -100)])
    with torch.set_grad_enabled(grad):
        out = model(ids, labels=labels, attention_mask=_real_mask(labels).long(), head=TokenLogps(),
                    balance_counts_fn=balance_counts_fn)
    lp = out.token_logps.sum(1)
    n = (labels[:, 1:] != -100).sum(1).to(lp.dtype)
    B = b["chosen_input_ids"].shape[0]
    return lp[:B], lp[B:], n[:B], n[B:], out


# Weights directories up to this size are fingerprinted by content; larger ones (a 33 GB Ling-Lite) by
# each file's size, mtime, inode and safetensors header, which any rewrite or re-save changes.
CONTENT_HASH_LIMIT = 1 << 30


def weights_fingerprint(directory: str) -> str:
    """A hash of a weights directory that changes when any file in it is rewritten, even in place."""
    return fingerprint_weights(directory, CONTENT_HASH_LIMIT)


# self.ref of a LoRA run's live reference: the policy itself with its adapters switched off.
BASE_OF_POLICY = "the policy's base (adapters off)"


class DPOTask:
    """``default_data``: as SFTTask's (the demo's preference pairs from the entry script).

    With LoRA the reference is the policy network with its adapters switched off (moe.lora.
    adapters_disabled): no second copy of the weights, for the precomputed pass and for 'live'."""
    name = "dpo"

    def __init__(self, default_data=None):
        self.ref = None  # index -> (ref_w, ref_l) tensor [N, 2], or a live model
        self.default_data = default_data

    def release(self) -> None:
        """At the end of a run: drop the reference model (a live one holds the process group)."""
        self.ref = None
        self.loader = None

    def adjust_model_config(self, opts, cfg, info):
        dirs, _, self.tokenizer, cfg = sources_and_vocab(opts, info.rank, "dpo", cfg, self.default_data)
        if len(dirs) != 1:
            raise TrainerError("DPO takes exactly one data source (a JSONL of pairs or a prepared dpo directory)")
        self.source = next(iter(dirs.values()))
        return cfg

    def build_loader(self, opts, info, accum, cfg):
        self.options = opts.dpo
        self.pad_id = cfg.pad_token_id
        self.loader = DPOLoader(self.source, opts.data.seq_len, opts.data.micro_batch_size, rank=info.rank,
                                     world_size=info.world_size, seed=opts.train.seed)
        return self.loader

    # ------------------------------------------------------------------ reference log-probs
    def _reference_key(self, opts, cfg, device) -> dict:
        """Everything the cached reference log-probs depend on: the data, the reference weights (their
        content, or seed and config for a from-scratch init), how rows are cut, the template, the
        tokenizer and the compute dtype."""
        init = opts.model.init_from
        # version 3: the template of data.dataset.TEMPLATE_VERSION 2 (prompts wholly untrained)
        return {"version": 3, "data_hash": self.loader.data_hash,
                "weights": weights_fingerprint(init) if init else None,
                "init_from": os.path.abspath(init) if init else None,
                "seed": None if init else opts.train.seed, "cfg": cfg.to_dict(),
                "seq_len": self.loader.seq_len, "overlong": self.loader.overlong,
                "eos_every_turn": bool(opts.data.eos_every_turn), "tokenizer": self.tokenizer.fingerprint(),
                "device": torch.device(device).type, "param_dtype": opts.model.param_dtype}

    @torch.no_grad()
    def _precompute(self, ctx: StepContext, path: str, key: str) -> torch.Tensor:
        """Every pair's reference log-probs: ranks split the pairs, then gather them on every rank."""
        info, model = ctx.info, ctx.model
        batches = list(self.loader.iter_all(ctx.opts.data.micro_batch_size))
        mine = batches[info.rank::info.world_size]
        # Every rank must run the same number of forwards (FSDP gathers weights collectively).
        n_rounds = -(-len(batches) // info.world_size)
        n = len(self.loader.dataset)
        table = torch.full((n, 2), float("nan"), dtype=torch.float64)
        was_training = model.training
        model.eval()
        with adapters_disabled(model):  # a LoRA run's reference is its base; a full run has none to switch off
            for i in range(n_rounds):
                b = mine[i] if i < len(mine) else (mine[-1] if mine else batches[0])
                b = {k: v.to(info.device) for k, v in b.items()}
                lw, ll, _, _, _ = sequence_logps(model, b, self.pad_id, grad=False)
                if i < len(mine):
                    table[b["index"].cpu(), 0] = lw.double().cpu()
                    table[b["index"].cpu(), 1] = ll.double().cpu()
        model.train(was_training)
        if dist.is_initialized() and info.world_size > 1:
            t = table.to(info.device)
            t = torch.where(torch.isnan(t), torch.full_like(t, -float("inf")), t)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # each pair was computed by exactly one rank
            table = t.cpu()
        if info.is_main:
            tmp = owned_temp_file(path)  # a killed writer's is swept by the next run (before_training)
            try:
                with writing(path):
                    save_file({"logps": table.contiguous()}, tmp, metadata={"key": key})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        if dist.is_initialized():
            dist.barrier()
        return table

    def before_training(self, ctx: StepContext) -> None:
        if ctx.opts.dpo.reference == "live" and has_adapters(ctx.model):
            self.ref = BASE_OF_POLICY
            return
        if ctx.opts.dpo.reference == "live":
            ref, _, _ = build_model(ctx.opts, ctx.info, self, frozen=True)
            ref.eval()
            self.ref = ref
            return
        key = json.dumps(self._reference_key(ctx.opts, ctx.cfg, ctx.info.device), sort_keys=True, default=str)
        name = f"ref_logps-{self.loader.data_hash[:12]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        path = os.path.join(self.source, name) if os.access(self.source, os.W_OK) else \
            os.path.join(ctx.opts.output_dir, name)
        if ctx.info.is_main:
            for left in sweep_stale_temp_files(os.path.dirname(path), "ref_logps-"):
                ctx.logger.info(f"removed {left} (left by a killed run)")
        self.ref = self._load_cached(path, key)
        if self.ref is not None:
            ctx.logger.info(f"reference log-probs: {path} (cached)")
        else:
            ctx.logger.info(f"reference log-probs: first pass over {len(self.loader.dataset)} pairs -> {path}")
            self.ref = self._precompute(ctx, path, key)
        # On the training device, so that each micro-step looks its pairs up there: indexing a host table
        # with the batch's device indices would copy them back and wait for the GPU every micro-step.
        self.ref = self.ref.to(ctx.info.device)

    def _load_cached(self, path: str, key: str) -> torch.Tensor | None:
        """The cached table when it exists and was made under exactly this key; safetensors, so
        loading it runs no code. A damaged or foreign file is recomputed over."""
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                table = f.get_tensor("logps")
        except Exception:  # a truncated or foreign file: safetensors raises its own error types
            return None
        n = len(self.loader.dataset)
        return table if table.shape == (n, 2) and table.dtype == torch.float64 else None

    # ------------------------------------------------------------------ the step
    @staticmethod
    def count(batch) -> dict[str, torch.Tensor]:
        return {"pairs": torch.tensor(batch["index"].shape[0]),
                "chosen_tokens": (batch["chosen_labels"][:, 1:] != -100).sum(), "micro_batches": torch.tensor(1)}

    def micro_step(self, ctx: StepContext, b) -> MicroStep:
        o = ctx.opts.dpo
        if self.ref is BASE_OF_POLICY:  # before the policy's forward: FSDP2 then sees an ordinary step
            with adapters_disabled(ctx.model):
                rw, rl, _, _, _ = sequence_logps(ctx.model, b, self.pad_id, grad=False)
        pw, pl, nw, nl, out = sequence_logps(ctx.model, b, self.pad_id, ctx.balance_counts_fn)
        if isinstance(self.ref, torch.Tensor):
            r = self.ref[b["index"].to(self.ref.device)].to(pw.device, pw.dtype)
            rw, rl = r[:, 0], r[:, 1]
        elif self.ref is not BASE_OF_POLICY:
            rw, rl, _, _, _ = sequence_logps(self.ref, b, self.pad_id, grad=False)
        losses, rew_w, rew_l = dpo_loss(pw, pl, rw, rl, nw, nl, o.beta, o.loss_type)
        nll = chosen_nll_sum(pw, nw, o.nll_average)
        nll_over = ctx.totals[NLL_DIVISOR[o.nll_average]]
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=pw.device)
        W, pairs = ctx.info.world_size, ctx.totals["pairs"]
        loss = losses.sum() * W / pairs.to(pw.dtype) + aux / ctx.accum
        if o.nll_coef > 0:
            loss = loss + o.nll_coef * nll * W / nll_over.to(pw.dtype)
        sums = {
            "loss/dpo": losses.sum(), "loss/nll": nll,
            "rewards/chosen": rew_w.sum(), "rewards/rejected": rew_l.sum(),
            "rewards/accuracies": (rew_w > rew_l).double().sum(), "rewards/margins": (rew_w - rew_l).sum(),
            "logps/chosen": pw.sum(), "logps/rejected": pl.sum(),
        }
        layers = tuple(sorted(out.expert_counts))
        counts = torch.stack([out.expert_counts[i] for i in layers]) if layers else None
        return MicroStep(loss, sums, aux=aux, expert_counts=counts, expert_layers=layers,
                         tokens=_real_mask(b["chosen_labels"]).sum() + _real_mask(b["rejected_labels"]).sum())

    def metrics(self, sums, totals, aux_loss) -> dict:
        o = self.options
        out = {k: v / max(totals["pairs"], 1) for k, v in sums.items()}
        out["loss/nll"] = sums["loss/nll"] / max(totals[NLL_DIVISOR[o.nll_average]], 1)
        out["loss/aux"] = aux_loss
        out["loss"] = out["loss/dpo"] + o.nll_coef * out["loss/nll"] + aux_loss
        return out


# Preference tuning moves a trained model a little: a lower peak rate than SFT's. The NLL term on
# the chosen answers is on by default: on the demo, plain sigmoid DPO reached reward accuracy 1.0
# while greedy answers got worse (answers with a format error 14% -> 77.5%: both sides' likelihood
# fell), and with nll_coef 1.0 they fell to 7.5% (benchmarks/demo_format_eval.json).
DPO_DEFAULTS = {"optim": {"lr": 2e-4, "warmup_ratio": 0.05}, "train": {"steps": 150}, "dpo": {"nll_coef": 1.0}}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_error():
        opts = parse_options(argv, "trainer/dpo.py", DPORunOptions, __doc__, default_output="runs/dpo",
                             defaults=DPO_DEFAULTS)
        if not opts.model.init_from and not opts.data.sources:
            # The demo: start from an SFT-ed tiny model, trained now if the SFT demo has not been run.
            opts.model.init_from = demo.dpo_initial_model(
                opts, lambda sft_opts: run(SFTTask(default_data=demo.sft_data), sft_opts, shutdown=False))
        return run(DPOTask(default_data=demo.dpo_data), opts)


if __name__ == "__main__":
    main()
    finish_process(0, parallel.groups_released())
