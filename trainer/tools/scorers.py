"""Scoring answers by rules: the checks of the evaluation suites, with no model and no decoding.

Each rule takes a reply (the decoded answer, without the EOS) and what the prompt asked for:
  reasoning_correct       the text after </think> states the answer as a whole number
  instruction_followed    IFEval-style constraints (capitals only, N bullets, ends with a word, ...)
  tool_call_correct       the first <tool_call> holds valid JSON naming the right tool and arguments
  knowledge_correct       the fact's object is named and no other candidate of its kind
  format_errors           structural errors as the Ring-Lite-Distill report counts them
                          (data.format_check), plus "no end-of-text within the token budget"
``score_families`` and ``score`` total them for the two suites of trainer.tools.evaluate.
"""
from __future__ import annotations

import json
import re
from collections import Counter

from data.format_check import format_check, redundancy_check

def _after_think(reply: str) -> str | None:
    """The answer part: text after the last </think>; None when a <think> never closes."""
    if "</think>" in reply:
        return reply.rsplit("</think>", 1)[1]
    return None if "<think>" in reply else reply


def final_answer_correct(reply: str, answer: str) -> bool:
    """The text after the reply's last </think> contains ``answer`` as a whole token (the demo suite's
    rule; a reply without </think> is judged on its whole text)."""
    tail = reply.rsplit("</think>", 1)[-1]
    return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", tail) is not None


def reasoning_correct(reply: str, answer: str) -> bool:
    """The final answer after </think>: the reply must close its thinking and then state ``answer``."""
    return "</think>" in reply and final_answer_correct(reply, answer)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE) is not None


def instruction_followed(reply: str, check: dict) -> bool:
    text = _after_think(reply)
    if text is None:
        return False
    text = text.strip()
    kind = check["kind"]
    if kind == "upper":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    if kind == "bullets":
        bullets = [ln for ln in text.splitlines() if re.match(r"\s*[-*] \S", ln)]
        return len(bullets) == check["n"]
    if kind == "end_with":
        return re.search(rf"(?<![\w]){re.escape(check['word'])}$", text) is not None
    if kind == "include":
        return _has_word(text, check["word"])
    if kind == "omit":
        return len(re.findall(r"[A-Za-z]+", text)) >= 2 and not _has_word(text, check["word"])
    if kind == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and all(k in obj for k in check["keys"])
    raise ValueError(f"unknown instruction kind {kind!r}")


def tool_call_correct(reply: str, check: dict) -> bool:
    m = re.search(r"<tool_call>(.*?)</tool_call>", reply, flags=re.DOTALL)
    if m is None:
        return False
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError:
        return False
    want = check["call"]
    if not isinstance(call, dict) or call.get("name") != want["name"] or not isinstance(call.get("arguments"), dict):
        return False
    norm = lambda args: {k: re.sub(r"\s+", "", v) if isinstance(v, str) else v for k, v in args.items()}  # noqa: E731
    return norm(call["arguments"]) == norm(want["arguments"])


def knowledge_correct(reply: str, check: dict) -> bool:
    """The answer names ``check["object"]`` and none of ``check["others"]`` (the other candidates of its
    kind: naming two cities is a hedge, not an answer)."""
    text = _after_think(reply)
    if text is None:
        return False
    return _has_word(text, check["object"]) and not any(_has_word(text, o) for o in check["others"])


def format_errors(reply: str, ended: bool) -> list[str]:
    """The structural errors of one answer, as the report counts them (without positions)."""
    errs = format_check(reply) + redundancy_check(reply)
    if not ended:
        errs.append("pos -1: no end-of-text within the token budget")
    return [re.sub(r"\(.*\)$", "", re.sub(r"^pos -?\d+: ", "", e)).strip() for e in errs]


FAMILY_SCORERS = {
    "reasoning": lambda reply, check: reasoning_correct(reply, check["answer"]),
    "instruction_following": instruction_followed,
    "tool_use": tool_call_correct,
    "knowledge": knowledge_correct,
}


def score_families(items: list[dict], replies: list[str], ended: list[bool]) -> dict:
    """Accuracy per family (and per difficulty / constraint / tool), and the format-error count; the
    families are those of the items, in FAMILY_SCORERS' order."""
    FAMILIES = [f for f in FAMILY_SCORERS if any(it["family"] == f for it in items)]
    right: Counter = Counter()
    total: Counter = Counter()
    sub_right: Counter = Counter()
    sub_total: Counter = Counter()
    kinds: Counter = Counter()
    bad_by_family: Counter = Counter()
    bad = 0
    for it, reply, stop in zip(items, replies, ended):
        fam, check = it["family"], it["check"]
        ok = bool(FAMILY_SCORERS[fam](reply, check))
        right[fam] += ok
        total[fam] += 1
        sub = {"reasoning": lambda: f"steps_{check['steps']}", "instruction_following": lambda: check["kind"],
               "tool_use": lambda: check["call"]["name"], "knowledge": lambda: check["relation"]}[fam]()
        sub_right[(fam, sub)] += ok
        sub_total[(fam, sub)] += 1
        errs = format_errors(reply, stop)
        if errs:
            bad += 1
            bad_by_family[fam] += 1
        kinds.update(errs)
    out = {f: (right[f] / total[f] if total[f] else None) for f in FAMILIES}
    out["format_errors"] = bad
    out["n"] = {f: total[f] for f in FAMILIES}
    out["by_subset"] = {f: {s: {"accuracy": sub_right[(f, s)] / sub_total[(f, s)], "n": sub_total[(f, s)]}
                            for (ff, s) in sorted(sub_total) if ff == f} for f in FAMILIES}
    out["format_errors_by_family"] = {f: bad_by_family[f] for f in FAMILIES}
    out["format_errors_by_kind"] = dict(kinds.most_common())
    return out


def score(replies: list[str], prompts: list[dict], ended: list[bool]) -> dict:
    """The demo suite: share of answers with a format error, errors by kind, accuracy where an
    answer is known."""
    kinds: Counter = Counter()
    bad = 0
    right = total = 0
    for reply, p, stop in zip(replies, prompts, ended):
        errs = format_errors(reply, stop)
        if errs:
            bad += 1
        kinds.update(errs)
        if p["answer"] is not None:
            total += 1
            right += final_answer_correct(reply, p["answer"])
    return {"samples": len(replies), "with_format_errors": bad, "format_error_rate": bad / max(1, len(replies)),
            "errors_by_kind": dict(kinds.most_common()), "answered": total,
            "accuracy": right / total if total else None}
