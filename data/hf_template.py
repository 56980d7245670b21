"""The bailing chat template of data/template.py as a Jinja2 ``chat_template`` for tokenizer_config.json.

Serving stacks (transformers' apply_chat_template, vLLM, SGLang) render a conversation with the
tokenizer's ``chat_template``. The one written into our exports renders exactly what
``data.template.render_chat`` renders for training:

* system / user / tool turns as their ``<role>...</role>`` prefixes; every user and tool turn ends
  with ``<role>ASSISTANT</role>``, so the generation prompt is already there and
  ``add_generation_prompt`` changes nothing (as in training, where a prompt is the conversation up
  to that marker);
* assistant content, then its tool calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
* ``<|endoftext|>`` after the last message when it is an assistant turn, never between turns: the
  text training saw, with or without data.eos_every_turn (which moves labels, not text), and what a
  serving stack feeds back as history after stripping the EOS it stopped on.

Tool call arguments given as an object render as ``json.dumps`` writes them (transformers' own
``tojson`` filter is json.dumps with ensure_ascii=False). A string of arguments (OpenAI's form) is
written as it is: render_chat re-dumps it, so the two agree when the string is JSON in json.dumps'
default spelling (``{"a": 1}``); Jinja cannot parse JSON.

This module builds the text only; rendering it needs jinja2, which data/ does not import.
"""
import json

from . import template_v2
from .template import (ASSISTANT_PREFIX, EOS_TOKEN, SYSTEM_PREFIX, TOOL_CLOSE, TOOL_OPEN, TOOL_PREFIX,
                       USER_PREFIX)

# Conversations the serving check renders both ways (and the tests, with more of their own).
SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another, in German: \"sieben\"?"},
     {"role": "assistant", "content": "Elf (11). Unicode: é, 中文"}],
    [{"role": "system", "content": "You can call tools."},
     {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": 2}}}]},
     {"role": "tool", "content": "{\"temp_c\": 18}"},
     {"role": "assistant", "content": "18 °C.",
      "tool_calls": [{"name": "log", "arguments": "{\"ok\": true}"}]}],
    # generation prompts: end with a user or tool turn
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Look it up."},
     {"role": "assistant", "content": "<think>need a tool</think>", "tool_calls": [{"name": "search", "arguments": {}}]},
     {"role": "tool", "content": "nothing found"}],
]


def _literal(text: str) -> str:
    """A Jinja string literal for ``text`` (our markers hold no quotes or backslashes; checked)."""
    if "'" in text or "\\" in text:
        raise ValueError(f"marker {text!r} cannot be a plain Jinja literal")
    return "'" + text + "'"


def chat_template(template: str = "bailing") -> str:
    """The Jinja2 chat template rendering what data.template.render_chat(..., template=template)
    renders (bailing_v2: data/template_v2.py's, which renders as the official Ling 2.0 template)."""
    if template == "bailing_v2":
        return template_v2.chat_template()
    call = ("{{- " + _literal(TOOL_OPEN + '{"name": ') + " ~ (fn['name'] | tojson) ~ "
            + _literal(', "arguments": ') + " ~ (args if args is string else (args | tojson)) ~ "
            + _literal("}" + TOOL_CLOSE) + " -}}")
    lines = [
        "{%- for message in messages -%}",
        "{%- set content = message['content'] if message['content'] is string else '' -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}",
        "{{- " + _literal(SYSTEM_PREFIX) + " ~ content -}}",
        "{%- elif message['role'] == 'user' -%}",
        "{{- " + _literal(USER_PREFIX) + " ~ content ~ " + _literal(ASSISTANT_PREFIX) + " -}}",
        "{%- elif message['role'] == 'tool' -%}",
        "{{- " + _literal(TOOL_PREFIX) + " ~ content ~ " + _literal(ASSISTANT_PREFIX) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- content -}}",
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}",
        "{%- for tc in message['tool_calls'] -%}",
        "{%- set fn = tc['function'] if tc['function'] is mapping else tc -%}",
        "{%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}",
        call,
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- if loop.last -%}{{- " + _literal(EOS_TOKEN) + " -}}{%- endif -%}",
        "{%- else -%}",
        "{{- raise_exception('unknown role ' ~ message['role'] ~ ' (expected system, user, assistant or tool)') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines)


def jinja_environment():
    """A Jinja2 environment set up as transformers' apply_chat_template sets up its own (sandboxed,
    trim_blocks, lstrip_blocks, json.dumps as ``tojson``, ``raise_exception``). Needs jinja2."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render_with_jinja(template: str, messages, add_generation_prompt: bool = False, tools=None,
                      **special_tokens) -> str:
    """``template`` rendered the way apply_chat_template renders it (tokenize=False)."""
    return jinja_environment().from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=None,
        **special_tokens)
