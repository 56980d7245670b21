"""The files an export holds beside its weights, so that it serves as it is.

Three sources, each optional:

* ``carry_from``: a checkpoint directory being converted (HF or native). Every top-level file that
  is not a weight, an index or config.json travels byte for byte (tokenizer files, model code,
  generation_config.json, README, LICENSE, ...): a conversion changes none of them.
* ``model_dir``: the directory the trained model was initialised from (model.init_from). Only what
  training leaves true travels: its model code (``*.py``, so ``trust_remote_code`` keeps working),
  its license files, and its generation_config.json fields (merged, see below).
* ``tokenizer_dir``: the tokenizer the run trained with. Its vocabulary files travel byte for byte;
  tokenizer_config.json gets the chat template the run trained with (data/hf_template.py: bailing,
  or bailing_v2 for Ling 2.0, which renders as the official Ling 2.0 template) and the eos/pad/bos
  tokens the run used (bailing_v2: eos <|role_end|>, the token that ends its turns);
  special_tokens_map.json agrees with it; generation_config.json gets the eos/pad/bos ids
  (bailing_v2: <|role_end|> and the tokenizer's own eos both stop; do_sample false unless the
  source says otherwise). A file that comes out equal to its source (as JSON) is copied byte for
  byte instead.

Then config.json loses the ``auto_map`` entries whose module file is not in the directory (a model
trained from scratch has no modeling code, and a config pointing at missing files breaks
``trust_remote_code`` loading). Nothing is ever fetched.
"""
from __future__ import annotations

import json
import os
import shutil

from checkpoints_convert.io import CheckpointError, MissingCheckpointError
from data import load_tokenizer
from data.errors import DataError
from data.hf_template import chat_template
from data.template import resolve_template, stop_token
from data.tokenizer import run_tokenizer_dir

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# The vocabulary of a tokenizer: copied unchanged from the run's tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp")
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")


def _is_ours(name: str) -> bool:
    """Files a writer makes itself: weights, their index, config.json, hidden temporaries."""
    return (name == CONFIG_NAME or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")
            or name.startswith("."))


def _regular_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))
                  and not os.path.islink(os.path.join(directory, n)))


def carried_files(src: str) -> list[str]:
    """The top-level files of checkpoint ``src`` that a conversion copies unchanged."""
    return [n for n in _regular_files(src) if not _is_ours(n)]


def model_files(src: str) -> list[str]:
    """The files of ``src`` that still describe a model trained from it: code and license."""
    return [n for n in _regular_files(src)
            if n.endswith(".py") or n.upper().startswith(_LICENSE_PREFIXES)]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _write_json_or_copy(out: str, data: dict, source: str | None) -> None:
    """Write ``data`` to ``out``; when it equals ``source``'s JSON, copy ``source``'s bytes instead."""
    if source is not None and os.path.isfile(source) and _read_json(source) == data:
        shutil.copyfile(source, out)
        return
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _copy(src_dir: str, names: list[str], out_dir: str) -> list[str]:
    for n in names:
        shutil.copyfile(os.path.join(src_dir, n), os.path.join(out_dir, n))
    return names


def _as_token(value):
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer_side(out_dir: str, tokenizer_dir: str, model_max_length: int | None, template: str = "bailing"):
    """Copy the vocabulary, write tokenizer_config.json / special_tokens_map.json; the loaded tokenizer."""
    try:
        tok = load_tokenizer(tokenizer_dir)
    except DataError as e:
        raise CheckpointError(f"tokenizer {tokenizer_dir}: {e}") from None
    if tok.eos_id is None:
        raise CheckpointError(f"tokenizer {tokenizer_dir}: no eos token (needed to stop generation)")
    tok_dir = tokenizer_dir if os.path.isdir(tokenizer_dir) else os.path.dirname(tokenizer_dir)
    _copy(tok_dir, [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tok_dir, n))], out_dir)

    cfg_src = os.path.join(tok_dir, TOKENIZER_CONFIG)
    tcfg = _read_json(cfg_src) if os.path.isfile(cfg_src) else {"tokenizer_class": "PreTrainedTokenizerFast"}
    # The tokens the run used (load_tokenizer's reading), spelled as strings; bailing_v2's answers end
    # with its own stop token.
    eos = stop_token(template) if template == "bailing_v2" else tok.eos_token
    if tok.token_to_id(eos) is None:
        raise CheckpointError(f"tokenizer {tokenizer_dir}: no {eos!r} token, which the {template} template ends "
                              f"answers with")
    tcfg.update(eos_token=eos, pad_token=tok.pad_token, bos_token=tok.bos_token,
                chat_template=chat_template(template))
    if "model_max_length" not in tcfg and model_max_length:
        tcfg["model_max_length"] = model_max_length
    _write_json_or_copy(os.path.join(out_dir, TOKENIZER_CONFIG), tcfg, cfg_src)

    map_src = os.path.join(tok_dir, SPECIAL_TOKENS_MAP)
    smap = _read_json(map_src) if os.path.isfile(map_src) else {}
    for key, token in (("eos_token", eos), ("pad_token", tok.pad_token), ("bos_token", tok.bos_token)):
        if token is None:
            smap.pop(key, None)
        elif _as_token(smap.get(key)) != token:
            smap[key] = token
    if "additional_special_tokens" not in smap and isinstance(tcfg.get("additional_special_tokens"), list):
        smap["additional_special_tokens"] = tcfg["additional_special_tokens"]
    _write_json_or_copy(os.path.join(out_dir, SPECIAL_TOKENS_MAP), smap, map_src)
    return tok


def _generation_config(out_dir: str, source: str | None, tok, template: str = "bailing") -> None:
    gen = _read_json(source) if source is not None and os.path.isfile(source) else {}
    eos = gen.get("eos_token_id")
    if template == "bailing_v2":  # the end of a turn, and the tokenizer's own eos (Ling 2.0's SFT config has both)
        want = list(dict.fromkeys([tok.token_to_id(stop_token(template)), tok.eos_id]))
        if not (isinstance(eos, list) and all(i in eos for i in want)):
            gen["eos_token_id"] = want
    elif not (isinstance(eos, list) and tok.eos_id in eos):  # a list that holds ours stops on ours too
        gen["eos_token_id"] = tok.eos_id
    gen["pad_token_id"] = tok.pad_id
    if tok.bos_id is not None:
        gen["bos_token_id"] = tok.bos_id
    else:
        gen.pop("bos_token_id", None)
    gen.setdefault("do_sample", False)  # greedy unless the source model recommends sampling
    _write_json_or_copy(os.path.join(out_dir, GENERATION_CONFIG), gen, source)


def drop_dangling_auto_map(out_dir: str) -> list[str]:
    """Remove config.json ``auto_map`` entries whose ``module.py`` is not in ``out_dir``; the removed keys."""
    path = os.path.join(out_dir, CONFIG_NAME)
    cfg = _read_json(path)
    auto = cfg.get("auto_map")
    if not isinstance(auto, dict):
        return []

    def present(ref) -> bool:
        refs = ref if isinstance(ref, list) else [ref]
        for r in refs:
            if not isinstance(r, str) or "--" in r:  # None slots; "repo--module.Class" names another repo
                continue
            if not os.path.isfile(os.path.join(out_dir, r.rsplit(".", 1)[0] + ".py")):
                return False
        return True

    keep = {k: v for k, v in auto.items() if present(v)}
    dropped = sorted(set(auto) - set(keep))
    if dropped:
        if keep:
            cfg["auto_map"] = keep
        else:
            del cfg["auto_map"]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
    return dropped


def export_sources(run_config: dict, family: str = "bailing_moe") -> dict:
    """What goes beside the weights of a trained run's export, from its resolved options (the
    config.yaml every checkpoint holds): {tokenizer, source_hf, template}. The tokenizer is the one
    it trained with (data.run_tokenizer_dir's rule; none for synthetic token rows), the source the
    directory it started from (model.init_from), the template the one it trained with (data.template
    'auto' resolved by the model's ``family``). The one rule for the trainer's export and dcp_to_hf's.
    (The chat template is the same whatever data.eos_every_turn was: that option changes labels, not
    text.)"""
    data, model = run_config.get("data") or {}, run_config.get("model") or {}
    init_from = model.get("init_from") or None
    synthetic = bool(data.get("synthetic"))  # random token rows: no tokenizer was trained with
    tokenizer = None if synthetic else run_tokenizer_dir(data.get("tokenizer") or "", init_from or "")
    return {"tokenizer": tokenizer, "source_hf": init_from,
            "template": resolve_template(data.get("template") or "auto", family)}


def check_sources(model_dir: str | None, tokenizer_dir: str | None) -> None:
    """Refuse missing sources before a conversion writes any weight."""
    if model_dir is not None and not os.path.isdir(model_dir):
        raise MissingCheckpointError(f"{model_dir}: the model's source directory does not exist")
    if tokenizer_dir is not None:
        tok_file = tokenizer_dir if tokenizer_dir.endswith(".json") else os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise CheckpointError(f"{tok_file}: the run's tokenizer is not there (pass --tokenizer DIR)")


def write_export_files(out_dir: str, *, carry_from: str | None = None, model_dir: str | None = None,
                       tokenizer_dir: str | None = None, model_max_length: int | None = None, hf: bool = True,
                       template: str = "bailing") -> list[str]:
    """Write the files beside the weights in ``out_dir`` (see the module docstring); their names.

    ``hf`` False (a native output) carries files but leaves config.json alone."""
    written: list[str] = []
    if carry_from is not None:
        written += _copy(carry_from, carried_files(carry_from), out_dir)
    check_sources(model_dir, tokenizer_dir)
    if model_dir is not None:
        written += _copy(model_dir, model_files(model_dir), out_dir)
    if tokenizer_dir is not None:
        tok = _tokenizer_side(out_dir, tokenizer_dir, model_max_length, template)
        gen_src = None
        for d in (model_dir, carry_from):
            if d is not None and os.path.isfile(os.path.join(d, GENERATION_CONFIG)):
                gen_src = os.path.join(d, GENERATION_CONFIG)
                break
        _generation_config(out_dir, gen_src, tok, template)
        written += [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(out_dir, n))]
        written += [TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG]
    if hf:
        drop_dangling_auto_map(out_dir)
    return sorted(set(written))
