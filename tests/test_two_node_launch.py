"""A two-node launch on one machine: two torchrun launchers (--nnodes 2, one process each) meeting by
c10d rendezvous on 127.0.0.1 train exactly like one launcher with two processes, with and without
expert parallelism across the two "nodes". Global rank 0 writes the files; each process picks its
device by its local rank (0 on both nodes)."""
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer_utils import ROOT, TINY, exported, free_port, metrics, on_cpu, run_torchrun


def _two_nodes(args: list[str], timeout: int = 240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_id", "lingmoe-test",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", str(ROOT / "trainer" / "sft.py"), *on_cpu(args)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"{o[-3000:]}\n{e[-5000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("ep", ["1", "2"])
def test_two_launchers_equal_one_launcher(tmp_path, ep):
    args = TINY + ["--data.synthetic", "true", "--train.steps", "3", "--train.global_batch_size", "4",
                   "--data.micro_batch_size", "2", "--checkpoint.every", "0", "--parallel.ep", ep]
    run_torchrun("sft", args + ["--output-dir", str(tmp_path / "one_node")])
    _two_nodes(args + ["--output-dir", str(tmp_path / "two_nodes")])
    m1, m2 = metrics(tmp_path / "one_node"), metrics(tmp_path / "two_nodes")
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    w1, w2 = exported(tmp_path / "one_node"), exported(tmp_path / "two_nodes")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
