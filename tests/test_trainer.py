"""SFT trainer: FSDP vs single process, accumulation invariance, resume, SIGTERM, router balance, CLI errors."""
import json
import pathlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import TINY_HF
from data.errors import EXIT_BAD_INPUT, EXIT_MISSING
from tests.trainer_utils import ROOT, TINY, exported, metrics, refused, run_inproc, run_torchrun
from trainer.checkpoint import latest_checkpoint
from trainer.optim import lr_lambda


def _close(a, b, rtol=1e-5, atol=1e-6):
    return abs(a - b) <= atol + rtol * abs(b)


@pytest.mark.slow
def test_two_rank_fsdp_equals_single_process(tmp_path):
    # From the golden HF checkpoint: each rank reads only its rows (its experts) of every tensor.
    # The two-rank side also recomputes blocks in backward (activation checkpointing, routing replayed).
    common = ["--model.init_from", str(TINY_HF), "--data.synthetic", "true", "--train.steps", "4",
              "--train.global_batch_size", "4", "--model.aux_loss_type", "global", "--model.aux_loss_alpha", "0.01",
              "--optim.lr", "3e-3", "--checkpoint.every", "0", "--train.progress", "false", "--data.seq_len", "32"]
    run_inproc("sft", common + ["--data.micro_batch_size", "4", "--output-dir", str(tmp_path / "one")])
    run_torchrun("sft", common + ["--data.micro_batch_size", "2", "--model.activation_checkpointing", "true",
                                  "--output-dir", str(tmp_path / "two")])
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        print(f"step {a['step']}: loss {a['loss']:.6f} vs {b['loss']:.6f}, aux {a['aux_loss']:.6e} vs {b['aux_loss']:.6e}")
        assert _close(a["loss"], b["loss"]) and _close(a["aux_loss"], b["aux_loss"]), (a, b)
        assert _close(a["grad_norm"], b["grad_norm"], rtol=1e-4), (a["grad_norm"], b["grad_norm"])
    w1, w2 = exported(tmp_path / "one"), exported(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5), k
    # The updates moved the weights: the comparison above is not of two untouched copies.
    golden = exported(TINY_HF.parent)
    moved = [k for k in golden if not torch.allclose(golden[k], w1[k], atol=1e-4)]
    assert len(moved) > len(golden) // 2


@pytest.mark.slow
def test_two_ranks_train_on_the_rows_one_process_trains_on_with_real_data(tmp_path):
    # Packed rows of real (demo) data, with truncation: the loader deals rows after packing, so two
    # ranks x 2 rows see the same rows as one process x 4, and the steps agree. (The sequence-level
    # balance loss is per row, so it is split-invariant too; docs/training.md says when 'global' is.)
    import pathlib

    from data.demo import ensure_demo_data

    paths = ensure_demo_data(str(tmp_path / "demo"))
    lines = pathlib.Path(paths["jsonl"]["sft_general"]).read_text().splitlines()[:200]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    common = TINY + ["--data.sources", f"[{tmp_path / 'sft.jsonl'}]", "--data.seq_len", "64", "--train.steps", "3",
                     "--train.global_batch_size", "4", "--model.aux_loss_type", "sequence", "--optim.lr", "3e-3",
                     "--checkpoint.every", "0", "--data.cache_dir", str(tmp_path / "cache")]
    run_inproc("sft", common + ["--data.micro_batch_size", "4", "--output-dir", str(tmp_path / "one")])
    run_torchrun("sft", common + ["--data.micro_batch_size", "2", "--output-dir", str(tmp_path / "two")])
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [1, 2, 3] and m1[-1]["data_truncated"] == m2[-1]["data_truncated"] > 0
    for a, b in zip(m1, m2):
        print(f"step {a['step']}: loss {a['loss']:.6f} vs {b['loss']:.6f}")
        assert _close(a["loss"], b["loss"]) and _close(a["aux_loss"], b["aux_loss"], rtol=1e-4), (a, b)
    w1, w2 = exported(tmp_path / "one"), exported(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k


def test_accumulation_split_gives_the_same_update(tmp_path):
    # Sequence-level balance and z-loss are per row / per token, so they are split-invariant exactly.
    common = TINY + ["--data.synthetic", "true", "--train.steps", "3", "--train.global_batch_size", "4",
                     "--model.aux_loss_type", "sequence", "--model.aux_loss_alpha", "0.01",
                     "--model.z_loss_coef", "0.001", "--optim.lr", "3e-3", "--checkpoint.every", "0"]
    run_inproc("sft", common + ["--data.micro_batch_size", "4", "--output-dir", str(tmp_path / "a")])
    run_inproc("sft", common + ["--data.micro_batch_size", "1", "--output-dir", str(tmp_path / "b")])
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for a, b in zip(ma, mb):
        assert _close(a["loss"], b["loss"]) and _close(a["aux_loss"], b["aux_loss"], rtol=1e-4), (a, b)
    wa, wb = exported(tmp_path / "a"), exported(tmp_path / "b")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    args = TINY + ["--train.steps", "6", "--checkpoint.every", "3", "--checkpoint.keep_last", "3",
                   "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
                   "--data.cache_dir", str(tmp_path / "cache")]
    run_inproc("sft", args + ["--output-dir", str(tmp_path / "straight")])
    crashed = tmp_path / "crashed"
    run_inproc("sft", args + ["--output-dir", str(crashed)])
    # Make it look as if the process died between step 3's and step 6's checkpoints, mid-save.
    shutil.rmtree(crashed / "checkpoints" / "step_00000006")
    shutil.rmtree(crashed / "hf")
    (crashed / "checkpoints" / "step_00000006.tmp").mkdir()
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # a line cut short by the crash
    assert latest_checkpoint(str(crashed / "checkpoints")).endswith("step_00000003")
    run_inproc("sft", args + ["--output-dir", str(crashed)])
    straight, resumed = metrics(tmp_path / "straight"), metrics(crashed)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    ws, wr = exported(tmp_path / "straight"), exported(crashed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert not (crashed / "checkpoints" / "step_00000006.tmp").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "trainer" / "sft.py"), *TINY, "--data.synthetic", "true",
           "--train.steps", "100000", "--checkpoint.every", "0", "--output-dir", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err
    last = metrics(out)[-1]["step"]
    ckpt = latest_checkpoint(str(out / "checkpoints"))
    assert ckpt is not None and ckpt.endswith(f"step_{last:08d}")


@pytest.mark.slow
def test_load_balancing_loss_evens_out_a_skewed_router(tmp_path):
    from checkpoints_convert import save_hf
    from moe import BailingMoeConfig, BailingMoeForCausalLM

    cfg = BailingMoeConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=1,
                           num_shared_experts=1, initializer_range=0.02, torch_dtype="float32", eos_token_id=0,
                           pad_token_id=0)
    torch.manual_seed(0)
    model = BailingMoeForCausalLM(cfg)
    with torch.no_grad():
        # Every embedding shares a direction c beside its own, and expert 0's router row points along c:
        # nearly all tokens go there, yet tokens still differ, so balancing can separate them.
        c = torch.randn(32)
        model.model.word_embeddings.weight.normal_(0, 1).add_(c)
        model.model.layers[0].mlp.gate.weight[0] = c * 0.2
    save_hf(model, tmp_path / "skewed")
    loads = {}
    for alpha in (0.0, 0.2):
        out = tmp_path / f"alpha{alpha}"
        run_inproc("sft", ["--model.init_from", str(tmp_path / "skewed"), "--data.synthetic", "true",
                           "--train.steps", "30", "--optim.lr", "1e-2", "--optim.warmup_steps", "0",
                           "--model.aux_loss_alpha", str(alpha), "--train.progress", "false",
                           "--data.seq_len", "32", "--checkpoint.export_hf", "false", "--output-dir", str(out)])
        m = metrics(out)
        loads[alpha] = (m[0]["expert_load_max_over_mean"], sum(x["expert_load_max_over_mean"] for x in m[-5:]) / 5)
    print("max/mean expert load (first step, mean of last 5):", loads)
    assert loads[0.2][0] > 3.0  # K=1, E=4: everything on one expert would be max/mean = 4
    assert loads[0.2][1] < 0.75 * loads[0.2][0]
    assert loads[0.2][1] < loads[0.0][1]


def test_schedule_warmup_then_cosine_to_floor():
    assert lr_lambda(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(100, 100, 10, 0.1) == pytest.approx(0.1)


def _cli(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "trainer" / "sft.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# A valid value other than the default for string options with a fixed set of values.
_OTHER_CHOICE = {("model", "preset"): "ling-lite", ("model", "expert_backend"): "torch",
                 ("model", "aux_loss_type"): "micro", ("model", "param_dtype"): "fp32", ("train", "device"): "cpu",
                 ("dpo", "loss_type"): "ipo", ("dpo", "reference"): "live", ("dpo", "nll_average"): "token",
                 ("data", "template"): "bailing_v2", ("parallel", "one_rank"): "fsdp",
                 ("parallel", "offload"): "optimizer", ("lora", "target"): "attention,experts"}
# Options that only go with another one.
_COMPANIONS = {("checkpoint", "save_final"): ["--checkpoint.export_hf", "false"],
               ("lora", "rank"): ["--model.init_from", "some/where"]}


def _other_value(sec, key, default):
    if (sec, key) in _OTHER_CHOICE:
        return [_OTHER_CHOICE[sec, key]]
    if isinstance(default, bool):
        return [str(not default).lower()]
    if isinstance(default, int):
        return [str(default + 1), str(default - 1)]
    if isinstance(default, float):
        return [repr(default * 2 + 0.5), repr(default / 2)]  # the second for those below 1 (AdamW's betas)
    if isinstance(default, list):
        return ["[a.jsonl]"]
    if isinstance(default, dict):
        return ["{num_hidden_layers: 2}"]
    return ["some/where"]


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_every_option_in_help_is_accepted_and_changes_the_resolved_config(script):
    import dataclasses
    import re

    from trainer import dpo, sft
    from trainer.options import DPORunOptions, Options, OptionsError, build_parser, option_key, parse_options

    options, defaults, doc = ((Options, None, sft.__doc__) if script == "sft"
                              else (DPORunOptions, dpo.DPO_DEFAULTS, dpo.__doc__))
    sections = options.sections()

    def resolve(args):
        return parse_options(args, script, options, doc, "runs/x", defaults=defaults).to_dict()

    help_text = build_parser(script, options, doc, defaults).format_help()
    listed = set(re.findall(r"^\s+--(\w+)\.(\w+) V\b", help_text, flags=re.M))  # the option lines
    assert listed == {(sec, option_key(f)) for sec, cls in sections.items() for f in dataclasses.fields(cls)}
    base = resolve([])
    for sec, key in sorted(listed):
        companions = _COMPANIONS.get((sec, key), [])
        for value in _other_value(sec, key, base[sec][key]):
            try:
                got = resolve([f"--{sec}.{key}", value, *companions])
                break
            except OptionsError:
                continue
        else:
            raise AssertionError(f"no value of --{sec}.{key} was accepted")
        changed = {(s, k) for s in sections for k in got[s] if got[s][k] != base[s][k]}
        want = {(sec, key)} | {tuple(c[2:].split(".")) for c in companions[::2]}
        assert changed == want, (sec, key, changed)
    if script == "dpo":  # the DPO script's own defaults are what it resolves to
        assert (base["optim"]["lr"], base["dpo"]["nll_coef"], base["train"]["steps"]) == (2e-4, 1.0, 150)


def test_unknown_options_and_keys_are_rejected_naming_the_valid_ones(tmp_path, capsys):
    from trainer.sft import main

    with pytest.raises(SystemExit) as e:
        main(["--optim.learning_rate", "1e-4", "--output-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--optim.lr" in err and "learning_rate" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1e-4\n  momentum: 0.9\n")
    with refused(capsys, r"unknown key optim.momentum.*'lr'", EXIT_BAD_INPUT):
        main(["--config", str(recipe), "--output-dir", str(tmp_path / "y")])
    with refused(capsys, "/nonexistent/train.jsonl: no such file", EXIT_MISSING):
        main(["--data.sources", "[{path: /nonexistent/train.jsonl}]", "--train.device", "cpu",
              "--output-dir", str(tmp_path / "z")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not (tmp_path / "z" / "checkpoints").exists()


def test_device_option_is_checked_before_anything_is_written(tmp_path, capsys):
    from trainer.sft import main

    with refused(capsys, "train.device must be auto, cuda or cpu", EXIT_BAD_INPUT):
        main(["--train.device", "tpu", "--output-dir", str(tmp_path / "a")])
    if torch.cuda.is_available():  # the other half of this check runs in tests/test_trainer_gpu.py
        return
    with refused(capsys, r"no CUDA device.*--train.device cpu"):
        main([*TINY[:-2], "--data.synthetic", "true", "--train.device", "cuda", "--output-dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_sample_reported_with_file_and_line_before_training(tmp_path):
    # Through the real command line: the message on stderr and a non-zero exit status.
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    p = _cli(["--data.sources", f"[{{path: {data}}}]", "--output-dir", str(tmp_path / "run"), *TINY])
    assert p.returncode != 0
    assert f"{data}:2" in p.stderr and "wizard" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    from trainer import loop
    from trainer.errors import TrainerError
    from trainer.options import Options, parse_options
    from trainer.sft import SFTTask

    class PoisonedTask(SFTTask):
        """Step 2's loss becomes NaN; from step 4 on every loss does."""
        calls = 0

        def micro_step(self, ctx, b):
            out = super().micro_step(ctx, b)
            PoisonedTask.calls += 1
            if PoisonedTask.calls == 2 or PoisonedTask.calls >= 4:
                out.loss = out.loss * float("nan")
                out.sums["loss"] = out.sums["loss"] * float("nan")
            return out

    opts = parse_options(TINY + ["--data.synthetic", "true", "--train.steps", "20", "--train.global_batch_size", "4",
                                 "--train.max_bad_steps", "3", "--checkpoint.every", "1",
                                 "--output-dir", str(tmp_path)], "t", Options, "", str(tmp_path))
    with pytest.raises(TrainerError, match="3 consecutive steps with a non-finite"):
        loop.run(PoisonedTask(), opts)
    m = metrics(tmp_path)
    assert [x["skipped"] for x in m] == [0, 1, 0, 1, 1, 1]
    # A skipped step leaves the weights as they were: the checkpoints after skipped steps 4 and 5
    # (the two kept) hold the same model, and the one after step 6 was never written.
    from checkpoints_convert.dcp_layout import iter_native_tensors
    from moe import BailingMoeConfig
    from trainer.checkpoint import checkpoint_dirs

    dirs = dict(checkpoint_dirs(str(tmp_path / "checkpoints")))
    assert sorted(dirs) == [4, 5]
    cfg = BailingMoeConfig.from_dict(json.loads((tmp_path / "checkpoints" / "step_00000004" / "model_config.json").read_text()))
    a = dict(iter_native_tensors(dirs[4], cfg))
    b = dict(iter_native_tensors(dirs[5], cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_training(tmp_path, capsys):
    from trainer.sft import main

    with refused(capsys, "vocabulary of 2000 ids, but the model embeds only 1000"):
        main(["--model.overrides", "{vocab_size: 1000}", "--output-dir", str(tmp_path / "run"), "--train.device", "cpu",
              "--data.cache_dir", str(tmp_path / "cache"), "--train.progress", "false"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_end_of_run_export_equals_the_checkpoint_and_loads_as_hf(tmp_path):
    from checkpoints_convert import load_hf
    from checkpoints_convert.dcp_layout import iter_native_tensors
    from moe import BailingMoeConfig

    run_inproc("sft", TINY + ["--data.synthetic", "true", "--train.steps", "2", "--output-dir", str(tmp_path)])
    ckpt = latest_checkpoint(str(tmp_path / "checkpoints"))
    cfg = BailingMoeConfig.from_dict(json.loads((pathlib.Path(ckpt) / "model_config.json").read_text()))
    stored = dict(iter_native_tensors(ckpt, cfg))
    model = load_hf(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bailing_moe"
    sd = model.state_dict()
    assert sd.keys() == stored.keys()
    assert all(torch.equal(sd[k], stored[k]) for k in sd)
    bad = subprocess.run([sys.executable, "-m", "checkpoints_convert.dcp_to_hf", str(tmp_path / "nope"),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr and not (tmp_path / "out").exists()


def _thread_names() -> list[str]:
    return sorted(pathlib.Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads this process's thread names from /proc")
def test_single_process_save_and_resume_start_no_thread_team(tmp_path, monkeypatch):
    # Regression: DCP gathered its plans over gloo, whose worker thread then ran a parallel copy and
    # so started a second OpenMP team; libgomp, managing more threads than cores, throttled its
    # spin-waits and every later step ran ~2x slower (trainer/checkpoint.py). That team shows as an
    # extra thread named after its gloo parent. The demo's tiny preset has enough tensors for it.
    from trainer import loop
    from trainer.options import Options, parse_options
    from trainer.sft import SFTTask

    seen = {}
    for name in ("save", "load"):
        orig = getattr(loop.Checkpointer, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            seen.setdefault(_name, _thread_names())
            return _orig(self, *a, **k)
        monkeypatch.setattr(loop.Checkpointer, name, wrapped)

    def opts(steps):
        return parse_options(["--data.synthetic", "true", "--data.seq_len", "32", "--train.progress", "false",
                              "--train.device", "cpu", "--train.steps", str(steps), "--checkpoint.every", "1",
                              "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path)],
                             "t", Options, "", str(tmp_path))
    try:
        loop.run(SFTTask(), opts(2), shutdown=False)
        after_saves = _thread_names()
        loop.run(SFTTask(), opts(3), shutdown=False)  # resumes from step 2, then saves step 3
        after_resume = _thread_names()
    finally:
        from trainer import parallel
        parallel.shutdown_distributed()
    print("before the first save:", seen["save"], "\nafter:", after_saves, "\nafter the resume:", after_resume)
    # (Only the gloo-named threads are compared: other threads, e.g. tqdm's monitor, may come and go.)
    gloo = lambda names: names.count("pt_gloo_runloop")  # noqa: E731
    assert gloo(after_saves) == gloo(seen["save"])
    assert gloo(after_resume) == gloo(seen["load"]) == gloo(seen["save"])


def test_global_balance_counts_carry_over_a_steps_micro_batches_and_checkpoints_say_global(tmp_path, monkeypatch):
    from moe.losses import CarriedCounts

    calls = []
    orig_call, orig_reset = CarriedCounts.__call__, CarriedCounts.reset

    def spy_call(self, counts):
        total = orig_call(self, counts)
        calls.append((counts.clone(), total.clone()))
        return total

    def spy_reset(self):
        calls.append("reset")
        orig_reset(self)

    monkeypatch.setattr(CarriedCounts, "__call__", spy_call)
    monkeypatch.setattr(CarriedCounts, "reset", spy_reset)
    run_inproc("sft", TINY + ["--data.synthetic", "true", "--train.steps", "2", "--train.global_batch_size", "4",
                              "--data.micro_batch_size", "2", "--model.aux_loss_type", "global",
                              "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path)])
    assert [c if c == "reset" else "mb" for c in calls] == ["reset", "mb", "mb"] * 2
    for first, second in (calls[1:3], calls[4:6]):
        assert torch.equal(first[1], first[0])  # one rank: the first micro-batch's own counts
        assert torch.equal(second[1], first[0] + second[0])  # then carried forward
        assert second[0].sum() > 0
    ckpt = latest_checkpoint(str(tmp_path / "checkpoints"))
    assert json.loads((pathlib.Path(ckpt) / "model_config.json").read_text())["aux_loss_type"] == "global"
