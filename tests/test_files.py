"""data.files: free-space refusal, lack-of-space errors that name the path, owned temporaries."""
import collections
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from data import files


def test_require_space_names_path_and_sizes(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(100 * 10**9, 97 * 10**9, 3 * 10**9))
    files.require_space(tmp_path / "x", 2 * 10**9)  # fits
    with pytest.raises(files.NoSpaceError) as e:
        files.require_space(tmp_path / "not" / "yet" / "made", 5_500_000_000, what="the export")
    assert str(e.value) == f"the export needs 5.50 GB at {tmp_path}/not/yet/made, 3.00 GB free"
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 "
                                              "vs 0 PytorchStreamWriter failed writing file data/0: file write failed")])
def test_writing_turns_lack_of_space_into_a_message_with_the_path(tmp_path, exc):
    with pytest.raises(files.NoSpaceError) as e:
        with files.writing(tmp_path / "model.safetensors"):
            raise exc
    assert str(e.value).startswith(f"No space left on device writing {tmp_path}/model.safetensors (")


def test_torchs_short_write_on_a_full_disk_is_lack_of_space(tmp_path, monkeypatch):
    # What torch 2.13's zip writer (torch.save, DCP's .distcp files) raised on a full 3 MB tmpfs: no
    # system message at all. It is lack of space when the disk is then (nearly) full, else not ours to name.
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(3 * 2**20, 3 * 2**20 - 4096, 4096))
    with pytest.raises(files.NoSpaceError, match=f"No space left on device writing {tmp_path}/step.tmp"):
        with files.writing(tmp_path / "step.tmp"):
            raise short
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(100 * 10**9, 10**9, 99 * 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with files.writing(tmp_path / "step.tmp"):
            raise short


def test_writing_lets_other_errors_through(tmp_path):
    with pytest.raises(PermissionError):
        with files.writing(tmp_path):
            raise PermissionError(errno.EACCES, "denied")


def test_owned_temp_dir_publishes_on_success_and_removes_on_failure(tmp_path):
    target = tmp_path / "out"
    with files.OwnedTempDir(target) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("1")
    assert sorted(os.listdir(target)) == ["a"]  # the owner record does not travel
    with pytest.raises(ValueError):
        with files.OwnedTempDir(tmp_path / "out2") as tmp:
            raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(FileExistsError):
        with files.OwnedTempDir(target):
            pass
    with files.OwnedTempDir(target, replace=True) as tmp:
        open(os.path.join(tmp, "b"), "w").close()
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_killed_writers_temporary_is_removed_by_the_next_run_a_live_ones_kept(tmp_path):
    target = tmp_path / "model"
    code = textwrap.dedent(f"""
        import os, sys, time
        from data.files import OwnedTempDir
        with OwnedTempDir({str(target)!r}) as tmp:
            open(os.path.join(tmp, "big"), "wb").write(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        dead_tmp, live_tmp = killed.stdout.readline().strip(), live.stdout.readline().strip()
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert os.path.isdir(dead_tmp)
        stranger = tmp_path / ".model.tmp-noowner"  # no owner record: not ours to judge, left alone
        stranger.mkdir()
        with files.OwnedTempDir(target) as tmp:
            assert not os.path.exists(dead_tmp) and os.path.isdir(live_tmp) and stranger.is_dir()
        assert json.load(open(os.path.join(live_tmp, files.OWNER_FILE)))["owner"] == files.process_identity(live.pid)
    finally:
        live.kill()
        live.wait()


def test_process_identity_survives_pid_reuse():
    me = files.process_identity()
    assert files.process_alive(me) is True
    host, pid, start = me.split(":")
    if start:  # /proc gives start times: the same pid with another start is another process
        assert files.process_alive(f"{host}:{pid}:{int(start) + 1}") is False
    assert files.process_alive(f"another-host-{host}:{pid}:{start}") is None
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert files.process_alive(f"{host}:{int(done.stdout)}:{start}") is False


def test_a_kill_at_any_point_of_publishing_leaves_nothing_unswept(tmp_path, monkeypatch):
    """Killed between the steps of __exit__ (simulated: the step after raises and the owner is then
    declared dead): every directory left beside the target is swept by the next writer."""
    target = tmp_path / "out"
    with files.OwnedTempDir(target) as tmp:
        open(os.path.join(tmp, "v1"), "w").close()
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def dies(*a):
        raise Killed

    monkeypatch.setattr(files.os, "replace", dies)  # dies after moving the old output aside
    with pytest.raises(Killed):
        with files.OwnedTempDir(target, replace=True) as tmp:
            open(os.path.join(tmp, "v2"), "w").close()
    monkeypatch.setattr(files.os, "replace", real_replace)
    left = sorted(p for p in os.listdir(tmp_path) if p != "out")
    assert len(left) == 2  # the new temporary and the old output set aside, both with an owner
    monkeypatch.setattr(files, "process_alive", lambda identity: False)  # their owner is gone now
    assert len(files.sweep_stale_temporaries(target)) == 2
    assert sorted(os.listdir(tmp_path)) == []


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    # The swap of a whole new output for the old one fails half-way (here: the final rename): the old
    # output must be back at its name, nothing else left beside it, and the error must name it.
    target = tmp_path / "hf"
    target.mkdir()
    (target / "old").write_text("1")
    real = files.os.replace

    def fails(src, dst, *a, **k):
        if os.fspath(dst) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(files.os, "replace", fails)
    with pytest.raises(files.OutputExistsError, match=f"{target} cannot be replaced"):
        with files.OwnedTempDir(target, replace=True) as tmp:
            open(os.path.join(tmp, "new"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["hf"] and sorted(os.listdir(target)) == ["old"]


def test_temp_files_of_dead_writers_are_swept_live_ones_and_other_hosts_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "ref_logps-a.safetensors"
    mine = files.owned_temp_file(target)
    host, _, rest = files.process_identity(dead.pid).partition(":")
    pid, _, start = rest.partition(":")
    gone = f"{target}.tmp-{pid}-{start}-{host}"
    elsewhere = f"{target}.tmp-{pid}-{start}-another-host.example"
    for p in (mine, gone, elsewhere, tmp_path / "other.tmp-1-2-x"):
        open(p, "w").close()
    assert files.sweep_stale_temp_files(tmp_path, "ref_logps-") == [gone]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (mine, elsewhere, "other.tmp-1-2-x"))
