"""lingmoe: a from-scratch trainer for fine-grained Mixture-of-Experts models (Ling-Lite / bailing_moe).

One distribution holding five packages: moe (the model), kernels (Triton expert kernels), trainer
(SFT/DPO loops on FSDP2), data (chat template, packing, mixtures) and checkpoints_convert (HF <-> native).

torch is required as a range so that a GPU machine keeps the build it already has; a fresh CPU
machine should install through requirements.txt, which pins the CPU wheel (torch 2.13.0) and the
triton it pairs with, instead of letting pip pull a multi-GB CUDA build.
"""
from setuptools import setup

setup(
    name="lingmoe",
    version="0.1.0",
    description="Fine-grained MoE (Ling-Lite / bailing_moe) training: Triton grouped-GEMM experts, FSDP2 SFT and DPO",
    python_requires=">=3.10",
    packages=["moe", "kernels", "trainer", "data", "checkpoints_convert"],
    install_requires=[
        "torch>=2.6",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=7", "matplotlib", "jinja2"],  # jinja2: tests render the exported chat template
        "bench": ["matplotlib"],
        "wandb": ["wandb"],
    },
)
