"""Evaluation: held-out prompts really are held out; every scorer against hand-made answers; batched
greedy decoding equals one-by-one decoding; the CLI writes one JSON per model."""
import json
import random

import pytest
import torch

from data.demo import generate
from data.demo.pipeline import (FAMILIES, RELATIONS, eval_prompts, if_task, is_held_out, knowledge_base,
                                pipeline_corpus, reasoning_problem, tool_exchange)
from data.errors import EXIT_MISSING, run_cli
from data.formats import normalize_dpo, normalize_sft
from moe import BailingMoeConfig, BailingMoeForCausalLM
from trainer.tools.evaluate import greedy_generate, load_prompts
from trainer.tools.scorers import (final_answer_correct, format_errors, instruction_followed, knowledge_correct,
                                   reasoning_correct, score, score_families, tool_call_correct)


def _user_texts(corpus: dict) -> set:
    """Every user turn of every training record (SFT messages and DPO prompts)."""
    seen = set()
    for part, records in corpus.items():
        for rec in records:
            if "prompt" in rec or "chosen" in rec:
                seen.update(m["content"] for m in normalize_dpo(rec)["prompt"] if m["role"] == "user")
            else:
                seen.update(m["content"] for m in normalize_sft(rec)["messages"] if m["role"] == "user")
    return seen


def test_batched_left_padded_greedy_equals_one_at_a_time():
    torch.manual_seed(0)
    cfg = BailingMoeConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                           num_shared_experts=1, initializer_range=0.2, torch_dtype="float32")
    model = BailingMoeForCausalLM(cfg)
    prompts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8], [11, 12]]
    batched = greedy_generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, batch_size=4)
    single = [greedy_generate(model, [p], eos_id=1, pad_id=0, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    # And one-by-one equals a plain argmax loop over the unpadded sequence.
    ids = list(prompts[2])
    for _ in range(len(single[2])):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(prompts[2]):] == single[2]
    assert any(len(s) > 0 for s in single)


def test_demo_scoring_by_hand():
    replies = ["<think>\n2 + 2 = 4\n</think>\nThe answer is 4.",
               "<think>\n5 x 1 = 5\nThe answer is 5.",
               "</think> 17 apples",
               "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> done"]
    prompts = [{"answer": "44"}, {"answer": "5"}, {"answer": "7"}, {"answer": None}]
    r = score(replies, prompts, ended=[True, True, False, True])
    # reply 2: unclosed <think>; reply 3: </think> without <think> and no EOS in budget.
    assert r["with_format_errors"] == 2 and r["samples"] == 4
    assert r["errors_by_kind"]["no end-of-text within the token budget"] == 1
    assert sum(r["errors_by_kind"].values()) == 3
    # "4." is not "44"; "5." after no </think> counts; "17" does not contain the whole number 7.
    assert r["answered"] == 3 and abs(r["accuracy"] - 1 / 3) < 1e-12
    assert final_answer_correct("<think>x</think>So 12 pages.", "12")
    assert not final_answer_correct("<think>12</think>So 13 pages.", "12")


def test_demo_default_prompts_are_fresh_and_half_have_answers():
    p = load_prompts(None, 200)
    assert len(p) == 200 and sum(x["answer"] is not None for x in p) == 100
    assert all(x["messages"][-1]["role"] == "user" for x in p)
    trained = _user_texts(generate())  # the corpus the SFT and DPO demos train on
    assert not [x for x in p if x["messages"][-1]["content"] in trained]
    assert len({x["messages"][-1]["content"] for x in p}) > 150


def test_pipeline_eval_prompts_are_never_trained_on():
    ev = eval_prompts(100)
    assert {f: len(v) for f, v in ev.items()} == {f: 100 for f in FAMILIES}
    trained = _user_texts(pipeline_corpus())
    for f in FAMILIES:
        texts = [it["messages"][-1]["content"] for it in ev[f]]
        assert len(set(texts)) == 100, f
        assert not set(texts) & trained, f
    # The rule has teeth: drawn without it, training-style generators do produce evaluation prompts.
    rng = random.Random(0)
    raw = {reasoning_problem(rng, 1)[0] for _ in range(30000)}
    assert raw & {it["messages"][-1]["content"] for it in ev["reasoning"]}
    assert all(is_held_out(it["messages"][-1]["content"]) for f in FAMILIES if f != "knowledge" for it in ev[f])
    # Knowledge: the facts the corpus teaches, asked in wordings no training sample uses.
    kb = knowledge_base()
    for it in ev["knowledge"]:
        c = it["check"]
        person = next(n for n in kb if n in it["messages"][-1]["content"])
        assert kb[person][c["relation"]] == c["object"]
    taught = " ".join(m["content"] for r in pipeline_corpus()["base"] for m in r["messages"] if m["role"] == "assistant")
    assert all(RELATIONS[it["check"]["relation"]]["fact"].format(s=p, o=it["check"]["object"]) in taught
               for it in ev["knowledge"][:20] for p in [next(n for n in kb if n in it["messages"][-1]["content"])])
    # Difficulties and constraint kinds are all present.
    assert sorted({it["check"]["steps"] for it in ev["reasoning"]}) == [1, 2, 3]
    assert len({it["check"]["kind"] for it in ev["instruction_following"]}) == 6


def test_training_answers_pass_their_own_scorers():
    """The corpus's answers are what the scorers call right (else the evaluation would be unfair)."""
    rng = random.Random(1)
    for _ in range(300):
        steps = rng.choice([1, 2, 3])
        q, ans, info = reasoning_problem(rng, steps)
        assert reasoning_correct(ans, info["answer"]) and format_errors(ans, True) == []
        q, ans, check = if_task(rng)
        assert instruction_followed(ans, check), (q, ans)
        assert format_errors(ans, True) == []
        q, call_text, _, _, call = tool_exchange(rng)
        assert tool_call_correct(call_text, {"call": call})


def test_reasoning_scorer_by_hand():
    assert reasoning_correct("<think>\n3 + 9 = 12.\n</think>\nAda has 12 apples.", "12")
    assert not reasoning_correct("Ada has 12 apples.", "12")  # no </think>: no final answer
    assert not reasoning_correct("<think>\n3 + 9 = 12.\nAda has 12 apples.", "12")  # never closed
    assert not reasoning_correct("<think>12</think>Ada has 13 apples.", "12")
    assert not reasoning_correct("<think>x</think>Ada has 112 apples.", "12")
    assert not reasoning_correct("<think>x</think>Ada has 1.12 apples.", "12")


@pytest.mark.parametrize("reply,check,right", [
    ("THE RIVER AND THE GARDEN ARE CALM.", {"kind": "upper"}, True),
    ("THE River IS CALM.", {"kind": "upper"}, False),
    ("12 + 3", {"kind": "upper"}, False),  # no letters at all
    ("<think>\nplan\n</think>\nTHE RIVER IS CALM.", {"kind": "upper"}, True),  # judged after </think>
    ("- a\n- b\n- c", {"kind": "bullets", "n": 3}, True),
    ("* a\n* b\n* c", {"kind": "bullets", "n": 3}, True),
    ("Intro:\n- a\n- b", {"kind": "bullets", "n": 3}, False),
    ("- a\n- b\n- c\n- d", {"kind": "bullets", "n": 3}, False),
    ("The river is calm, done", {"kind": "end_with", "word": "done"}, True),
    ("The river is calm, done\n", {"kind": "end_with", "word": "done"}, True),
    ("The river is calm, done.", {"kind": "end_with", "word": "done"}, False),
    ("The river is calm, undone", {"kind": "end_with", "word": "done"}, False),
    ("The river is Calm.", {"kind": "include", "word": "calm"}, True),
    ("The river is calmer.", {"kind": "include", "word": "calm"}, False),
    ("It is calm and wide.", {"kind": "omit", "word": "river"}, True),
    ("The River is calm.", {"kind": "omit", "word": "river"}, False),
    ("", {"kind": "omit", "word": "river"}, False),
    ('{"name": "Ada", "age": 30}', {"kind": "json", "keys": ["name", "age"]}, True),
    ('{"name": "Ada"}', {"kind": "json", "keys": ["name", "age"]}, False),
    ('name: Ada, age: 30', {"kind": "json", "keys": ["name", "age"]}, False),
    ('["name", "age"]', {"kind": "json", "keys": ["name", "age"]}, False),
    ('<think>\n{"name": "Ada", "age": 30}', {"kind": "json", "keys": ["name", "age"]}, False),
])
def test_instruction_scorer_by_hand(reply, check, right):
    assert instruction_followed(reply, check) is right


def test_tool_and_knowledge_scorers_by_hand():
    calc = {"call": {"name": "calculator", "arguments": {"expression": "12*7"}}}
    assert tool_call_correct('<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>', calc)
    assert not tool_call_correct('<tool_call>{"name": "calculator", "arguments": {"expression": "12*8"}}</tool_call>', calc)
    assert not tool_call_correct('<tool_call>{"name": "get_weather", "arguments": {"expression": "12*7"}}</tool_call>', calc)
    assert not tool_call_correct("<tool_call>{'name': 'calculator', 'arguments': {'expression': '12*7'}}</tool_call>", calc)
    assert not tool_call_correct('<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}', calc)
    assert not tool_call_correct('{"name": "calculator", "arguments": {"expression": "12*7"}}', calc)
    city = {"relation": "city", "object": "Lima", "others": [o for o in RELATIONS["city"]["objects"] if o != "Lima"]}
    assert "Oslo" in city["others"]
    assert knowledge_correct("Ada lives in Lima.", city)
    assert not knowledge_correct("Ada lives in Lima or Oslo.", city)  # hedging names a second city
    assert not knowledge_correct("Ada lives in Oslo.", city)
    assert not knowledge_correct("<think>\nAda lives in Lima.", city)


def test_format_errors_and_family_scores_by_hand():
    assert format_errors("<think>\na\n</think>\nAda has 5 apples.\nAda has 5 apples.", True) == ["repeated answer"]
    assert format_errors("<think>\na\nAda has 5 apples.", True) == ["unclosed <think>"]
    assert format_errors("Ada has 5 apples.", False) == ["no end-of-text within the token budget"]
    assert format_errors("<tool_call>{\"name\": \"x\"}", True) == ["unclosed <tool_call>"]
    items = [{"family": "reasoning", "check": {"answer": "5", "steps": 1}},
             {"family": "reasoning", "check": {"answer": "7", "steps": 2}},
             {"family": "instruction_following", "check": {"kind": "upper"}},
             {"family": "tool_use", "check": {"call": {"name": "f", "arguments": {}}}},
             {"family": "knowledge", "check": {"relation": "pet", "object": "cat", "others": ["dog"]}}]
    replies = ["<think>\n2 + 3 = 5.\n</think>\nAda has 5 apples.",
               "<think>\n3 + 3 = 6.\n</think>\nAda has 6 apples.\nAda has 6 apples.",
               "HELLO THERE",
               '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>',
               "Ben has a pet cat."]
    r = score_families(items, replies, [True, True, False, True, True])
    assert r["reasoning"] == 0.5 and r["instruction_following"] == 1.0 and r["tool_use"] == 1.0
    assert r["knowledge"] == 1.0
    assert r["format_errors"] == 3  # the repeated answer, no end-of-text, the unclosed second <tool_call>
    assert r["format_errors_by_family"] == {"reasoning": 1, "instruction_following": 1, "tool_use": 1, "knowledge": 0}
    assert r["by_subset"]["reasoning"] == {"steps_1": {"accuracy": 1.0, "n": 1}, "steps_2": {"accuracy": 0.0, "n": 1}}


def test_cli_compares_models_side_by_side(tmp_path, capsys):
    import data
    from checkpoints_convert import save_hf
    from trainer.tools import evaluate
    from data.demo import TOKENIZER_DIR as DEMO_TOKENIZER

    tok = data.load_tokenizer(DEMO_TOKENIZER)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = BailingMoeConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                               initializer_range=0.1, torch_dtype="float32", eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id)
        paths.append(tmp_path / f"m{seed}" / "hf")
        save_hf(BailingMoeForCausalLM(cfg), paths[-1])
    out = tmp_path / "evals"
    rc = evaluate.main(["--model", str(paths[0]), "--model", str(paths[1]), "-n", "6", "--max-new-tokens", "6",
                        "--out-dir", str(out), "--show", "0"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["m0.json", "m1.json"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["m0", "m1"] and table[-1].split() == ["n", "per", "family", "6", "6"]
    for name, path in (("m0", paths[0]), ("m1", paths[1])):
        rec = json.loads((out / f"{name}.json").read_text())
        model, tk = evaluate.load_model_and_tokenizer(str(path))
        again = evaluate.evaluate_families(model, tk, n=6, max_new_tokens=6)
        assert rec["result"]["format_errors"] == again["format_errors"]
        assert all(rec["result"][f] == again[f] for f in FAMILIES)
        assert rec["result"]["n"] == {f: 6 for f in FAMILIES}
    assert run_cli(evaluate.main, ["--model", str(tmp_path / "missing")]) == EXIT_MISSING
    assert str(tmp_path / "missing") in capsys.readouterr().err
