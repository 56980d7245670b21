"""The "bailing" chat template (Ling / Ling-Lite), with assistant-only labels.

Rendered form, turn by turn::

    system     <role>SYSTEM</role>{content}
    user       <role>HUMAN</role>{content}<role>ASSISTANT</role>
    tool       <role>OBSERVATION</role>{content}<role>ASSISTANT</role>
    assistant  {content}
    (end)      <|endoftext|>   -- once, right after the last assistant turn

The text is the same whatever is trained: ``<|endoftext|>`` appears once, at the end of a conversation
that ends with an answer, never between turns. Labels are -100 everywhere except assistant content
and the final EOS. An assistant turn that is followed by another turn ends where the next ``<role>``
begins; that ``<role>`` token is part of the following turn's prefix.

``eos_every_turn=True`` also trains the end of every earlier answer, exactly as LLaMA-Factory 0.9.5's
"bailing" template (efficient_eos) encodes multi-turn data, the fine-tuning Ling's own README
recommends: the first token of the turn after an answer (its ``<role>``) carries the label
``<|endoftext|>`` while its input stays ``<role>``, so after the model's shift the answer's last token
is trained to predict EOS, and the input never holds an EOS between turns (what a serving stack feeds
back as history: it strips the EOS it stopped on). The default trains only the final EOS.

``train_history=False`` (DPO: the prompt holds the conversation so far) trains only the final answer
and its EOS; earlier answers are context, labelled -100 with no EOS label after them, as
LLaMA-Factory encodes preference pairs.

We tokenize each segment separately and concatenate the ids; the concatenation is exactly what
we train on. That is what makes label boundaries exact. With the bailing markers every segment
boundary sits next to a special token (which the tokenizer splits out before BPE anyway), so for
such tokenizers this equals tokenizing the rendered string in one go; a test checks that on the
shipped demo tokenizer.

``template="bailing_v2"`` selects Ling 2.0's template instead (data/template_v2.py): every function
here takes it, and ``tools`` (function signatures, rendered in its system block). Its turns end with
``<|role_end|>`` in the text, so ``eos_every_turn`` has nothing to add there; ``train_history`` applies.
"""
import json
from typing import Literal, NamedTuple, get_args

from . import template_v2
from .errors import DataError

TemplateName = Literal["bailing", "bailing_v2"]
TEMPLATES = get_args(TemplateName)

ROLE_OPEN = "<role>"
ROLE_CLOSE = "</role>"
EOS_TOKEN = "<|endoftext|>"
ROLE_END = "<|role_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PREFIX = "<role>SYSTEM</role>"
USER_PREFIX = "<role>HUMAN</role>"
TOOL_PREFIX = "<role>OBSERVATION</role>"
ASSISTANT_PREFIX = "<role>ASSISTANT</role>"

SPECIAL_TOKENS = [EOS_TOKEN, ROLE_OPEN, ROLE_CLOSE, ROLE_END, THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE]
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


def render_tool_call(call):
    """One ``<tool_call>{json}</tool_call>`` from {"name", "arguments"} (or OpenAI's {"function": ...})."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError("a tool call must be an object with a string 'name'")
    args = call.get("arguments", {})
    if isinstance(args, str):
        # OpenAI stores arguments as a JSON string; keep the object form so the rendered JSON is
        # one canonical object rather than a string containing JSON.
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise DataError("tool call 'arguments' is a string that is not valid JSON") from None
    body = json.dumps({"name": call["name"], "arguments": args}, ensure_ascii=False)
    return f"{TOOL_OPEN}{body}{TOOL_CLOSE}"


def _assistant_text(msg):
    text = msg["content"]
    for call in msg.get("tool_calls") or []:
        text += render_tool_call(call)
    return text


def validate_messages(messages, require_final_assistant=True):
    """Check structure; raise DataError (without file/line, the reader adds those)."""
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError("empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise DataError(f"message {i} has no 'role'")
        if "content" not in m:
            raise DataError(f"message {i} has no 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a system message may only come first")
        if m.get("tool_calls") is not None:
            if role != "assistant" or not isinstance(m["tool_calls"], list):
                raise DataError(f"message {i}: 'tool_calls' must be a list on an assistant message")
            for call in m["tool_calls"]:
                render_tool_call(call)
    if require_final_assistant:
        if messages[-1]["role"] != "assistant":
            raise DataError(f"conversation must end with an assistant message, ends with {messages[-1]['role']!r}")
    elif messages[-1]["role"] not in ("user", "tool"):
        raise DataError(f"a prompt must end with a user or tool message, ends with {messages[-1]['role']!r}")
    if len(messages) == 1 and messages[0]["role"] == "system":
        raise DataError("conversation has only a system message")


class Segment(NamedTuple):
    """One piece of the rendered conversation: its text, whether its tokens are trained (label = the
    token), and whether its first token carries the EOS label of the answer just before it."""
    text: str
    trained: bool
    eos_label: bool = False


def check_template(template):
    if template not in TEMPLATES:
        raise DataError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")


def resolve_template(name, family="bailing_moe"):
    """The template a run uses: ``name``, or for "auto" the one of the model's family (bailing_v2 for
    Ling 2.0, bailing otherwise)."""
    if name == "auto":
        return "bailing_v2" if family == "bailing_moe_v2" else "bailing"
    check_template(name)
    return name


def stop_token(template="bailing"):
    """The token that ends an answer in ``template`` (what generation stops on)."""
    check_template(template)
    return template_v2.ROLE_END if template == "bailing_v2" else EOS_TOKEN


def thinking_value(thinking):
    """A record's "thinking" field: "on", "off", or None (the template's default, off)."""
    if thinking not in (None, "on", "off"):
        raise DataError(f"'thinking' must be \"on\" or \"off\", got {thinking!r}")
    return thinking or "off"


def check_thinking(thinking, template):
    """The "detailed thinking" line's value for ``template``; only bailing_v2's system block has one."""
    value = thinking_value(thinking)
    if thinking is not None and template != "bailing_v2":
        raise DataError("'thinking' sets the bailing_v2 template's \"detailed thinking\" line; the bailing "
                        "template has none (data.template bailing_v2, or drop the field)")
    return value


def check_fields(template, tools=None, thinking=None):
    """A record's fields that only some templates render: DataError under one that cannot."""
    check_template(template)
    check_thinking(thinking, template)
    if tools and template != "bailing_v2":
        raise DataError("'tools' are rendered by the bailing_v2 template only "
                        "(the bailing template has no tools block)")


def _v2_segments(messages, tools, train_history=True, add_generation_prompt=False, thinking=None):
    """template_v2's (text, trained) pieces as Segments; without ``train_history`` only the last
    trained piece (the final answer and its <|role_end|>) stays trained."""
    pieces = template_v2.chat_segments(messages, tools, add_generation_prompt=add_generation_prompt,
                                       thinking=check_thinking(thinking, "bailing_v2"))
    last = max((i for i, (_, trained) in enumerate(pieces) if trained), default=-1)
    return [Segment(text, trained and (train_history or i == last)) for i, (text, trained) in enumerate(pieces)]


def chat_segments(messages, add_eos=True, eos_every_turn=False, train_history=True, template="bailing", tools=None,
                  thinking=None):
    """The rendered conversation as Segments, in order (see the module docstring for the options)."""
    check_template(template)
    if template == "bailing_v2":
        return _v2_segments(messages, tools, train_history, thinking=thinking)
    check_fields(template, tools, thinking)
    segs = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role = m["role"]
        # The turn after a trained answer carries that answer's EOS label on its <role> (eos_every_turn).
        after_answer = eos_every_turn and i > 0 and messages[i - 1]["role"] == "assistant" and segs[-1].trained
        if role == "system":
            segs.append(Segment(SYSTEM_PREFIX + m["content"], False))
        elif role == "user":
            segs.append(Segment(USER_PREFIX + m["content"] + ASSISTANT_PREFIX, False, after_answer))
        elif role == "tool":
            segs.append(Segment(TOOL_PREFIX + m["content"] + ASSISTANT_PREFIX, False, after_answer))
        else:
            segs.append(Segment(_assistant_text(m), train_history or i == last))
            if add_eos and i == last:
                segs.append(Segment(EOS_TOKEN, True))
    return segs


def render_chat(messages, add_eos=True, template="bailing", tools=None, add_generation_prompt=False, thinking=None):
    """The conversation as the exact string the model sees (whatever its labels are). For bailing_v2,
    exactly what the official Ling 2.0 Jinja template renders (``add_generation_prompt`` appends the
    assistant prefix); the bailing template's user and tool turns always end with it."""
    check_template(template)
    if template == "bailing_v2":
        return template_v2.render_chat(messages, tools, add_generation_prompt, check_thinking(thinking, template))
    check_thinking(thinking, template)
    # A conversation ending with a user/tool turn renders as a generation prompt.
    ends_with_answer = isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"
    validate_messages(messages, require_final_assistant=bool(ends_with_answer))
    return "".join(seg.text for seg in chat_segments(messages, add_eos=add_eos))


def segment_labels(segs, pieces, eos_id):
    """(input_ids, labels) from Segments and their token ids (one list per segment)."""
    input_ids, labels = [], []
    for seg, ids in zip(segs, pieces):
        input_ids.extend(ids)
        if seg.trained:
            labels.extend(ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
            if seg.eos_label and ids:
                labels[len(labels) - len(ids)] = eos_id
    return input_ids, labels


def _encode_segments(tokenizer, segs):
    texts = [seg.text for seg in segs]
    pieces = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(t) for t in texts]
    return segment_labels(segs, pieces, tokenizer.eos_id)


def _check_eos(tokenizer):
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None or tokenizer.token_to_id(EOS_TOKEN) != eos:
        # The template writes the EOS as text; it must map to the tokenizer's eos id, or the
        # model would be trained to stop on a token the generator never watches for.
        raise DataError(f"tokenizer eos id {eos} is not the id of {EOS_TOKEN!r}")


def check_stop_token(tokenizer, template):
    """bailing_v2 ends every turn with <|role_end|>: it must be one token of the vocabulary."""
    if tokenizer.token_to_id(template_v2.ROLE_END) is None:
        raise DataError(f"the bailing_v2 template needs {template_v2.ROLE_END!r} as a token of the tokenizer "
                        f"(it ends every turn and stops generation)")


def encode_chat(tokenizer, messages, eos_every_turn=False, train_history=True, template="bailing", tools=None,
                thinking=None):
    """(input_ids, labels) for one SFT conversation; labels are unshifted (the model shifts)."""
    check_template(template)
    if template == "bailing_v2":
        template_v2.validate_messages(messages, tools)
        check_stop_token(tokenizer, template)
        return _encode_segments(tokenizer, _v2_segments(messages, tools, train_history, thinking=thinking))
    check_thinking(thinking, template)
    validate_messages(messages)
    _check_eos(tokenizer)
    return _encode_segments(tokenizer, chat_segments(messages, eos_every_turn=eos_every_turn,
                                                     train_history=train_history))


def encode_prompt(tokenizer, messages, template="bailing", tools=None, thinking=None):
    """Token ids of a generation prompt (ends with the assistant prefix), nothing trained."""
    check_template(template)
    if template == "bailing_v2":
        template_v2.validate_messages(messages, tools, require_final_assistant=False)
        ids, _ = _encode_segments(tokenizer, _v2_segments(messages, tools, add_generation_prompt=True,
                                                          thinking=thinking))
        return ids
    check_thinking(thinking, template)
    validate_messages(messages, require_final_assistant=False)
    ids, _ = _encode_segments(tokenizer, chat_segments(messages))
    return ids
