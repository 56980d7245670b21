"""Data preparation and the disk: free space checked before writing, a write that runs out of space
named and cleaned up, a killed preparation's temporary removed by the next run, concurrent launches
preparing the same cache once."""
import collections
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import data.files
from data import PreparedSFT, prepare_data as prepare
from data.errors import EXIT_NO_SPACE, NoSpaceError, run_cli
from data.prepare import main as prepare_main

try:
    from data_helpers import tiny_tokenizer, write_jsonl
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import tiny_tokenizer, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    from tests.test_data_prepare import _tok_dir

    tok = _tok_dir(tmp_path)
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 50)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(data.files.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(NoSpaceError) as e:
        prepare([f], tiny_tokenizer(), tmp_path / "out")
    assert f"GB at {tmp_path}, 0.00 GB free" in str(e.value) and "needs" in str(e.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert run_cli(prepare_main, [f, "--tokenizer", tok, "--out", str(tmp_path / "out"), "--quiet"]) == EXIT_NO_SPACE
    assert "error: preparing" in capsys.readouterr().err


def test_a_write_that_runs_out_of_space_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    h = prepare([f], tiny_tokenizer(), tmp_path / "out")["data_hash"]
    from data.prepare import _ArrayWriter

    real = _ArrayWriter.write

    def write(self, values):
        if self.name == "mask":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, values)

    monkeypatch.setattr(_ArrayWriter, "write", write)
    with pytest.raises(NoSpaceError, match=f"No space left on device writing {tmp_path / 'out'}"):
        prepare([f], tiny_tokenizer(), tmp_path / "out")
    assert _leftovers(tmp_path) == []
    assert PreparedSFT(tmp_path / "out").data_hash == h  # the previous output is untouched


def test_a_killed_preparations_temporary_is_removed_by_the_next_run(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    out = tmp_path / "out"
    # A preparation SIGKILLed while it writes its arrays.
    script = f"""
import os, signal, data.prepare as p
real = p._prepare_into
def killed(files, tok, tmp, *a):
    open(os.path.join(tmp, "tokens.bin"), "wb").write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
p._prepare_into = killed
from tests.data_helpers import tiny_tokenizer
p.prepare([{str(f)!r}], tiny_tokenizer(), {str(out)!r})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == -signal.SIGKILL
    assert len(_leftovers(tmp_path)) == 1 and not out.exists()
    prepare([f], tiny_tokenizer(), out)
    assert _leftovers(tmp_path) == [] and len(PreparedSFT(out)) == 3


def test_concurrent_launches_prepare_a_shared_cache_once(tmp_path):
    # Two launches on one cache: while one prepares (holds the lock), the other waits and then finds
    # its result instead of preparing again over it.
    import data
    from data.files import FileLock
    from trainer.sources import _prepare_once

    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    out = str(tmp_path / "cache" / "d-0123")
    os.makedirs(tmp_path / "cache")

    class Opts:
        class data:
            skip_bad, eos_every_turn = False, False

    with FileLock(out + ".lock"):
        other = threading.Thread(target=_prepare_once, args=(data, f, out, tiny_tokenizer(), "sft", Opts))
        other.start()
        time.sleep(0.5)
        assert not os.path.exists(out)  # the second launch waits
        prepare([f], tiny_tokenizer(), out)
        first = os.stat(os.path.join(out, "manifest.json")).st_ino
    other.join(30)
    assert os.stat(os.path.join(out, "manifest.json")).st_ino == first  # not prepared a second time
