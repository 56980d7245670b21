"""A finished run leaves no process group alive, so the interpreter can end normally.

Why it matters: gloo runs each collective on worker threads that live as long as the process group
object, and ``destroy_process_group`` only unregisters the group: anything still referencing it (the
model's DTensors, a DeviceMesh, DPO's live reference model) keeps the threads. A worker that drops a
finished collective's tensors after their Python objects died has to take the GIL; if the interpreter
is finalizing by then, CPython ends that thread with a forced unwind, which meets a noexcept C++
destructor: "terminate called without an active exception", SIGABRT, and a complete run reported as
failed (benchmarks/exit_race.py shows it in miniature, and that releasing the group removes it).
"""
import subprocess
import sys
import weakref

import pytest
import torch.distributed as dist

from tests.test_dpo import demo_pairs  # noqa: F401  (fixture)
from tests.trainer_utils import ROOT, TINY, run_inproc, run_torchrun
from trainer import parallel


@pytest.fixture
def groups_made(monkeypatch):
    """Weak references to every process group a run creates (the world group and any mesh's)."""
    made: list[weakref.ref] = []
    real = parallel.init_distributed

    def spy(*a, **k):
        info = real(*a, **k)
        made.extend(weakref.ref(g) for g in dist.distributed_c10d._world.pg_map)
        return info

    monkeypatch.setattr(parallel, "init_distributed", spy)
    return made


def test_sft_run_releases_its_process_group(tmp_path, groups_made):
    run_inproc("sft", TINY + ["--data.synthetic", "true", "--train.steps", "2", "--output-dir", str(tmp_path)])
    assert groups_made
    # No gc.collect() here: the run itself must have let go of every group before returning.
    assert [r() for r in groups_made if r() is not None] == []
    assert parallel.groups_released()


def test_dpo_run_with_live_reference_releases_its_process_group(tmp_path, demo_pairs, groups_made):  # noqa: F811
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--dpo.reference", "live",
                              "--data.seq_len", "128", "--checkpoint.export_hf", "false", "--output-dir",
                              str(tmp_path)])
    assert groups_made
    assert [r() for r in groups_made if r() is not None] == []
    assert parallel.groups_released()


def test_two_rank_expert_parallel_run_exits_through_the_interpreter(tmp_path):
    """Two ranks on a 2-D (dp x ep) mesh: the workers end normally, not by the os._exit fallback that
    finish_process keeps for a group something still holds."""
    p = run_torchrun("sft", TINY + ["--data.synthetic", "true", "--train.steps", "2", "--parallel.ep", "2",
                                    "--output-dir", str(tmp_path)])
    out = p.stdout + p.stderr
    assert "still referenced at exit" not in out, out[-3000:]
    assert "terminate called" not in out


def test_finish_process_falls_back_to_os_exit_only_when_a_group_outlives_the_run(tmp_path):
    """A child holds a group past destroy_process_group: finish_process says so and leaves by os._exit
    (skipping an atexit handler, the proof); with the group released it exits normally (handler runs)."""
    prog = (
        "import atexit, os, sys, torch.distributed as dist\n"
        "from trainer import parallel\n"
        "from trainer.errors import finish_process\n"
        "info = parallel.init_distributed('cpu')\n"
        "keep = dist.group.WORLD if sys.argv[1] == 'hold' else None\n"
        "del info\n"
        "atexit.register(lambda: print('ATEXIT RAN', flush=True))\n"
        "parallel.shutdown_distributed()\n"
        "os.environ['TORCHELASTIC_RUN_ID'] = 'test'\n"
        "finish_process(0, parallel.groups_released())\n"
    )
    for mode, normal in (("hold", False), ("release", True)):
        p = subprocess.run([sys.executable, "-c", prog, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert ("ATEXIT RAN" in p.stdout) == normal, (mode, p.stdout, p.stderr)
        assert ("still referenced at exit" in p.stderr) == (not normal), (mode, p.stderr)
