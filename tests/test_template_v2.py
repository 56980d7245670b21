"""The bailing_v2 chat template (Ling 2.0) against 36 renderings of the official Jinja template made
with transformers' apply_chat_template (tests/fixtures/bailing_moe_v2_tiny), its labels, and the data
path: prepare, the trainer's template check, the export's template and stop tokens."""
import json

import pytest

from data import DataError, encode_chat, encode_prompt, load_tokenizer, render_chat
from data.dataset import TEMPLATE_VERSION
from data.demo import TOKENIZER_DIR
from data.formats import encode_dpo_pair
from data.hf_template import chat_template, render_with_jinja
from data.template import chat_segments
from tests.conftest import FIXTURES

CASES = json.loads((FIXTURES / "bailing_moe_v2_tiny" / "chat_template_expected.json").read_text())
M = -100


@pytest.mark.parametrize("case", CASES, ids=[f"{c['name']}-{c['add_generation_prompt']}" for c in CASES])
def test_render_chat_and_our_jinja_equal_the_official_template(case):
    want = case["rendered"]
    got = render_chat(case["messages"], template="bailing_v2", tools=case["tools"],
                      add_generation_prompt=case["add_generation_prompt"])
    assert got == want
    jinja = render_with_jinja(chat_template(template="bailing_v2"), case["messages"],
                              add_generation_prompt=case["add_generation_prompt"], tools=case["tools"])
    assert jinja == want


def test_thinking_on_changes_only_the_system_line():
    case = next(c for c in CASES if c["name"] == "with_system" and not c["add_generation_prompt"])
    on = render_with_jinja(chat_template(template="bailing_v2"), case["messages"], thinking_option="on")
    assert on == case["rendered"].replace("detailed thinking off", "detailed thinking on")


def test_labels_train_each_answer_and_its_role_end():
    """Reasoning before the last query is dropped; the last answer keeps it; each assistant turn's text
    after <role>ASSISTANT</role> and its <|role_end|> are trained, nothing else; segment-wise ids equal
    the whole rendered string's."""
    tok = load_tokenizer(TOKENIZER_DIR)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3*7?"},
            {"role": "assistant", "content": "<think>\n3 times 7.\n</think>\n\n21"},
            {"role": "user", "content": "And 6*7?"},
            {"role": "assistant", "content": "<think>6*7 = 42</think>42",
             "tool_calls": [{"name": "log", "arguments": {"x": 42}}]}]
    ids, labels = encode_chat(tok, msgs, template="bailing_v2")
    text = render_chat(msgs, template="bailing_v2")
    assert ids == tok.encode(text)
    trained = [i for i, lab in zip(ids, labels) if lab != M]
    assert tok.decode(trained) == ('21<|role_end|>\n<think>\n6*7 = 42\n</think>\n\n42\n<tool_call>\n'
                                   '{"name": "log", "arguments": {"x": 42}}\n</tool_call><|role_end|>')
    assert "3 times 7" not in text
    prompt = encode_prompt(tok, msgs[:4], template="bailing_v2")
    assert tok.decode(prompt) == render_chat(msgs[:4], template="bailing_v2", add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|role_end|><role>ASSISTANT</role>")


def test_tools_and_bad_inputs():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    segs = chat_segments(msgs, template="bailing_v2", tools=tools)
    assert '\n{"type": "function", "function": {"name": "f", "parameters": {}}}\n</tools>' in segs[0][0]
    with pytest.raises(DataError, match="bailing_v2 template only"):
        chat_segments(msgs, tools=tools)  # the bailing template has no tools block
    with pytest.raises(DataError, match="unknown chat template"):
        render_chat(msgs, template="chatml")
    with pytest.raises(DataError, match="must be a string"):
        render_chat([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}], template="bailing_v2")


def test_prepare_records_the_template_and_the_trainer_refuses_another(tmp_path):
    from data.dataset import PreparedSFT
    from data.prepare import prepare
    from trainer.errors import TrainerError
    from trainer.sources import _check_template

    rec = {"messages": [{"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
                        {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}],
           "tools": [{"name": "f"}]}
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    tok = load_tokenizer(TOKENIZER_DIR)
    m = prepare([str(f)], tok, tmp_path / "v2", template="bailing_v2")
    assert m["template"] == {"eos_every_turn": False, "name": "bailing_v2", "version": TEMPLATE_VERSION}
    ids, labels = PreparedSFT(tmp_path / "v2")[0]
    assert (ids.tolist(), labels.tolist()) == encode_chat(tok, rec["messages"], template="bailing_v2",
                                                          tools=rec["tools"])
    _check_template(str(tmp_path / "v2"), False, "bailing_v2")
    with pytest.raises(TrainerError, match="prepared with the bailing_v2 chat template, but this run uses bailing"):
        _check_template(str(tmp_path / "v2"), False, "bailing")
    with pytest.raises(DataError, match="eos_every_turn"):
        prepare([str(f)], tok, tmp_path / "x", template="bailing_v2", eos_every_turn=True)


def test_v2_dpo_pairs_train_only_the_final_answer_not_the_prompts_history():
    # A multi-turn preference prompt: its earlier answer is context (-100), as for the bailing template;
    # what is trained is exactly the tokens of the final answer and its <|role_end|>.
    tok = load_tokenizer(TOKENIZER_DIR)
    prompt = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
              {"role": "user", "content": "Another?"}]
    enc = encode_dpo_pair(tok, {"prompt": prompt, "chosen": "11", "rejected": "9"}, template="bailing_v2")
    for side, answer in (("chosen", "11"), ("rejected", "9")):
        ids, labels = enc[side]
        assert tok.decode(ids) == render_chat(prompt + [{"role": "assistant", "content": answer}], template="bailing_v2")
        trained = [t for t in labels if t != -100]
        assert trained == tok.encode(answer + "<|role_end|>")
        assert labels[-len(trained):] == trained  # the trained tokens are the last ones
    # SFT of the same conversation trains the earlier answer too
    _, sft_labels = encode_chat(tok, prompt + [{"role": "assistant", "content": "11"}], template="bailing_v2")
    assert [t for t in sft_labels if t != -100] == tok.encode("7<|role_end|>") + tok.encode("11<|role_end|>")
