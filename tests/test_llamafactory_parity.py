"""Our bailing encoding against LLaMA-Factory 0.9.5's own, token for token.

tests/fixtures/llamafactory_bailing/llamafactory_bailing.json was made by LLaMA-Factory's encoders
(SupervisedDatasetProcessor, PairwiseDatasetProcessor with its "bailing" template) on the demo
tokenizer; its README gives the versions and the rules, and make_llamafactory_fixture.py remakes it
(in a venv with llamafactory installed; nothing here imports it).
"""
import json
import pathlib

import pytest

import data
from data import encode_chat, encode_dpo_pair, PreparedDPO, PreparedSFT
from data.demo import TOKENIZER_DIR

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llamafactory_bailing" / "llamafactory_bailing.json"
CASES = {c["name"]: c for c in json.loads(FIXTURE.read_text())["cases"]}
M = -100
# Multi-turn SFT without tool calls: the text is the same as ours, so ids and labels must be equal.
# (LLaMA-Factory writes a tool call as "Action: ..."; ours keeps <tool_call>{json}</tool_call>.)
PLAIN_SFT = ["sft_a_one_turn_system", "sft_two_turns_no_system", "sft_b_three_turns_no_system",
             "sft_c_three_turns_system"]
DPO = ["dpo_f_single_turn", "dpo_g_history_no_system", "dpo_h_history_system"]


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(TOKENIZER_DIR)


def _pattern(ids, labels):
    """Runs of P (prompt), T (trained on its own token), E (a label that is EOS on another token)."""
    kinds = ["P" if lab == M else "T" if lab == i else "E" for i, lab in zip(ids, labels)]
    return "".join(k for j, k in enumerate(kinds) if j == 0 or k != kinds[j - 1])


@pytest.mark.parametrize("name", PLAIN_SFT)
def test_sft_eos_every_turn_is_llamafactorys_encoding_exactly(tok, name):
    case, want = CASES[name], CASES[name]["encoding"]
    ids, labels = encode_chat(tok, case["messages_openai"], eos_every_turn=True)
    assert ids == want["input_ids"]
    assert labels == want["labels"]


@pytest.mark.parametrize("name", PLAIN_SFT)
def test_sft_default_is_llamafactorys_without_the_non_final_eos_labels(tok, name):
    # The same input; the EOS labels LLaMA-Factory puts on each later turn's <role> are not trained.
    case, want = CASES[name], CASES[name]["encoding"]
    ids, labels = encode_chat(tok, case["messages_openai"])
    assert ids == want["input_ids"]
    assert labels == [M if lab != i else lab for i, lab in zip(want["input_ids"], want["labels"])]


def test_worked_example_by_hand(tok):
    # The fixture README's worked example: 11 trained labels, the first answer's EOS on position 15.
    ids, labels = encode_chat(tok, CASES["sft_two_turns_no_system"]["messages_openai"], eos_every_turn=True)
    assert ids[15] == 1 and labels[15] == 0 and ids.count(0) == 1 and ids[-1] == 0
    assert labels[11:15] == ids[11:15] == [47, 411, 754, 8] and labels[29:35] == [41, 83, 92, 76, 21, 0]
    assert sum(lab != M for lab in labels) == 11


def test_tool_conversation_trains_the_same_positions(tok):
    # Text differs in the call's spelling; what is trained where must not: prompt, the call, its EOS
    # label on the OBSERVATION turn's <role>, the observation, the final answer and EOS.
    case, want = CASES["sft_d_tool_observation"], CASES["sft_d_tool_observation"]["encoding"]
    ids, labels = encode_chat(tok, case["messages_openai"], eos_every_turn=True)
    assert _pattern(ids, labels) == _pattern(want["input_ids"], want["labels"]) == "PTEPT"


@pytest.mark.parametrize("name", DPO)
def test_dpo_pairs_are_llamafactorys_with_the_prompt_history_untrained(tok, name):
    case, want = CASES[name], CASES[name]["encoding"]
    enc = encode_dpo_pair(tok, case["messages_openai"])
    for side in ("chosen", "rejected"):
        assert enc[side] == (want[f"{side}_input_ids"], want[f"{side}_labels"])
    if name != "dpo_f_single_turn":  # the README's counts: 13 / 9 trained, the answer and its EOS
        assert [sum(lab != M for lab in enc[s][1]) for s in ("chosen", "rejected")] == [13, 9]


def test_prepared_data_keeps_llamafactorys_labels(tok, tmp_path):
    # Through data.prepare's shards (a label on another token's position is stored as mask code 2)
    # and back, SFT with eos_every_turn and DPO pairs with history equal the fixture.
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": CASES[n]["messages_openai"]}) + "\n" for n in PLAIN_SFT))
    data.prepare_data([sft], tok, tmp_path / "sft", eos_every_turn=True)
    ds = PreparedSFT(tmp_path / "sft")
    for i, n in enumerate(PLAIN_SFT):
        ids, labels = ds[i]
        assert (ids.tolist(), labels.tolist()) == (CASES[n]["encoding"]["input_ids"], CASES[n]["encoding"]["labels"])
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text("".join(json.dumps(CASES[n]["messages_openai"]) + "\n" for n in DPO))
    data.prepare_data([dpo], tok, tmp_path / "dpo", kind="dpo", eos_every_turn=True)
    ds = PreparedDPO(tmp_path / "dpo")
    for i, n in enumerate(DPO):
        for side in ("chosen", "rejected"):
            ids, labels = ds[i][side]
            want = CASES[n]["encoding"]
            assert (ids.tolist(), labels.tolist()) == (want[f"{side}_input_ids"], want[f"{side}_labels"])


def test_mask_history_is_llamafactorys_but_for_its_reversed_loop_quirk(tok):
    """train_history False against LLaMA-Factory's mask_history=True (sft_e): the same input ids, the last
    answer and its EOS trained alike. LLaMA-Factory also labels EOS at position 0 (which the causal shift
    discards) and on turn 2's <role> ("EOS after answer 1"), but not on turn 3's: its loop over reversed
    turns applies the EOS-at-source rule to every pair but the last (fixture README, "mask_history").
    Ours trains no EOS of an untrained answer, so exactly those two positions differ."""
    case, want = CASES["sft_e_three_turns_no_system_mask_history"], CASES["sft_e_three_turns_no_system_mask_history"]
    want = want["encoding"]
    for eos_every_turn in (True, False):
        ids, labels = encode_chat(tok, case["messages_openai"], eos_every_turn=eos_every_turn, train_history=False)
        assert ids == want["input_ids"]
        differ = [i for i, (a, b) in enumerate(zip(labels, want["labels"])) if a != b]
        roles = [i for i, t in enumerate(ids) if t == 1]  # each turn's <role>
        assert differ == [0, roles[2]] and all(want["labels"][i] == 0 and labels[i] == M for i in differ)
        assert sum(lab != M for lab in labels) == want["num_trained_tokens"] - 2
