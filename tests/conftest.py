import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated: set before any test imports kernels, so the
    # "triton" expert backend runs through the interpreter on CPU (fp32 only: bf16 is wrong there).
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY_HF = FIXTURES / "bailing_moe_tiny" / "hf"
TINY_EXPECTED = FIXTURES / "bailing_moe_tiny" / "expected.safetensors"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores in CI: more threads only add contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
