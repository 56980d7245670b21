"""Hugging Face <-> native checkpoint conversion (bailing_moe)."""
from checkpoints_convert.io import CheckpointError, load_hf, save_hf

__all__ = ["CheckpointError", "load_hf", "save_hf"]
