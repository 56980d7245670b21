"""The "bailing_v2" chat template (Ling 2.0: Ling-mini-2.0, Ling-flash-2.0, Ring-2.0), with assistant-only labels.

Rendered form (R_END = ``<|role_end|>``, the template's end of turn and the model's stop token)::

    <role>SYSTEM</role>[{system}\\n][{tools block}]detailed thinking off R_END    always first
    <role>HUMAN</role>{content} R_END                                             user
    <role>SYSTEM</role>{content} R_END                                            a later system message
    <role>ASSISTANT</role>{answer}[\\n]<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>... R_END
    <role>OBSERVATION</role>\\n<tool_response>\\n{content}\\n</tool_response>... R_END   a run of tool messages

as the official template of inclusionAI/Ling-V2 (resource/tokenizer/config_sft) renders it; the
rules, in our words, are in tests/fixtures/bailing_moe_v2_tiny/README.md and the tests compare
with 36 renderings of the official template. In particular:

* the system block is always there and ends with "detailed thinking off" (the official template
  hard-codes "off"; ``thinking="on"`` here, or ``thinking_option='on'`` given to the exported
  Jinja template, writes "on" instead);
* an assistant message's reasoning (``reasoning_content``, or the text between ``<think>`` and
  ``</think>`` at the start of its content) is kept only after the last real user query (a user
  message that is not a wrapped ``<tool_response>``), as ``\\n<think>\\n...\\n</think>\\n\\n``;
  earlier turns lose it;
* tool call arguments given as a string are written as they are, an object as json.dumps writes it;
  the tool's name is written as it is.

Training labels: the assistant's text after ``<role>ASSISTANT</role>`` (its reasoning when kept,
the answer, the tool calls) and the R_END that closes it, in every assistant turn; nothing else.
Every turn already ends with R_END, so there is no eos_every_turn choice here.

Importing this module imports nothing of ours but data.errors; data/template.py dispatches to it.
"""
import json

from .errors import DataError

ROLE_END = "<|role_end|>"
SYSTEM_PREFIX = "<role>SYSTEM</role>"
USER_PREFIX = "<role>HUMAN</role>"
ASSISTANT_PREFIX = "<role>ASSISTANT</role>"
TOOL_PREFIX = "<role>OBSERVATION</role>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
ROLES = ("system", "user", "assistant", "tool")

TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
              "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n")


def _tojson(x) -> str:
    # transformers' tojson filter: json.dumps with ensure_ascii=False and the default separators.
    return json.dumps(x, ensure_ascii=False)


def _text(value) -> str:
    """Assistant and tool content: a string, anything else (None) counts as empty."""
    return value if isinstance(value, str) else ""


def validate_messages(messages, tools=None, require_final_assistant=True):
    """Check structure; raise DataError (without file/line: the reader adds those)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"message {i} must be an object with a 'role'")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if role in ("user", "system") and not isinstance(content, str):
            raise DataError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role in ("assistant", "tool") and content is not None and not isinstance(content, str):
            raise DataError(f"message {i} content must be a string or null, got {type(content).__name__}")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise DataError(f"message {i}: 'reasoning_content' must be a string")
        if m.get("tool_calls") is not None:
            if role != "assistant" or not isinstance(m["tool_calls"], list):
                raise DataError(f"message {i}: 'tool_calls' must be a list on an assistant message")
            for call in m["tool_calls"]:
                render_tool_call(call)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError("'tools' must be a list of objects (function signatures)")
    last = messages[-1]["role"]
    if require_final_assistant and last != "assistant":
        raise DataError(f"conversation must end with an assistant message, ends with {last!r}")
    if not require_final_assistant and last not in ("user", "tool"):
        raise DataError(f"a prompt must end with a user or tool message, ends with {last!r}")


def render_tool_call(call) -> str:
    """``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`` from {"name", "arguments"} or
    OpenAI's {"function": {...}}: ARGS a string as it is, else its JSON."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict) and call["function"]:
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError("a tool call must be an object with a string 'name'")
    args = call.get("arguments", {})
    args = args if isinstance(args, str) else _tojson(args)
    return '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + args + "}\n</tool_call>"


def _last_query(messages) -> int:
    """Index of the last user message that is a real query (not a wrapped tool response)."""
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i].get("content")
        if messages[i]["role"] == "user" and isinstance(c, str) \
                and not (c.startswith(RESPONSE_OPEN) and c.endswith(RESPONSE_CLOSE)):
            return i
    return len(messages) - 1


def _split_reasoning(m) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message."""
    content = _text(m.get("content"))
    if isinstance(m.get("reasoning_content"), str):
        return m["reasoning_content"], content
    if THINK_CLOSE not in content:
        return "", content
    before_close = content.split(THINK_CLOSE)[0].rstrip("\n")
    return before_close.split(THINK_OPEN)[-1].lstrip("\n"), content.split(THINK_CLOSE)[-1].lstrip("\n")


def _assistant_body(m, keep_reasoning: bool) -> str:
    reasoning, answer = _split_reasoning(m)
    if keep_reasoning and reasoning:
        body = "\n" + THINK_OPEN + "\n" + reasoning.strip("\n") + "\n" + THINK_CLOSE + "\n\n" + answer.lstrip("\n")
    else:
        body = answer
    for k, call in enumerate(m.get("tool_calls") or []):
        if k > 0 or answer:
            body += "\n"
        body += render_tool_call(call)
    return body


def system_block(messages, tools=None, thinking: str = "off") -> str:
    text = SYSTEM_PREFIX
    if messages and messages[0]["role"] == "system":
        text += messages[0]["content"] + "\n"
    if tools:
        text += TOOLS_HEAD + "".join("\n" + _tojson(t) for t in tools) + TOOLS_TAIL
    return text + "detailed thinking " + thinking + ROLE_END


def chat_segments(messages, tools=None, add_generation_prompt=False, thinking="off"):
    """The rendered conversation as (text, trained) segments, in order."""
    segs = [(system_block(messages, tools, thinking), False)]
    query = _last_query(messages)
    n = len(messages)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            segs.append((USER_PREFIX + m["content"] + ROLE_END, False))
        elif role == "system" and i > 0:
            segs.append((SYSTEM_PREFIX + m["content"] + ROLE_END, False))
        elif role == "assistant":
            segs.append((ASSISTANT_PREFIX, False))
            segs.append((_assistant_body(m, keep_reasoning=i > query) + ROLE_END, True))
        elif role == "tool":
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == n - 1 or messages[i + 1]["role"] != "tool"
            text = (TOOL_PREFIX if first else "") + "\n" + RESPONSE_OPEN + "\n" + _text(m.get("content")) \
                + "\n" + RESPONSE_CLOSE + (ROLE_END if last else "")
            segs.append((text, False))
    if add_generation_prompt:
        segs.append((ASSISTANT_PREFIX, False))
    return segs


def render_chat(messages, tools=None, add_generation_prompt=False, thinking="off"):
    """The conversation as the exact string the official template renders (tokenize=False)."""
    ends_with_answer = isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"
    validate_messages(messages, tools, require_final_assistant=bool(ends_with_answer))
    return "".join(t for t, _ in chat_segments(messages, tools, add_generation_prompt, thinking))


# Conversations (messages, tools) the serving check renders both ways.
_WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SAMPLE_CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}], None),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
      {"role": "assistant", "content": "<think>\nsmall ones\n</think>\n\n7"},
      {"role": "user", "content": "Another, in German: \"sieben\"?"},
      {"role": "assistant", "content": "Elf (11). Unicode: é, 中文", "reasoning_content": "eleven is prime"}], None),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
          "name": "weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "{\"temp_c\": 18}"}, {"role": "tool", "content": "sunny"},
      {"role": "assistant", "content": "18 °C, sunny.",
       "tool_calls": [{"name": "log", "arguments": "{\"ok\": true}"}]}],
     [_WEATHER]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], [_WEATHER]),
]


# ------------------------------------------------------------------------------------------ Jinja
def _lit(text: str) -> str:
    """A Jinja string literal: JSON's double-quoted form is one (escapes \\n, quotes, backslashes)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template() -> str:
    """The Jinja2 chat_template an export's tokenizer_config.json carries: it renders exactly what
    render_chat renders (and what the official Ling 2.0 template renders), add_generation_prompt
    appending ``<role>ASSISTANT</role>``; ``thinking_option`` ('off' unless given) fills the system line."""
    L = _lit
    lines = [
        "{%- set think = thinking_option if thinking_option is defined else 'off' -%}",
        "{{- " + L(SYSTEM_PREFIX) + " -}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] ~ '\\n' -}}{%- endif -%}",
        "{%- if tools -%}",
        "{{- " + L(TOOLS_HEAD) + " -}}",
        "{%- for tool in tools -%}{{- '\\n' ~ (tool | tojson) -}}{%- endfor -%}",
        "{{- " + L(TOOLS_TAIL) + " -}}",
        "{%- endif -%}",
        "{{- 'detailed thinking ' ~ think ~ " + L(ROLE_END) + " -}}",
        # the last real query: the last user message that is not a wrapped tool response
        "{%- set q = namespace(index=(messages | length) - 1, found=false) -%}",
        "{%- for m in messages | reverse -%}",
        "{%- if not q.found and m['role'] == 'user' and m['content'] is string and not (m['content'].startswith("
        + L(RESPONSE_OPEN) + ") and m['content'].endswith(" + L(RESPONSE_CLOSE) + ")) -%}",
        "{%- set q.found = true -%}{%- set q.index = (messages | length) - 1 - loop.index0 -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- for m in messages -%}",
        "{%- set content = m['content'] if m['content'] is string else '' -%}",
        "{%- if m['role'] == 'user' -%}",
        "{{- " + L(USER_PREFIX) + " ~ m['content'] ~ " + L(ROLE_END) + " -}}",
        "{%- elif m['role'] == 'system' -%}",
        "{%- if not loop.first -%}{{- " + L(SYSTEM_PREFIX) + " ~ m['content'] ~ " + L(ROLE_END) + " -}}{%- endif -%}",
        "{%- elif m['role'] == 'assistant' -%}",
        "{%- set r = namespace(text='', answer=content) -%}",
        "{%- if m.reasoning_content is string -%}{%- set r.text = m.reasoning_content -%}",
        "{%- elif " + L(THINK_CLOSE) + " in content -%}",
        "{%- set r.text = (content.split(" + L(THINK_CLOSE) + ") | first).rstrip('\\n').split(" + L(THINK_OPEN)
        + ") | last -%}",
        "{%- set r.text = r.text.lstrip('\\n') -%}",
        "{%- set r.answer = (content.split(" + L(THINK_CLOSE) + ") | last).lstrip('\\n') -%}",
        "{%- endif -%}",
        "{{- " + L(ASSISTANT_PREFIX) + " -}}",
        "{%- if loop.index0 > q.index and r.text -%}",
        "{{- '\\n' ~ " + L(THINK_OPEN) + " ~ '\\n' ~ r.text.strip('\\n') ~ '\\n' ~ " + L(THINK_CLOSE)
        + " ~ '\\n\\n' ~ r.answer.lstrip('\\n') -}}",
        "{%- else -%}{{- r.answer -}}{%- endif -%}",
        "{%- for call in (m.tool_calls or []) -%}",
        "{%- if not loop.first or r.answer -%}{{- '\\n' -}}{%- endif -%}",
        "{%- set fn = call.function if call.function else call -%}",
        "{%- set args = fn.arguments if fn.arguments is defined else {} -%}",
        "{{- '<tool_call>\\n{\"name\": \"' ~ fn.name ~ '\", \"arguments\": '"
        " ~ (args if args is string else (args | tojson)) ~ '}\\n</tool_call>' -}}",
        "{%- endfor -%}",
        "{{- " + L(ROLE_END) + " -}}",
        "{%- elif m['role'] == 'tool' -%}",
        "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- " + L(TOOL_PREFIX) + " -}}{%- endif -%}",
        "{{- '\\n' ~ " + L(RESPONSE_OPEN) + " ~ '\\n' ~ content ~ '\\n' ~ " + L(RESPONSE_CLOSE) + " -}}",
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- " + L(ROLE_END) + " -}}{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + L(ASSISTANT_PREFIX) + " -}}{%- endif -%}",
    ]
    return "\n".join(lines)
