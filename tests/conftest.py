import os
import pathlib

import pytest
import torch

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY_HF = FIXTURES / "bailing_moe_tiny" / "hf"
TINY_EXPECTED = FIXTURES / "bailing_moe_tiny" / "expected.safetensors"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores in CI: more threads only add contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
