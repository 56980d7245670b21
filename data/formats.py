"""JSONL input formats, normalized to one internal shape, with located errors.

SFT records (one JSON object per line), either
    {"messages": [{"role": "system|user|assistant|tool", "content": str, "tool_calls"?: [...]}, ...],
     "tools"?: [function signatures, rendered by the bailing_v2 template]}
or ShareGPT style
    {"conversations": [{"from": "human|gpt|system|observation|function_call|...", "value": str}, ...],
     "system"?: str}
DPO records
    {"prompt": str | [messages], "chosen": str | message | [messages], "rejected": same as chosen}
Both may carry "domain": str and "tags": [str], kept for mixtures and statistics.

The template (template.py) renders and encodes one conversation; this module turns records into
conversations, so a DPO pair is normalised and encoded here.
"""
import json

from .errors import DataError
from .template import encode_chat, validate_messages, render_tool_call, thinking_value, TOOL_OPEN

# ShareGPT "from" values seen in the wild, mapped onto our four roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "model": "assistant", "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool", "function_response": "tool",
    "ipython": "tool",
}


def _meta(obj):
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"'domain' must be a string, got {type(domain).__name__}")
    tags = obj.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError("'tags' must be a list of strings")
    return domain, tags


def _function_call_text(value):
    # ShareGPT function_call turns hold the call as JSON; the bailing/Ling format wraps each call
    # in <tool_call> tags, so render it that way unless the text already does.
    if TOOL_OPEN in value:
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise DataError("function_call value is not valid JSON") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    return "".join(render_tool_call(c) for c in calls)


def sharegpt_to_messages(conversations, system=None):
    if not isinstance(conversations, list):
        raise DataError(f"'conversations' must be a list, got {type(conversations).__name__}")
    messages = []
    if system is not None:
        if not isinstance(system, str):
            raise DataError("'system' must be a string")
        if system:
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object, got {type(turn).__name__}")
        if "from" not in turn or "value" not in turn:
            raise DataError(f"turn {i} needs 'from' and 'value'")
        src, value = turn["from"], turn["value"]
        if src not in SHAREGPT_ROLES:
            raise DataError(f"turn {i} has unknown 'from' {src!r}")
        if not isinstance(value, str):
            raise DataError(f"turn {i} value must be a string, got {type(value).__name__}")
        if src == "function_call":
            value = _function_call_text(value)
        messages.append({"role": SHAREGPT_ROLES[src], "content": value})
    return messages


def _to_messages(obj, field):
    """A message list from either message dicts or ShareGPT turns."""
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "from" in obj[0]:
        return sharegpt_to_messages(obj)
    if not isinstance(obj, list):
        raise DataError(f"'{field}' must be a list of messages, got {type(obj).__name__}")
    return obj


def check_turns(messages):
    """Training-data checks beyond the template's structure: the first turn after the system prompt
    is not the assistant's (nothing to answer), and no assistant turn is empty (it would train the
    model to say nothing). Chat and generation prompts are not held to these."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is not None and messages[first]["role"] == "assistant":
        raise DataError(f"message {first}: the conversation starts with an assistant turn "
                        "(expected a user turn first)")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(f"message {i}: assistant turn with empty content")


def normalize_sft(obj):
    """{"messages", "domain", "tags"} from one SFT record, or DataError."""
    if not isinstance(obj, dict):
        raise DataError(f"record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _to_messages(obj["messages"], "messages")
    elif "conversations" in obj:
        messages = sharegpt_to_messages(obj["conversations"], obj.get("system"))
    else:
        raise DataError("record has neither 'messages' nor 'conversations'")
    if isinstance(messages, list) and not messages:
        raise DataError("empty conversation")
    validate_messages(messages)
    check_turns(messages)
    domain, tags = _meta(obj)
    out = {"messages": messages, "domain": domain, "tags": tags, **_thinking(obj)}
    tools = obj.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory's datasets keep the list as a JSON string, "" for none
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"'tools' is a string but not JSON ({e.msg} at column {e.colno})") from None
    if tools:  # function signatures: the bailing_v2 template renders them in its system block
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("'tools' must be a list of objects (function signatures)")
        out["tools"] = tools
    elif tools not in (None, []):
        raise DataError(f"'tools' must be a list of objects (function signatures), got {type(tools).__name__}")
    return out


def _answer_text(value, field):
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise DataError(f"'{field}' is an empty list")
        msgs = _to_messages(value, field)
        parts = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                raise DataError(f"'{field}' message {i} must be an assistant message")
            if not isinstance(m.get("content"), str):
                raise DataError(f"'{field}' message {i} content must be a string")
            parts.append(m["content"] + "".join(render_tool_call(c) for c in m.get("tool_calls") or []))
        return "".join(parts)
    raise DataError(f"'{field}' must be a string or assistant message(s), got {type(value).__name__}")


def normalize_dpo(obj):
    """{"prompt": messages, "chosen": str, "rejected": str, "domain", "tags"} or DataError."""
    if not isinstance(obj, dict):
        raise DataError(f"record must be a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise DataError(f"DPO record has no '{key}'")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = _to_messages(prompt, "prompt")
    validate_messages(prompt, require_final_assistant=False)
    check_turns(prompt)
    chosen = _answer_text(obj["chosen"], "chosen")
    rejected = _answer_text(obj["rejected"], "rejected")
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"'{side}' is empty")
    if chosen == rejected:
        raise DataError("'chosen' and 'rejected' are the same answer (the pair teaches nothing)")
    domain, tags = _meta(obj)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain, "tags": tags,
            **_thinking(obj)}


def _thinking(obj):
    """{"thinking": "on"|"off"} when the record sets the bailing_v2 template's "detailed thinking" line."""
    return {} if obj.get("thinking") is None else {"thinking": thinking_value(obj["thinking"])}


def dpo_conversations(ex):
    """The chosen and rejected conversations of a normalised pair: the prompt, then the answer."""
    return [ex["prompt"] + [{"role": "assistant", "content": ex[side]}] for side in ("chosen", "rejected")]


def encode_dpo_pair(tokenizer, example, template="bailing"):
    """Encode {"prompt", "chosen", "rejected"} (strings or message lists; see normalize_dpo).

    Returns {"chosen": (ids, labels), "rejected": (ids, labels)}; each side is the prompt (labels
    -100, earlier answers in it included) followed by the answer and EOS (trained), as LLaMA-Factory
    encodes pairs. data.eos_every_turn does not apply: nothing of the prompt is trained.
    """
    ex = normalize_dpo(example)
    return {side: encode_chat(tokenizer, msgs, train_history=False, template=template, thinking=ex.get("thinking"))
            for side, msgs in zip(("chosen", "rejected"), dpo_conversations(ex))}


def read_jsonl(path, kind="sft", skip_bad=False, bad=None):
    """Yield (line_number, normalized record) from a JSONL file.

    Bad records raise DataError naming file and line; with ``skip_bad`` they are appended to the
    ``bad`` list as (file, line, problem) instead, so the caller can count and report them.
    Blank lines are not records and are passed over.
    """
    normalize = {"sft": normalize_sft, "dpo": normalize_dpo}[kind]
    path = str(path)
    with open(path, "rb") as f:
        offset = 0  # of the line's first byte in the file
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = _decode_line(raw, start)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON ({e.msg} at column {e.colno})") from None
                rec = normalize(obj)
            except DataError as e:
                if not skip_bad:
                    raise e.located(path, lineno) from None
                if bad is not None:
                    bad.append((path, lineno, e.problem))
                continue
            yield lineno, rec


def _decode_line(raw, start):
    """One line's text; bytes that are not UTF-8 are a DataError naming their byte offset in the file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at byte offset {start + e.start} of the "
                        f"file (byte {e.start + 1} of the line): {e.reason}") from None
    # A byte-order mark some editors write at the start of the file is not part of the JSON.
    return text[1:] if start == 0 and text.startswith("\ufeff") else text


def detect_kind(path):
    """'dpo' if the first record looks like a preference pair, else 'sft'."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    obj = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return "sft"
                return "dpo" if isinstance(obj, dict) and "chosen" in obj else "sft"
    return "sft"
