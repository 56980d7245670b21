import json
import os
import re

import pytest

from data import format_check, encode_chat, load_tokenizer, DataError
from data.demo import generate, ensure_demo_data, TOKENIZER_DIR
from data.formats import normalize_sft, normalize_dpo
from data import inspect as inspect_mod, stats as stats_mod
from data.errors import EXIT_BAD_INPUT, EXIT_MISSING, run_cli
try:
    from data_helpers import write_jsonl
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import write_jsonl


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


def test_prepare_cli_options_do_what_they_say(tmp_path, capsys):
    from data import PreparedDPO, PreparedSFT
    from data.prepare import main as prepare_main

    long = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b " * 30}]}
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "domain": "math"}
    f = write_jsonl(tmp_path / "s.jsonl", [long, short, "{"])
    common = [f, "--tokenizer", TOKENIZER_DIR, "--skip-bad"]
    assert prepare_main(common + ["--out", str(tmp_path / "t"), "--max-len", "12", "--domain", "chat"]) == 0
    assert "prepare" in capsys.readouterr().err  # the progress bar, without --quiet
    ds = PreparedSFT(tmp_path / "t")
    assert ds.manifest["num_skipped"] == 1 and ds.manifest["truncated"] == 1 and len(ds[0][0]) == 12
    assert sorted(ds.domains) == ["chat", "math"]  # --domain names records that have none
    assert prepare_main(common + ["--out", str(tmp_path / "d"), "--max-len", "12", "--overlong", "drop",
                                  "--quiet"]) == 0
    assert capsys.readouterr().err == "" and len(PreparedSFT(tmp_path / "d")) == 1
    pair = {"prompt": "a", "chosen": "b", "rejected": "c"}
    assert prepare_main([write_jsonl(tmp_path / "p.jsonl", [pair]), "--tokenizer", TOKENIZER_DIR, "--out",
                         str(tmp_path / "p"), "--kind", "dpo", "--quiet"]) == 0
    assert len(PreparedDPO(tmp_path / "p")) == 1


def test_inspect_and_stats_options_do_what_they_say(tmp_path, capsys):
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}]}
            for i in range(5)]
    f = write_jsonl(tmp_path / "a.jsonl", recs + ["{"])
    assert inspect_mod.main([f, "-n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("<role>HUMAN</role>") == 2 and "\x1b[" not in out
    assert inspect_mod.main([f, "-n", "1", "--color", "always"]) == 0
    assert "\x1b[" in capsys.readouterr().out and "[[" not in out.split("q0")[0]
    assert run_cli(stats_mod.main, [f]) == EXIT_BAD_INPUT  # the bad last line stops it...
    capsys.readouterr()
    for bins in (2, 4):
        assert stats_mod.main([f, "--skip-bad", "--bins", str(bins)]) == 0  # ...unless skipped
        out = capsys.readouterr().out
        hist = out.split("length histogram")[1].splitlines()[1:]
        assert len([ln for ln in hist if re.match(r"\s+\d+-\d+", ln)]) == bins
        assert "skipped bad records: 1" in out


def test_demo_cli_writes_each_part(tmp_path, capsys):
    from data.demo.__main__ import main as demo_main

    assert demo_main(["generate", "--out", str(tmp_path / "g")]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["dpo.jsonl", "sft_general.jsonl",
                                                                   "sft_reasoning.jsonl"]
    assert demo_main(["pipeline", "--out", str(tmp_path / "p"), "-n", "4"]) == 0
    evals = (tmp_path / "p" / "eval_prompts.jsonl").read_text().splitlines()
    assert len(evals) == 16  # 4 per family


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


def test_inspect_shows_a_label_only_eos_and_dpo_prompts_untrained(tmp_path, capsys):
    two = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    f = write_jsonl(tmp_path / "a.jsonl", [two])
    for tok in ([], ["--tokenizer", TOKENIZER_DIR]):
        assert inspect_mod.main([f, "--color", "never", "--eos-every-turn", *tok]) == 0
        out = capsys.readouterr().out
        # the first answer's EOS is a target on the next <role>, not a token of the input
        assert "<role>ASSISTANT</role>[[b]][[(<|endoftext|>)]]<role>HUMAN</role>c<role>ASSISTANT</role>" \
               "[[d<|endoftext|>]]" in out, out
    pair = {"prompt": two["messages"][:3], "chosen": "d", "rejected": "e"}
    f = write_jsonl(tmp_path / "p.jsonl", [pair])
    assert inspect_mod.main([f, "--color", "never", "--tokenizer", TOKENIZER_DIR]) == 0
    out = capsys.readouterr().out
    assert "<role>ASSISTANT</role>b<role>HUMAN</role>c<role>ASSISTANT</role>[[d<|endoftext|>]]" in out



def test_inspect_renders_ling_2_records_with_the_bailing_v2_template(tmp_path, capsys):
    """--template bailing_v2 shows what data.prepare --template bailing_v2 trains: the record's tools in the
    system block, its "detailed thinking on", each answer and its <|role_end|> marked; the default template
    refuses those fields with the record's file and line."""
    from data import DataError

    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "tools": [{"name": "f"}], "thinking": "on"}
    f = write_jsonl(tmp_path / "v2.jsonl", [rec])
    for tok in ([], ["--tokenizer", TOKENIZER_DIR]):
        assert inspect_mod.main([f, "--color", "never", "--template", "bailing_v2", *tok]) == 0
        out = capsys.readouterr().out
        assert '{"name": "f"}' in out and "detailed thinking on<|role_end|>" in out, out
        assert "<role>ASSISTANT</role>[[a<|role_end|>]]" in out, out
    with pytest.raises(DataError, match=r"v2.jsonl:1: 'thinking' sets the bailing_v2 template's"):
        inspect_mod.main([f, "--color", "never"])
    # data.stats counts the same tokens data.prepare --template bailing_v2 writes
    from data import encode_chat, load_tokenizer

    assert stats_mod.main([f, "--template", "bailing_v2", "--tokenizer", TOKENIZER_DIR]) == 0
    ids, labels = encode_chat(load_tokenizer(TOKENIZER_DIR), rec["messages"], template="bailing_v2",
                              tools=rec["tools"], thinking="on")
    trained = sum(lab != -100 for lab in labels)
    assert f"sequences: 1  tokens: {len(ids)}  trained tokens: {trained}" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"v2.jsonl:1: 'thinking' sets the bailing_v2 template's"):
        stats_mod.main([f])


def test_inspect_of_an_empty_or_missing_file_says_so(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert run_cli(inspect_mod.main, [str(empty)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"error: {empty}: no records (the file is empty or holds only blank lines)"
    assert run_cli(inspect_mod.main, [str(tmp_path / "nope.jsonl")]) == EXIT_MISSING
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"


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
    assert run_cli(stats_mod.main, [bad]) == EXIT_BAD_INPUT
    assert f"{bad}:2" in capsys.readouterr().err
