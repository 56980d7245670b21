"""HF <-> native conversion: bit-exact round trips, equal logits, verify, dtype casts, and bad inputs.

Expected values come from the golden fixture read with safetensors' own loader (not our reader) and
from the reference logits in expected.safetensors.
"""
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert import (CheckpointError, load_checkpoint, load_hf, load_native, save_hf, save_native,
                                 write_checkpoint)
from checkpoints_convert import checkpoint, hf_to_native, native_to_hf, verify
from data.errors import EXIT_BAD_INPUT, EXIT_MISSING, EXIT_NO_SPACE, OutputExistsError, run_cli
from checkpoints_convert.io import INDEX_NAME

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "bailing_moe_tiny"
TINY_HF = FIXTURE / "hf"
EXPECTED = FIXTURE / "expected.safetensors"
ARCH_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
               "num_shared_experts", "first_k_dense_replace", "norm_topk_prob", "hidden_act", "rms_norm_eps",
               "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "use_bias",
               "use_qkv_bias", "norm_head", "pad_token_id", "torch_dtype", "model_type", "architectures"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"checkpoints_convert.{module}", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def run_inproc(main, capsys, *args: str) -> tuple[int, str, str]:
    rc = run_cli(main, list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def all_tensors(d: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors' own loader."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def golden():
    return all_tensors(TINY_HF)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """fixture hf -> native -> hf through the CLIs, in real subprocesses, with small shards."""
    d = tmp_path_factory.mktemp("conv")
    r1 = cli("hf_to_native", "--hf", str(TINY_HF), "--out", str(d / "native"), "--shard-size", "300KB")
    assert r1.returncode == 0, r1.stderr
    r2 = cli("native_to_hf", "--native", str(d / "native"), "--out", str(d / "hf"), "--shard-size", "300KB",
             "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert "tensors" in r1.stderr  # the progress bar counts tensors ...
    assert "B/s" in r1.stderr or "MB" in r1.stderr or "kB" in r1.stderr.lower()  # ... and bytes
    return d


def test_hf_native_hf_is_bit_identical(converted, golden):
    back = all_tensors(converted / "hf")
    assert sorted(back) == sorted(golden)
    for name, t in golden.items():
        assert back[name].dtype == t.dtype, name
        assert torch.equal(back[name], t), name
    index = json.loads((converted / "hf" / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(golden)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in golden.values())
    for name, fname in index["weight_map"].items():  # every name is in the shard the index names
        assert name in load_file(str(converted / "hf" / fname))
    shards = sorted(p.name for p in (converted / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors")
                                   for s in shards)
    for s in shards:
        assert (converted / "hf" / s).stat().st_size < 300_000 + 20_000  # tensors + header per shard


def test_hf_config_round_trip(converted):
    ref = json.loads((TINY_HF / "config.json").read_text())
    out = json.loads((converted / "hf" / "config.json").read_text())
    for key, value in ref.items():  # every field of the fixture, architecture or not
        assert out.get(key) == value, key
    for key in ARCH_FIELDS:
        if key in ref:
            assert out[key] == ref[key]
    # The fixture ships no modeling_bailing_moe.py, so an auto_map would point at missing files.
    assert "auto_map" not in out and not list((converted / "hf").glob("*.py"))


def test_native_layout(converted, golden):
    cfg = json.loads((converted / "native" / "config.json").read_text())
    assert cfg["format"] == "lingmoe-native" and cfg["version"] == 1
    assert cfg["model"]["num_experts"] == 8 and cfg["model"]["torch_dtype"] == "float32"
    assert "model_type" not in cfg  # not mistakable for an HF config
    native = all_tensors(converted / "native")
    index = json.loads((converted / "native" / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(native)
    # Stacking computed here independently of the adapter.
    for L in range(3):
        p = f"model.layers.{L}.mlp.experts"
        gate_up = torch.stack([torch.cat([golden[f"{p}.{e}.gate_proj.weight"], golden[f"{p}.{e}.up_proj.weight"]])
                               for e in range(8)])
        down = torch.stack([golden[f"{p}.{e}.down_proj.weight"] for e in range(8)])
        assert torch.equal(native[f"{p}.w_gate_up"], gate_up) and native[f"{p}.w_gate_up"].shape == (8, 64, 64)
        assert torch.equal(native[f"{p}.w_down"], down) and native[f"{p}.w_down"].shape == (8, 64, 32)
    plain = {k: v for k, v in golden.items() if ".mlp.experts." not in k}
    assert len(native) == len(plain) + 6
    for k, v in plain.items():
        assert torch.equal(native[k], v) and native[k].dtype == v.dtype, k


def test_logits_equal_from_every_side(converted):
    exp = load_file(str(EXPECTED))
    models = [load_hf(TINY_HF), load_native(converted / "native"), load_checkpoint(converted / "hf")]
    with torch.no_grad():
        logits = [m(exp["input_ids"], attention_mask=exp["attention_mask"]).logits for m in models]
    for other in logits[1:]:
        assert torch.equal(other, logits[0])
    real = exp["attention_mask"].bool()
    assert (logits[0] - exp["logits"])[real].abs().max() < 1e-4  # and they are the reference's logits


def _flip_one_element(shard: pathlib.Path, name: str, flat_index: int) -> None:
    """Flip the sign bit of one float32 element of ``name`` in place, found from the raw header."""
    with open(shard, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        assert header[name]["dtype"] == "F32"
        pos = 8 + n + header[name]["data_offsets"][0] + 4 * flat_index + 3
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x80]))


def test_verify_cli(capsys, converted, tmp_path):
    rc, out, err = run_inproc(verify.main, capsys, str(TINY_HF), str(converted / "native"))
    assert rc == 0, out + err
    assert "identical: 33 tensors" in out
    bad = tmp_path / "flipped"
    shutil.copytree(converted / "native", bad)
    name = "model.layers.1.mlp.experts.w_down"
    shard = bad / json.loads((bad / INDEX_NAME).read_text())["weight_map"][name]
    _flip_one_element(shard, name, 5 * 64 * 32 + 7 * 32 + 3)  # expert 5, row 7, column 3
    r = cli("verify", str(TINY_HF), str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    diff_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("DIFF ")]
    assert len(diff_lines) == 1
    assert name in diff_lines[0] and "1 of 16384 elements differ" in diff_lines[0]
    assert "[5, 7, 3]" in diff_lines[0]
    value = load_file(str(TINY_HF / json.loads((TINY_HF / INDEX_NAME).read_text())["weight_map"][
        "model.layers.1.mlp.experts.5.down_proj.weight"]))["model.layers.1.mlp.experts.5.down_proj.weight"][7, 3]
    assert f"max abs diff {2 * abs(value.item()):.3e}" in diff_lines[0]


def test_verify_tolerance_and_dtype(capsys, converted):
    a = {"x": torch.tensor([1.0, 2.0, 3.0])}
    assert verify.compare_tensors("x", a["x"], a["x"].clone()) is None
    assert verify.compare_tensors("x", torch.tensor([0.0]), torch.tensor([-0.0])) is not None  # bitwise
    d = verify.compare_tensors("x", a["x"], torch.tensor([1.0, 2.5, 3.0]))
    assert "1 of 3 elements differ" in d.message and "5.000e-01" in d.message and "[1]" in d.message
    assert verify.compare_tensors("x", a["x"], torch.tensor([1.0, 2.5, 3.0]), atol=0.5) is None
    assert "shape [3] vs [2]" in verify.compare_tensors("x", a["x"], a["x"][:2]).message
    assert "dtype float32 vs bfloat16" in verify.compare_tensors("x", a["x"], a["x"].bfloat16()).message


def test_dtype_conversion(capsys, tmp_path, golden):
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(tmp_path / "n16"),
                            "--dtype", "bf16", "--quiet")
    assert rc == 0, err
    native = all_tensors(tmp_path / "n16")
    assert all(t.dtype == torch.bfloat16 for t in native.values())
    assert torch.equal(native["model.word_embeddings.weight"], golden["model.word_embeddings.weight"].bfloat16())
    assert torch.equal(native["model.layers.2.mlp.experts.w_down"][3],
                       golden["model.layers.2.mlp.experts.3.down_proj.weight"].bfloat16())
    assert json.loads((tmp_path / "n16" / "config.json").read_text())["model"]["torch_dtype"] == "bfloat16"
    # back to HF in fp32: exactly the bf16 values widened
    rc, _, err = run_inproc(native_to_hf.main, capsys, "--native", str(tmp_path / "n16"), "--out",
                            str(tmp_path / "h32"), "--dtype", "fp32", "--quiet")
    assert rc == 0, err
    back = all_tensors(tmp_path / "h32")
    for k, v in golden.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.bfloat16().float()), k
    assert json.loads((tmp_path / "h32" / "config.json").read_text())["torch_dtype"] == "float32"
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h32"))
    assert rc == 1  # rounded values differ bitwise
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h32"), "--atol", "0.01")
    assert rc == 0, out  # bf16 rounding of values ~N(0, 0.02) and norms ~1 stays within 0.01


def test_save_native_load_native_api(tmp_path):
    model = load_hf(TINY_HF)
    save_native(model, tmp_path / "n", shard_size="100KB")
    again = load_native(tmp_path / "n")
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    save_hf(again, tmp_path / "h", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(tmp_path / "h").values())
    with pytest.raises(OutputExistsError, match="already exists"):
        save_native(model, tmp_path / "n")
    with pytest.raises(CheckpointError, match="native checkpoint; use load_native"):
        load_hf(tmp_path / "n")


def test_failure_while_writing_leaves_nothing(tmp_path):
    with checkpoint.open_checkpoint(TINY_HF) as ck:
        def stream():
            for i, item in enumerate(ck.iter_native()):
                if i == 20:
                    raise RuntimeError("disk on fire")
                yield item
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_checkpoint(stream(), ck.cfg, tmp_path / "out", "hf", "50KB", source_dtypes=ck.dtypes)
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary sibling


def test_converter_options_do_what_they_say(capsys, tmp_path):
    """--shard-size, --dtype, --quiet and --progress change the output as described (the option list in
    --help is argparse's; what each option does is tested here)."""
    total = json.loads((TINY_HF / INDEX_NAME).read_text())["metadata"]["total_size"]
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(tmp_path / "one"))
    assert rc == 0 and "writing one" in err  # a progress bar on stderr by default
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(tmp_path / "many"),
                            "--shard-size", "200KB", "--quiet")
    assert rc == 0 and err == ""
    shards = lambda d: sorted(p.name for p in d.glob("*.safetensors"))  # noqa: E731
    assert len(shards(tmp_path / "one")) == 1  # 5GB default: the whole fixture fits one shard
    assert len(shards(tmp_path / "many")) >= total // 200_000
    rc, _, _ = run_inproc(native_to_hf.main, capsys, "--native", str(tmp_path / "many"), "--out",
                          str(tmp_path / "h16"), "--dtype", "fp16", "--quiet")
    assert rc == 0 and {t.dtype for t in all_tensors(tmp_path / "h16").values()} == {torch.float16}
    # verify: --atol lets the fp16 rounding pass, --ignore-dtype compares values across dtypes,
    # --max-report caps the lines printed, --progress draws a bar on stderr.
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h16"), "--max-report", "2")
    assert rc == 1 and len([ln for ln in out.splitlines() if ln.startswith("DIFF ")]) == 2
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h16"), "--atol", "0.01")
    assert rc == 1  # the dtypes differ: without --ignore-dtype that is a difference whatever the tolerance
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h16"), "--ignore-dtype")
    assert rc == 1  # fp16 rounding moved values: bitwise they differ
    rc, _, err = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "h16"), "--ignore-dtype",
                            "--atol", "0.01", "--progress")
    assert rc == 0 and "comparing" in err


# ------------------------------------------------------------------------------------------ bad input
def _copy(tmp_path) -> pathlib.Path:
    d = tmp_path / "in"
    shutil.copytree(TINY_HF, d)
    return d


def _edit_shard(d: pathlib.Path, fname: str, edit) -> None:
    tensors = load_file(str(d / fname))
    edit(tensors)
    save_file(tensors, str(d / fname), metadata={"format": "pt"})


def _edit_json(path: pathlib.Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _expect_cli_error(capsys, d, tmp_path, *needles, module=hf_to_native, flag="--hf"):
    out = tmp_path / "out"
    rc, _, err = run_inproc(module.main, capsys, flag, str(d), "--out", str(out), "--quiet")
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp dir either
    return err


def test_missing_shard_subprocess(tmp_path):
    d = _copy(tmp_path)
    (d / "model-00003-of-00006.safetensors").unlink()
    r = cli("hf_to_native", "--hf", str(d), "--out", str(tmp_path / "out"))
    assert r.returncode == EXIT_MISSING
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "model-00003-of-00006.safetensors" in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_shard(capsys, tmp_path):
    d = _copy(tmp_path)
    shard = d / "model-00002-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _expect_cli_error(capsys, d, tmp_path, str(shard), "truncated")


def test_index_names_tensor_absent_from_its_shard(capsys, tmp_path):
    d = _copy(tmp_path)
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"  # really in shard 1
    _edit_json(d / INDEX_NAME, lambda j: j["weight_map"].__setitem__(name, "model-00006-of-00006.safetensors"))
    _expect_cli_error(capsys, d, tmp_path, "model-00006-of-00006.safetensors", name, "does not contain")


def test_unexpected_and_missing_keys_are_listed(capsys, tmp_path):
    d = _copy(tmp_path)
    extra, gone = "model.layers.0.mlp.experts.8.up_proj.weight", "model.layers.2.attention.dense.weight"
    shard_of = json.loads((d / INDEX_NAME).read_text())["weight_map"]

    def edit(t):
        t[extra] = torch.zeros(32, 64)
    _edit_shard(d, shard_of["lm_head.weight"], edit)
    _edit_shard(d, shard_of[gone], lambda t: t.pop(gone))

    def edit_index(j):
        j["weight_map"][extra] = shard_of["lm_head.weight"]
        del j["weight_map"][gone]
    _edit_json(d / INDEX_NAME, edit_index)
    err = _expect_cli_error(capsys, d, tmp_path, "missing tensors (1): " + gone, "unexpected tensors (1): " + extra,
                            str(d / "config.json"))
    assert err.count("\n") == 1  # one line


def test_shape_disagrees_with_config(capsys, tmp_path):
    d = _copy(tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("vocab_size", 500))
    shard = json.loads((d / INDEX_NAME).read_text())["weight_map"]["model.word_embeddings.weight"]
    _expect_cli_error(capsys, d, tmp_path, shard, "model.word_embeddings.weight", "[512, 64]", "[500, 64]",
                      "config.json")


def test_model_type_not_bailing_moe(capsys, tmp_path):
    d = _copy(tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("model_type", "llama"))
    _expect_cli_error(capsys, d, tmp_path, str(d / "config.json"), "model_type is 'llama'", "bailing_moe")


def test_output_directory_exists(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(out), "--quiet")
    assert rc == EXIT_BAD_INPUT and str(out) in err and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_layout_for_the_cli(capsys, tmp_path, converted):
    _expect_cli_error(capsys, TINY_HF, tmp_path, "hf checkpoint, expected native", module=native_to_hf,
                      flag="--native")
    _expect_cli_error(capsys, converted / "native", tmp_path, "native checkpoint, expected hf")


def test_bad_native_input(capsys, tmp_path, converted):
    d = tmp_path / "in"
    shutil.copytree(converted / "native", d)
    _edit_json(d / "config.json", lambda c: c["model"].__setitem__("num_experts", 16))
    _expect_cli_error(capsys, d, tmp_path, "model.layers.0.mlp.gate.weight", "[8, 64]", "[16, 64]",
                      module=native_to_hf, flag="--native")
    _edit_json(d / "config.json", lambda c: c.__setitem__("version", 7))
    _expect_cli_error(capsys, d, tmp_path, str(d / "config.json"), "version 7", module=native_to_hf,
                      flag="--native")


def test_verify_of_a_missing_checkpoint_exits_3(capsys, tmp_path):
    rc, _, err = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "nope"))
    assert rc == EXIT_MISSING and "nope" in err and err.startswith("error: ")


def test_single_file_hf_input_and_stream_order_checked(capsys, tmp_path, golden):
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(TINY_HF / "config.json", single / "config.json")
    save_file(golden, str(single / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(single), "--out", str(tmp_path / "n"), "--quiet")
    assert rc == 0, err
    rc, out, _ = run_inproc(verify.main, capsys, str(TINY_HF), str(tmp_path / "n"))
    assert rc == 0, out
    with checkpoint.open_checkpoint(TINY_HF) as ck:
        items = list(ck.iter_native())
        items[3], items[4] = items[4], items[3]
        with pytest.raises(CheckpointError, match="arrived where"):
            write_checkpoint(iter(items), ck.cfg, tmp_path / "o", "native", source_dtypes=ck.dtypes)
        with pytest.raises(CheckpointError, match="planned for bfloat16"):
            write_checkpoint(ck.iter_native(), ck.cfg, tmp_path / "o", "hf", source_dtypes=torch.bfloat16)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- disk space, kills
def _no_leftovers(tmp_path, name="out"):
    return not (tmp_path / name).exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")] == []


def _free(monkeypatch, nbytes):
    import collections
    from data import files

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - nbytes, nbytes))


def test_conversion_refuses_before_writing_when_space_is_short(capsys, tmp_path, monkeypatch):
    # The bytes to write are the fixture's tensors (its index says how many), plus small headers.
    total = json.loads((TINY_HF / INDEX_NAME).read_text())["metadata"]["total_size"]
    out = tmp_path / "out"
    _free(monkeypatch, total - 1)
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(out), "--quiet")
    assert rc == EXIT_NO_SPACE and err.count("\n") == 1, err
    assert err.startswith("error: writing the native checkpoint needs ") and f" GB at {out}, 0.00 GB free" in err
    assert _no_leftovers(tmp_path)
    _free(monkeypatch, 2 * total)  # and with room it goes through
    assert run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(out), "--quiet")[0] == 0
    # the fp32 output of a bf16 request is half: the check counts output dtypes
    _free(monkeypatch, total // 2 + 200_000)
    rc, _, err = run_inproc(native_to_hf.main, capsys, "--native", str(out), "--out", str(tmp_path / "h"),
                            "--dtype", "bf16", "--quiet")
    assert rc == 0, err


def test_a_write_that_runs_out_of_space_names_the_path_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import errno
    from checkpoints_convert import io as ckio

    written = [0]

    class FullDisk:
        """A file whose writes fail with ENOSPC once 300 kB went through."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            written[0] += len(data)
            if written[0] > 300_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open = open
    monkeypatch.setattr(ckio, "open", lambda p, mode="r", *a, **k: FullDisk(real_open(p, mode, *a, **k))
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    out = tmp_path / "out"
    rc, _, err = run_inproc(hf_to_native.main, capsys, "--hf", str(TINY_HF), "--out", str(out), "--quiet",
                            "--shard-size", "200KB")
    assert rc == EXIT_NO_SPACE and err.count("\n") == 1, err
    assert err.startswith(f"error: No space left on device writing {out} ("), err
    assert written[0] > 300_000 and _no_leftovers(tmp_path)


def test_a_killed_conversions_temporary_is_removed_by_the_next_run(tmp_path, golden):
    # The conversion kills itself (SIGKILL: no cleanup runs) after writing a few tensors.
    out = tmp_path / "out"
    script = (f"import os, signal, sys\n"
              f"from checkpoints_convert import io, hf_to_native\n"
              f"from data.errors import run_cli\n"
              f"add = io.ShardWriter.add\n"
              f"def dying_add(self, name, t):\n"
              f"    add(self, name, t)\n"
              f"    if self._next == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"io.ShardWriter.add = dying_add\n"
              f"sys.exit(run_cli(hf_to_native.main, ['--hf', {str(TINY_HF)!r}, '--out', {str(out)!r}, "
              f"'--quiet', '--shard-size', '100KB']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and any(f.suffix == ".safetensors" for f in stale[0].iterdir())
    r = cli("hf_to_native", "--hf", str(TINY_HF), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the stale temporary is gone
    model, ref = load_native(out).state_dict(), load_hf(TINY_HF).state_dict()
    assert sorted(model) == sorted(ref) and all(torch.equal(model[k], ref[k]) for k in ref)
