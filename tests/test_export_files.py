"""Exports that serve as they are: chat template, tokenizer, generation config, carried model files.

The chat template is rendered with jinja2 set up as transformers' apply_chat_template sets it up
(sandboxed, trim_blocks, lstrip_blocks, json.dumps as tojson) and compared with
data.template.render_chat, and with one string written out by hand.
"""
from __future__ import annotations

import io
import json
import pathlib
import shutil

import jinja2  # a torch dependency, and in the [dev] extra
import jinja2.ext
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data.hf_template import SAMPLE_CONVERSATIONS, chat_template
from data.template import render_chat
from tests.conftest import TINY_HF
from tests.trainer_utils import TINY, run_inproc

DEMO_TOK = pathlib.Path(__file__).resolve().parent.parent / "data" / "demo" / "tokenizer"


def transformers_render(template: str, messages, add_generation_prompt: bool) -> str:
    """Our own copy of transformers' rendering set-up (not data.hf_template's), for an independent check."""
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            eos_token="<|endoftext|>", bos_token=None, pad_token="<|endoftext|>")


EXTRA = [
    [{"role": "system", "content": "  spaces \n and newlines\n"}, {"role": "user", "content": "\n{{ not jinja }}\n"},
     {"role": "assistant", "content": " a "}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c\n"}],
    [{"role": "user", "content": "call"},
     {"role": "assistant", "content": "x", "tool_calls": [
         {"type": "function", "function": {"name": "f", "arguments": "{\"q\": \"é\", \"n\": [1, 2]}"}},
         {"name": "g", "arguments": {"z": 1, "a": {"nested": None}}}]},
     {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}, {"role": "assistant", "content": "done"}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conv", SAMPLE_CONVERSATIONS + EXTRA, ids=lambda c: f"{len(c)}msgs-{c[-1]['role']}")
def test_chat_template_renders_what_training_renders(conv, add_generation_prompt):
    got = transformers_render(chat_template(), conv, add_generation_prompt)
    assert got == render_chat(conv)


def test_chat_template_against_a_hand_written_string():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A", "tool_calls": [{"name": "t", "arguments": {"k": 1}}]},
            {"role": "tool", "content": "O"}, {"role": "assistant", "content": "B"}]
    body = ('<role>SYSTEM</role>S<role>HUMAN</role>U<role>ASSISTANT</role>A<tool_call>{"name": "t", "arguments": '
            '{"k": 1}}</tool_call><role>OBSERVATION</role>O<role>ASSISTANT</role>B<|endoftext|>')
    assert transformers_render(chat_template(), conv, True) == body
    prompt = conv[:2]
    assert transformers_render(chat_template(), prompt, True) == "<role>SYSTEM</role>S<role>HUMAN</role>U<role>ASSISTANT</role>"
    with pytest.raises(jinja2.exceptions.TemplateError, match="system message may only come first"):
        transformers_render(chat_template(), [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], True)


def _hf_source(tmp_path) -> pathlib.Path:
    """The tiny fixture with everything a published model directory has beside its weights."""
    src = tmp_path / "src"
    shutil.copytree(TINY_HF, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                       "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (src / "configuration_bailing_moe.py").write_text("# stand-in\nclass BailingMoeConfig: pass\n")
    (src / "modeling_bailing_moe.py").write_text("# stand-in\nclass BailingMoeForCausalLM: pass\n")
    shutil.copy(DEMO_TOK / "tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "chat_template": "{{ the source\'s }}"}')
    (src / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}\n')
    (src / "generation_config.json").write_text('{\n "eos_token_id": 5, "do_sample": true, "top_p": 0.8}\n')
    (src / "README.md").write_text("# a model card\n")
    (src / "LICENSE").write_text("license text\n")
    return src


def test_round_trip_keeps_every_non_weight_file_byte_for_byte(tmp_path):
    from checkpoints_convert import hf_to_native, native_to_hf

    src = _hf_source(tmp_path)
    assert hf_to_native.main(["--hf", str(src), "--out", str(tmp_path / "native"), "--quiet"]) == 0
    assert native_to_hf.main(["--native", str(tmp_path / "native"), "--out", str(tmp_path / "back"), "--quiet"]) == 0
    side = sorted(p.name for p in src.iterdir() if not p.name.endswith((".safetensors", ".index.json"))
                  and p.name != "config.json")
    assert len(side) == 8
    for name in side:
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    # config.json is rewritten (it gains the defaulted eos_token_id); every source field is kept,
    # auto_map included since its files travelled.
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in json.loads((src / "config.json").read_text()).items():
        assert back_cfg[key] == value, key


def test_scratch_export_has_no_dangling_auto_map(tmp_path):
    from checkpoints_convert import save_hf
    from moe import BailingMoeConfig
    from moe.model import BailingMoeForCausalLM

    cfg = BailingMoeConfig.preset("tiny", num_hidden_layers=1, expert_backend="torch")
    save_hf(BailingMoeForCausalLM(cfg), tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg.to_hf()["auto_map"]  # the config as published names modeling files...
    assert "auto_map" not in written and not list((tmp_path / "hf").glob("*.py"))  # ...that are not here


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_inproc("sft", TINY + ["--train.steps", "2", "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
                              "--output-dir", str(out / "run"), "--data.cache_dir", str(out / "cache")])
    return out / "run"


def test_demo_export_serves_as_it_is(demo_run):
    import tokenizers

    from checkpoints_convert import load_hf
    from checkpoints_convert.serving import check_serving
    from data import load_tokenizer

    hf = demo_run / "hf"
    rust = tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json"))
    eos_id = rust.token_to_id("<|endoftext|>")
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos_id == load_tokenizer(hf).eos_id and gen["do_sample"] is False
    tcfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == chat_template() and tcfg["eos_token"] == "<|endoftext|>"
    assert (hf / "tokenizer.json").read_bytes() == (DEMO_TOK / "tokenizer.json").read_bytes()
    assert "auto_map" not in json.loads((hf / "config.json").read_text())
    model = load_hf(hf)
    assert model.config.vocab_size >= rust.get_vocab_size() and model.config.eos_token_id == eos_id
    report = io.StringIO()
    assert check_serving(str(hf), report) == 0, report.getvalue()
    assert "renders the 5 test conversations as data/template.py" in report.getvalue()


def test_serving_check_names_what_is_missing_or_wrong(demo_run, tmp_path):
    from checkpoints_convert.serving import check_serving

    hf = tmp_path / "hf"
    shutil.copytree(demo_run / "hf", hf)
    tcfg = json.loads((hf / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = tcfg["chat_template"].replace("<role>HUMAN</role>", "<role>USER</role>")
    (hf / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (hf / "generation_config.json").unlink()
    report = io.StringIO()
    assert check_serving(str(hf), report) == 1
    text = report.getvalue()
    assert "MISSING generation config" in text and "BAD     template renders as trained" in text
    assert "<role>USER</role>" in text


def test_dcp_to_hf_reads_the_run_and_takes_overrides(demo_run, tmp_path):
    from checkpoints_convert.dcp_to_hf import dcp_to_hf

    dcp_to_hf(str(demo_run / "checkpoints"), str(tmp_path / "run"))
    tcfg = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == chat_template()
    dcp_to_hf(str(demo_run / "checkpoints"), str(tmp_path / "bare"), tokenizer=None)
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_an_eos_every_turn_runs_template_renders_the_input_it_trained_on(demo_run, tmp_path):
    # data.eos_every_turn trains LLaMA-Factory's encoding, whose input holds no EOS between turns: the
    # export of such a run must render exactly that input (the decoded ids of LLaMA-Factory's own
    # encoding in the fixture), so that a served conversation's history looks as training's did.
    from checkpoints_convert.dcp_to_hf import dcp_to_hf

    step = tmp_path / "step"
    shutil.copytree(sorted((demo_run / "checkpoints").iterdir())[-1], step)
    run = yaml.safe_load((step / "config.yaml").read_text())
    run["data"]["eos_every_turn"] = True
    (step / "config.yaml").write_text(yaml.safe_dump(run))
    dcp_to_hf(str(step), str(tmp_path / "hf"))
    template = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    fixture = pathlib.Path(__file__).parent / "fixtures" / "llamafactory_bailing" / "llamafactory_bailing.json"
    cases = [c for c in json.loads(fixture.read_text())["cases"] if c["kind"] == "sft" and not c["mask_history"]
             and all(m["role"] in ("system", "user", "assistant") and not m.get("tool_calls")
                     for m in c["messages_openai"])]
    assert len(cases) == 4
    for case in cases:
        got = transformers_render(template, case["messages_openai"], False)
        assert got == case["encoding"]["decoded_input_ids"], case["name"]


def test_export_of_a_model_trained_from_an_hf_dir_carries_its_code(demo_run, tmp_path):
    """As if the demo run had started from an HF directory: its code and license travel, its
    generation settings are kept with our eos/pad ids, its model card (about other weights) does not."""
    from checkpoints_convert.dcp_to_hf import dcp_to_hf

    src = _hf_source(tmp_path)
    dcp_to_hf(str(demo_run / "checkpoints"), str(tmp_path / "out"), source_hf=str(src))
    out = tmp_path / "out"
    for name in ("configuration_bailing_moe.py", "modeling_bailing_moe.py", "LICENSE"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "README.md").exists()
    assert json.loads((out / "generation_config.json").read_text()) == {
        "eos_token_id": 0, "pad_token_id": 0, "do_sample": True, "top_p": 0.8}  # demo tokenizer: eos = pad = 0
    auto = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto["AutoModelForCausalLM"] == "modeling_bailing_moe.BailingMoeForCausalLM"


def test_dcp_to_hf_command_writes_the_configs_dtype_by_default(demo_run, tmp_path):
    from safetensors import safe_open

    from checkpoints_convert.dcp_to_hf import main

    def dtypes(out):
        found = set()
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                found |= {st.get_slice(k).get_dtype() for k in st.keys()}
        return found

    # The tiny preset says float32; as Ling-Lite's config does, this copy says bfloat16 (stored: fp32).
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(demo_run / "checkpoints", ckpt)
    for cfg in ckpt.glob("step_*/model_config.json"):
        cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), torch_dtype="bfloat16")))
    main([str(ckpt), str(tmp_path / "auto"), "--quiet"])
    main([str(ckpt), str(tmp_path / "keep"), "--quiet", "--dtype", "keep"])
    assert (dtypes(tmp_path / "auto"), dtypes(tmp_path / "keep")) == ({"BF16"}, {"F32"})
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), str(tmp_path / "int8"), "--dtype", "int8"])
    assert e.value.code == 2 and not (tmp_path / "int8").exists()
