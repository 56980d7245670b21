"""Helpers for the trainer tests: run a trainer in-process or under torchrun, read what it wrote."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A model small enough for many short runs on 2 cores, with every structural feature kept.
TINY = ["--model.overrides", "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
        "intermediate_size: 64, moe_intermediate_size: 16, num_experts: 4, num_experts_per_tok: 2}",
        "--train.progress", "false", "--data.seq_len", "32", "--train.device", "cpu"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a test's process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu(args: list[str]) -> list[str]:
    """These tests compare fp32 numbers exactly and run two ranks on one machine: on CPU (gloo) even
    where a GPU is, unless a test names a device itself (tests/test_trainer_gpu.py does)."""
    return args if "--train.device" in args else [*args, "--train.device", "cpu"]


def run_inproc(script: str, args: list[str]) -> dict:
    if script == "sft":
        from trainer.sft import main
    else:
        from trainer.dpo import main
    return main(on_cpu(args))


@contextlib.contextmanager
def refused(capsys, match: str, code: int | None = None):
    """Around a command that must stop with one line ``error: ...`` on stderr matching ``match`` (a
    regular expression) and, when given, exit status ``code``."""
    capsys.readouterr()
    result = types.SimpleNamespace(code=None, message=None)
    with pytest.raises(SystemExit) as e:
        yield result
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert re.search(match, errors[0]), errors[0]
    if code is not None:
        assert e.value.code == code, (e.value.code, errors[0])
    result.code, result.message = e.value.code, errors[0]


@contextlib.contextmanager
def unwritable(path):
    """``path`` (a directory) made so that nothing in it can be created, removed or renamed: read-only
    for an ordinary user; for root, whom permissions do not stop, immutable (chattr +i; the test is
    skipped where the file system or the container does not allow that)."""
    path = str(path)
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needed to make a directory unwritable for root)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 240, check: bool = True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "trainer" / f"{script}.py"), *on_cpu(args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def exported(run_dir) -> dict[str, torch.Tensor]:
    hf = pathlib.Path(run_dir) / "hf"
    out = {}
    for f in sorted(hf.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
