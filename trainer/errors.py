"""The trainer's error type, and the one place that turns library errors into an exit.

Library code (the loop, sources, checkpoints, options) raises TrainerError beside the data
pipeline's DataError, the converters' CheckpointError and the model's ConfigError; only the entry
points (trainer/sft.py, trainer/dpo.py) turn them into ``error: ...`` and a non-zero exit status,
through ``exit_on_error``.
"""
from __future__ import annotations

import contextlib
import os
import sys


class TrainerError(RuntimeError):
    """A training run that cannot start or go on: bad options, data, device or checkpoint state."""


@contextlib.contextmanager
def exit_on_error():
    """For entry points: any known error becomes SystemExit("error: ...") (exit status 1)."""
    from checkpoints_convert import CheckpointError
    from data import DataError
    from data.files import NoSpaceError
    from moe.config import ConfigError

    try:
        yield
    except (TrainerError, DataError, CheckpointError, ConfigError, NoSpaceError) as e:
        raise SystemExit(f"error: {e}") from None


def finish_process(status: int = 0) -> None:
    """The end of a torchrun worker whose run is complete and closed: flush and leave without the
    interpreter's C++ teardown. On the 2-core CPU, two-rank gloo runs of the trainer aborted there
    about one time in four under load ("terminate called without an active exception", SIGABRT,
    with no Python frame left), after everything was saved, exported and closed, so the launcher
    reported a finished run as failed. Outside torchrun the interpreter exits normally."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
