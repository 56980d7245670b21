"""Resumable training checkpoints with torch.distributed.checkpoint (DCP).

The layout of <output-dir>/checkpoints/step_N/ is checkpoints_convert.dcp_layout's (the exporter
reads what this writes): the model and optimizer sharded by rank, trainer.json (the same on all
ranks), rank_0000r.pt (data loader position and RNG of rank r), model_config.json, config.yaml and,
written last, COMPLETE.

A save goes to step_N.tmp/ and is renamed to step_N/ by rank 0 once every rank has finished, so a
crash mid-save leaves the previous checkpoint whole and the partial one ignored (and removed later).

A background save (``save(..., background=True)``, the trainer's --checkpoint.async) copies the
state to host memory (pinned on CUDA), starts DCP's write of that copy in a thread and returns;
training goes on. ``finish()`` waits for the write and only then writes COMPLETE, renames and
prunes, exactly as a save does; a failed write removes step_N.tmp/ and raises as a save would. One
write at a time: a save first finishes the write in flight. The trainer calls ``finish()`` once
every rank's write is done (``written()``, summed in the step's all-reduce), before SIGTERM's save
and before the final save.

``trained_only`` (LoRA runs): the model state holds the parameters that train (the adapters), not
the frozen ones, which the run rebuilds from its base; the optimizer state is all of it either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import uuid
import warnings
from concurrent import futures

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from data.errors import NoSpaceError
from data.files import fsync_dir, is_no_space, writing
from trainer.errors import TrainerError
from checkpoints_convert import dcp_read
from checkpoints_convert.dcp_layout import (COMPLETE, MODEL_CONFIG, RUN_CONFIG, TRAINER_STATE, checkpoint_dirs,
                                            latest_checkpoint, rank_state_name, step_dir_name)

__all__ = ["Checkpointer", "checkpoint_dirs", "latest_checkpoint"]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _single_process() -> bool:
    """One rank: DCP then runs without its object collectives (no_dist), which changes nothing on disk.

    Why it matters (measured on the 2-core CPU): DCP gathers its save/load plans with gloo, and
    gloo's gather copies the result in one of its own threads with an ATen parallel copy. That
    thread then owns a second OpenMP thread team; from then on libgomp manages more threads than
    there are cores and throttles its spin-waiting, so every parallel op of the training step pays a
    futex sleep/wake. Steps after the first save (or after a resume) ran about 2x slower
    (benchmarks/train_step.py --save-at reports both). Multi-rank CPU runs under torchrun get one
    OpenMP thread per rank and never form such a team."""
    return not dist.is_initialized() or dist.get_world_size() == 1


@contextlib.contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():  # "... assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


@dataclasses.dataclass
class _Write:
    """A background write in flight."""
    step: int
    tmp: str
    final: str
    future: object  # concurrent.futures.Future of dcp.async_save


class _BackgroundWriter(FileSystemWriter):
    """DCP's file writer at the lowest scheduling priority (nice 19) for its thread: where the cores
    are all taken by the training loop (a CPU run, whose compute threads spin-wait on each other),
    the write then runs in their gaps instead of taking a core from one of them mid-step."""

    def write_data(self, plan, planner):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        return super().write_data(plan, planner)


def _host_stager(pin_memory: bool):
    """DCP's stager, kept for the run: it copies the state into host buffers it allocates once (pinned
    for fast device-to-host copies on CUDA) and reuses at every later save."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        raise TrainerError(f"checkpoint.async needs torch.distributed.checkpoint.staging.DefaultStager "
                           f"(torch >= 2.9); this is torch {torch.__version__}") from None
    return DefaultStager(StagingOptions(use_pinned_memory=pin_memory, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


class Checkpointer:
    def __init__(self, root: str, rank: int, keep_last: int = 2, background: bool = False, pin_memory: bool = False,
                 trained_only: bool = False):
        self.root, self.rank, self.keep_last = root, rank, keep_last
        self.trained_only = trained_only
        self.pending: _Write | None = None
        self._stager = self._group = self._launched = None
        if background:
            self._stager = _host_stager(pin_memory)
            if _single_process():  # DCP's writing thread says so at every save, outside _quiet_single_process
                warnings.filterwarnings("ignore", message=".*assuming the intent is to save", category=UserWarning)
            else:
                # DCP exchanges plans and results between ranks from the writing thread: on a gloo group
                # of its own, so that they never interleave with the training step's collectives.
                self._group = dist.new_group(backend="gloo")

    def _state_dict_options(self, **kw) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trained_only, **kw)

    def save(self, step: int, model, optimizer, trainer_state: dict, rank_state: dict,
             model_config: dict, config_yaml: str, background: bool = False, extra_json: dict | None = None) -> str:
        """The checkpoint of ``step``; with ``background`` only started (see the module docstring).
        ``extra_json``: {file name: object} written beside trainer.json by rank 0 (LoRA's lora.json)."""
        self.finish()  # one write at a time
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        if os.path.exists(os.path.join(final, COMPLETE)):
            # This step is saved already (the same state): a complete checkpoint is never rewritten,
            # so no moment exists at which it is gone. (Every rank sees the same directory.)
            _barrier()
            return final
        with self._nothing_left_on_failure(tmp):
            self._launched = None
            try:
                self._write(step, tmp, model, optimizer, trainer_state, rank_state, model_config, config_yaml,
                            background, extra_json or {})
            except BaseException:
                if self._launched is not None:  # its thread still writes into tmp: let it end before removing
                    futures.wait([self._launched])
                raise
        if background:
            self.pending = _Write(step, tmp, final, self._launched)
            return final
        self._publish(step, tmp, final)
        return final

    def written(self) -> bool:
        """Whether this rank's background write, if one is in flight, has ended (well or not)."""
        return self.pending is not None and self.pending.future.done()

    def finish(self, barrier: bool = True) -> str | None:
        """Wait for the background write in flight (if any), then publish it as save() publishes: COMPLETE,
        the rename, pruning. Returns its directory. A failed write leaves nothing and raises as save()
        does. ``barrier=False`` for a run ending on an error, when another rank may be gone: rank 0's
        write ends only after every rank's has (DCP gathers their results), so it publishes alone."""
        w, self.pending = self.pending, None
        if w is None:
            return None
        with self._nothing_left_on_failure(w.tmp):
            w.future.result()  # what the writing thread raised, raised here
        self._publish(w.step, w.tmp, w.final, barrier)
        return w.final

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
        self._stager = self._group = None

    @contextlib.contextmanager
    def _nothing_left_on_failure(self, tmp: str):
        try:
            with writing(tmp):
                try:
                    yield
                except CheckpointException as e:  # DCP gathers every rank's write error into one of these
                    errors = [exc for exc, _ in e.failures.values()]
                    no_space = next((exc for exc in errors if is_no_space(exc, tmp)), None)
                    if no_space is not None:
                        raise no_space from None
                    raise
        except NoSpaceError as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise NoSpaceError(f"{e}; the earlier checkpoints are untouched") from None

    def _publish(self, step: int, tmp: str, final: str, barrier: bool = True) -> None:
        """Rank 0, once every rank's files are in ``tmp``: COMPLETE, the rename, pruning."""
        if self.rank == 0:
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                f.write(f"{step}\n")
            if os.path.exists(final):  # an incomplete leftover of the same step: not a checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune(step)
        if barrier:
            _barrier()

    def _write(self, step, tmp, model, optimizer, trainer_state, rank_state, model_config, config_yaml,
               background=False, extra_json=None) -> None:
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        msd, osd = get_state_dict(model, optimizer, options=self._state_dict_options())
        with _quiet_single_process():
            if background:  # the copy to host memory is made here; the thread writes the copy
                self._launched = dcp.async_save({"model": msd, "optim": osd}, storage_writer=_BackgroundWriter(tmp),
                                                no_dist=_single_process(), process_group=self._group,
                                                async_stager=self._stager)
            else:
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp, no_dist=_single_process())
        torch.save(rank_state, os.path.join(tmp, rank_state_name(self.rank)))
        if self.rank == 0:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:  # save_id: checkpoint_identity's
                json.dump({**trainer_state, "save_id": uuid.uuid4().hex}, f, indent=2)
            with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
                json.dump(model_config, f, indent=2)
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                f.write(config_yaml)
            for name, obj in extra_json.items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2)
        _barrier()

    def _prune(self, saved: int) -> None:
        """After ``saved`` is complete and in place: delete the oldest beyond keep_last, never ``saved``
        itself nor a checkpoint of a later step (those are not this run's to judge)."""
        dirs = [(s, p) for s, p in checkpoint_dirs(self.root) if s < saved]
        for _, path in dirs[:max(0, len(dirs) - (self.keep_last - 1))] if self.keep_last > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # leftovers of saves that crashed
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def load(self, path: str, model, optimizer) -> tuple[dict, dict]:
        """Restore model and optimizer in place; returns (trainer_state, this rank's rank_state)."""
        msd, osd = get_state_dict(model, optimizer, options=self._state_dict_options())
        state = {"model": msd, "optim": osd}
        dcp_read.load(state, path, no_dist=_single_process())  # data only: no pickle from the checkpoint runs
        # Without the frozen parameters, load_state_dict's strict check would count them as missing:
        # DCP has already loaded every key of msd (it fails on an absent one), so nothing is.
        keys = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                              options=self._state_dict_options(strict=not self.trained_only))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        unexpected = [k for k in getattr(keys, "missing_keys", []) if k not in frozen]
        if unexpected:
            raise TrainerError(f"{path}: the checkpoint does not hold {unexpected[:5]}")
        with open(os.path.join(path, TRAINER_STATE)) as f:
            trainer_state = json.load(f)
        rank_file = os.path.join(path, rank_state_name(self.rank))
        if not os.path.exists(rank_file):
            raise TrainerError(f"{path}: no {os.path.basename(rank_file)}; resume with the same number of ranks "
                               f"the checkpoint was written with")
        rank_state = dcp_read.load_plain(rank_file)  # plain data: loader position and the RNG state tensor
        return trainer_state, rank_state
