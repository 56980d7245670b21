"""Option values that used to crash, or to run and do something else than they say, are refused
before anything is written: one `error: ...` line naming the option, a non-zero exit status."""
import json

import pytest

from data.errors import EXIT_BAD_INPUT, run_cli
from tests.data_helpers import tiny_hf_tokenizer, write_jsonl
from tests.trainer_utils import TINY, refused, run_inproc

# A run that would finish in seconds if the option were taken.
QUICK = TINY + ["--data.synthetic", "true", "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
                "--train.steps", "2", "--checkpoint.export_hf", "false"]

REFUSED = [
    # What each did when it was taken:
    ("data.micro_batch_size", "0"),  # ZeroDivisionError
    ("train.log_every", "0"),  # ZeroDivisionError after the first step
    ("train.max_bad_steps", "0"),  # stopped after a good step: "0 consecutive steps with a non-finite loss"
    ("train.steps", "0"),  # exit status 0, nothing trained
    ("train.steps", "-3"),  # refused, blaming train.profile_step
    ("checkpoint.every", "-1"),  # a checkpoint every step
    ("model.param_dtype", "int8"),  # taken (CPU ignores it; a GPU run would fail in FSDP)
    # The audit of the other numbers:
    ("optim.lr", "-0.001"),  # AdamW's ValueError, a traceback
    ("optim.lr", ".inf"),
    ("optim.lr", "nan"),
    ("optim.beta1", "1.0"),  # AdamW's ValueError
    ("optim.beta2", "-0.1"),
    ("optim.eps", "0"),  # 0/0 where a moment is still 0: NaN weights
    ("optim.min_lr_ratio", "1.5"),  # a schedule that climbs to 1.5 x the peak
    ("optim.warmup_ratio", "2"),  # a warm-up longer than the run
    ("optim.warmup_steps", "-2"),  # read as -1 (warmup_ratio)
    ("optim.weight_decay", "-0.1"),  # AdamW's ValueError
    ("optim.grad_clip", "-1"),  # read as 0 (no clipping)
    ("train.global_batch_size", "0"),  # no micro-batches: a crash in the step
    ("train.seed", "-1"),  # numpy refuses negative seeds (the data loaders)
    ("train.peak_tflops", "-1"),  # a negative MFU
    ("train.ceiling_tflops", "-1"),
    ("data.seq_len", "1"),  # rows with no token to train on
    ("parallel.ep", "0"),
    ("checkpoint.keep_last", "0"),  # kept every checkpoint
    ("model.aux_loss_alpha", "-0.001"),  # rewards imbalance
    ("model.z_loss_coef", "-0.001"),
    ("model.overrides", "{num_layers: 2}"),  # TypeError: not a model config field
    ("model.overrides", "{aux_loss_type: micro}"),  # TypeError: given twice
]


def _refused(script, option, value, out, capsys):
    with refused(capsys, "", EXIT_BAD_INPUT) as r:
        run_inproc(script, QUICK + [f"--{option}", value, "--output-dir", str(out)])
    message = r.message
    assert f" {option} must " in message or f" {option}: " in message or f" {option} cannot " in message, message
    assert not out.exists()  # nothing written: not even the run directory


@pytest.mark.parametrize("option, value", REFUSED)
def test_a_bad_value_is_refused_before_anything_is_written(option, value, tmp_path, capsys):
    _refused("sft", option, value, tmp_path / "run", capsys)


def test_compile_with_activation_checkpointing_is_refused(tmp_path, capsys):
    # Taken, it crashed in the first forward (dynamo cannot trace the checkpoint's routing replay).
    with refused(capsys, "model.compile true cannot be combined with model.activation_checkpointing",
                 EXIT_BAD_INPUT):
        run_inproc("sft", QUICK + ["--model.compile", "true", "--model.activation_checkpointing", "true",
                                   "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value", [("dpo.beta", "0"), ("dpo.nll_coef", "-1")])
def test_a_bad_dpo_value_is_refused_before_anything_is_written(option, value, tmp_path, capsys):
    # beta 0: ipo divides by it, sigmoid and hinge have no gradient; a negative NLL weight pushes the
    # chosen answers down.
    _refused("dpo", option, value, tmp_path / "run", capsys)


@pytest.mark.parametrize("max_len", ["0", "-5", "1"])
def test_prepare_refuses_a_max_len_that_leaves_nothing_to_train(max_len, tmp_path, capsys):
    from data.prepare import main

    tok = tmp_path / "tok"
    tok.mkdir()
    tiny_hf_tokenizer().save(str(tok / "tokenizer.json"))
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    sample = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "a.jsonl", [sample])
    out = tmp_path / "out"
    assert run_cli(main, [data, "--tokenizer", str(tok), "--out", str(out), "--max-len", max_len,
                          "--quiet"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --max-len must be") and "\n" not in err, err
    assert not out.exists()
    assert main([data, "--tokenizer", str(tok), "--out", str(out), "--max-len", "64", "--quiet"]) == 0
