"""`python -m kernels.bench`: the expert-kernel benchmark, kept under its old name as a thin entry
point. The tool (timing, table, plot, CLI) is trainer.tools.kernel_bench: kernels/ holds only the
kernels and their references, and imports nothing of ours; this entry script is the one exception,
and only when run (tests/test_layering.py allows imports under ``if __name__ == "__main__"``).
"""
import sys

if __name__ == "__main__":
    from trainer.tools.kernel_bench import cli

    sys.exit(cli())
