"""Writing files without losing anything: free-space checks, owned temporary directories, and
errors that name the path.

Used by everything that writes large outputs (data preparation, conversions, HF exports, trainer
checkpoints). It lives in ``data`` because that package imports nothing else of ours, so every
other package may build on it.

- ``require_space(path, nbytes, what)``: refuse before writing, with "needs X GB at PATH, Y GB free".
- ``OwnedTempDir(target)``: a temporary directory beside ``target`` (same file system, so the final
  rename is atomic) whose name records its owner; on entry it removes the temporaries of earlier
  runs for the same target whose owner process is gone. On success it becomes ``target``; on any
  failure it is removed.
- ``writing(path)``: turns a write failure for lack of space (an ``OSError`` with ENOSPC, or the
  ``RuntimeError`` torch raises from its C++ writers) into ``NoSpaceError`` naming the path.
- ``process_identity(pid)`` / ``process_alive(identity)``: "host:pid:start-time" strings that survive
  pid reuse (the start time comes from /proc where there is one), for locks and temporaries.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile

GB = 1e9
OWNER_FILE = ".owner.json"


class NoSpaceError(OSError):
    """Not enough free space for a write; the message names the path and the sizes."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the file system that holds (or would hold) ``path``."""
    return shutil.disk_usage(_existing_ancestor(os.fspath(path))).free


def require_space(path: str | os.PathLike, nbytes: int, what: str = "this write", reserve: int = 0) -> None:
    """Raise NoSpaceError unless ``nbytes`` (+ ``reserve``) fit on the file system of ``path``."""
    free = free_bytes(path)
    if nbytes + reserve > free:
        raise NoSpaceError(f"{what} needs {(nbytes + reserve) / GB:.2f} GB at {os.path.abspath(os.fspath(path))}, "
                           f"{free / GB:.2f} GB free")


def is_no_space(exc: BaseException) -> bool:
    """True for a failed write for lack of space, whatever layer raised it (OSError, or torch's
    C++ writers, which raise RuntimeError with the system's message or only 'file write failed')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("No space left on device" in text or "Disk quota exceeded" in text
                                              or "file write failed" in text)


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Around a write to ``path``: a failure for lack of space becomes NoSpaceError naming it."""
    try:
        yield
    except NoSpaceError:
        raise
    except (OSError, RuntimeError) as e:
        if is_no_space(e):
            raise NoSpaceError(f"No space left on device writing {os.path.abspath(os.fspath(path))} "
                               f"({free_bytes(path) / GB:.2f} GB free there now)") from None
        raise


# ---------------------------------------------------------------- owners

def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), or '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    return stat.rpartition(")")[2].split()[19]


def process_identity(pid: int | None = None) -> str:
    """'host:pid:start' naming one process for as long as it lives (pid reuse gets a new start)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def process_alive(identity: str) -> bool | None:
    """Whether the process an identity names still runs: True/False on this host, None (unknown)
    for another host's process."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return not start or _start_time(pid) in ("", start)


def _tmp_prefix(target: str) -> str:
    return "." + os.path.basename(target) + ".tmp-"


def sweep_stale_temporaries(target: str | os.PathLike) -> list[str]:
    """Remove the temporary directories of earlier writers of ``target`` whose owner process is
    gone (this host only; a directory without a readable owner is left alone). Returns them."""
    target = os.path.abspath(os.fspath(target))
    parent, prefix = os.path.dirname(target), _tmp_prefix(target)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = json.load(f)["owner"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_alive(owner) is False:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class OwnedTempDir:
    """``with OwnedTempDir(target) as tmp:`` write into ``tmp``; on success it is renamed to
    ``target`` (replacing an existing one only when ``replace`` is true), on failure removed.
    Temporaries of killed earlier runs for the same target are removed on entry."""

    def __init__(self, target: str | os.PathLike, replace: bool = False):
        self.target = os.path.abspath(os.fspath(target))
        self.replace = replace
        self.tmp: str | None = None
        self.swept: list[str] = []

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.swept = sweep_stale_temporaries(self.target)
        self.tmp = tempfile.mkdtemp(prefix=_tmp_prefix(self.target), dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like mkdir's
        with open(os.path.join(self.tmp, OWNER_FILE), "w") as f:
            json.dump({"owner": process_identity()}, f)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.target):
            if not self.replace:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise FileExistsError(errno.EEXIST, "appeared while writing; left untouched", self.target)
            # The old output goes aside under a temporary's name with our owner record, so a kill
            # before it is removed leaves something the next writer sweeps, never an orphan.
            old = tempfile.mkdtemp(prefix=_tmp_prefix(self.target), dir=os.path.dirname(self.target))
            os.rmdir(old)
            os.rename(self.target, old)
            with open(os.path.join(old, OWNER_FILE), "w") as f:
                json.dump({"owner": process_identity()}, f)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        # The owner record goes after the rename: a kill before it leaves a swept temporary, a kill
        # after it at worst a stray record in the finished output.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.target, OWNER_FILE))
        return False


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
