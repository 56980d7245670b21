import pytest

from data import render_chat, encode_chat, encode_dpo_pair, encode_prompt, DataError, load_tokenizer
from data.formats import normalize_sft, normalize_dpo
from data.demo import TOKENIZER_DIR, generate
try:
    from data_helpers import tiny_tokenizer
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import tiny_tokenizer

M = -100


def test_single_turn_string_and_mask():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(msgs) == "<role>HUMAN</role>hi<role>ASSISTANT</role>hello<|endoftext|>"
    ids, labels = encode_chat(tiny_tokenizer(), msgs)
    assert ids == [1, 4, 2, 7, 1, 5, 2, 8, 0]
    assert labels == [M, M, M, M, M, M, M, 8, 0]


def test_multi_turn_with_system_and_tool():
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "sum"},
            {"role": "assistant", "content": "hello"}]
    assert render_chat(msgs) == ("<role>SYSTEM</role>be nice<role>HUMAN</role>hi<role>ASSISTANT</role>ok"
                                 "<role>OBSERVATION</role>sum<role>ASSISTANT</role>hello<|endoftext|>")
    ids, labels = encode_chat(tiny_tokenizer(), msgs)
    assert ids == [1, 3, 2, 9, 10, 1, 4, 2, 7, 1, 5, 2, 11, 1, 6, 2, 12, 1, 5, 2, 8, 0]
    expected = [M] * 22
    expected[12], expected[20], expected[21] = 11, 8, 0
    assert labels == expected


def test_two_user_turns_one_eos_at_end():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids, labels = encode_chat(tiny_tokenizer(), msgs)
    assert ids == [1, 4, 2, 7, 1, 5, 2, 11, 1, 4, 2, 18, 1, 5, 2, 19, 0]
    assert labels == [M] * 7 + [11] + [M] * 7 + [19, 0]
    assert ids.count(0) == 1


def test_eos_after_every_assistant_turn_as_llama_factory_bailing():
    # LLaMA-Factory's bailing template (efficient_eos): every answer's end is trained, but the input
    # holds no EOS between turns: the label of the next turn's <role> (position 8) is EOS (id 0), so
    # after the shift "ok" predicts EOS. The text is the default's.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids, labels = encode_chat(tiny_tokenizer(), msgs, eos_every_turn=True)
    assert ids == [1, 4, 2, 7, 1, 5, 2, 11, 1, 4, 2, 18, 1, 5, 2, 19, 0] == encode_chat(tiny_tokenizer(), msgs)[0]
    assert labels == [M] * 7 + [11, 0] + [M] * 6 + [19, 0]
    # A generation prompt after such a history is the history as trained: no EOS in it.
    assert encode_prompt(tiny_tokenizer(), msgs[:3]) == [1, 4, 2, 7, 1, 5, 2, 11, 1, 4, 2, 18, 1, 5, 2]


def test_eos_every_turn_labels_the_tool_turn_after_a_call_and_nothing_between_two_answers():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
            {"role": "assistant", "content": "x"}, {"role": "tool", "content": "sum"},
            {"role": "assistant", "content": "y"}]
    ids, labels = encode_chat(tiny_tokenizer(), msgs, eos_every_turn=True)
    assert ids == [1, 4, 2, 7, 1, 5, 2, 11, 18, 1, 6, 2, 12, 1, 5, 2, 19, 0]
    # "ok" runs straight into "x" (trained as itself); the OBSERVATION turn's <role> carries the EOS label.
    assert labels == [M] * 7 + [11, 18, 0] + [M] * 6 + [19, 0]


def test_dpo_prompt_history_is_not_trained():
    # Only the final answer and its EOS: the earlier answer "ok" in the prompt is context, with no EOS
    # label after it (LLaMA-Factory's pairwise encoding; tests/test_llamafactory_parity.py checks its own).
    tok = tiny_tokenizer()
    pair = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": "x"}], "chosen": "y", "rejected": "hello"}
    enc = encode_dpo_pair(tok, pair)
    assert enc["chosen"] == ([1, 4, 2, 7, 1, 5, 2, 11, 1, 4, 2, 18, 1, 5, 2, 19, 0], [M] * 15 + [19, 0])
    assert enc["rejected"] == ([1, 4, 2, 7, 1, 5, 2, 11, 1, 4, 2, 18, 1, 5, 2, 8, 0], [M] * 15 + [8, 0])


def test_tool_calls_field_rendered_inside_assistant_turn():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": '{"a": 1}'}]},
            {"role": "tool", "content": "sum"}, {"role": "assistant", "content": "ok"}]
    assert render_chat(msgs) == ('<role>HUMAN</role>hi<role>ASSISTANT</role><tool_call>{"name": "f", "arguments": '
                                 '{"a": 1}}</tool_call><role>OBSERVATION</role>sum<role>ASSISTANT</role>ok<|endoftext|>')


def test_prompt_rendering_has_no_eos():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(msgs) == "<role>HUMAN</role>hi<role>ASSISTANT</role>"
    assert encode_prompt(tiny_tokenizer(), msgs) == [1, 4, 2, 7, 1, 5, 2]


def test_dpo_pair_encoding_string_and_message_forms():
    tok = tiny_tokenizer()
    a = encode_dpo_pair(tok, {"prompt": "hi", "chosen": "hello", "rejected": "ok"})
    b = encode_dpo_pair(tok, {"prompt": [{"role": "user", "content": "hi"}],
                              "chosen": [{"role": "assistant", "content": "hello"}],
                              "rejected": {"role": "assistant", "content": "ok"}})
    for enc in (a, b):
        assert enc["chosen"] == ([1, 4, 2, 7, 1, 5, 2, 8, 0], [M] * 7 + [8, 0])
        assert enc["rejected"] == ([1, 4, 2, 7, 1, 5, 2, 11, 0], [M] * 7 + [11, 0])


def test_sharegpt_roles_mapped():
    rec = {"system": "be nice", "conversations": [
        {"from": "human", "value": "hi"},
        {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "sum"},
        {"from": "gpt", "value": "ok"}], "domain": "d", "tags": ["t"]}
    out = normalize_sft(rec)
    assert out == {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": '<tool_call>{"name": "f", "arguments": {}}</tool_call>'},
                                {"role": "tool", "content": "sum"}, {"role": "assistant", "content": "ok"}],
                   "domain": "d", "tags": ["t"]}


@pytest.mark.parametrize("msgs, needle", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}], "must end with an assistant"),
    ([{"role": "bot", "content": "hi"}], "unknown role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "must be a string"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "system message may only come first"),
])
def test_invalid_messages_raise(msgs, needle):
    with pytest.raises(DataError, match=needle):
        encode_chat(tiny_tokenizer(), msgs)


def test_shipped_tokenizer_segmentwise_equals_whole_string_and_masks_assistant_text():
    tok = load_tokenizer(TOKENIZER_DIR)
    corpus = generate(seed=7, sizes={"general": 40, "tool": 20, "reasoning": 40, "dpo": 5})
    for rec in corpus["sft_general"] + corpus["sft_reasoning"]:
        msgs = normalize_sft(rec)["messages"]
        ids, labels = encode_chat(tok, msgs)
        assert ids == tok.encode(render_chat(msgs))
        trained = [i for i, l in zip(ids, labels) if l != M]
        assert tok.decode(trained) == "".join(m["content"] for m in msgs if m["role"] == "assistant") + "<|endoftext|>"
        assert [l for l in labels if l != M] == trained


def test_dpo_normalize_rejects_non_assistant_answer():
    with pytest.raises(DataError, match="assistant"):
        normalize_dpo({"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"})
