"""The run directory's safety rules: one trainer per directory, no two runs mixed, options that may
and may not change on resume, temporaries of killed runs removed, workers that die with torchrun.

    <output-dir>/.lock                 locked (flock) by the trainer using the directory (rank 0), with its
                                       host, pid, start time and command; removed when it ends
    <output-dir>/config_changes.jsonl  one line per resume that changed an option: step, old and new values

Everything here runs on rank 0 (the lock, the checks, the moves) before anything else is written;
the other ranks wait for its verdict (``on_rank0``).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import signal
import socket
import sys
import time

import torch.distributed as dist
import yaml

from checkpoints_convert.dcp_layout import COMPLETE, RUN_CONFIG, TRAINER_STATE, checkpoint_dirs
from data.errors import BadInputError, InUseError, LingmoeError, MissingFileError, NoSpaceError, exit_code_of
from data.files import OWNER_FILE, FileLock, process_alive, process_identity, remove_tree
from trainer.errors import TrainerError

LOCK_NAME = ".lock"
CHANGES_NAME = "config_changes.jsonl"
HF_RECORD = "hf_export.json"  # which checkpoint <output-dir>/hf was exported from, written after it
# What belongs to one run (moved aside together by --overwrite). The prepared-data cache and the DPO
# reference cache are keyed by their inputs, not by the run, and stay.
RUN_STATE = ("checkpoints", "metrics.jsonl", "config.yaml", CHANGES_NAME, "hf", "adapter", HF_RECORD)

# Options a resumed run may change; every other option (the model, data, seq_len, batch sizes, seed,
# the objective, the device) is fixed for the life of a run. The ranks' count is fixed too.
CHANGEABLE = {
    "optim": {"lr", "min_lr_ratio", "warmup_steps", "warmup_ratio", "weight_decay", "grad_clip"},
    "train": {"steps", "log_every", "max_bad_steps", "peak_tflops", "ceiling_tflops", "progress", "profile_step"},
    "checkpoint": {"every", "keep_last", "resume", "export_hf", "save_final", "async"},
    "log": {"wandb_project", "wandb_run_name"},
    "model": {"expert_backend", "expert_recompute", "activation_checkpointing", "compile"},  # how, not what, is computed
    "data": {"cache_dir"},  # the prepared data are keyed by content wherever they are cached
    # layouts and where state lives: DCP reshards between them, the numbers are the same (tested)
    "parallel": {"ep", "one_rank", "offload"},
}


# What a failure on rank 0 becomes on the other ranks: the same kind of error (so the same exit code).
_REMOTE = {cls.exit_code: cls for cls in (TrainerError, BadInputError, InUseError)}


def on_rank0(fn):
    """Run ``fn()`` on rank 0 only; every rank gets its result, or an error of the kind rank 0 raised."""
    out = [None, None, None]
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            out = [fn(), None, None]
        except (LingmoeError, OSError) as e:  # the other ranks are waiting for the verdict: never leave them
            error = e
            out = [None, str(e), exit_code_of(e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    if error is not None:
        raise error
    if out[1] is not None:
        code = out[2]
        if code == NoSpaceError.exit_code:
            raise NoSpaceError(out[1])
        if code == MissingFileError.exit_code:
            raise MissingFileError(out[1])
        raise _REMOTE.get(code, TrainerError)(out[1])
    return out[0]


# ---------------------------------------------------------------- the lock

def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            + (f", command: {holder['command']}" if holder.get("command") else ""))


class RunLock:
    """``<output-dir>/.lock``: a data.files.FileLock (flock, released by the kernel when its holder
    dies, however it dies) holding a record of the trainer that holds it. Taking it is one system
    call, so two launches can never both hold it, and a dead trainer's lock is free at once. A
    record left by a trainer that was killed on another host is refused: on a network file system
    that host's lock may not reach this one, so it cannot be known to be gone."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.identity = process_identity()
        self.lock = FileLock(self.path)

    @property
    def held(self) -> bool:
        return self.lock.fd is not None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a killed trainer's record was there. Raises InUseError
        when another trainer holds it."""
        if not self.lock.acquire(blocking=False):
            holder = _parse(self.lock.read())
            about = f": {_describe(holder)}" if holder else ""
            raise InUseError(f"{os.path.dirname(self.path)} is in use by another trainer{about}. Wait for it, stop "
                             f"it, or choose another --output-dir")
        warning = None
        left = _parse(self.lock.read())  # a record nobody holds: its trainer died without releasing
        if left and left.get("owner") != self.identity:
            if left.get("host") not in (None, socket.gethostname()):
                self.lock.release()
                raise InUseError(f"{os.path.dirname(self.path)} is in use by another trainer (on another host: its "
                                 f"liveness cannot be checked here): {_describe(left)}. If it is surely gone, "
                                 f"remove {self.path}")
            warning = f"taking over the lock of a trainer that is gone ({_describe(left)})"
        self.lock.write(json.dumps({
            "owner": self.identity, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(sys.argv)}))
        return warning

    def release(self) -> None:
        self.lock.release(remove=True)


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


# ---------------------------------------------------------------- what is already there

def existing_run(output_dir: str) -> list[str]:
    """A description of each piece of an earlier run found in ``output_dir`` (empty: none)."""
    found = []
    dirs = checkpoint_dirs(os.path.join(output_dir, "checkpoints"))
    if dirs:
        found.append(f"{len(dirs)} checkpoint(s) up to step {dirs[-1][0]} in {os.path.join(output_dir, 'checkpoints')}")
    mpath = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(mpath) and os.path.getsize(mpath) > 0:
        with open(mpath, "rb") as f:
            lines = sum(1 for _ in f)
        found.append(f"{mpath} ({lines} lines)")
    if os.path.isdir(os.path.join(output_dir, "hf")):
        found.append(f"an HF export in {os.path.join(output_dir, 'hf')}")
    if os.path.isdir(os.path.join(output_dir, "adapter")):
        found.append(f"a LoRA adapter in {os.path.join(output_dir, 'adapter')}")
    return found


# Files of a run the trainer reads back and appends to: each must be a regular file (a symlink to one
# is fine). A device or pipe in their place (a symlink to /dev/full) would be read without end.
RUN_FILES = ("metrics.jsonl", CHANGES_NAME, "config.yaml")


def check_run_files(output_dir: str) -> None:
    """Refuse, naming it, a run file (RUN_FILES) that exists but is not a regular file."""
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            what = "a directory" if os.path.isdir(path) else "a broken link" if not os.path.exists(path) else \
                "not a regular file (a device, pipe or socket)"
            raise BadInputError(f"{path} is {what}: the trainer reads it back and appends to it; remove it or "
                                f"choose another --output-dir")


def move_aside(output_dir: str) -> str:
    """--overwrite: move the earlier run's files (RUN_STATE) into a sibling directory; returns it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = f"{os.path.abspath(output_dir).rstrip(os.sep)}.replaced-{stamp}"
    n = 0
    while os.path.exists(aside if n == 0 else f"{aside}-{n}"):
        n += 1
    aside = aside if n == 0 else f"{aside}-{n}"
    os.makedirs(aside)
    for name in RUN_STATE:
        src = os.path.join(output_dir, name)
        if os.path.lexists(src):
            os.rename(src, os.path.join(aside, name))
    return aside


def sweep_temporaries(output_dir: str) -> list[str]:
    """Remove what killed runs left half-written: step_N.tmp/ of interrupted saves, temporaries of
    interrupted HF exports (.hf.tmp-*) and of metrics rewrites. Called under the lock, so no live
    trainer owns them; an export temporary that records a live owner (a conversion someone started
    by hand into this directory) is left alone."""
    removed = []
    root = os.path.join(output_dir, "checkpoints")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(".tmp") and remove_tree(os.path.join(root, name)):
            removed.append(os.path.join(root, name))
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(".hf.tmp-") and os.path.isdir(path):
            try:
                with open(os.path.join(path, OWNER_FILE)) as f:
                    if process_alive(json.load(f)["owner"]) is not False:
                        continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no owner recorded: the trainer's own export, and the lock says it is gone
            if remove_tree(path):  # only what is really gone is reported
                removed.append(path)
        elif name == "metrics.jsonl.tmp":
            try:
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
    return removed


# ---------------------------------------------------------------- options on resume

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_world_size(step_dir: str) -> int | None:
    try:
        with open(os.path.join(step_dir, TRAINER_STATE)) as f:
            ws = json.load(f).get("world_size")
    except (OSError, ValueError):
        return None
    if ws is None:  # checkpoints written before world_size was recorded: one state file per rank
        ws = sum(1 for n in os.listdir(step_dir) if n.startswith("rank_") and n.endswith(".pt")) or None
    return ws


def compare_options(step_dir: str, new: dict, world_size: int) -> dict[str, tuple]:
    """The options that differ from those ``step_dir`` was written with, as {name: (old, new)}.
    Raises TrainerError listing the fixed ones that differ."""
    try:
        with open(os.path.join(step_dir, RUN_CONFIG)) as f:
            old = yaml.safe_load(f) or {}
    except OSError:
        return {}
    old_flat, new_flat = _flat({k: v for k, v in old.items() if k != "output_dir"}), \
        _flat({k: v for k, v in new.items() if k != "output_dir"})
    # An option the checkpoint does not name did not exist when it was written: not a difference.
    diffs = {k: (old_flat[k], new_flat.get(k, "(unset)"))
             for k in sorted(old_flat) if old_flat[k] != new_flat.get(k, "(unset)")}
    old_ws = checkpoint_world_size(step_dir)
    fixed = {k: v for k, v in diffs.items() if k.split(".", 1)[1] not in CHANGEABLE.get(k.split(".", 1)[0], ())}
    if old_ws is not None and old_ws != world_size:
        fixed["ranks"] = (old_ws, world_size)
    if fixed:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in fixed.items())
        raise TrainerError(f"cannot resume {step_dir} with different settings that a run cannot change: {listed}. "
                           f"Use the same values, or start a new run (another --output-dir, or --overwrite)")
    return diffs


def record_changes(output_dir: str, step: int, step_dir: str, changes: dict[str, tuple]) -> None:
    rec = {"step": step, "time": round(time.time(), 3), "checkpoint": os.path.basename(step_dir),
           "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
    with open(os.path.join(output_dir, CHANGES_NAME), "a") as f:
        f.write(json.dumps(rec) + "\n")


def export_is_of(record: str, checkpoint: str, identity: str) -> bool:
    """Whether the export record ``record`` (hf_export.json) names this very save of ``checkpoint``.
    A record written before identities existed names only the step: it counts when the checkpoint's
    COMPLETE is not newer than the record, i.e. the step was not saved again after that export."""
    try:
        with open(record) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or rec.get("checkpoint") != os.path.basename(checkpoint):
        return False
    if "identity" in rec:
        return rec["identity"] == identity
    try:
        return os.stat(os.path.join(checkpoint, COMPLETE)).st_mtime_ns <= os.stat(record).st_mtime_ns
    except OSError:
        return False


def complete(step_dir: str) -> bool:
    return os.path.exists(os.path.join(step_dir, COMPLETE))


# ---------------------------------------------------------------- torchrun's workers

PR_SET_PDEATHSIG = 1


def die_with_launcher() -> bool:
    """Under torchrun: ask the kernel to send this worker SIGTERM when the launcher dies (even by
    SIGKILL), so a killed launcher leaves no worker training on as an orphan; the SIGTERM path then
    saves and exits. torchrun starts each worker in its own session, so nothing else reaches them.
    Linux only; returns whether it is armed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True

