"""The trainer's error type, and the one place that turns library errors into an exit.

Library code (the loop, sources, checkpoints, options) raises TrainerError beside the data
pipeline's DataError, the converters' CheckpointError and the model's ConfigError; only the entry
points (trainer/sft.py, trainer/dpo.py) turn them into ``error: ...`` and a non-zero exit status,
through ``exit_on_error``.
"""
from __future__ import annotations

import contextlib


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
