"""Structural format checks on generated or training text.

These are the error kinds the Ring-Lite-Distill report counts as formatting failures (and that
our DPO pairs target): unpaired or misnested ``<think>``/``<tool_call>`` tags, tool-call bodies
that are not JSON, and anything after the end-of-text token.
"""
import json
import re

from .template import THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE, EOS_TOKEN

_TAGS = {THINK_OPEN: ("think", True), THINK_CLOSE: ("think", False),
         TOOL_OPEN: ("tool_call", True), TOOL_CLOSE: ("tool_call", False)}
_TAG_RE = re.compile("|".join(re.escape(t) for t in list(_TAGS) + [EOS_TOKEN]))


def _check_tool_body(body, pos):
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return [f"pos {pos}: tool_call body is not valid JSON ({e.msg})"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return [f"pos {pos}: tool_call JSON must be an object with a string \"name\""]
    return []


def format_check(text):
    """Return a list of error strings ("pos N: what"); empty means well formed.

    Positions are character offsets into ``text``. Tags may not nest in themselves and must
    close in the order they opened; a tool_call body must be a JSON object with a "name".
    """
    errors = []
    stack = []  # (kind, position of the opening tag, index just after it)
    for m in _TAG_RE.finditer(text):
        tag, pos = m.group(0), m.start()
        if tag == EOS_TOKEN:
            rest = text[m.end():]
            if rest:
                errors.append(f"pos {m.end()}: text after {EOS_TOKEN} ({len(rest)} chars)")
            # Whatever follows EOS is already an error; do not also judge its tags.
            text = text[:m.end()]
            break
        kind, opening = _TAGS[tag]
        if opening:
            if any(k == kind for k, _, _ in stack):
                errors.append(f"pos {pos}: nested <{kind}> inside an open <{kind}>")
            stack.append((kind, pos, m.end()))
            continue
        if not stack:
            errors.append(f"pos {pos}: </{kind}> without an opening <{kind}>")
            continue
        top_kind, top_pos, body_start = stack[-1]
        if top_kind != kind:
            if any(k == kind for k, _, _ in stack):
                errors.append(f"pos {pos}: </{kind}> closes across an open <{top_kind}> (misnested)")
                while stack and stack[-1][0] != kind:
                    stack.pop()
                top_kind, top_pos, body_start = stack[-1]
            else:
                errors.append(f"pos {pos}: </{kind}> without an opening <{kind}>")
                continue
        stack.pop()
        if kind == "tool_call":
            errors.extend(_check_tool_body(text[body_start:pos], top_pos))
    for kind, pos, _ in stack:
        errors.append(f"pos {pos}: unclosed <{kind}>")
    return errors


_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]?")


def redundancy_check(text):
    """Errors for a repeated answer: the same sentence or line (3+ words) twice outside <think>.

    The report counts redundancy (a final answer written twice, text after the end) among the
    structural errors; what follows EOS is format_check's, this catches the repetition."""
    tail = text.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in text else (
        "" if THINK_OPEN in text else text)
    offset = len(text) - len(tail)
    seen = set()
    for m in _SENTENCE_RE.finditer(tail):
        s = " ".join(m.group(0).split()).strip(" -*").rstrip(".!?").lower()
        if len(s.split()) < 3:
            continue
        if s in seen:
            return [f"pos {offset + m.start()}: repeated answer ({s[:40]!r} twice)"]
        seen.add(s)
    return []
