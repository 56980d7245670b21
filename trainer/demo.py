"""The demo's part in the two entry scripts: what `python trainer/sft.py` and `python trainer/dpo.py`
train with no options.

- No data sources: the generated demo corpus (data.demo), prepared under the run's data cache; SFT
  draws general and reasoning samples 340 : 550 (the Ring-Lite-Distill stage-2 ratio), DPO takes the
  demo preference pairs, whose rejected answers carry format errors.
- DPO with neither a model nor data: it starts from the SFT demo's export (runs/sft/hf) when there
  is one, else from a short SFT warm-up of the tiny model trained first.

Only the entry scripts import this module (tests/test_layering.py keeps the demo out of the
library), and it changes no option that a checkpoint records except model.init_from of the DPO demo.
"""
from __future__ import annotations

import os

from data.demo import dpo_source, ensure_demo_data, sft_sources
from trainer.options import Options, parse_options
from trainer.sources import cache_dir

DEMO_SFT_EXPORT = os.path.join("runs", "sft", "hf")
WARMUP_STEPS = 150


def _prepared(opts: Options, template: str) -> dict:
    name = "demo" if template == "bailing" else f"demo-{template}"
    return ensure_demo_data(os.path.join(cache_dir(opts), name), template=template)


def sft_data(opts: Options, template: str = "bailing") -> tuple[dict[str, str], dict[str, float], str]:
    """The SFT demo's prepared sources, their weights and the demo tokenizer (trainer.sources' ``default``),
    in the chat template the run uses."""
    paths = _prepared(opts, template)
    return (*sft_sources(paths), paths["tokenizer"])


def dpo_data(opts: Options, template: str = "bailing") -> tuple[dict[str, str], dict[str, float], str]:
    """The DPO demo's prepared pairs, in the form of ``sft_data``."""
    paths = _prepared(opts, template)
    return (*dpo_source(paths), paths["tokenizer"])


def dpo_initial_model(opts: Options, train_sft) -> str:
    """The model the DPO demo starts from: the SFT demo's export, or one trained now by
    ``train_sft(sft_options)`` (a WARMUP_STEPS-step SFT run in <output-dir>/sft_warmup)."""
    if os.path.exists(os.path.join(DEMO_SFT_EXPORT, "config.json")):
        return DEMO_SFT_EXPORT
    warm = os.path.join(opts.output_dir, "sft_warmup")
    sft_opts = parse_options(["--train.steps", str(WARMUP_STEPS), "--output-dir", warm, "--train.progress",
                              str(opts.train.progress).lower(), "--train.log_every", str(opts.train.log_every)],
                             "trainer/sft.py", Options, "", warm)
    train_sft(sft_opts)
    return os.path.join(warm, "hf")
