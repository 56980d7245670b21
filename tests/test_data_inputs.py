"""Bad inputs are refused with FILE:LINE (or skipped and counted with skip_bad), before training and
before anything is written: bytes that are not UTF-8, conversations that cannot train, DPO pairs that
teach nothing, a missing tokenizer, mixture weights that cannot be sampled."""
import json
import os

import pytest

from data import DataError, prepare_data as prepare
from data.errors import EXIT_BAD_INPUT, run_cli
from data.prepare import main as prepare_main

try:
    from data_helpers import tiny_tokenizer, write_jsonl
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import tiny_tokenizer, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "ok"}


def test_bytes_that_are_not_utf8_name_file_line_and_byte_offset(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    bad = b'{"messages": [{"role": "user", "content": "h\xff"}, {"role": "assistant", "content": "x"}]}\n'
    f = tmp_path / "latin.jsonl"
    f.write_bytes(good + good + bad)
    with pytest.raises(DataError) as e:
        prepare([str(f)], tiny_tokenizer(), tmp_path / "out")
    # The 0xff sits after the two good lines and the bad line's own prefix up to 'h'.
    offset = 2 * len(good) + bad.index(b"\xff")
    assert e.value.file == str(f) and e.value.line == 3
    assert f"{f}:3: " in str(e.value) and f"byte offset {offset}" in str(e.value) and "UTF-8" in str(e.value)
    assert not os.path.exists(tmp_path / "out")
    m = prepare([str(f)], tiny_tokenizer(), tmp_path / "out", skip_bad=True)
    assert m["num_samples"] == 2 and [(s["line"], "UTF-8" in s["problem"]) for s in m["skipped"]] == [(3, True)]


def test_a_byte_order_mark_is_not_a_bad_record(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode())
    assert prepare([str(f)], tiny_tokenizer(), tmp_path / "out")["num_samples"] == 1


BAD_TURNS = [
    ("sft", {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "ok"}]}, "starts with an assistant turn"),
    ("sft", {"messages": [{"role": "system", "content": "be nice"}, {"role": "assistant", "content": "hello"}]},
     "starts with an assistant turn"),
    ("sft", {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "y"}]}, "starts with an assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "message 1: assistant turn with empty content"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]},
     "message 1: assistant turn with empty content"),
    ("dpo", {"prompt": "hi", "chosen": "hello", "rejected": "hello"}, "the same answer"),
    ("dpo", {"prompt": "hi", "chosen": {"role": "assistant", "content": "ok"}, "rejected": "ok"}, "the same answer"),
    ("dpo", {"prompt": "hi", "chosen": "", "rejected": "ok"}, "'chosen' is empty"),
    ("dpo", {"prompt": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}],
             "chosen": "a", "rejected": "b"}, "starts with an assistant turn"),
]


@pytest.mark.parametrize("kind, record, needle", BAD_TURNS)
def test_records_that_cannot_train_are_refused_with_file_and_line(tmp_path, kind, record, needle):
    good = GOOD if kind == "sft" else PAIR
    f = write_jsonl(tmp_path / "d.jsonl", [good, record, good])
    with pytest.raises(DataError) as e:
        prepare([f], tiny_tokenizer(), tmp_path / "out", kind=kind)
    assert str(e.value).startswith(f"{f}:2: ") and needle in str(e.value)
    assert not os.path.exists(tmp_path / "out")
    m = prepare([f], tiny_tokenizer(), tmp_path / "out", kind=kind, skip_bad=True)
    assert m["num_samples"] == 2 and m["num_skipped"] == 1 and m["skipped"][0]["line"] == 2
    assert needle in m["skipped"][0]["problem"]


def test_an_assistant_turn_holding_only_tool_calls_is_fine(tmp_path):
    call = {"messages": [{"role": "user", "content": "sum"}, {"role": "assistant", "content": "",
                                                              "tool_calls": [{"name": "sum", "arguments": {}}]},
                         {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert prepare([write_jsonl(tmp_path / "d.jsonl", [call])], tiny_tokenizer(), tmp_path / "out")["num_samples"] == 1


def test_skip_bad_on_the_command_line_counts_them_in_the_report(tmp_path, capsys):
    from tests.test_data_prepare import _tok_dir

    f = write_jsonl(tmp_path / "d.jsonl", [PAIR, {"prompt": "hi", "chosen": "x", "rejected": "x"}, PAIR])
    tok = _tok_dir(tmp_path)
    assert run_cli(prepare_main, [f, "--kind", "dpo", "--tokenizer", tok, "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_BAD_INPUT
    assert f"{f}:2: " in capsys.readouterr().err
    assert prepare_main([f, "--kind", "dpo", "--tokenizer", tok, "--out", str(tmp_path / "o"), "--quiet",
                         "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "samples=2" in out and "skipped_bad=1" in out and f"skipped {f}:2: 'chosen' and 'rejected'" in out


# ---------------------------------------------------------------- through the trainer

def _trainer_error(args, capsys):
    """The one-line message of a trainer run that is refused."""
    from tests.trainer_utils import TINY, refused, run_inproc

    with refused(capsys, "") as e:
        run_inproc("sft", TINY + ["--train.steps", "1"] + args)
    return e.message


def test_a_missing_tokenizer_is_one_line_naming_the_path_and_the_option(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    msg = _trainer_error(["--data.sources", f"[{f}]", "--data.tokenizer", str(tmp_path / "nope"),
                          "--output-dir", str(tmp_path / "run")], capsys)
    assert msg.startswith("error: data.tokenizer: ") and str(tmp_path / "nope") in msg and "\n" not in msg


@pytest.mark.parametrize("weights, needle", [
    (["-1", "1"], "data.sources[0] (a): weight -1"),
    (["1", "nan"], "data.sources[1] (b): weight"),
    (["0", "0"], "sum to 0"),
])
def test_mixture_weights_are_refused_before_any_tokenizing(tmp_path, weights, needle, capsys):
    a, b = write_jsonl(tmp_path / "a.jsonl", [GOOD]), write_jsonl(tmp_path / "b.jsonl", [GOOD])
    sources = f"[{{path: {a}, weight: {weights[0]}}}, {{path: {b}, weight: {weights[1]}}}]"
    msg = _trainer_error(["--data.sources", sources, "--data.cache_dir", str(tmp_path / "cache"),
                          "--output-dir", str(tmp_path / "run")], capsys)
    assert msg.startswith("error: ") and needle in msg and "\n" not in msg
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # nothing tokenized


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "."])
def test_a_source_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name, capsys):
    # The name names the cache entry (data.cache_dir/NAME-KEY): "../../escape" would put the prepared
    # data and its lock outside the cache and the output directory.
    (tmp_path / "work" / "cache").mkdir(parents=True)
    a = write_jsonl(tmp_path / "work" / "a.jsonl", [GOOD])
    msg = _trainer_error(["--data.sources", f"[{{path: {a}, name: '{name}'}}]", "--data.cache_dir",
                          str(tmp_path / "work" / "cache"), "--output-dir", str(tmp_path / "work" / "run")], capsys)
    assert msg.startswith(f"error: data.sources[0]: name '{name}' must be a plain file name") and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not os.listdir(tmp_path / "work" / "cache")
