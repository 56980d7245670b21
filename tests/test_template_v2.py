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


def test_a_record_sets_detailed_thinking_on_in_prepared_data_pairs_and_prompts(tmp_path):
    """'thinking': 'on' in a record (Ring-2.0 style reasoning data) gives the system line the official
    template renders with thinking_option='on', in SFT data, both sides of a DPO pair and a generation
    prompt; only that line changes (the labels train the same text)."""
    from data.dataset import PreparedDPO, PreparedSFT
    from data.prepare import prepare

    tok = load_tokenizer(TOKENIZER_DIR)
    msgs = [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "<think>6*7</think>42"}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": msgs, "thinking": "on"}) + "\n"
                                        + json.dumps({"messages": msgs}) + "\n")
    prepare([str(tmp_path / "sft.jsonl")], tok, tmp_path / "sft", template="bailing_v2")
    on, off = PreparedSFT(tmp_path / "sft")[0], PreparedSFT(tmp_path / "sft")[1]
    official_on = render_with_jinja(chat_template(template="bailing_v2"), msgs, thinking_option="on")
    assert tok.decode(on[0].tolist()) == official_on
    assert tok.decode(off[0].tolist()) == official_on.replace("detailed thinking on", "detailed thinking off")
    assert tok.decode(on[0][on[1] != M].tolist()) == tok.decode(off[0][off[1] != M].tolist())
    pair = {"prompt": msgs[:1], "chosen": "42", "rejected": "41", "thinking": "on"}
    (tmp_path / "dpo.jsonl").write_text(json.dumps(pair) + "\n")
    prepare([str(tmp_path / "dpo.jsonl")], tok, tmp_path / "dpo", kind="dpo", template="bailing_v2")
    chosen_ids = PreparedDPO(tmp_path / "dpo")[0]["chosen"][0]
    want = encode_dpo_pair(tok, pair, template="bailing_v2")
    assert chosen_ids.tolist() == want["chosen"][0] and "detailed thinking on" in tok.decode(want["rejected"][0])
    prompt = tok.decode(encode_prompt(tok, msgs[:1], template="bailing_v2", thinking="on"))
    assert prompt == render_with_jinja(chat_template(template="bailing_v2"), msgs[:1], add_generation_prompt=True,
                                       thinking_option="on")


def test_fields_the_bailing_template_cannot_render_are_refused_with_their_line(tmp_path):
    from data.prepare import prepare

    tok = load_tokenizer(TOKENIZER_DIR)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for i, (extra, problem) in enumerate([({"thinking": "on"}, "'thinking' sets the bailing_v2 template's"),
                                          ({"tools": [{"name": "f"}]}, "'tools' are rendered by the bailing_v2"),
                                          ({"thinking": "yes"}, "'thinking' must be \"on\" or \"off\"")]):
        f = tmp_path / f"{i}.jsonl"
        f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"messages": msgs, **extra}) + "\n")
        with pytest.raises(DataError, match=problem) as e:
            prepare([str(f)], tok, tmp_path / f"out{i}")
        assert str(e.value).startswith(f"{f}:2: "), e.value  # the file and the record's line
        assert not (tmp_path / f"out{i}").exists()


def test_llamafactory_style_tools_columns_are_read(tmp_path):
    """LLaMA-Factory's ShareGPT rows carry "tools" as a JSON string, "" when there are none: an empty one is
    no tools (the bailing template prepares the row; it was refused before), a filled one is the list."""
    from data.dataset import PreparedSFT
    from data.prepare import prepare

    tok = load_tokenizer(TOKENIZER_DIR)
    conv = [{"from": "human", "value": "weather?"}, {"from": "gpt", "value": "Sunny."}]
    sigs = [{"name": "get_weather", "parameters": {"type": "object"}}]
    (tmp_path / "plain.jsonl").write_text(json.dumps({"conversations": conv, "tools": ""}) + "\n")
    prepare([str(tmp_path / "plain.jsonl")], tok, tmp_path / "plain")
    assert PreparedSFT(tmp_path / "plain")[0][0].tolist() == encode_chat(tok, [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Sunny."}])[0]
    (tmp_path / "v2.jsonl").write_text(json.dumps({"conversations": conv, "tools": json.dumps(sigs)}) + "\n")
    prepare([str(tmp_path / "v2.jsonl")], tok, tmp_path / "v2", template="bailing_v2")
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Sunny."}]
    assert PreparedSFT(tmp_path / "v2")[0][0].tolist() == encode_chat(tok, msgs, template="bailing_v2", tools=sigs)[0]
