"""Turn the data options into prepared directories and a tokenizer, once, before training starts.

Local rank 0 of each node does any tokenizing (JSONL sources are prepared into the cache directory,
keyed by the file's path, size, mtime and the tokenizer), under a file lock so that nodes or launches
sharing the cache prepare it once; the other ranks wait and then only open the memory-mapped results.
Problems (a missing file or tokenizer, a bad sample, mixture weights that cannot be sampled, too little
disk space, token ids the model cannot embed) are reported here, before a single step runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import torch.distributed as dist

import data
from data.dataset import read_manifest
from data.errors import BadInputError, MissingFileError
from data.files import FileLock
from data.prepare import summary
from data.template import resolve_template
from data.tokenizer import run_tokenizer_dir  # the one rule: the export (export_files.export_sources) applies it too
from trainer.errors import TrainerError

# A from-scratch model embeds the tokenizer's ids rounded up to this, for matmul-friendly shapes.
VOCAB_MULTIPLE = 64


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def resolve_tokenizer_dir(opts) -> str:
    tok = opts.data.tokenizer
    if tok and not os.path.exists(os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok):
        raise TrainerError(f"data.tokenizer: {tok}: no tokenizer.json there (give a Hugging Face tokenizer "
                           f"directory, or leave data.tokenizer empty for the model's or the demo tokenizer)")
    return run_tokenizer_dir(tok, opts.model.init_from)


def cache_dir(opts) -> str:
    """Where prepared data is cached: data.cache_dir, else <output-dir>/prepared."""
    return opts.data.cache_dir or os.path.join(opts.output_dir, "prepared")


def _fingerprint(path: str, tokenizer_dir: str, kind: str, eos_every_turn: bool = False,
                 template: str = "bailing") -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{kind}|"
    # The encodings that changed with template version 2 (data.dataset.TEMPLATE_VERSION) get a key of
    # their own, so a cache made the old way is never picked up; SFT without eos_every_turn encodes as
    # it always did and keeps the key its caches were made with. So does the bailing template's name.
    if kind == "sft" and eos_every_turn:
        key += "eos_every_turn|template-v2|"
    elif kind == "dpo":
        key += "template-v2|"
    if template != "bailing":
        key += f"template={template}|"
    h = hashlib.sha256(key.encode())
    tok_file = tokenizer_dir if os.path.isfile(tokenizer_dir) else os.path.join(tokenizer_dir, "tokenizer.json")
    with open(tok_file, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def prepared_sources(opts, rank: int, kind: str, default=None,
                     template: str = "bailing") -> tuple[dict[str, str], dict[str, float], str]:
    """{name: prepared dir}, {name: weight} and the tokenizer directory for a run.

    ``default(opts, template) -> (dirs, weights, tokenizer dir)`` gives the data when data.sources is
    empty (the entry scripts pass the demo corpus's, trainer/demo.py); local rank 0 makes it first,
    the other ranks then only open it. ``template``: the chat template resolved for the model
    (data.template.resolve_template).
    """
    tok_dir = resolve_tokenizer_dir(opts)
    if not opts.data.sources:
        if default is None:
            raise TrainerError("data.sources is empty: give the training data (JSONL files or prepared directories)")
        if _preparer(rank):
            dirs, weights, tok_dir = default(opts, template)
        _barrier()
        if not _preparer(rank):
            dirs, weights, tok_dir = default(opts, template)  # already written: only checks it
        for d in dirs.values():
            _check_template(d, opts.data.eos_every_turn, template)
        return dirs, weights, tok_dir

    dirs, weights, todo = {}, {}, []
    for i, src in enumerate(opts.data.sources):
        if isinstance(src, str):
            src = {"path": src}
        if not isinstance(src, dict) or "path" not in src:
            raise TrainerError(f"data.sources[{i}] must be a path or {{path: ..., weight: ...}}, got {src!r}")
        path = src["path"]
        name = src.get("name") or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        _check_name(name, i)
        if name in dirs:
            name = f"{name}_{i}"
        if not os.path.exists(path):
            raise MissingFileError(f"data.sources[{i}]: {path}: no such file or directory")
        weights[name] = _weight(src.get("weight", 1.0), i, name)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json")):
            _check_template(path, opts.data.eos_every_turn, template)
            dirs[name] = path
        else:
            key = _fingerprint(path, tok_dir, kind, opts.data.eos_every_turn, template)
            out = os.path.join(cache_dir(opts), f"{name}-{key}")
            dirs[name] = out
            todo.append((path, out))
    if sum(weights.values()) <= 0:
        raise TrainerError(f"data.sources: the weights ({', '.join(f'{n} {w:g}' for n, w in weights.items())}) sum to "
                           f"0: give at least one source a positive weight")
    failure = None
    if _preparer(rank):
        tokenizer = data.load_tokenizer(tok_dir)
        for path, out in todo:
            try:
                _prepare_once(data, path, out, tokenizer, kind, opts, template)
            except data.DataError as e:
                failure = str(e) + ("" if opts.data.skip_bad else " (data.skip_bad true skips and counts bad samples)")
                break
            except OSError as e:  # no space (data.files.NoSpaceError), permissions
                failure = f"preparing {path} -> {out}: {e}"
                break
    # Every rank learns of a failure on any preparing rank, so none is left waiting in a collective.
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, failure)
        failure = next((f for f in every if f), None)
    if failure:
        raise TrainerError(failure)
    return dirs, weights, tok_dir


def _preparer(rank: int) -> bool:
    """Local rank 0 of each node prepares: once per file system when the cache is shared (the lock in
    _prepare_once makes the other nodes wait and then find it), and per node when it is not."""
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


def _prepare_once(data, path: str, out: str, tokenizer, kind: str, opts, template: str = "bailing") -> None:
    """Prepare ``path`` into ``out`` unless it is there; under a file lock, so two launches sharing the
    cache directory prepare it once (the second finds the first's result) instead of racing."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with FileLock(out + ".lock"):
        if os.path.exists(os.path.join(out, "manifest.json")):
            return
        manifest = data.prepare_data([path], tokenizer, out, kind=kind, skip_bad=opts.data.skip_bad, progress=True,
                                     eos_every_turn=opts.data.eos_every_turn, template=template)
    print(f"prepared {path} -> {out}\n{summary(manifest)}", flush=True)


def _weight(value, i: int, name: str) -> float:
    """A source's mixture weight: a finite number >= 0 (checked before anything is tokenized)."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if not math.isfinite(w) or w < 0:
        raise TrainerError(f"data.sources[{i}] ({name}): weight {value!r} must be a number >= 0")
    return w


def _check_name(name, i: int) -> None:
    """A source's name names its cache entry (data.cache_dir/NAME-KEY): one plain path component, or
    the prepared data and its lock could be written anywhere (``../../x``)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name) or "\0" in name):
        raise BadInputError(f"data.sources[{i}]: name {name!r} must be a plain file name (no path separators, "
                            f"not '.' or '..'): it names the source's cache entry in data.cache_dir")


def _check_template(prepared: str, eos_every_turn: bool, template: str = "bailing") -> None:
    """A prepared directory was encoded with one template choice; it must be the run's (the encoding's
    version is data.dataset.read_manifest's to check). DPO pairs encode the same with either
    eos_every_turn."""
    try:
        manifest = read_manifest(prepared)
    except data.DataError as e:
        raise TrainerError(str(e)) from None
    recorded = manifest.get("template", {})
    made, name = recorded.get("eos_every_turn", False), recorded.get("name", "bailing")
    if name != template:
        raise TrainerError(f"{prepared} was prepared with the {name} chat template, but this run uses {template} "
                           f"(data.template, or the model's family when it is auto): prepare it again (python -m "
                           f"data.prepare --template {template}) or change the option")
    if manifest["kind"] == "sft" and made != eos_every_turn:
        raise TrainerError(f"{prepared} was prepared with eos_every_turn {str(made).lower()}, but this run has "
                           f"data.eos_every_turn {str(eos_every_turn).lower()}: prepare it again (python -m "
                           f"data.prepare{' --eos-every-turn' if eos_every_turn else ''}) or change the option")


def sources_and_vocab(opts, rank: int, kind: str, cfg, default=None):
    """The task's data and tokenizer, and the model config fitted to them: (dirs, weights, tokenizer, cfg);
    ``default`` as for prepared_sources.

    From scratch (no model.init_from and no vocab_size override) the model embeds exactly the
    tokenizer's ids, rounded up to VOCAB_MULTIPLE, with its EOS and pad ids; either way every data
    source's ids must fit the embedding."""
    template = resolve_template(opts.data.template, cfg.family)
    dirs, weights, tok_dir = prepared_sources(opts, rank, kind, default, template)
    tokenizer = data.load_tokenizer(tok_dir)
    if not opts.model.init_from and "vocab_size" not in opts.model.overrides:
        vocab = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        cfg = dataclasses.replace(cfg, vocab_size=vocab, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    check_vocab(dirs, cfg.vocab_size)
    return dirs, weights, tokenizer, cfg


def check_vocab(dirs: dict[str, str], vocab_size: int) -> None:
    """Token ids must fit the model's embedding: checked from each manifest's tokenizer record."""
    for name, d in dirs.items():
        with open(os.path.join(d, "manifest.json")) as f:
            tv = json.load(f)["tokenizer"]["vocab_size"]
        if tv > vocab_size:
            raise TrainerError(f"data source {name!r} ({d}) was tokenized with a vocabulary of {tv} ids, "
                             f"but the model embeds only {vocab_size}; use the model's tokenizer (data.tokenizer)")
