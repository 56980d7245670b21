"""Hugging Face <-> native checkpoint conversion (bailing_moe), streaming and bit-exact.

CLIs: ``python -m checkpoints_convert.hf_to_native``, ``.native_to_hf``, ``.verify`` (see docs/checkpoints.md).
"""
from checkpoints_convert.checkpoint import (NATIVE_FORMAT, NATIVE_VERSION, Checkpoint, load_checkpoint, load_hf,
                                            load_native, open_checkpoint, save_hf, save_native, write_checkpoint,
                                            write_hf_from_native, write_native)
from checkpoints_convert.io import CheckpointError

__all__ = ["CheckpointError", "Checkpoint", "NATIVE_FORMAT", "NATIVE_VERSION", "load_checkpoint", "load_hf",
           "load_native", "open_checkpoint", "save_hf", "save_native", "write_checkpoint", "write_hf_from_native",
           "write_native"]
