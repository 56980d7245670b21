"""Shared helpers for the data tests (not a test module itself)."""
import json

from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from data.tokenizer import Tokenizer

# A word-level vocabulary small enough to check every id by hand.
TINY_VOCAB = {"<|endoftext|>": 0, "<role>": 1, "</role>": 2, "SYSTEM": 3, "HUMAN": 4, "ASSISTANT": 5,
              "OBSERVATION": 6, "hi": 7, "hello": 8, "be": 9, "nice": 10, "ok": 11, "sum": 12, "[UNK]": 13,
              "<think>": 14, "</think>": 15, "<tool_call>": 16, "</tool_call>": 17, "x": 18, "y": 19}
TINY_SPECIALS = ["<|endoftext|>", "<role>", "</role>", "<think>", "</think>", "<tool_call>", "</tool_call>"]


def tiny_hf_tokenizer():
    tok = HFTokenizer(models.WordLevel(dict(TINY_VOCAB), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(TINY_SPECIALS)
    return tok


def tiny_tokenizer():
    return Tokenizer(tiny_hf_tokenizer(), eos_token="<|endoftext|>")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)
