"""The project's one error base, its exit codes, and the one place that turns an error into an exit.

Every error the project raises for something a user can fix (bad input, a missing file, a directory
another trainer uses, a full disk) is a ``LingmoeError``; its class says which exit code it ends a
command with. Anything else that escapes is a bug and keeps its traceback.

Exit codes of every command (``trainer/sft.py``, ``trainer/dpo.py``, ``python -m data.prepare``, the
converters, the tools):

    0    success
    1    the work could not go on (non-finite loss, a device problem, a failed step)
    2    bad input: options, recipe, data, model config, checkpoint contents
    3    a file or directory that was named does not exist
    4    the run directory is in use by another trainer
    5    no space left on the device being written
    130  interrupted (Ctrl-C); nothing half-written is left behind

This module and data/files.py are the floor every package may import: they import nothing of ours.
"""
from __future__ import annotations

import contextlib
import errno
import sys

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING = 3
EXIT_IN_USE = 4
EXIT_NO_SPACE = 5
EXIT_INTERRUPTED = 130


class LingmoeError(Exception):
    """An error a user can act on; ``exit_code`` is what a command ends with when it escapes."""

    exit_code = EXIT_FAILED


class BadInputError(LingmoeError, ValueError):
    """Input that cannot be used as given (options, files' contents, configurations)."""

    exit_code = EXIT_BAD_INPUT


class _SystemLikeError(LingmoeError, OSError):
    """Our error that is also the OSError the system would raise (so code catching FileNotFoundError
    or OSError sees it), with our one-line message instead of "[Errno N] ..."."""

    errno_code = 0

    def __init__(self, message: str):
        super().__init__(self.errno_code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class MissingFileError(_SystemLikeError, FileNotFoundError):
    """A file or directory that was named but is not there; the message names it."""

    exit_code, errno_code = EXIT_MISSING, errno.ENOENT


class OutputExistsError(_SystemLikeError, FileExistsError):
    """An output that exists (or appeared while writing) and may not be replaced; left untouched."""

    exit_code, errno_code = EXIT_BAD_INPUT, errno.EEXIST


class InUseError(LingmoeError):
    """A directory or resource another live process holds (a run directory's lock)."""

    exit_code = EXIT_IN_USE


class NoSpaceError(_SystemLikeError):
    """Not enough free space for a write; the message names the path and the sizes."""

    exit_code, errno_code = EXIT_NO_SPACE, errno.ENOSPC


class DataError(BadInputError):
    """Bad input data, located by file and line so the user can fix the source.

    ``file`` and ``line`` may be None when the data did not come from a file (e.g. a message list
    built in Python); ``problem`` is the human-readable reason on its own.
    """

    def __init__(self, problem, file=None, line=None):
        self.problem = str(problem)
        self.file = None if file is None else str(file)
        self.line = line
        where = ""
        if self.file is not None:
            where = self.file + (f":{line}" if line is not None else "") + ": "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + self.problem)

    def located(self, file, line):
        """The same problem, attached to a file/line (used when re-raising from a reader)."""
        return DataError(self.problem, file=file, line=line)


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code an escaping exception ends a command with; None for a bug (keep its traceback).

    Besides our own errors, an OSError from the system (a permission denied, a missing path, a full
    disk under another layer) is the environment's, not a bug: it is reported by its message, which
    names the path."""
    if isinstance(exc, LingmoeError):
        return exc.exit_code
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_NO_SPACE
        if exc.errno == errno.ENOENT:
            return EXIT_MISSING
        return EXIT_FAILED
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, LingmoeError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


@contextlib.contextmanager
def exit_on_error():
    """For entry points: an escaping error becomes ``error: ...`` on stderr and its exit code (see the
    module docstring); Ctrl-C becomes exit 130. Progress bars must be closed before this runs (the
    commands open them in ``with`` blocks), so the message starts on a line of its own."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        code = exit_code_of(e)
        if code is None:
            raise
        print(f"error: {_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def run_cli(main, argv=None) -> int:
    """``sys.exit(run_cli(main))`` for a command whose ``main(argv)`` returns an exit status."""
    try:
        with exit_on_error():
            return main(argv) or 0
    except SystemExit as e:  # from exit_on_error or argparse, which have printed their message
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            return EXIT_FAILED
        return 0 if e.code is None else e.code
