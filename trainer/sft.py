"""Supervised fine-tuning of a BailingMoe (Ling-Lite) model with FSDP2.

    torchrun --nproc_per_node=N trainer/sft.py [--config configs/X.yaml] [--section.key value ...] [--output-dir DIR]
    python trainer/sft.py                # one process; with no options: the tiny CPU demo

With no options it trains the tiny preset on the generated demo corpus (general : reasoning mixed
340 : 550 as in the Ring-Lite-Distill stage-2 recipe) for a few minutes on CPU, printing a falling
loss, and writes runs/sft/{metrics.jsonl, config.yaml, checkpoints/, hf/}. Run again to resume;
`--checkpoint.resume false --overwrite` starts over (the old run is moved aside). See configs/ for
the Ling-Lite stage-1/2 recipes and `--help` for every option.

Loss per step = (sum of token cross entropies over the step's trained tokens on all ranks) / (their
count) + the load-balancing loss (expert counts summed over ranks for the 'global' form) + z-loss;
for a model with MTP layers (Ling 2.0) also mtp_loss_scaling_factor x each MTP layer's cross
entropy, normalised the same way by its own global target count (--model.mtp false leaves them out).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (torchrun trainer/sft.py): import from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from data import SFTLoader
from data.errors import exit_on_error
from moe.heads import CHUNK_TOKENS, CrossEntropy, mtp_labels
from trainer import demo, parallel
from trainer.errors import finish_process
from trainer.loop import MicroStep, StepContext, run
from trainer.options import Options, parse_options
from trainer.sources import sources_and_vocab
from trainer.synthetic import SyntheticLoader


class SFTTask:
    """``default_data(opts) -> (dirs, weights, tokenizer dir)``: the data when data.sources is empty
    (the entry script passes the demo corpus's; None refuses an empty data.sources)."""
    name = "sft"
    # The summed token CE, chunk by chunk: the step normalises it by the tokens of all ranks and
    # micro-batches, and no [B, S, V] logits are kept.
    head = CrossEntropy(chunk_size=CHUNK_TOKENS)

    def __init__(self, default_data=None):
        self.tokenizer = None
        self.dirs = None
        self.default_data = default_data
        self.mtp_depth = 0  # MTP layers trained (their targets are counted like the main ones)
        self.mtp_factor = 0.0

    def adjust_model_config(self, opts, cfg, info):
        if opts.data.synthetic:
            return cfg
        self.dirs, self.weights, self.tokenizer, cfg = sources_and_vocab(opts, info.rank, "sft", cfg,
                                                                         self.default_data)
        return cfg

    def build_loader(self, opts, info, accum, cfg):
        self.mtp_depth = cfg.num_nextn_predict_layers if cfg.mtp_enabled else 0
        self.mtp_factor = cfg.mtp_loss_scaling_factor
        if opts.data.synthetic:
            return SyntheticLoader(cfg.vocab_size, opts.data.seq_len, opts.data.micro_batch_size, accum,
                                   info.rank, info.world_size, opts.train.seed,
                                   docs_per_row=opts.data.synthetic_docs_per_row)
        return SFTLoader(self.dirs, opts.data.seq_len, opts.data.micro_batch_size, rank=info.rank,
                              world_size=info.world_size, seed=opts.train.seed, weights=self.weights)

    def before_training(self, ctx: StepContext) -> None:
        pass

    def count(self, batch) -> dict[str, torch.Tensor]:
        out = {"tokens": (batch["labels"][:, 1:] != -100).sum()}
        for j in range(1, self.mtp_depth + 1):
            out[f"mtp_tokens_{j}"] = (mtp_labels(batch["labels"], j, batch.get("document_ids"))[:, 1:] != -100).sum()
        return out

    def micro_step(self, ctx: StepContext, b) -> MicroStep:
        out = ctx.model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                        document_ids=b.get("document_ids"), head=self.head, balance_counts_fn=ctx.balance_counts_fn)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=out.ce_sum.device)
        W = ctx.info.world_size
        loss = out.ce_sum * W / ctx.totals["tokens"].to(out.ce_sum.dtype) + aux / ctx.accum
        sums = {"loss": out.ce_sum}
        for j, ce in enumerate(out.mtp_ce_sums, start=1):
            loss = loss + self.mtp_factor * ce * W / ctx.totals[f"mtp_tokens_{j}"].to(ce.dtype)
            sums[f"mtp_{j}"] = ce
        docs = b.get("document_ids")
        layers = tuple(sorted(out.expert_counts))
        counts = torch.stack([out.expert_counts[i] for i in layers]) if layers else None
        return MicroStep(loss, sums, aux=aux, expert_counts=counts, expert_layers=layers,
                         tokens=(docs >= 0).sum() if docs is not None else b["input_ids"].numel())

    @staticmethod
    def metrics(sums, totals, aux_loss) -> dict:
        """loss: the main next-token cross entropy; mtp_loss: the MTP layers' cross entropies (each a
        mean over its targets, unscaled, summed over the layers) when there are any."""
        out = {"loss": sums["loss"] / max(totals["tokens"], 1)}
        mtp = [sums[k] / max(totals[f"mtp_tokens_{k[4:]}"], 1) for k in sorted(sums) if k.startswith("mtp_")]
        if mtp:
            out["mtp_loss"] = sum(mtp)
        return out


def main(argv=None) -> dict:
    with exit_on_error():
        opts = parse_options(argv, "trainer/sft.py", Options, __doc__, default_output="runs/sft")
        return run(SFTTask(default_data=demo.sft_data), opts)


if __name__ == "__main__":
    main()
    finish_process(0, parallel.groups_released())
