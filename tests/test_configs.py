"""The shipped recipes parse with every key valid and carry the report's numbers."""
import pathlib

import pytest

from trainer.options import DPO_SECTIONS, SFT_SECTIONS, OptionsError, parse_options

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load(name, sections=SFT_SECTIONS, extra=()):
    return parse_options(["--config", str(CONFIGS / name), *extra], "t", sections, "", "runs/x")


def test_stage1_recipe():
    o = _load("ling_lite_sft_stage1.yaml")
    assert (o.optim.lr, o.train.global_batch_size) == (4e-5, 256)
    assert o.model.aux_loss_type == "global" and o.model.activation_checkpointing


def test_stage2_recipe_mixture():
    o = _load("ling_lite_sft_stage2.yaml")
    assert (o.optim.lr, o.train.global_batch_size) == (1e-5, 128)
    weights = [s["weight"] for s in o.data.sources]
    assert weights == [340, 550]  # 340K general : 550K reasoning


def test_dpo_recipe():
    o = _load("ling_lite_dpo.yaml", DPO_SECTIONS)
    assert (o.dpo.beta, o.dpo.loss_type, o.optim.lr) == (0.1, "sigmoid", 1e-5)


def test_tiny_demo_recipe_equals_the_defaults():
    assert _load("tiny_demo.yaml").to_dict() == parse_options([], "t", SFT_SECTIONS, "", "runs/sft").to_dict()


def test_command_line_overrides_recipe_and_types_are_checked():
    o = _load("ling_lite_sft_stage2.yaml", extra=["--optim.lr", "2e-5", "--train.steps", "7"])
    assert o.optim.lr == 2e-5 and o.train.steps == 7
    with pytest.raises(OptionsError, match="train.steps must be int"):
        _load("tiny_demo.yaml", extra=["--train.steps", "many"])
