import json

import pytest

from data import load_tokenizer, format_check, SPECIAL_TOKENS
from data.demo import TOKENIZER_DIR, train_tokenizer, tokenizer_config
try:
    from data_helpers import tiny_hf_tokenizer
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import tiny_hf_tokenizer


def test_shipped_tokenizer_special_tokens_are_single_ids():
    tok = load_tokenizer(TOKENIZER_DIR)
    assert 1900 <= tok.vocab_size <= 2100
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    for t, i in zip(SPECIAL_TOKENS, ids):
        assert tok.encode("ab" + t + "cd").count(i) == 1
    assert tok.encode("<role>") == [tok.token_to_id("<role>")]
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")


def test_shipped_tokenizer_round_trips_arbitrary_text():
    tok = load_tokenizer(TOKENIZER_DIR)
    for text in ["Reverse the word \"river\".", "  leading spaces\nand\ttabs ", "ünïcödé ✓ 数学 🙂", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_shipped_tokenizer_equals_fresh_training():
    with open(f"{TOKENIZER_DIR}/tokenizer.json", encoding="utf-8") as f:
        shipped = json.load(f)
    fresh = json.loads(train_tokenizer().to_str())
    assert fresh == shipped
    with open(f"{TOKENIZER_DIR}/tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f) == tokenizer_config()


def test_config_precedence_and_added_token_dict(tmp_path):
    tiny_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<role>", "pad_token": "</role>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (0, 2)  # eos from tokenizer_config, pad from special_tokens_map
    assert tok.encode("hi hello") == [7, 8]  # no special tokens added by encode


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think>b<|endoftext|>", []),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', []),
    ("<think>a", ["pos 0: unclosed <think>"]),
    ("ab</think>", ["pos 2: </think> without an opening <think>"]),
    ("<tool_call>{'name': 1}</tool_call>", ["pos 0: tool_call body is not valid JSON"]),
    ('<tool_call>[1, 2]</tool_call>', ["pos 0: tool_call JSON must be an object"]),
    ('x<tool_call>{"name": "f"}', ["pos 1: unclosed <tool_call>"]),
    ("done<|endoftext|>more", ["pos 17: text after <|endoftext|>"]),
    ("<think><tool_call></think></tool_call>", ["pos 18: </think> closes across an open <tool_call>",
                                                "pos 26: </tool_call> without an opening <tool_call>"]),
    ("<think><think></think></think>", ["pos 7: nested <think>"]),
])
def test_format_check(text, expected):
    errs = format_check(text)
    assert len(errs) == len(expected)
    for e, want in zip(errs, expected):
        assert e.startswith(want)
