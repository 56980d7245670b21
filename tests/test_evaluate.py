"""Evaluation: batched greedy decoding equals one-by-one decoding; scoring by hand-made replies."""
import torch

from moe import BailingMoeConfig, BailingMoeForCausalLM
from trainer.evaluate import final_answer_correct, greedy_generate, load_prompts, score


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


def test_scoring_by_hand():
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


def test_default_prompts_are_fresh_and_half_have_answers():
    p = load_prompts(None, 10)
    assert len(p) == 10 and sum(x["answer"] is not None for x in p) == 5
    assert all(x["messages"][-1]["role"] == "user" for x in p)
