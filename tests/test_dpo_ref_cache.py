"""The DPO reference cache is used only for the exact reference it was computed for: changing
data.seq_len or rewriting the weights at the same init_from path computes it again (the first step's
loss is ln 2 again, as policy == reference), and loading it never unpickles anything."""
import math
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_dpo import demo_pairs  # noqa: F401  (the fixture)
from tests.trainer_utils import TINY, metrics, run_inproc
from trainer import dpo


def _first_loss(tmp_path, name, demo_pairs, *extra):
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--checkpoint.export_hf",
                              "false", "--data.cache_dir", str(tmp_path / "cache"), "--output-dir",
                              str(tmp_path / name), *extra])
    return metrics(tmp_path / name)[0]["loss/dpo"]


def _caches(tmp_path):
    return sorted((tmp_path / "cache").rglob("ref_logps-*"))


def test_a_new_seq_len_computes_the_reference_again(tmp_path, demo_pairs):  # noqa: F811
    assert abs(_first_loss(tmp_path, "a", demo_pairs, "--data.seq_len", "128") - math.log(2)) < 1e-5
    # 48 tokens cut most answers: reference log-probs of the 128-token rows would be wrong (1.254).
    assert abs(_first_loss(tmp_path, "b", demo_pairs, "--data.seq_len", "48") - math.log(2)) < 1e-5
    assert len(_caches(tmp_path)) == 2


def test_weights_rewritten_at_the_same_path_compute_the_reference_again(tmp_path, demo_pairs):  # noqa: F811
    # An exported model to start from (one step from scratch), then the same files rewritten in place.
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--data.seq_len", "64",
                              "--data.cache_dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "warm")])
    init = tmp_path / "warm" / "hf"
    args = ["--model.init_from", str(init), "--data.seq_len", "64"]
    assert abs(_first_loss(tmp_path, "a", demo_pairs, *args) - math.log(2)) < 1e-5
    for f in init.glob("*.safetensors"):
        w = load_file(f)
        save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in w.items()}, f, metadata={"format": "pt"})
    assert abs(_first_loss(tmp_path, "b", demo_pairs, *args) - math.log(2)) < 1e-5
    assert len(_caches(tmp_path)) == 3  # from scratch (warm), before and after the rewrite


def test_the_fingerprint_of_a_large_directory_sees_a_rewrite(tmp_path, monkeypatch):
    # Above the content-hash limit, size + mtime + inode + header stand for the content.
    monkeypatch.setattr(dpo, "CONTENT_HASH_LIMIT", 0)
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, f)
    before = dpo.weights_fingerprint(str(tmp_path))
    assert dpo.weights_fingerprint(str(tmp_path)) == before
    save_file({"w": torch.ones(4)}, tmp_path / "new.tmp")  # a save beside it, renamed over it
    os.replace(tmp_path / "new.tmp", f)
    renamed = dpo.weights_fingerprint(str(tmp_path))
    assert renamed != before
    with open(f, "r+b") as fh:  # rewritten in place: same inode and size, a later mtime
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert dpo.weights_fingerprint(str(tmp_path)) != renamed


class _Exploit:
    def __reduce__(self):
        return (open, (os.environ["MARKER"], "w"))


def test_a_cache_file_is_never_unpickled(tmp_path, demo_pairs, monkeypatch):  # noqa: F811
    _first_loss(tmp_path, "a", demo_pairs, "--data.seq_len", "64")
    (cache,) = _caches(tmp_path)
    marker = tmp_path / "ran"
    monkeypatch.setenv("MARKER", str(marker))
    cache.write_bytes(pickle.dumps(_Exploit()))
    assert abs(_first_loss(tmp_path, "b", demo_pairs, "--data.seq_len", "64") - math.log(2)) < 1e-5
    assert not marker.exists()  # recomputed over, nothing run
    assert load_file(cache)["logps"].shape[1] == 2


@pytest.mark.slow
def test_a_killed_writers_reference_temporary_is_removed_by_the_next_run(tmp_path, demo_pairs):  # noqa: F811
    # Rank 0 killed (SIGKILL: no handler runs) between writing the table and renaming it into place:
    # the next run removes that temporary; another live writer's is left alone.
    import signal
    import subprocess
    import sys

    from data.files import owned_temp_file
    from tests.trainer_utils import ROOT, on_cpu

    args = on_cpu(TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--data.seq_len", "64",
                          "--checkpoint.export_hf", "false", "--data.cache_dir", str(tmp_path / "cache")])
    script = f"""
import os, signal, sys
real = os.replace
def killed(src, dst, *a, **k):
    if str(dst).endswith(".safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = killed
from trainer.dpo import main
main({args + ["--output-dir", str(tmp_path / "killed")]!r})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    (left,) = [p for p in _caches(tmp_path) if ".tmp-" in p.name]
    live = pathlib.Path(owned_temp_file(left.parent / "ref_logps-other-key.safetensors"))  # this process: alive
    live.write_bytes(b"x")
    assert abs(_first_loss(tmp_path, "again", demo_pairs, "--data.seq_len", "64") - math.log(2)) < 1e-5
    assert [p for p in _caches(tmp_path) if ".tmp-" in p.name] == [live]
    assert len([p for p in _caches(tmp_path) if p.name.endswith(".safetensors")]) == 1
