import json
import os
import re

import pytest

from data import format_check, encode_chat, load_tokenizer, DataError
from data.demo import generate, ensure_demo_data, TOKENIZER_DIR
from data.formats import normalize_sft, normalize_dpo
from data import inspect as inspect_mod, stats as stats_mod
from data.prepare import build_parser as prepare_parser
from data.demo import build_parser as demo_parser
try:
    from test_data_helpers import write_jsonl
except ImportError:  # tests/ imported as a package
    from tests.test_data_helpers import write_jsonl


@pytest.fixture(scope="module")
def corpus():
    return generate(seed=99, sizes={"general": 200, "tool": 100, "reasoning": 200, "dpo": 200})


def test_generation_deterministic_and_seeded():
    a = generate(seed=1, sizes={"general": 20, "tool": 5, "reasoning": 20, "dpo": 10})
    b = generate(seed=1, sizes={"general": 20, "tool": 5, "reasoning": 20, "dpo": 10})
    c = generate(seed=2, sizes={"general": 20, "tool": 5, "reasoning": 20, "dpo": 10})
    assert a == b and a != c


def test_dpo_chosen_clean_rejected_broken(corpus):
    kinds = set()
    for rec in corpus["dpo"]:
        ex = normalize_dpo(rec)
        assert format_check(ex["chosen"]) == []
        assert format_check(ex["rejected"]) != []
        kinds.add(rec["tags"][0])
    assert kinds == {"rejected:" + k for k in ("unclosed_think", "missing_think_open", "text_after_eos", "misnested",
                                               "unpaired_tool_call", "invalid_json")}


def test_sft_answers_well_formed_short_and_arithmetic_checks(corpus):
    tok = load_tokenizer(TOKENIZER_DIR)
    for rec in corpus["sft_general"] + corpus["sft_reasoning"]:
        msgs = normalize_sft(rec)["messages"]
        for m in msgs:
            if m["role"] == "assistant":
                assert format_check(m["content"]) == []
        assert len(encode_chat(tok, msgs)[0]) < 256
    for rec in corpus["sft_reasoning"]:
        answer = rec["messages"][-1]["content"]
        # every "a op b = c" step in the reasoning must be arithmetically true
        for a, op, b, c in re.findall(r"(\d+) ([-+x]) (\d+) = (\d+)", answer):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "x": a * b}[op] == c
        assert rec["answer"] in answer.split("</think>")[1]
    tool_turns = [m for r in corpus["sft_general"] if r.get("domain") == "tool" for m in r["messages"]]
    calls = [m["content"] for m in tool_turns if m["role"] == "assistant" and m["content"].startswith("<tool_call>")]
    assert len(calls) == 100 and all(json.loads(c[11:-12])["name"] in ("calculator", "get_weather") for c in calls)


def test_ensure_demo_data_idempotent_and_repairs(tmp_path):
    sizes = {"general": 30, "tool": 10, "reasoning": 30, "dpo": 20}
    p = ensure_demo_data(str(tmp_path / "d"), sizes=sizes)
    man = os.path.join(p["sft_general"], "manifest.json")
    t0 = os.stat(man).st_mtime_ns
    p2 = ensure_demo_data(str(tmp_path / "d"), sizes=sizes)
    assert p2 == p and os.stat(man).st_mtime_ns == t0
    os.truncate(os.path.join(p["dpo"], "chosen_tokens.bin"), 10)  # damage: must be detected and rebuilt
    ensure_demo_data(str(tmp_path / "d"), sizes=sizes)
    from data import PreparedDPO
    ds = PreparedDPO(p["dpo"])
    assert len(ds) == 20 and os.path.getsize(os.path.join(p["dpo"], "chosen_tokens.bin")) == 4 * ds.manifest["num_tokens"]["chosen"]
    assert p["mixture"] == {"sft_general": 340, "sft_reasoning": 550}


def _help(parser):
    return parser.format_help()


@pytest.mark.parametrize("parser, options", [
    (prepare_parser, ["--tokenizer", "--out", "--kind", "--skip-bad", "--max-len", "--overlong", "--domain", "--quiet"]),
    (inspect_mod.build_parser, ["-n", "--tokenizer", "--color", "--skip-bad"]),
    (stats_mod.build_parser, ["--tokenizer", "--bins", "--skip-bad"]),
    (demo_parser, ["build-tokenizer", "generate", "ensure"]),
])
def test_cli_help_lists_every_option(parser, options):
    text = _help(parser())
    for opt in options:
        assert opt in text


def test_inspect_marks_trained_spans(tmp_path, capsys):
    rec = {"messages": [{"role": "user", "content": "Reverse the word \"river\"."},
                        {"role": "assistant", "content": "revir"}]}
    f = write_jsonl(tmp_path / "a.jsonl", [rec])
    assert inspect_mod.main([f, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert '<role>HUMAN</role>Reverse the word "river".<role>ASSISTANT</role>[[revir<|endoftext|>]]' in out
    assert inspect_mod.main([f, "--color", "never", "--tokenizer", TOKENIZER_DIR]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(TOKENIZER_DIR)
    n_trained = len(tok.encode("revir")) + 1
    assert "[[revir<|endoftext|>]]" in out and f"trained={n_trained}" in out


def test_stats_counts(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "domain": "math", "tags": ["x", "y"]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "domain": "math", "tags": ["x"]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    assert stats_mod.main([f]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(TOKENIZER_DIR)
    n = len(tok.encode("<role>HUMAN</role>a<role>ASSISTANT</role>b<|endoftext|>"))
    assert "samples: 3" in out
    assert re.search(r"math\s+2\n", out) and re.search(r"\(none\)\s+1\n", out)
    assert re.search(r"\bx\s+2\n", out) and re.search(r"\by\s+1\n", out)
    assert f"tokens: {3 * n}" in out and "trained tokens: 6" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:1] + ["{"])
    assert stats_mod.main([bad]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
