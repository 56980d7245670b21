"""Deterministic demo corpora and tokenizer, small enough for a tiny model on a CPU.

Three kinds of SFT samples (reasoning word problems with <think> steps, templated general
instructions, tool calls answered by a tool turn) and DPO pairs whose rejected side carries a
structural format error. Everything derives from one integer seed, so the shipped tokenizer in
data/demo/tokenizer/ can be rebuilt bit for bit with ``python -m data.demo build-tokenizer``.

The demo is a package of its own, kept out of the production paths: only the entry scripts
(trainer/sft.py and trainer/dpo.py, through trainer/demo.py; the evaluation CLI) and the
benchmarks use it (tests/test_layering.py keeps it so). With no data sources they call
``ensure_demo_data(out_dir)`` to get JSONL plus prepared shards in a few seconds, and
``sft_sources``/``dpo_source`` to pick from them.

The corpus of the pipeline in miniature (base, stage 1, stage 2, DPO, and held-out evaluation
prompts for four ability families) is data.demo.pipeline's; ``python -m data.demo pipeline`` writes it.
"""
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..dataset import read_manifest
from ..files import FileLock, OwnedTempDir
from ..formats import dpo_conversations, normalize_dpo, normalize_sft
from ..prepare import prepare
from ..template import EOS_TOKEN, SPECIAL_TOKENS, render_chat
from ..tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer
from .samples import dpo_pair, general_sample, reasoning_sample, tool_sample

GENERATOR_VERSION = 2  # 2: prepared with the template encoding of data.dataset.TEMPLATE_VERSION 2
DEFAULT_SEED = 1234
SIZES = {"general": 1500, "tool": 500, "reasoning": 2000, "dpo": 1000}
MIXTURE = {"sft_general": 340, "sft_reasoning": 550}  # the stage-2 SFT general : reasoning ratio
TOKENIZER_DIR = DEMO_TOKENIZER_DIR  # data/demo/tokenizer/, shipped
VOCAB_SIZE = 2000


# ---------------------------------------------------------------- corpus

def generate(seed=DEFAULT_SEED, sizes=None):
    """{"sft_general": [...], "sft_reasoning": [...], "dpo": [...]} of JSON-ready records."""
    sizes = dict(SIZES, **(sizes or {}))
    # Separate generators per part, so changing one size leaves the other parts unchanged.
    rg, rt, rr, rd = (random.Random(f"{seed}:{part}") for part in ("general", "tool", "reasoning", "dpo"))
    general = [general_sample(rg) for _ in range(sizes["general"])]
    tools = [tool_sample(rt) for _ in range(sizes["tool"])]
    mixed = general + tools
    random.Random(f"{seed}:mix").shuffle(mixed)
    return {"sft_general": mixed,
            "sft_reasoning": [reasoning_sample(rr) for _ in range(sizes["reasoning"])],
            "dpo": [dpo_pair(rd) for _ in range(sizes["dpo"])]}


def _record_texts(corpus):
    for rec in corpus["sft_general"] + corpus["sft_reasoning"]:
        yield render_chat(normalize_sft(rec)["messages"])
    for rec in corpus["dpo"]:
        for msgs in dpo_conversations(normalize_dpo(rec)):
            yield render_chat(msgs)


def train_tokenizer(corpus=None, seed=DEFAULT_SEED, vocab_size=VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the rendered demo corpus."""
    corpus = corpus or generate(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_record_texts(corpus)), trainer=trainer)
    return tok


def tokenizer_config():
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
            "bos_token": None, "model_max_length": 4096,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != EOS_TOKEN]}


def save_tokenizer(tok, out_dir):
    # An owned temporary (data.files): a killed save's is removed by the next one.
    with OwnedTempDir(out_dir, replace=True) as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"), pretty=True)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config(), f, indent=2)
            f.write("\n")


def write_jsonl(records, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _stamp(seed, sizes, tokenizer):
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "sizes": sizes,
            "tokenizer_fingerprint": tokenizer.fingerprint()}


def _paths(out_dir):
    return {"dir": out_dir, "tokenizer": TOKENIZER_DIR,
            "jsonl": {k: os.path.join(out_dir, k + ".jsonl") for k in ("sft_general", "sft_reasoning", "dpo")},
            "sft_general": os.path.join(out_dir, "prepared", "sft_general"),
            "sft_reasoning": os.path.join(out_dir, "prepared", "sft_reasoning"),
            "dpo": os.path.join(out_dir, "prepared", "dpo"),
            "mixture": dict(MIXTURE)}


def _up_to_date(out_dir, expect):
    try:
        with open(os.path.join(out_dir, "demo.json"), encoding="utf-8") as f:
            stamp = json.load(f)
        if {k: stamp.get(k) for k in expect} != expect:
            return False
        paths = _paths(out_dir)
        for name, h in stamp["data_hashes"].items():
            m = read_manifest(paths[name])
            if m["data_hash"] != h:
                return False
            for arr, info in m["arrays"].items():
                size = os.path.getsize(os.path.join(paths[name], arr + ".bin"))
                if size != info["length"] * int(info["dtype"][-1]):
                    return False
        return all(os.path.exists(p) for p in paths["jsonl"].values())
    except (OSError, ValueError, KeyError):
        return False


def ensure_demo_data(out_dir="demo_data", seed=DEFAULT_SEED, sizes=None, force=False, quiet=True, template="bailing"):
    """Write the demo JSONL and prepared shards under ``out_dir`` unless already there and intact,
    encoded with chat ``template`` (data.template).

    Returns {"dir", "tokenizer", "jsonl": {...}, "sft_general", "sft_reasoning", "dpo", "mixture"}:
    prepared directories for SFTLoader/DPOLoader and the 340:550 general:reasoning weights.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, "prepared"), exist_ok=True)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    sizes = dict(SIZES, **(sizes or {}))
    expect = _stamp(seed, sizes, tokenizer)
    if template != "bailing":  # (the bailing stamp is the one written before templates had names)
        expect["template"] = template
    paths = _paths(out_dir)
    with FileLock(os.path.join(out_dir, ".lock")):
        if not force and _up_to_date(out_dir, expect):
            return paths
        corpus = generate(seed, sizes)
        hashes = {}
        for name, records in corpus.items():
            write_jsonl(records, paths["jsonl"][name])
            kind = "dpo" if name == "dpo" else "sft"
            m = prepare([paths["jsonl"][name]], tokenizer, paths[name], kind=kind, progress=not quiet,
                        template=template)
            hashes[name] = m["data_hash"]
        with open(os.path.join(out_dir, "demo.json"), "w", encoding="utf-8") as f:
            json.dump(dict(expect, data_hashes=hashes), f, indent=1)
    return paths


def sft_sources(paths: dict) -> tuple[dict[str, str], dict[str, float]]:
    """The SFT demo's data: general and reasoning samples drawn 340 : 550 (the stage-2 recipe), as
    ({name: prepared dir}, {name: weight}) from ``ensure_demo_data``'s paths."""
    return ({"general": paths["sft_general"], "reasoning": paths["sft_reasoning"]},
            {"general": float(paths["mixture"]["sft_general"]), "reasoning": float(paths["mixture"]["sft_reasoning"])})


def dpo_source(paths: dict) -> tuple[dict[str, str], dict[str, float]]:
    """The DPO demo's preference pairs, in the form of ``sft_sources``."""
    return {"dpo": paths["dpo"]}, {"dpo": 1.0}
