"""lingmoe data pipeline: bailing chat template, prepared shards, packing, mixtures, DPO pairs.

Importing this package only defines names; nothing is read, trained or written until called.
"""
from .errors import DataError
from .tokenizer import Tokenizer, load_tokenizer, run_tokenizer_dir
from .template import (render_chat, encode_chat, encode_prompt, chat_segments, validate_messages, IGNORE_INDEX,
                       SPECIAL_TOKENS, EOS_TOKEN)
from .formats import read_jsonl, normalize_sft, normalize_dpo, encode_dpo_pair, dpo_conversations
from .format_check import format_check
from .packing import pack_documents, best_fit_decreasing, BATCH_KEYS
from .dataset import PreparedSFT, PreparedDPO, open_prepared
from .mixture import SampleStream, parse_weights
from .loader import SFTLoader, DPOLoader, collate_dpo


def prepare_data(files, tokenizer, out_dir, **kwargs):
    """data.prepare.prepare under a name that cannot clash with the data.prepare module; imported
    on use so that `python -m data.prepare` does not find its module already loaded."""
    from .prepare import prepare as _prepare
    return _prepare(files, tokenizer, out_dir, **kwargs)


__all__ = [
    "DataError", "Tokenizer", "load_tokenizer", "run_tokenizer_dir", "render_chat", "encode_chat", "encode_prompt", "encode_dpo_pair",
    "chat_segments", "validate_messages", "IGNORE_INDEX", "SPECIAL_TOKENS", "EOS_TOKEN", "read_jsonl",
    "normalize_sft", "normalize_dpo", "format_check", "pack_documents", "best_fit_decreasing", "BATCH_KEYS",
    "prepare_data", "PreparedSFT", "PreparedDPO", "open_prepared", "SampleStream", "parse_weights", "SFTLoader",
    "DPOLoader", "collate_dpo",
]
