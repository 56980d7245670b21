"""Is an HF export complete for serving? (``python -m checkpoints_convert.verify --serving DIR``)

Checks, each reported on one line (``ok`` / ``MISSING`` / ``BAD`` / ``skipped``): the weights
(validated as open_checkpoint validates them; Ling 2.0's expert biases stored in fp32), config.json
(HF bailing_moe, or BailingMoeV2ForCausalLM with the fields vLLM and SGLang read; every auto_map
module present), the tokenizer (loads with `tokenizers`, fits the embedding), the chat template in
tokenizer_config.json, generation_config.json (its eos id is the tokenizer's), and whether the
chat template renders sample conversations exactly as data.template.render_chat does (bailing:
data/hf_template.SAMPLE_CONVERSATIONS; bailing_v2, for a Ling 2.0 model:
data/template_v2.SAMPLE_CONVERSATIONS, with tools; needs jinja2, skipped without it).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from checkpoints_convert.checkpoint import open_checkpoint
from checkpoints_convert.export_files import GENERATION_CONFIG, TOKENIZER_CONFIG
from checkpoints_convert.io import CheckpointError
from data import load_tokenizer
from data.errors import DataError
from data import template_v2
from data.hf_template import SAMPLE_CONVERSATIONS, render_with_jinja
from data.template import render_chat

# What vLLM's and SGLang's bailing_moe model file reads from a V2 config.json, with the value the
# reference computes (the reference itself reads none of the first four).
V2_SERVING_FIELDS = {"score_function": "sigmoid", "moe_router_enable_expert_bias": True, "use_rmsnorm": True,
                     "norm_topk_prob": True, "use_qk_norm": None, "n_group": None, "topk_group": None,
                     "routed_scaling_factor": None, "partial_rotary_factor": None, "head_dim": None}


def _json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{path}: {e}"


def template_matches(template: str, family: str = "bailing_moe") -> tuple[bool | None, str]:
    """(True/False, what was checked or the first mismatch); (None, why) when jinja2 is absent.
    A Ling 2.0 model (``family`` bailing_moe_v2) is held to the bailing_v2 template."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return None, "jinja2 is not installed, the template was not rendered"
    if family == "bailing_moe_v2":
        return _v2_template_matches(template)
    for i, conv in enumerate(SAMPLE_CONVERSATIONS):
        try:
            got = render_with_jinja(template, conv, add_generation_prompt=conv[-1]["role"] != "assistant")
        except Exception as e:  # a template error of any kind is a failed check
            got = f"<error: {e}>"
        want = render_chat(conv)
        if got != want:
            return False, f"conversation {i}: rendered {got!r}, data/template.py renders {want!r}"
    return True, f"renders the {len(SAMPLE_CONVERSATIONS)} test conversations as data/template.py"


def _v2_template_matches(template: str) -> tuple[bool, str]:
    for i, (conv, tools) in enumerate(template_v2.SAMPLE_CONVERSATIONS):
        prompt = conv[-1]["role"] != "assistant"
        try:
            got = render_with_jinja(template, conv, add_generation_prompt=prompt, tools=tools)
        except Exception as e:  # a template error of any kind is a failed check
            got = f"<error: {e}>"
        want = render_chat(conv, template="bailing_v2", tools=tools, add_generation_prompt=prompt)
        if got != want:
            return False, f"conversation {i}: rendered {got!r}, the bailing_v2 template renders {want!r}"
    return True, (f"renders the {len(template_v2.SAMPLE_CONVERSATIONS)} test conversations as the bailing_v2 "
                  f"template (Ling 2.0's) does")


def _v2_config_problems(raw: dict) -> list[str]:
    out = []
    for key, want in V2_SERVING_FIELDS.items():
        if key not in raw:
            out.append(f"no {key}")
        elif want is not None and raw[key] != want:
            out.append(f"{key} {raw[key]!r} (the reference computes {want!r})")
    return out


def check_serving(path: str, out=None) -> int:
    """Print one line per check; 0 when complete for serving, 1 otherwise."""
    out = sys.stdout if out is None else out
    bad = 0

    def line(status, what, detail):
        nonlocal bad
        bad += status not in ("ok", "skipped")
        print(f"{status:8s}{what}: {detail}", file=out)

    cfg = None
    try:
        with open_checkpoint(path) as ck:
            kind, cfg = ck.kind, ck.cfg
            n = len(ck.names)
            not_fp32 = [f"{b} ({ck.dtypes[b]})" for b in ck.names if b.endswith("expert_bias")
                        and ck.dtypes[b] != torch.float32]
        if kind != "hf":
            line("BAD", "weights", f"a {kind} checkpoint; serving stacks read the HF layout (native_to_hf)")
        elif not_fp32:
            line("BAD", "weights", f"expert biases not in fp32 (bf16 rounds away balancing steps): "
                                   f"{', '.join(not_fp32)}")
        else:
            line("ok", "weights", f"all {n} tensors (counted by native name) present, shapes as config.json implies")
    except CheckpointError as e:
        line("BAD", "weights", str(e))
    raw, err = _json(os.path.join(path, "config.json"))
    if raw is not None and cfg is not None:
        auto = raw.get("auto_map") or {}
        missing = sorted({v.rsplit(".", 1)[0] + ".py" for v in auto.values() if isinstance(v, str) and "--" not in v
                          and not os.path.isfile(os.path.join(path, v.rsplit(".", 1)[0] + ".py"))})
        v2_problems = _v2_config_problems(raw) if cfg.family == "bailing_moe_v2" else []
        if missing:
            line("BAD", "config", f"auto_map names {', '.join(missing)}, not in {path}")
        elif v2_problems:
            line("BAD", "config", f"BailingMoeV2ForCausalLM config without what vLLM/SGLang read: "
                                  f"{'; '.join(v2_problems)}")
        else:
            code = "with its model code" if auto else "no auto_map (vLLM/SGLang implement bailing_moe natively)"
            arch = (raw.get("architectures") or ["?"])[0]
            line("ok", "config", f"model_type {raw.get('model_type')}, {arch}, {code}")
    elif err:
        line("BAD", "config", err)

    tok = None
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        line("MISSING", "tokenizer", f"no tokenizer.json in {path}")
    else:
        try:
            tok = load_tokenizer(path)
        except DataError as e:
            line("BAD", "tokenizer", str(e))
        else:
            if cfg is not None and tok.vocab_size > cfg.vocab_size:
                line("BAD", "tokenizer", f"{tok.vocab_size} ids but the model embeds {cfg.vocab_size}")
            elif tok.eos_id is None:
                line("BAD", "tokenizer", "no eos token")
            else:
                line("ok", "tokenizer", f"{tok.vocab_size} ids, eos {tok.eos_token!r} = {tok.eos_id}")

    tcfg, err = _json(os.path.join(path, TOKENIZER_CONFIG))
    template = None
    if tcfg is None:
        line("MISSING", "chat template", f"no readable {TOKENIZER_CONFIG}" + (f" ({err})" if os.path.exists(
            os.path.join(path, TOKENIZER_CONFIG)) else ""))
    else:
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: the "default" one serves
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if isinstance(template, str) and template:
            line("ok", "chat template", f"in {TOKENIZER_CONFIG}")
        else:
            template = None
            line("MISSING", "chat template", f"{TOKENIZER_CONFIG} has no chat_template")

    gen, err = _json(os.path.join(path, GENERATION_CONFIG))
    if gen is None:
        line("MISSING", "generation config", f"no readable {GENERATION_CONFIG}")
    else:
        eos = gen.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos]
        if tok is not None and tok.eos_id not in ids:
            line("BAD", "generation config", f"eos_token_id {eos} does not hold the tokenizer's eos id {tok.eos_id}")
        else:
            line("ok", "generation config", f"eos_token_id {eos}, do_sample {gen.get('do_sample', False)}")

    if template is not None:
        ok, detail = template_matches(template, cfg.family if cfg is not None else "bailing_moe")
        line("skipped" if ok is None else "ok" if ok else "BAD", "template renders as trained", detail)
    print("complete for serving" if not bad else f"NOT complete for serving: {bad} problem(s)", file=out)
    return 0 if not bad else 1
