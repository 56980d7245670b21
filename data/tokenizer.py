"""A thin wrapper over a Hugging Face `tokenizers` tokenizer directory.

We only need `tokenizers` (Rust) rather than `transformers`: the chat template is implemented in
data/template.py, so all we need from the directory is the BPE model and which strings are the
eos/pad/bos tokens.
"""
import hashlib
import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from .errors import DataError

# The shipped tokenizer of the demo corpus: the one a run without a tokenizer of its own uses.
DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "tokenizer")


def run_tokenizer_dir(tokenizer: str = "", init_from: str = "") -> str:
    """The tokenizer a run uses (the one rule for training, exports and the tools): ``tokenizer``
    (data.tokenizer) when given, else the one beside ``init_from`` (model.init_from) when it has one,
    else the shipped demo tokenizer."""
    if tokenizer:
        return tokenizer
    if init_from and os.path.exists(os.path.join(init_from, "tokenizer.json")):
        return init_from
    return DEMO_TOKENIZER_DIR


def _token_str(value):
    # tokenizer_config.json stores special tokens either as a bare string or as an AddedToken dict.
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    return None


class Tokenizer:
    """Encode/decode plus the special ids the template and packer need.

    ``encode`` never adds BOS/EOS or other post-processing: the chat template decides exactly
    which special tokens appear. Special tokens written literally in text (``<role>``) still map
    to their single id because `tokenizers` splits registered added tokens before BPE.
    """

    def __init__(self, hf_tokenizer, eos_token=None, pad_token=None, bos_token=None, name=None):
        self._tok = hf_tokenizer
        self.name = name
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.bos_token = bos_token
        self.eos_id = self._require_id(eos_token) if eos_token is not None else None
        self.pad_id = self._require_id(self.pad_token) if self.pad_token is not None else None
        self.bos_id = self._require_id(bos_token) if bos_token is not None else None
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _require_id(self, token):
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise DataError(f"special token {token!r} named in the tokenizer config is not in the vocabulary",
                            file=self.name)
        return idx

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Like ``encode`` over many strings; the Rust side runs them in parallel."""
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    def id_to_token(self, idx):
        return self._tok.id_to_token(int(idx))

    def fingerprint(self):
        """Hash of the serialized tokenizer plus special ids; prepared data records it so a stale
        shard built with another tokenizer is detectable."""
        h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
        h.update(json.dumps([self.eos_id, self.pad_id, self.bos_id]).encode())
        return h.hexdigest()

    @property
    def hf(self):
        return self._tok


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None


def load_tokenizer(path):
    """Load a Hugging Face tokenizer directory (or a tokenizer.json file).

    Special tokens come from special_tokens_map.json, overridden by tokenizer_config.json (the
    file `transformers` itself treats as authoritative). Without any config, ``<|endoftext|>`` is
    used as eos/pad when the vocabulary has it, which is what bailing/Ling tokenizers use.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory, tok_file = path, os.path.join(path, "tokenizer.json")
    else:
        directory, tok_file = os.path.dirname(path), path
    if not os.path.exists(tok_file):
        raise DataError("no tokenizer.json found (only the fast-tokenizer format is supported)", file=tok_file)
    hf = _HFTokenizer.from_file(tok_file)
    specials = {}
    for cfg_name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg_path = os.path.join(directory, cfg_name)
        if os.path.exists(cfg_path):
            cfg = _read_json(cfg_path)
            for key in ("eos_token", "pad_token", "bos_token"):
                if key in cfg:
                    specials[key] = _token_str(cfg[key])
    if specials.get("eos_token") is None and hf.token_to_id("<|endoftext|>") is not None:
        specials["eos_token"] = "<|endoftext|>"
    return Tokenizer(hf, eos_token=specials.get("eos_token"), pad_token=specials.get("pad_token"),
                     bos_token=specials.get("bos_token"), name=tok_file)
