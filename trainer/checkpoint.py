"""Resumable training checkpoints with torch.distributed.checkpoint (DCP).

The layout of <output-dir>/checkpoints/step_N/ is checkpoints_convert.dcp_layout's (the exporter
reads what this writes): the model and optimizer sharded by rank, trainer.json (the same on all
ranks), rank_0000r.pt (data loader position and RNG of rank r), model_config.json, config.yaml and,
written last, COMPLETE.

A save goes to step_N.tmp/ and is renamed to step_N/ by rank 0 once every rank has finished, so a
crash mid-save leaves the previous checkpoint whole and the partial one ignored (and removed later).

``trained_only`` (LoRA runs): the model state holds the parameters that train (the adapters), not
the frozen ones, which the run rebuilds from its base; the optimizer state is all of it either way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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


class Checkpointer:
    def __init__(self, root: str, rank: int, keep_last: int = 2, trained_only: bool = False):
        self.root, self.rank, self.keep_last = root, rank, keep_last
        self.trained_only = trained_only

    def _state_dict_options(self, **kw) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trained_only, **kw)

    def save(self, step: int, model, optimizer, trainer_state: dict, rank_state: dict,
             model_config: dict, config_yaml: str, extra_json: dict | None = None) -> str:
        """``extra_json``: {file name: object} written beside trainer.json by rank 0 (LoRA's lora.json)."""
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        if os.path.exists(os.path.join(final, COMPLETE)):
            # This step is saved already (the same state): a complete checkpoint is never rewritten,
            # so no moment exists at which it is gone. (Every rank sees the same directory.)
            _barrier()
            return final
        try:
            with writing(tmp):
                try:
                    self._write(step, tmp, model, optimizer, trainer_state, rank_state, model_config, config_yaml,
                                extra_json or {})
                except CheckpointException as e:  # DCP gathers every rank's write error into one of these
                    errors = [exc for exc, _ in e.failures.values()]
                    no_space = next((exc for exc in errors if is_no_space(exc)), None)
                    if no_space is not None:
                        raise no_space from None
                    raise
        except NoSpaceError as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise NoSpaceError(f"{e}; the earlier checkpoints are untouched") from None
        if self.rank == 0:
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                f.write(f"{step}\n")
            if os.path.exists(final):  # an incomplete leftover of the same step: not a checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune(step)
        _barrier()
        return final

    def _write(self, step, tmp, model, optimizer, trainer_state, rank_state, model_config, config_yaml,
               extra_json) -> None:
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        msd, osd = get_state_dict(model, optimizer, options=self._state_dict_options())
        with _quiet_single_process():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp, no_dist=_single_process())
        torch.save(rank_state, os.path.join(tmp, rank_state_name(self.rank)))
        if self.rank == 0:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(trainer_state, f, indent=2)
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
