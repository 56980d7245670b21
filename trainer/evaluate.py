"""Generate answers with one or more models and score them: format errors and reasoning accuracy.

    python -m trainer.evaluate --model runs/sft/hf --model runs/dpo/hf [--data FILE.jsonl] [-n 200]

What the Ring-Lite-Distill report tracks through its stages: the structural formatting errors of
the answers (unpaired or misnested <think>/<tool_call>, tool calls that are not JSON, text after
EOS; counted by data.format_check) and whether reasoning answers are right. Each model answers the
same prompts greedily; the table shows, per model, the share of answers with a format error, the
errors by kind, and the accuracy on prompts that carry a reference "answer".

Prompts: JSONL records with "messages" (everything before the last assistant turn is the prompt)
or "prompt" (a string or message list, as in DPO pairs), and optionally "answer" (the expected
final answer; the reply is right when its text after </think> contains it as a whole number or
word). Default: fresh demo prompts (a seed the demo training data does not use), half arithmetic
reasoning with answers, half the demo's preference prompts.

Decoding is plain greedy without a KV cache (each new token reruns the prefix): meant for the tiny
demo models and small checks, not for serving Ling-Lite.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

import torch

EVAL_SEED = 20261122  # not the demo corpus's seed: these prompts were never trained on


def load_prompts(path: str | None, n: int) -> list[dict]:
    """[{"messages": prompt messages, "answer": str | None}], at most n."""
    from data.formats import read_jsonl

    if path is None:
        from data.demo import generate

        corpus = generate(seed=EVAL_SEED, sizes={"general": 0, "tool": 0, "reasoning": n - n // 2, "dpo": n // 2})
        records = corpus["sft_reasoning"] + corpus["dpo"]
    else:
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: {path}:{line_no}: not valid JSON ({e.msg})") from None
    out = []
    for r in records[:n]:
        if "prompt" in r:
            msgs = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
        elif "messages" in r:
            msgs = list(r["messages"])
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
        else:
            raise SystemExit(f"error: {path}: a record has neither 'messages' nor 'prompt'")
        out.append({"messages": msgs, "answer": None if r.get("answer") is None else str(r["answer"])})
    return out


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int,
                    batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (without the EOS) of token-id prompts, batched with left padding."""
    model.eval()
    outs: list[list[int]] = []
    device = next(model.parameters()).device
    for b0 in range(0, len(prompts), batch_size):
        batch = prompts[b0:b0 + batch_size]
        L = max(len(p) for p in batch)
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, L - len(p):] = torch.tensor(p, device=device)
            mask[i, L - len(p):] = 1
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        new = [[] for _ in batch]
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = model(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            for i in range(len(batch)):
                if not done[i]:
                    if int(nxt[i]) == eos_id:
                        done[i] = True
                    else:
                        new[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
        outs.extend(new)
    return outs


def final_answer_correct(reply: str, answer: str) -> bool:
    """The reply's text after its last </think> contains ``answer`` as a whole token."""
    tail = reply.rsplit("</think>", 1)[-1]
    return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", tail) is not None


def score(replies: list[str], prompts: list[dict], ended: list[bool]) -> dict:
    from data import format_check

    kinds: Counter = Counter()
    bad = 0
    right = total = 0
    for reply, p, stop in zip(replies, prompts, ended):
        errs = format_check(reply)
        if not stop:
            errs = errs + ["pos -1: no end-of-text within the token budget"]
        if errs:
            bad += 1
        for e in errs:
            kinds[re.sub(r"^pos -?\d+: ", "", re.sub(r"\(\d+ chars\)", "", e)).strip()] += 1
        if p["answer"] is not None:
            total += 1
            right += final_answer_correct(reply, p["answer"])
    return {"samples": len(replies), "with_format_errors": bad, "format_error_rate": bad / max(1, len(replies)),
            "errors_by_kind": dict(kinds.most_common()), "answered": total,
            "accuracy": right / total if total else None}


def _record(a, results: dict) -> dict:
    import datetime
    import platform
    import subprocess

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except Exception:
        commit = "unknown"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
            "device": f"CPU {platform.machine()}", "prompts": a.data or f"demo prompts, seed {EVAL_SEED}",
            "n": a.n, "max_new_tokens": a.max_new_tokens, "decoding": "greedy", "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="an HF or native checkpoint directory; repeat to compare models on the same prompts")
    p.add_argument("--data", default=None, help="JSONL of prompts (default: fresh demo prompts)")
    p.add_argument("-n", type=int, default=100, help="number of prompts (default 100)")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: next to the model, else the demo's)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per answer (default 160)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default 16)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--show", type=int, default=2, help="print this many prompt/answer examples per model")
    a = p.parse_args(argv)

    import os

    import data
    from checkpoints_convert import CheckpointError, load_checkpoint
    from trainer.sources import DEMO_TOKENIZER

    prompts = load_prompts(a.data, a.n)
    results = {}
    for path in a.model:
        tok_dir = a.tokenizer or (path if os.path.exists(os.path.join(path, "tokenizer.json")) else DEMO_TOKENIZER)
        tok = data.load_tokenizer(tok_dir)
        try:
            model = load_checkpoint(path, dtype=torch.float32, expert_backend="torch")
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ids = [data.encode_prompt(tok, pr["messages"]) for pr in prompts]
        gen = greedy_generate(model, ids, tok.eos_id, tok.pad_id, a.max_new_tokens, a.batch_size)
        replies = [tok.decode(g) for g in gen]
        ended = [len(g) < a.max_new_tokens for g in gen]
        results[path] = score(replies, prompts, ended)
        for pr, rep in list(zip(prompts, replies))[:a.show]:
            print(f"--- {path}\n> {pr['messages'][-1]['content']}\n{rep}\n")
    print(f"{'model':<40} {'samples':>7} {'format errors':>14} {'accuracy':>9}")
    for path, r in results.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        print(f"{path:<40} {r['samples']:>7} {r['with_format_errors']:>6} ({r['format_error_rate']:.0%}) {acc:>9}")
        for kind, c in r["errors_by_kind"].items():
            print(f"{'':<42}{c:>4} x {kind}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(_record(a, results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
