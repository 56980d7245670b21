"""The trainer's error type, and how a finished trainer process leaves.

Library code (the loop, sources, checkpoints, options) raises TrainerError, or the lower packages'
errors (DataError, CheckpointError, ConfigError, NoSpaceError): all of them are
``data.errors.LingmoeError``, and only the entry points (trainer/sft.py, trainer/dpo.py) turn them
into ``error: ...`` and an exit code, through ``data.errors.exit_on_error``.
"""
from __future__ import annotations

import os
import sys

from data.errors import LingmoeError


class TrainerError(LingmoeError):
    """A training run that cannot start or go on: bad options, data, device or checkpoint state."""


def finish_process(status: int = 0, groups_released: bool = True) -> None:
    """The end of a trainer process whose run is complete and closed.

    Normally the interpreter exits as usual. Under torchrun, if a process group outlived the run
    (``groups_released`` false: something still references it, see parallel.shutdown_distributed),
    its gloo worker threads may still be freeing a collective's tensors when the interpreter
    finalizes, which aborts the process ("terminate called without an active exception") after the
    run was saved and exported, and the launcher then reports a finished run as failed. Only then
    the process says so, flushes and leaves by os._exit, without the interpreter's teardown."""
    if groups_released or "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(status)
    print("warning: a process group is still referenced at exit; leaving without the interpreter's "
          "teardown so that its threads cannot abort a finished run", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
