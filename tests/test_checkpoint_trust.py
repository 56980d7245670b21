"""A checkpoint is read as data: crafted pickles are refused (and run nothing), index entries and
DCP storage entries that lead outside their directory are refused.

Every payload would create a marker file if it ran; each test asserts the marker does not exist.
"""
import builtins
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpoints_convert import CheckpointError, dcp_read
from checkpoints_convert.dcp_layout import rank_state_name
from moe.config import BailingMoeConfig
from moe.model import BailingMoeForCausalLM
from tests.trainer_utils import ROOT, TINY, refused, run_inproc
from trainer.checkpoint import Checkpointer

SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)


class _System:
    """Unpickles as os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    """Unpickles as builtins.exec(source)."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return builtins.exec, (self.source,)


def _payloads(marker):
    return {"os.system": _System(f"touch {marker}"),
            "builtins.exec": _Exec(f"open({str(marker)!r}, 'w').close()")}


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = BailingMoeForCausalLM(BailingMoeConfig.preset("tiny", **SMALL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(8).view(1, 8)
    model(ids, labels=ids).loss.backward()
    opt.step()  # so the optimizer has state to save
    return model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint written by the trainer's Checkpointer: (step dir, model, optimizer, rank state)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, opt = _model_and_optimizer()
    rank_state = {"loader": {"g": 3, "counters": {"rows": 5}}, "rng": torch.get_rng_state()}
    path = Checkpointer(str(root), 0).save(1, model, opt, {"step": 1, "bad_in_a_row": 0}, rank_state,
                                           model.config.to_dict(), "seed: 0\n")
    return path, model, opt, rank_state


def _copy(saved, tmp_path):
    d = tmp_path / "step"
    shutil.copytree(saved[0], d)
    return d


def _load(step_dir):
    model, opt = _model_and_optimizer(seed=1)
    return Checkpointer(str(step_dir.parent), 0).load(str(step_dir), model, opt), model, opt


def test_plain_checkpoint_loads_exactly(saved, tmp_path):
    (tstate, rstate), model, opt = _load(_copy(saved, tmp_path))
    _, model0, opt0, rank_state0 = saved
    assert {k: v for k, v in tstate.items() if k != "save_id"} == {"step": 1, "bad_in_a_row": 0}
    assert rstate["loader"] == rank_state0["loader"] and torch.equal(rstate["rng"], rank_state0["rng"])
    sd, sd0 = model.state_dict(), model0.state_dict()
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)
    # the optimizer's param_groups are DCP "bytes" items: loaded as plain data, values intact
    assert opt.param_groups[0]["betas"] == opt0.param_groups[0]["betas"]
    assert opt.param_groups[0]["lr"] == opt0.param_groups[0]["lr"]


def _real_metadata(step_dir):
    with open(step_dir / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own trusted file


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("where", ["whole file", "inside real metadata"])
def test_crafted_dcp_metadata_is_refused_and_runs_nothing(saved, tmp_path, kind, where):
    d = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    payload = _payloads(marker)[kind]
    if where == "whole file":
        blob = pickle.dumps(payload)
    else:  # a real Metadata carrying the payload in a field DCP never looks at
        meta = _real_metadata(d)
        meta.planner_data = {"x": payload}
        blob = pickle.dumps(meta)
    (d / ".metadata").write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused") as e:
        _load(d)
    assert kind.split(".")[1] in str(e.value) and not marker.exists()
    # the exporter reads the same file the same way
    from checkpoints_convert.dcp_to_hf import dcp_to_hf
    with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
        dcp_to_hf(str(d), str(tmp_path / "hf"))
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_crafted_dcp_metadata_through_the_export_cli(saved, tmp_path):
    d = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    (d / ".metadata").write_bytes(pickle.dumps(_System(f"touch {marker}")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "checkpoints_convert.dcp_to_hf", str(d), str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert f"{d / '.metadata'}: refused" in r.stderr
    assert not marker.exists()


def test_dcp_storage_entry_outside_the_directory_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    meta = _real_metadata(d)
    key = next(iter(meta.storage_data))
    meta.storage_data[key].relative_path = "../elsewhere.distcp"
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"names data file '\.\./elsewhere\.distcp'"):
        _load(d)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_data_file_is_named_by_the_export_and_the_resume(saved, tmp_path, damage, capsys):
    from checkpoints_convert.dcp_to_hf import main as dcp_to_hf_main
    from data.errors import EXIT_BAD_INPUT, EXIT_MISSING, run_cli

    d = _copy(saved, tmp_path)
    data = d / "__0_0.distcp"
    size = data.stat().st_size
    if damage == "missing":
        data.unlink()
        want, code = rf"{data}: no such file, though {d / '.metadata'} names it: the checkpoint is incomplete", \
            EXIT_MISSING
    else:
        os.truncate(data, size // 2)
        want, code = rf"{data}: {size // 2} bytes, but {d / '.metadata'} places data up to byte {size}: the file " \
                     rf"is truncated", EXIT_BAD_INPUT
    capsys.readouterr()
    assert run_cli(dcp_to_hf_main, [str(d), str(tmp_path / "hf")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: {want}", err[0]), err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match=want):
        _load(d)


def test_a_model_config_that_does_not_describe_the_weights_is_named(saved, tmp_path):
    from checkpoints_convert.dcp_to_hf import dcp_to_hf

    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "model_config.json").read_text())
    cfg["num_experts"] = 8
    (d / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{d / 'model_config.json'} implies model\.layers\.\d\.mlp\.gate\.weight of "
                                              rf"shape \(8, 16\), but {d / '.metadata'} stores \(4, 16\)"):
        dcp_to_hf(str(d), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_non_tensor_item_with_a_payload_is_refused(tmp_path):
    # DCP stores non-tensors (the optimizer's param_groups) as torch.save bytes; torch's own planner
    # loads them with weights_only=False.
    marker = tmp_path / "ran"
    d = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.ones(3)}, "optim": {"x": _System(f"touch {marker}")}}, checkpoint_id=str(d),
             no_dist=True)
    state = {"model": {"w": torch.zeros(3)}, "optim": {"x": None}}
    with pytest.raises(CheckpointError, match=r"item 'optim\.x' refused, not plain data.*system"):
        dcp_read.load(state, d, no_dist=True)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_crafted_rank_state_is_refused_and_runs_nothing(saved, tmp_path, kind):
    d = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    rank_file = d / rank_state_name(0)
    torch.save({"loader": _payloads(marker)[kind], "rng": torch.get_rng_state()}, rank_file)
    with pytest.raises(CheckpointError, match=rf"{rank_file}: refused, not plain data") as e:
        _load(d)
    assert kind.split(".")[1] in str(e.value) and not marker.exists()


def test_resume_from_a_crafted_rank_state_stops_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = TINY + ["--data.synthetic", "true", "--train.global_batch_size", "2", "--data.micro_batch_size", "2",
                   "--checkpoint.every", "1", "--output-dir", str(run)]
    run_inproc("sft", args + ["--train.steps", "1"])
    marker = tmp_path / "ran"
    rank_file = run / "checkpoints" / "step_00000001" / rank_state_name(0)
    state = torch.load(rank_file, weights_only=True)
    state["loader"] = _System(f"touch {marker}")
    torch.save(state, rank_file)
    with refused(capsys, "^" + re.escape(f"error: {rank_file}: refused, not plain data")):
        run_inproc("sft", args + ["--train.steps", "2"])
    assert not marker.exists()


# ------------------------------------------------------------------------- index entries (item 10)
def _hf_copy(tmp_path):
    from checkpoints_convert.io import INDEX_NAME
    from tests.conftest import TINY_HF

    d = tmp_path / "hf"
    shutil.copytree(TINY_HF, d)
    outside = tmp_path / "outside"
    outside.mkdir()
    index = d / INDEX_NAME
    return d, outside, index, json.loads(index.read_text())


def _convert(d, tmp_path):
    from checkpoints_convert import hf_to_native
    from data.errors import run_cli

    return run_cli(hf_to_native.main, ["--hf", str(d), "--out", str(tmp_path / "native"), "--quiet"])


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_entry_outside_its_directory_is_refused(tmp_path, capsys, how):
    d, outside, index, data = _hf_copy(tmp_path)
    name = "lm_head.weight"
    shard = data["weight_map"][name]
    # a valid shard outside: without the check the conversion would read it and succeed
    shutil.move(d / shard, outside / shard)
    if how == "absolute":
        entry = str(outside / shard)
    elif how == "dotdot":
        entry = f"../outside/{shard}"
    else:
        entry = shard
        os.symlink(outside / shard, d / shard)
    for k, v in data["weight_map"].items():
        if v == shard:
            data["weight_map"][k] = entry
    index.write_text(json.dumps(data))
    assert _convert(d, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {index}: weight_map entry ") and "refused" in err and repr(entry) in err, err
    assert not (tmp_path / "native").exists()


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_read(tmp_path, capsys):
    # <repo>/snapshots/<rev>/file -> ../../blobs/<hash>: how huggingface_hub stores downloads
    from tests.conftest import TINY_HF

    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(TINY_HF.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f.name)
    assert _convert(snap, tmp_path) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------- unusable dtypes (item 12)
@pytest.mark.parametrize("dtype,st", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"),
                                      (torch.complex64, "C64")])
def test_tensors_of_a_dtype_the_model_cannot_use_are_refused_before_writing(tmp_path, capsys, dtype, st):
    from safetensors.torch import load_file, save_file

    d, _, _, data = _hf_copy(tmp_path)
    names = ["lm_head.weight", "model.layers.1.mlp.experts.3.down_proj.weight"]
    for name in names:
        shard = d / data["weight_map"][name]
        tensors = load_file(str(shard))
        tensors[name] = tensors[name].to(dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    assert _convert(d, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d}: tensors of a dtype the model cannot use (2): "), err
    for name in names:  # each named, with its dtype and file
        assert f"{name} ({st}, in {d / data['weight_map'][name]})" in err, err
    assert [p.name for p in tmp_path.iterdir() if "native" in p.name] == []  # no output, no temporary


def test_export_refuses_a_training_checkpoint_of_integer_weights(saved, tmp_path):
    from checkpoints_convert.dcp_to_hf import dcp_to_hf

    d = _copy(saved, tmp_path)
    meta = _real_metadata(d)
    meta.state_dict_metadata["model.lm_head.weight"].properties.dtype = torch.int32
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensors of a dtype the model cannot use: lm_head\.weight \(int32\)"):
        dcp_to_hf(str(d), str(tmp_path / "hf"), dtype="keep")
    assert not (tmp_path / "hf").exists()
