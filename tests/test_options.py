"""trainer/options.py: typed sections, one validation for every option, errors that name where a value came from."""
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, get_args

import pytest
import yaml

from moe.config import PRESETS, PresetName
from tests.trainer_utils import TINY, metrics, run_inproc
from trainer.options import DPORunOptions, Options, OptionsError, dump_yaml, parse_options, validate


def _parse(args, options=Options):
    return parse_options(args, "t", options, "", "runs/x")


def test_sections_are_typed_fields_and_the_config_keeps_its_shape():
    o = _parse(["--train.steps", "7", "--optim.lr", "2"])
    assert o.train.steps == 7 and type(o.optim.lr) is float and o.optim.lr == 2.0
    # config.yaml (compared on resume by trainer/rundir.py) lists the sections in this order, then output_dir.
    sft = ["model", "data", "optim", "train", "checkpoint", "log", "parallel", "lora"]
    assert list(yaml.safe_load(dump_yaml(o))) == sft + ["output_dir"]
    assert list(_parse([], DPORunOptions).to_dict()) == sft + ["dpo", "output_dir"]
    assert "overwrite" not in yaml.safe_load(dump_yaml(_parse(["--overwrite"])))


def test_preset_names_are_the_presets():
    assert set(get_args(PresetName)) == set(PRESETS)


@pytest.mark.parametrize("option, value", [("model.aux_loss_type", "macro"), ("model.expert_backend", "cuda"),
                                           ("model.preset", "ling-plus"), ("train.device", "tpu"),
                                           ("data.synthetic_docs_per_row", "3")])
def test_enum_options_take_only_their_literal_values(option, value):
    with pytest.raises(OptionsError, match=f"command line: {option} must be "):
        _parse([f"--{option}", value])


@pytest.mark.parametrize("option, value", [("dpo.loss_type", "kto"), ("dpo.reference", "cached"),
                                           ("dpo.nll_average", "batch")])
def test_dpo_enum_options_are_checked_for_dpo_runs(option, value):
    with pytest.raises(OptionsError, match=f"{option} must be "):
        _parse([f"--{option}", value], DPORunOptions)


def test_a_new_literal_option_is_checked_with_no_code_of_its_own():
    @dataclass
    class Adapter:
        kind: Literal["lora", "dora"] = "lora"
        rank: int = 8

    @dataclass
    class WithAdapter(Options):
        adapter: Adapter = field(default_factory=Adapter)

    o = _parse(["--adapter.kind", "dora", "--adapter.rank", "4"], WithAdapter)
    assert (o.adapter.kind, o.adapter.rank) == ("dora", 4)
    with pytest.raises(OptionsError, match="adapter.kind must be lora or dora, got 'ia3'"):
        _parse(["--adapter.kind", "ia3"], WithAdapter)
    with pytest.raises(OptionsError, match="adapter.rank must be int"):
        _parse(["--adapter.rank", "high"], WithAdapter)


def test_a_literal_of_ints_does_not_take_a_bool():
    # YAML reads `true` as True, which Python counts equal to 1.
    with pytest.raises(OptionsError, match="synthetic_docs_per_row must be 1 or 2, got True"):
        _parse(["--data.synthetic_docs_per_row", "true"])


def test_errors_name_the_recipe_or_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  device: tpu\n  steps: 3\n")
    with pytest.raises(OptionsError, match=f"^{recipe}: train.device must be auto, cuda or cpu"):
        _parse(["--config", str(recipe)])
    with pytest.raises(OptionsError, match="^command line: train.device must be"):
        _parse(["--config", str(recipe), "--train.device", "gpu"])
    assert _parse(["--config", str(recipe), "--train.device", "cpu"]).train.device == "cpu"


def test_options_built_in_code_go_through_the_same_checks():
    o = Options()
    o.train.device = "tpu"
    with pytest.raises(OptionsError, match="train.device must be auto, cuda or cpu"):
        validate(o)
    o = Options()
    o.optim.lr = 3  # an int where a float is wanted is taken, as a float
    assert type(validate(o).optim.lr) is float
    assert dataclasses.asdict(validate(Options())) == dataclasses.asdict(Options())


def test_ceiling_tflops_logs_model_flops_over_it_and_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--data.synthetic", "true", "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
                   "--checkpoint.export_hf", "false", "--train.peak_tflops", "1e-6", "--output-dir", str(out)]
    run_inproc("sft", args + ["--train.steps", "1"])
    run_inproc("sft", args + ["--train.steps", "2", "--train.ceiling_tflops", "4e-6"])
    first, second = metrics(out)
    assert "mfu" in first and "mfu_vs_measured_peak" not in first  # 0 = not logged
    # The same model FLOPs per second over a denominator 4 times the peak's.
    assert second["mfu_vs_measured_peak"] == pytest.approx(second["mfu"] / 4, rel=1e-12)
    changes = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])["changes"]
    assert changes["train.ceiling_tflops"] == {"old": 0.0, "new": 4e-6}
