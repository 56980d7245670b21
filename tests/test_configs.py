"""The shipped recipes: each resolves with every key valid, builds its model on the meta device with the
parameter count its header claims, and splits its global batch evenly over the ranks of the command
its header gives."""
import pathlib
import re

import pytest
import torch

from moe import BailingMoeConfig, BailingMoeForCausalLM
from trainer import parallel
from trainer.loop import model_overrides
from trainer.options import DPORunOptions, Options, OptionsError, parse_options

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def _load(name, options=Options, extra=()):
    return parse_options(["--config", str(CONFIGS / name), *extra], "t", options, "", "runs/x")


def _command(name):
    """(ranks, script) from the recipe header's launch line; the demo runs as one process."""
    m = re.search(r"--nproc_per_node=(\d+) trainer/(\w+)\.py --config configs/(\S+)", (CONFIGS / name).read_text())
    if m is None:
        return 1, "sft"
    assert m.group(3) == name, f"{name}'s header launches configs/{m.group(3)}"
    return int(m.group(1)), m.group(2)


def test_the_docs_and_the_recipes_name_each_other():
    """Every recipe the README and docs/ tell a user to run is shipped, and every shipped recipe is
    named there (a recipe nobody can find is as lost as a missing one)."""
    root = CONFIGS.parent
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    named = {m for t in texts for m in re.findall(r"configs/([\w.-]+\.yaml)", t.read_text())}
    assert named, "the docs name no recipe"
    assert named - set(RECIPES) == set(), "named but not shipped"
    assert set(RECIPES) - named == set(), "shipped but never named"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_builds_its_model_on_meta(name):
    ranks, script = _command(name)
    o = _load(name, DPORunOptions if script == "dpo" else Options)
    assert isinstance(o, DPORunOptions) == (script == "dpo")
    # A recipe starting from a checkpoint starts from Ling-Lite, whose config.json is the ling-lite
    # preset (tests/test_model.py checks the preset against the real file's values), or from
    # Ling-mini-2.0 (ling_mini2_*), whose sizes the ling-mini-2.0 preset holds.
    base = "ling-mini-2.0" if name.startswith("ling_mini2") else "ling-lite"
    cfg = BailingMoeConfig.preset(base if o.model.init_from else o.model.preset,
                                  **model_overrides(o, torch.device("cpu")))
    with torch.device("meta"):
        model = BailingMoeForCausalLM(cfg)
    if o.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params() and all(p.is_meta for p in model.parameters())
    claimed = re.search(r"A ([\d.]+)M-parameter model", (CONFIGS / name).read_text())
    if o.model.init_from:
        assert round(n / 1e9, 1) == {"ling-lite": 16.8, "ling-mini-2.0": 16.3}[base]
    if o.parallel.ep > 1:
        assert cfg.num_experts % o.parallel.ep == 0 and ranks % o.parallel.ep == 0
    elif claimed:
        assert round(n / 1e6, 1) == float(claimed.group(1)), (n, claimed.group(0))
    # The global batch splits into whole micro-batches on every rank of the header's command.
    assert o.train.global_batch_size % (o.data.micro_batch_size * ranks) == 0
    assert o.data.seq_len <= cfg.max_position_embeddings


def test_tiny_demo_recipe_equals_the_defaults():
    assert _load("tiny_demo.yaml").to_dict() == parse_options([], "t", Options, "", "runs/sft").to_dict()


def test_command_line_overrides_recipe_and_types_are_checked():
    o = _load("ling_lite_sft_stage2.yaml", extra=["--optim.lr", "2e-5", "--train.steps", "7"])
    assert o.optim.lr == 2e-5 and o.train.steps == 7
    with pytest.raises(OptionsError, match="train.steps must be int"):
        _load("tiny_demo.yaml", extra=["--train.steps", "many"])
