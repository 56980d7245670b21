"""One logger that only rank 0 writes through: console, <output-dir>/metrics.jsonl, optional wandb."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm

from data.errors import NoSpaceError
from data.files import writing
from trainer.errors import TrainerError


class _NoWandb:
    def log(self, *a, **k):
        pass

    def finish(self):
        pass


class RunLogger:
    def __init__(self, is_main: bool, output_dir: str, wandb_project: str = "", run_name: str = "",
                 config: dict | None = None, resume_step: int = 0, resumed: bool = True):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.wandb = _NoWandb()
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resumed and os.path.exists(self.path):
            # Steps past the checkpoint (all of them when there is none: a run killed before its first
            # save) are about to be redone: each step is in the file once.
            self._truncate_after(resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrainerError("log.wandb_project is set but wandb is not installed "
                                 "(pip install wandb, or leave log.wandb_project empty)") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name or os.path.basename(output_dir.rstrip("/")),
                                    config=config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """After a resume, drop lines of steps past the checkpoint: they are about to be redone."""
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def info(self, msg: str) -> None:
        if self.is_main:  # through tqdm: a progress bar on the terminal is cleared first, then redrawn
            tqdm.write(msg, file=sys.stderr)

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf
            rec[k] = v
        try:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # NoSpaceError (named by writing()) passes as it is
            if isinstance(e, NoSpaceError):
                raise
            raise TrainerError(f"{self.path}: step {step}'s metrics could not be written ({e.strerror or e})") from None
        self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.is_main:
            self.wandb.finish()


def format_metrics(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}"]
    for k, fmt in (("loss", ".4f"), ("mtp_loss", ".4f"), ("loss/dpo", ".4f"), ("loss/nll", ".4f"), ("rewards/accuracies", ".3f"),
                   ("rewards/margins", ".3f"),
                   ("aux_loss", ".2e"), ("lr", ".2e"), ("grad_norm", ".3f"),
                   ("tokens_per_s", ".0f"), ("mfu", ".1%"), ("expert_load_max_over_mean", ".2f")):
        if k in m and isinstance(m[k], (int, float)):
            parts.append(f"{k} {m[k]:{fmt}}")
    if m.get("data_truncated") or m.get("data_dropped"):
        parts.append(f"docs truncated {m.get('data_truncated', 0)}, dropped {m.get('data_dropped', 0)}")
    return " | ".join(parts)
