"""Errors a person can read: a command that stops while its progress bar is drawn prints
``error: ...`` on a line of its own, after the bar's last state, and nothing is redrawn after it."""
from __future__ import annotations

import os
import subprocess
import sys

from data.demo import TOKENIZER_DIR
from data.errors import EXIT_BAD_INPUT
from tests.data_helpers import write_jsonl
from tests.trainer_utils import ROOT, TINY, run_inproc

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _lines(stderr: str) -> list[str]:
    """What a terminal shows: each carriage return starts the line over."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]


def test_prepare_stops_on_a_bad_line_with_its_error_on_a_line_of_its_own(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 300 + ["{"])
    # Under a pipe tqdm draws too; --quiet is not given, so the bar is there.
    r = subprocess.run([sys.executable, "-m", "data.prepare", f, "--tokenizer", TOKENIZER_DIR, "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == EXIT_BAD_INPUT
    assert "prepare" in r.stderr and "rec" in r.stderr  # the bar was drawn
    lines = [ln for ln in r.stderr.split("\n") if ln]
    assert lines[-1] == f"error: {f}:301: malformed JSON (Expecting property name enclosed in double quotes " \
                        f"at column 1)", lines[-1]
    assert "\r" not in lines[-1] and "rec/s]" not in lines[-1]


def test_a_trainer_that_stops_mid_run_prints_its_error_below_the_bar(tmp_path, capsys, monkeypatch):
    import pytest

    from trainer import loop

    real_step = loop.Trainer.step

    def failing_step(self):
        if self.state.step == 2:
            raise loop.TrainerError("stopped on purpose at step 3")
        return real_step(self)

    monkeypatch.setattr(loop.Trainer, "step", failing_step)
    args = [a for a in TINY if a not in ("--train.progress", "false")]
    with pytest.raises(SystemExit):
        run_inproc("sft", args + ["--data.synthetic", "true", "--train.steps", "4", "--train.progress", "true",
                                  "--output-dir", str(tmp_path / "run")])
    shown = [ln for ln in _lines(capsys.readouterr().err) if ln]
    assert shown[-1] == "error: stopped on purpose at step 3"
    assert any("sft" in ln and "2/4" in ln for ln in shown[:-1])  # the bar, ended on its own line
