"""--checkpoint.async true: saves written in the background while training goes on, with every
guarantee of a save (docs/training.md, "Runs that are never lost"): COMPLETE and the rename only once
the write is done, pruning only after that, a kill at any point leaves the previous checkpoint whole,
SIGTERM waits for the write and saves once, a failed write says so in one line and leaves nothing
that looks complete, and a resume is bitwise the run that was never interrupted.

Kills are simulated as in tests/test_run_safety.py (a BaseException at that point), except the kill
during the write itself, which is a real SIGKILL of a trainer whose writing thread is held up: a
simulated one would run the trainer's own clean-up, which waits for the write."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from data.errors import EXIT_NO_SPACE
from tests.trainer_utils import ROOT, TINY, exported, metrics, refused, run_inproc
from trainer.checkpoint import checkpoint_dirs

BASE = TINY + ["--data.synthetic", "true", "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
               "--checkpoint.every", "2", "--train.steps", "6"]
ASYNC = ("--checkpoint.async", "true")


class Killed(BaseException):
    """The process dying at that point (no handler of ours catches a BaseException)."""


def _run(out, *extra):
    return run_inproc("sft", BASE + ["--output-dir", str(out), *extra])


def _ckpts(out):
    return [s for s, _ in checkpoint_dirs(str(out / "checkpoints"))]


def _complete(out, step):
    return (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists()


def _same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ma, mb):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), (x, y)
    ea, eb = exported(a), exported(b)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run with ordinary saves, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(out, "--checkpoint.keep_last", "3")
    return out


def _hold_writes(monkeypatch, step: int, seconds: float = 0.0, error: OSError | None = None):
    """DCP's item writer, for the files of step ``step``'s checkpoint: waits ``seconds`` before the first
    item (the write stays in flight that long) or raises ``error``."""
    from torch.distributed.checkpoint import filesystem

    real, marker, held = filesystem._write_item, f"step_{step:08d}.tmp", []

    def write_item(transforms, stream, *a, **k):
        if marker in getattr(stream, "name", ""):
            if error is not None:
                raise error
            if not held:
                held.append(True)
                time.sleep(seconds)
        return real(transforms, stream, *a, **k)
    monkeypatch.setattr(filesystem, "_write_item", write_item)


def test_background_saves_train_and_resume_exactly_as_saves(tmp_path, reference):
    out = tmp_path / "run"
    _run(out, *ASYNC, "--checkpoint.keep_last", "3")
    assert _ckpts(out) == [2, 4, 6] and all(_complete(out, s) for s in (2, 4, 6))
    _same_run(reference, out)
    # Cut back to the step-4 checkpoint, which was written in the background: the resume is exact.
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "hf")
    _run(out, *ASYNC, "--checkpoint.keep_last", "3")
    _same_run(reference, out)


def test_training_goes_on_while_the_write_is_in_flight_and_it_is_published_only_once_written(
        tmp_path, monkeypatch, capsys):
    from trainer import loop

    out = tmp_path / "run"
    _hold_writes(monkeypatch, step=4, seconds=1.5)
    seen = {}
    real_step = loop.Trainer.step

    def step(self):
        if self.state.step == 4:  # step 5 begins while step 4's checkpoint is being written
            tmp = out / "checkpoints" / "step_00000004.tmp"
            seen.update(tmp=tmp.is_dir(), tmp_complete=(tmp / "COMPLETE").exists(),
                        final=(out / "checkpoints" / "step_00000004").exists(), previous=_complete(out, 2))
        return real_step(self)
    monkeypatch.setattr(loop.Trainer, "step", step)
    _run(out, *ASYNC, "--checkpoint.keep_last", "1")
    # Not complete, not renamed, and with keep_last 1 the previous one still there: pruned only after.
    assert seen == {"tmp": True, "tmp_complete": False, "final": False, "previous": True}
    assert _ckpts(out) == [6] and not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]
    err = capsys.readouterr().err
    assert err.count(f"saved checkpoint {out / 'checkpoints' / 'step_00000004'} (written in the background") == 1


@pytest.mark.parametrize("at", ["staging", "publishing"])
def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_and_the_rerun_resumes_exactly(
        at, tmp_path, monkeypatch, reference):
    """Killed while the state is copied to host memory (no write started), or after the write ended
    but before COMPLETE and the rename."""
    from torch.distributed.checkpoint.staging import DefaultStager

    from trainer.checkpoint import Checkpointer

    out = tmp_path / "run"
    calls = []
    target, name = (DefaultStager, "stage") if at == "staging" else (Checkpointer, "_publish")
    real = getattr(target, name)

    def killed_at_step_4(self, *a, **k):
        calls.append(name)
        if len(calls) == 2:  # the first call is step 2's save
            raise Killed()
        return real(self, *a, **k)
    monkeypatch.setattr(target, name, killed_at_step_4)
    with pytest.raises(Killed):
        _run(out, *ASYNC, "--checkpoint.keep_last", "1")
    assert _ckpts(out) == [2] and _complete(out, 2) and not _complete(out, 4)
    monkeypatch.setattr(target, name, real)
    _run(out, *ASYNC, "--checkpoint.keep_last", "1")
    _same_run(reference, out)
    assert _ckpts(out) == [6] and not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]


@pytest.mark.parametrize("signal_at", [4, 5])
def test_sigterm_waits_for_the_write_in_flight_then_saves_once(signal_at, tmp_path, monkeypatch, capsys):
    """SIGTERM at the step whose save has just started (4: then that step is saved, not again) or at
    the next one (5: it is saved after step 4's write is published)."""
    from trainer import loop

    out = tmp_path / "run"
    _hold_writes(monkeypatch, step=4, seconds=1.0)
    real_step = loop.Trainer.step

    def step(self):
        if self.state.step + 1 == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's own handler: read in this step's all-reduce
        return real_step(self)
    monkeypatch.setattr(loop.Trainer, "step", step)
    result = _run(out, *ASYNC, "--checkpoint.keep_last", "2")
    assert result["stopped"] and result["step"] == signal_at
    err = capsys.readouterr().err
    ck = out / "checkpoints"
    assert "SIGTERM received: waiting for the checkpoint of step 4 being written" in err
    assert err.count(f"saved checkpoint {ck / 'step_00000004'} (written in the background") == 1
    if signal_at == 4:
        assert "SIGTERM received: step 4 is already saved; exiting" in err and _ckpts(out) == [2, 4]
    else:
        assert err.count(f"saved checkpoint {ck / 'step_00000005'} (") == 1 and _ckpts(out) == [4, 5]
    assert [m["step"] for m in metrics(out)][-1] == signal_at


def test_a_background_write_that_runs_out_of_space_says_so_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _hold_writes(monkeypatch, step=4, error=OSError(errno.ENOSPC, "No space left on device"))
    with refused(capsys, rf"No space left on device writing {out / 'checkpoints' / 'step_00000004.tmp'}"
                         r".*earlier checkpoints are untouched", EXIT_NO_SPACE):
        _run(out, *ASYNC, "--checkpoint.keep_last", "1")
    assert _ckpts(out) == [2] and _complete(out, 2)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]


HELD_TRAINER = """
import sys, time
from torch.distributed.checkpoint import filesystem
real = filesystem._write_item
def write_item(transforms, stream, *a, **k):
    if "step_00000004.tmp" in getattr(stream, "name", ""):
        time.sleep(600)  # step 4's write stays in flight until the process is killed
    return real(transforms, stream, *a, **k)
filesystem._write_item = write_item
from trainer.sft import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_during_the_background_write_leaves_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    args = BASE + ["--output-dir", str(out), *ASYNC, "--checkpoint.keep_last", "1"]
    p = subprocess.Popen([sys.executable, "-c", HELD_TRAINER, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
    finally:
        p.kill()
        p.wait()
    # Training went on to step 5 while step 4's checkpoint was being written; then SIGKILL.
    assert [m["step"] for m in metrics(out)][:5] == [1, 2, 3, 4, 5]
    assert _ckpts(out) == [2] and _complete(out, 2)
    assert not (out / "checkpoints" / "step_00000004.tmp" / "COMPLETE").exists()
    run_inproc("sft", args)
    _same_run(reference, out)
    assert _ckpts(out) == [6] and not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]


@pytest.mark.slow
def test_two_ranks_write_in_the_background_and_resume_exactly(tmp_path):
    """Two gloo ranks: DCP's exchanges run in the writing thread on a group of their own while the step's
    collectives go on, and the write is published at the same step on both ranks."""
    from tests.trainer_utils import run_torchrun

    out = tmp_path / "run"
    args = TINY + ["--data.synthetic", "true", "--train.global_batch_size", "4", "--data.micro_batch_size", "1",
                   "--checkpoint.every", "2", "--train.steps", "6", "--checkpoint.keep_last", "3", *ASYNC,
                   "--output-dir", str(out)]
    run_torchrun("sft", args)
    assert _ckpts(out) == [2, 4, 6] and all(_complete(out, s) for s in (2, 4, 6))
    assert sorted(n for n in os.listdir(out / "checkpoints" / "step_00000004") if n.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    first, first_export = metrics(out), exported(out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "hf")
    run_torchrun("sft", args)
    again = metrics(out)
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in again] == \
        [(m["step"], m["loss"], m["grad_norm"]) for m in first]
    export = exported(out)
    assert all(torch.equal(export[k], first_export[k]) for k in first_export)


@pytest.mark.skipif(not hasattr(os, "setpriority") or not sys.platform.startswith("linux"),
                    reason="per-thread nice values are Linux's")
def test_the_background_write_runs_at_the_lowest_priority_and_training_keeps_its_own(tmp_path, monkeypatch):
    """The writing thread yields the cores to the training loop (benchmarks/save_stall.py: on the 2-core
    CPU the step beside the write took 0.4-0.6 s longer at nice 19, 2.3-4.3 s at equal priority)."""
    import threading
    from torch.distributed.checkpoint import filesystem

    real, seen = filesystem._write_item, []

    def write_item(transforms, stream, *a, **k):
        if "step_00000002.tmp" in getattr(stream, "name", ""):  # the periodic save; the final one is not
            tid = threading.get_native_id()                     # in the background
            seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid)))
        return real(transforms, stream, *a, **k)
    monkeypatch.setattr(filesystem, "_write_item", write_item)
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    _run(tmp_path / "run", *ASYNC, "--train.steps", "3")
    assert seen and all(tid != threading.get_native_id() and nice == 19 for tid, nice in seen), seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    assert os.getpriority(os.PRIO_PROCESS, 0) == main
