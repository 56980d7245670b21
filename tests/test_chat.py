"""python -m trainer.tools.chat: answers equal moe.generate on the bailing prompt of the conversation so far,
streamed text equals the whole answer, /reset forgets, stop strings never reach the screen."""
import io

import pytest
import torch

import data
import moe
from checkpoints_convert import save_hf
from moe import BailingMoeConfig, BailingMoeForCausalLM
from trainer.tools import chat
from data.demo import TOKENIZER_DIR as DEMO_TOKENIZER


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    tok = data.load_tokenizer(DEMO_TOKENIZER)
    cfg = BailingMoeConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                           num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                           initializer_range=0.1, torch_dtype="float32", eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id, max_position_embeddings=512)
    model = BailingMoeForCausalLM(cfg)
    path = tmp_path_factory.mktemp("chat") / "hf"
    save_hf(model, path)
    return path, model.eval(), tok


def _expected(model, tok, messages, n):
    """The answer computed without the chat: template, generate, decode, cut at the turn marker."""
    ids = torch.tensor([data.encode_prompt(tok, messages)])
    out = moe.generate(model, ids, max_new_tokens=n, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       stop_strings=["<role>"], tokenizer=tok)[0, ids.shape[1]:].tolist()
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    text = tok.decode(out)
    return text.split("<role>")[0]


def test_chat_turns_history_and_reset(exported):
    path, model, tok = exported
    torch.set_num_threads(1)
    n = 10
    stdin = io.StringIO("What is 2 plus 3?\nAnd 4 plus 4?\n/reset\nAnd 4 plus 4?\n")
    stdout = io.StringIO()
    rc = chat.main(["--model", str(path), "--tokenizer", DEMO_TOKENIZER, "--max-new-tokens", str(n),
                    "--system", "You are a careful tutor."], stdin=stdin, stdout=stdout)
    assert rc == 0
    shown = stdout.getvalue().split("assistant> ")[1:]
    assert len(shown) == 3
    replies = [s.replace("(conversation reset)\n", "")[:-1] for s in shown]  # each answer ends with a newline
    sys_msg = [{"role": "system", "content": "You are a careful tutor."}]
    q1 = {"role": "user", "content": "What is 2 plus 3?"}
    q2 = {"role": "user", "content": "And 4 plus 4?"}
    want1 = _expected(model, tok, sys_msg + [q1], n)
    want2 = _expected(model, tok, sys_msg + [q1, {"role": "assistant", "content": want1}, q2], n)
    want3 = _expected(model, tok, sys_msg + [q2], n)
    assert replies == [want1, want2, want3]
    assert want2 != want3  # the history changes the answer here, so the check above has teeth
    assert "<role>" not in stdout.getvalue()


class _Tok:
    """Decodes id i to the i-th piece; "<ro" + "le>" spell the stop string across two tokens."""
    pieces = ["Hi", " there", "<ro", "le>", "x", "\xe9"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_stream_printer_holds_back_stop_string_prefixes():
    out = io.StringIO()
    p = chat.StreamPrinter(_Tok(), out)
    for i in (0, 1, 2):
        p.add(i)
    assert out.getvalue() == "Hi there"  # "<ro" could start "<role>": not shown yet
    p.add(3)
    assert p.finish() == "Hi there" and out.getvalue() == "Hi there"
    out = io.StringIO()
    p = chat.StreamPrinter(_Tok(), out)
    for i in (0, 2, 4, 5):
        p.add(i)
    assert p.finish() == "Hi<rox\xe9" and out.getvalue() == "Hi<rox\xe9"  # not a stop string after all


def test_chat_errors(tmp_path, capsys):
    from data.errors import EXIT_MISSING, run_cli

    rc = run_cli(lambda argv: chat.main(argv, stdin=io.StringIO(""), stdout=io.StringIO()),
                 ["--model", str(tmp_path / "nope")])
    assert rc == EXIT_MISSING
    assert "no such checkpoint directory" in capsys.readouterr().err
