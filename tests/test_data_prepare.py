import json
import os

import numpy as np
import pytest

from data import prepare_data as prepare, DataError, PreparedSFT, PreparedDPO, encode_chat, encode_dpo_pair
from data.formats import normalize_sft
from data.errors import EXIT_BAD_INPUT, run_cli
from data.prepare import main as prepare_main
try:
    from data_helpers import tiny_tokenizer, tiny_hf_tokenizer, write_jsonl
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import tiny_tokenizer, tiny_hf_tokenizer, write_jsonl

M = -100
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "domain": "a"}
GOOD2 = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tags": ["t"]}


def _tok_dir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    tiny_hf_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(d)


def test_prepare_matches_encode_chat_and_manifest(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [GOOD, "", GOOD2])
    m = prepare([f], tiny_tokenizer(), tmp_path / "out")
    ds = PreparedSFT(tmp_path / "out")
    assert len(ds) == m["num_samples"] == 2
    ids, labels = ds[0]
    assert ids.tolist() == [1, 4, 2, 7, 1, 5, 2, 8, 0] and labels.tolist() == [M] * 7 + [8, 0]
    ids, labels = ds[1]
    assert (ids.tolist(), labels.tolist()) == encode_chat(tiny_tokenizer(), normalize_sft(GOOD2)["messages"])
    assert ds.domains == ["a", "default"] and ds.domain_ids().tolist() == [0, 1]
    assert m["num_tokens"] == {"tokens": 18} and m["num_trained_tokens"] == {"tokens": 4}
    assert m["tag_counts"] == {"t": 1}
    assert isinstance(ds[0][0], np.ndarray) and ds[0][0].dtype == np.int64


def test_data_hash_stable_and_content_sensitive(tmp_path):
    f1 = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD2])
    f2 = write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD2])
    f3 = write_jsonl(tmp_path / "c.jsonl", [GOOD2, GOOD])
    h1 = prepare([f1], tiny_tokenizer(), tmp_path / "o1")["data_hash"]
    h2 = prepare([f2], tiny_tokenizer(), tmp_path / "o2")["data_hash"]
    h3 = prepare([f3], tiny_tokenizer(), tmp_path / "o3")["data_hash"]
    assert h1 == h2 != h3
    assert PreparedSFT(tmp_path / "o1").data_hash == h1


def test_prepare_dpo(tmp_path):
    ex = {"prompt": "hi", "chosen": "hello", "rejected": "ok", "domain": "d"}
    f = write_jsonl(tmp_path / "p.jsonl", [ex])
    prepare([f], tiny_tokenizer(), tmp_path / "out", kind="dpo")
    ds = PreparedDPO(tmp_path / "out")
    want = encode_dpo_pair(tiny_tokenizer(), ex)
    got = ds[0]
    for side in ("chosen", "rejected"):
        assert (got[side][0].tolist(), got[side][1].tolist()) == want[side]


def test_max_len_truncation_counted(tmp_path):
    long = {"messages": [{"role": "user", "content": "hi hi hi"}, {"role": "assistant", "content": "ok ok ok"}]}
    f = write_jsonl(tmp_path / "a.jsonl", [GOOD, long])
    m = prepare([f], tiny_tokenizer(), tmp_path / "o", max_len=12)
    assert m["truncated"] == 1 and m["dropped_long"] == 0
    assert PreparedSFT(tmp_path / "o").lengths().tolist() == [9, 12]
    m = prepare([f], tiny_tokenizer(), tmp_path / "o2", max_len=12, overlong="drop")
    assert m["dropped_long"] == 1 and m["num_samples"] == 1


BAD_SFT = [
    ("{not json", "malformed JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}', "has no 'role'"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}]}', "unknown role"),
    ('{"messages": []}', "empty conversation"),
    ('{"conversations": []}', "empty conversation"),
    ('{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]}', "must be a string"),
    ('{"messages": "hello"}', "must be a list"),
    ('{"text": "hello"}', "neither 'messages' nor 'conversations'"),
    ('["a list"]', "must be a JSON object"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "unknown 'from'"),
    ('{"conversations": [{"from": "human"}]}', "needs 'from' and 'value'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "tags": "x"}',
     "'tags' must be a list"),
]


@pytest.mark.parametrize("line, needle", BAD_SFT)
def test_bad_sft_record_names_file_and_line(tmp_path, line, needle):
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD2, line, GOOD])
    with pytest.raises(DataError) as e:
        prepare([f], tiny_tokenizer(), tmp_path / "out")
    assert e.value.file == f and e.value.line == 3
    assert f"{f}:3: " in str(e.value) and needle in str(e.value)
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # temp dir cleaned up


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "hi", "chosen": "a"}', "no 'rejected'"),
    ('{"prompt": 5, "chosen": "a", "rejected": "b"}', "must be a list"),
    ('{"prompt": "hi", "chosen": 1, "rejected": "b"}', "'chosen' must be a string"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}', "prompt must end with"),
])
def test_bad_dpo_record(tmp_path, line, needle):
    f = write_jsonl(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DataError, match=needle) as e:
        prepare([f], tiny_tokenizer(), tmp_path / "out", kind="dpo")
    assert e.value.line == 1 and f in str(e.value)


def test_skip_bad_counts_and_reports(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops", '{"messages": []}', GOOD2])
    m = prepare([f], tiny_tokenizer(), tmp_path / "out", skip_bad=True)
    assert m["num_samples"] == 2 and m["num_skipped"] == 2
    assert [(s["line"], s["file"]) for s in m["skipped"]] == [(2, f), (3, f)]
    assert m["sources"][0]["skipped"] == 2 and m["sources"][0]["records"] == 2


def test_failed_prepare_keeps_previous_output(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", [GOOD])
    bad = write_jsonl(tmp_path / "b.jsonl", [GOOD, "{"])
    h = prepare([good], tiny_tokenizer(), tmp_path / "out")["data_hash"]
    with pytest.raises(DataError):
        prepare([bad], tiny_tokenizer(), tmp_path / "out")
    assert PreparedSFT(tmp_path / "out").data_hash == h


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="refusing"):
        prepare([write_jsonl(tmp_path / "g.jsonl", [GOOD])], tiny_tokenizer(), tmp_path / "out")
    assert (tmp_path / "out" / "precious.txt").read_text() == "x"


def test_cli_success_and_error(tmp_path, capsys):
    tok = _tok_dir(tmp_path)
    good = write_jsonl(tmp_path / "g.jsonl", [GOOD, "[1]", GOOD2])
    assert run_cli(prepare_main, [good, "--tokenizer", tok, "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_BAD_INPUT
    assert f"{good}:2:" in capsys.readouterr().err
    assert prepare_main([good, "--tokenizer", tok, "--out", str(tmp_path / "o"), "--quiet", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "samples=2" in out and "skipped_bad=1" in out and f"{good}:2" in out
    assert PreparedSFT(tmp_path / "o").manifest["num_skipped"] == 1


def test_eos_every_turn_is_prepared_recorded_and_checked_by_the_trainer(tmp_path):
    two_turns = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    f = write_jsonl(tmp_path / "a.jsonl", [two_turns])
    m = prepare([f], tiny_tokenizer(), tmp_path / "every", eos_every_turn=True)
    assert m["template"] == {"eos_every_turn": True, "version": 2}
    ids, labels = PreparedSFT(tmp_path / "every")[0]
    assert (ids.tolist(), labels.tolist()) == encode_chat(tiny_tokenizer(), two_turns["messages"], eos_every_turn=True)
    assert labels.tolist().count(0) == 2 and ids.tolist().count(0) == 1  # both answers' EOS trained, one in the input
    assert labels.tolist()[8] == 0 and ids.tolist()[8] == 1  # the first answer's: a label on the next <role>
    assert prepare([f], tiny_tokenizer(), tmp_path / "last")["template"] == {"eos_every_turn": False, "version": 2}
    assert PreparedSFT(tmp_path / "last")[0][1].tolist().count(0) == 1
    # A prepared directory made the other way is refused by the trainer, naming the fix.
    from trainer.errors import TrainerError
    from trainer.sources import _check_template

    _check_template(str(tmp_path / "every"), True)
    with pytest.raises(TrainerError, match="prepared with eos_every_turn true.*data.eos_every_turn false"):
        _check_template(str(tmp_path / "every"), False)


@pytest.mark.parametrize("kind, eos_every_turn, refused", [("sft", True, True), ("dpo", False, True),
                                                           ("sft", False, False)])
def test_data_prepared_with_the_old_encoding_is_refused_where_it_differs(tmp_path, kind, eos_every_turn, refused):
    # Before template version 2, eos_every_turn wrote EOS into the input and DPO trained the prompt's
    # earlier answers: such directories must not be trained on silently. The default SFT encoding did
    # not change, so its old directories stay usable.
    rec = GOOD if kind == "sft" else {"prompt": "hi", "chosen": "hello", "rejected": "ok"}
    f = write_jsonl(tmp_path / "a.jsonl", [rec])
    prepare([f], tiny_tokenizer(), tmp_path / "old", kind=kind, eos_every_turn=eos_every_turn)
    path = tmp_path / "old" / "manifest.json"
    m = json.loads(path.read_text())
    m["version"], m["template"] = 1, {"eos_every_turn": eos_every_turn}  # as the older lingmoe wrote it
    path.write_text(json.dumps(m))
    cls = PreparedSFT if kind == "sft" else PreparedDPO
    if refused:
        with pytest.raises(DataError, match="prepared by an older lingmoe whose encoding differs.*prepare it again"):
            cls(tmp_path / "old")
    else:
        assert len(cls(tmp_path / "old")) == 1
