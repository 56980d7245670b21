"""The floor for writing files without losing anything: free-space checks, owned temporary
directories that become their target atomically, one file lock, and lack-of-space errors that name
the path.

Every package may import this module (with data/errors.py, the exceptions it raises): it imports
nothing else of ours. Everything that writes large outputs builds on it: data preparation,
conversions, HF exports, the trainer's checkpoints and its run-directory lock.

- ``require_space(path, nbytes, what)``: refuse before writing, with "needs X GB at PATH, Y GB free".
- ``OwnedTempDir(target)``: a temporary directory beside ``target`` (same file system, so the final
  rename is atomic) whose name records its owner; on entry it removes the temporaries of earlier
  runs for the same target whose owner process is gone, then checks free space. On success it
  becomes ``target``; on any failure it is removed, and a failure for lack of space names ``target``.
- ``writing(path)``: turns a write failure for lack of space (an ``OSError`` with ENOSPC, or the
  ``RuntimeError`` torch raises from its C++ writers) into ``NoSpaceError`` naming the path.
- ``FileLock(path)``: an exclusive lock (flock) that the kernel releases when its holder dies, so it
  is never stale; the run directory's lock and the prepared-data caches' locks are both this one.
- ``process_identity(pid)`` / ``process_alive(identity)``: "host:pid:start-time" strings that survive
  pid reuse (the start time comes from /proc where there is one), for temporaries' owners.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile

try:
    import fcntl
except ImportError:  # not POSIX: FileLock cannot exclude other processes there (documented below)
    fcntl = None

from .errors import NoSpaceError, OutputExistsError

GB = 1e9
OWNER_FILE = ".owner.json"


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


# torch's zip writer (torch.save, and DCP through it) reports a write the file system cut short only as
# "[enforce fail at inline_container.cc:N] . unexpected pos A vs B" (torch 2.13, seen on a full tmpfs).
# That is taken for lack of space when the file system then has less than this free.
SHORT_WRITE_FREE = 256 * 2 ** 20


def is_no_space(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """True for a failed write for lack of space, whatever layer raised it (OSError, or torch's
    C++ writers, which raise RuntimeError with the system's message, only 'file write failed', or a
    short write of the zip writer: that one when ``path``'s file system is nearly full, or no path is
    known)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return False
    if "No space left on device" in text or "Disk quota exceeded" in text or "file write failed" in text:
        return True
    if "inline_container" in text and "unexpected pos" in text:
        return path is None or free_bytes(path) < SHORT_WRITE_FREE
    return False


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Around a write to ``path``: a failure for lack of space becomes NoSpaceError naming it."""
    try:
        yield
    except NoSpaceError:
        raise
    except (OSError, RuntimeError) as e:
        if is_no_space(e, path):
            raise _no_space_writing(path) from None
        raise


def _no_space_writing(path) -> NoSpaceError:
    return NoSpaceError(f"No space left on device writing {os.path.abspath(os.fspath(path))} "
                        f"({free_bytes(path) / GB:.2f} GB free there now)")


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


def owned_temp_file(target: str | os.PathLike) -> str:
    """A temporary name beside the file ``target`` (written, then renamed onto it) that carries its
    owner, ``TARGET.tmp-PID-START-HOST``, so that sweep_stale_temp_files can tell a killed writer's
    leftover from a live writer's file."""
    host, _, rest = process_identity().partition(":")
    pid, _, start = rest.partition(":")
    return f"{os.fspath(target)}.tmp-{pid}-{start}-{host}"


def sweep_stale_temp_files(directory: str | os.PathLike, prefix: str) -> list[str]:
    """Remove the files ``PREFIX*.tmp-PID-START-HOST`` (owned_temp_file) in ``directory`` whose writer
    is gone (this host's only: another host's cannot be checked). Returns them."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in sorted(names):
        if not name.startswith(prefix) or ".tmp-" not in name:
            continue
        pid, start, host = (name.rpartition(".tmp-")[2].split("-", 2) + ["", ""])[:3]
        if not pid.isdigit() or process_alive(f"{host}:{pid}:{start}") is not False:
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed


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
        if process_alive(owner) is False and remove_tree(path):
            removed.append(path)
    return removed


def remove_tree(path: str | os.PathLike) -> bool:
    """Remove a directory tree as far as possible; True only when it is gone."""
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def check_replaceable(target: str | os.PathLike) -> None:
    """Refuse (OutputExistsError naming ``target``) an existing output that could not be swapped for a
    new one: a directory in it where no file can be made or removed (read-only, immutable, another
    user's) would stop the swap half-way, after the old output was moved. Checked by making and
    removing a probe file in each, before anything is written."""
    for root, dirs, _ in os.walk(os.fspath(target)):
        probe = os.path.join(root, f".lingmoe-probe-{os.getpid()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.remove(probe)
        except OSError as e:
            raise OutputExistsError(f"{os.path.abspath(os.fspath(target))} cannot be replaced: nothing can be written "
                                    f"or removed in {root} ({e.strerror}); make it writable or move it away, then run "
                                    f"again (it was left as it is)") from None


class OwnedTempDir:
    """``with OwnedTempDir(target) as tmp:`` write into ``tmp``; on success it is renamed to
    ``target``, on failure removed.

    - An existing ``target`` is refused (OutputExistsError, nothing touched) unless ``replace``;
      with ``replace`` the old one is swapped out only once the new one is whole, and one that could
      not be swapped (check_replaceable) is refused before anything is written. If the swap still
      fails, the old one is put back: ``target`` is never left missing.
    - Temporaries of killed earlier writers of the same target are removed on entry, then, with
      ``nbytes``, the free space is checked (the sweep may have freed it) before anything is made.
    - A failure for lack of space inside the block becomes NoSpaceError naming ``target``.
    """

    def __init__(self, target: str | os.PathLike, replace: bool = False, nbytes: int | None = None,
                 what: str = "this write"):
        self.target = os.path.abspath(os.fspath(target))
        self.replace = replace
        self.nbytes, self.what = nbytes, what
        self.tmp: str | None = None
        self.swept: list[str] = []

    def __enter__(self) -> str:
        if os.path.exists(self.target) and not self.replace:
            raise OutputExistsError(f"{self.target}: output directory already exists (choose another or remove it)")
        if os.path.isdir(self.target):
            check_replaceable(self.target)
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.swept = sweep_stale_temporaries(self.target)  # first: a killed writer's leftovers may fill the disk
        if self.nbytes is not None:
            require_space(self.target, self.nbytes, what=self.what)
        with writing(self.target):
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
            if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, NoSpaceError) \
                    and is_no_space(exc, self.target):
                raise _no_space_writing(self.target) from None
            return False
        with writing(self.target):
            self._commit()
        return False

    def _commit(self) -> None:
        if os.path.exists(self.target):
            if not self.replace:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputExistsError(f"{self.target}: output directory appeared while writing; left untouched")
            # The old output goes aside under a temporary's name with our owner record, so a kill
            # before it is removed leaves something the next writer sweeps, never an orphan. A step
            # that fails puts it back, so the target is never missing.
            old = tempfile.mkdtemp(prefix=_tmp_prefix(self.target), dir=os.path.dirname(self.target))
            os.rmdir(old)
            try:
                os.rename(self.target, old)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputExistsError(f"{self.target} cannot be replaced ({e.strerror}); it was left as it is") from None
            try:
                with open(os.path.join(old, OWNER_FILE), "w") as f:
                    json.dump({"owner": process_identity()}, f)
                os.replace(self.tmp, self.target)
            except OSError as e:
                os.rename(old, self.target)
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.target, OWNER_FILE))
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputExistsError(f"{self.target} cannot be replaced ({e.strerror}); it was left as it is") from None
            remove_tree(old)  # what cannot be removed keeps our owner record: a later writer sweeps it
        else:
            os.replace(self.tmp, self.target)
        # The owner record goes after the rename: a kill before it leaves a swept temporary, a kill
        # after it at worst a stray record in the finished output.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.target, OWNER_FILE))


class FileLock:
    """An exclusive lock on the file ``path`` (created if needed): ``with FileLock(p):`` waits for it;
    ``acquire(blocking=False)`` returns False at once when another process holds it.

    flock: the kernel releases it when the holder's process ends, however it ends, so a lock is
    never stale and no one has to decide whether a holder is gone. Taking it is one system call,
    so two processes can never both hold it. While held, ``write``/``read`` keep a short record
    in the file (who holds it) for the message another process shows when refused.

    ``release(remove=True)`` also deletes the file; a process that opened it just before and then
    gets the lock sees that the path no longer names the file it locked, and opens it again.
    Without fcntl (not POSIX) the lock excludes nothing: building an output twice is then merely
    slower, and two trainers are not kept out of one directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                self.fd = fd
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # removed by its holder meanwhile: lock the file the path names now

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None

    def write(self, text: str) -> None:
        """Replace the record in the held lock file (durably: a later reader may be another host)."""
        data = text.encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def read(self) -> str:
        """The record in the lock file, held or not ('' when there is none)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
