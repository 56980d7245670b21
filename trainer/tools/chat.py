"""Chat with an exported model in its chat template (bailing; bailing_v2 for Ling 2.0), streaming the answer.

    python -m trainer.tools.chat --model runs/sft/hf [--system "You are a helpful assistant."] [--temperature 0.7]

Each line you type is a user turn; the model's answer is printed as it is generated (KV-cache
decoding, moe.generate) and kept in the conversation. An answer ends at <|endoftext|>, at the start
of a new turn (<role>) or after --max-new-tokens. Commands: /reset forgets the conversation, /exit
(or end of input) quits. Reads stdin, so a file of questions can be piped in.

Greedy by default (--temperature 0); --temperature > 0 samples, with --top-k / --top-p and --seed.
When the conversation no longer fits the model's context, the oldest turns are dropped.
"""
from __future__ import annotations

import argparse
import sys

import torch

import data
import moe
from checkpoints_convert import load_checkpoint
from data.errors import BadInputError, run_cli
from data.template import resolve_template

STOP_STRINGS = ("<role>",)  # the model starting a turn of its own


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.tools.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="an HF (bailing_moe) or lingmoe-native checkpoint directory")
    p.add_argument("--tokenizer", default="", metavar="DIR",
                   help="tokenizer directory (default: the model directory if it has tokenizer.json, else the demo tokenizer)")
    p.add_argument("--template", default="auto", choices=("auto", "bailing", "bailing_v2"),
                   help="chat template (default auto: bailing_v2 for a Ling 2.0 model, bailing otherwise)")
    p.add_argument("--system", default="", help="a system message put before the conversation (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0 = all; default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens holding this much probability (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: none, answers vary)")
    p.add_argument("--expert-backend", default="torch", choices=("torch", "loop", "triton"),
                   help="routed-expert compute (default torch; triton needs a GPU or TRITON_INTERPRET=1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: decoding is many tiny operations)")
    return p


class StreamPrinter:
    """Prints a growing list of token ids as text: only what is new, never half a UTF-8 character
    (byte-level tokens can split one), and nothing of a stop string (text that could be the start of
    one is held back until it is clearly not)."""

    def __init__(self, tokenizer, out, stops=STOP_STRINGS):
        self.tok, self.out, self.stops = tokenizer, out, stops
        self.ids: list[int] = []
        self.shown = ""

    def text(self) -> str:
        """The answer so far, cut before the first stop string."""
        text = self.tok.decode(self.ids)
        cut = min((text.index(s) for s in self.stops if s in text), default=len(text))
        return text[:cut]

    def _show(self, upto: str) -> None:
        if len(upto) > len(self.shown):
            self.out.write(upto[len(self.shown):])
            self.out.flush()
            self.shown = upto

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.text()
        if text.endswith("\ufffd"):
            return
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._show(text[:len(text) - hold])

    def finish(self) -> str:
        text = self.text()
        self._show(text)
        return text


def answer(model, tok, messages, a, out) -> str:
    """Generate, stream and return the assistant's answer to ``messages`` (without EOS / stop string)."""
    ids = data.encode_prompt(tok, messages, template=a.template)
    x = torch.tensor([ids], device=a.device)
    printer = StreamPrinter(tok, out)
    for step in moe.generate_stream(model, x, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                                    temperature=a.temperature if a.temperature > 0 else 1.0, top_k=a.top_k,
                                    top_p=a.top_p, eos_token_id=tok.eos_id, seed=a.seed, pad_token_id=tok.pad_id,
                                    stop_strings=STOP_STRINGS, tokenizer=tok):
        t = int(step.tokens_B[0])
        if t == tok.eos_id:
            break
        printer.add(t)
        if bool(step.ended_B[0]):
            break
    text = printer.finish()
    out.write("\n")
    out.flush()
    return text


def fit_context(tok, messages: list[dict], limit: int, template: str = "bailing") -> list[dict]:
    """Drop the oldest user/assistant exchanges (keeping a system message) until the prompt fits."""
    msgs = list(messages)
    while len(data.encode_prompt(tok, msgs, template=template)) > limit:
        first = 1 if msgs[0]["role"] == "system" else 0
        later_user = [i for i, m in enumerate(msgs) if m["role"] == "user" and i > first]
        if not later_user:
            break  # only the current question is left: let it run (the model may see a cut prompt)
        del msgs[first:later_user[0]]
    return msgs


def main(argv=None, stdin=None, stdout=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if a.temperature < 0:
        p.error("--temperature must be >= 0")
    torch.set_num_threads(a.threads)
    model = load_checkpoint(a.model, dtype=a.dtype, device=a.device, expert_backend=a.expert_backend).eval()
    tok_dir = data.run_tokenizer_dir(a.tokenizer, a.model)  # the model's own tokenizer when it has one
    tok = data.load_tokenizer(tok_dir)
    a.template = resolve_template(a.template, model.config.family)
    if tok.vocab_size > model.config.vocab_size:
        raise BadInputError(f"the tokenizer in {tok_dir} has {tok.vocab_size} ids but the model embeds only "
                            f"{model.config.vocab_size}; pass the model's tokenizer with --tokenizer")
    start = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(start)
    limit = model.config.max_position_embeddings - a.max_new_tokens
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    if interactive:
        out.write(f"chatting with {a.model} (/reset, /exit)\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            out.write("(conversation reset)\n")
            continue
        messages = fit_context(tok, messages + [{"role": "user", "content": line}], limit, a.template)
        out.write("assistant> ")
        reply = answer(model, tok, messages, a, out)
        messages.append({"role": "assistant", "content": reply})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
