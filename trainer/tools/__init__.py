"""Command-line tools built on the libraries, beside the trainer rather than inside it: none of them
imports the training loop (tests/test_layering.py keeps it so).

    python -m trainer.tools.evaluate   decode held-out prompts greedily and score the answers by rules
    python -m trainer.tools.chat       chat with an export in the bailing template, streaming the answer
    python -m trainer.tools.plan       memory per GPU and traffic per step for FSDP and FSDP+EP layouts
    python -m trainer.tools.kernel_bench   the routed-expert kernels against the alternatives (also
                                       `python -m kernels.bench`)
"""
