"""What a checkpoint writes beside its tensors' bytes, against what the trainer's free-space check asks.

    python benchmarks/checkpoint_overhead.py --json benchmarks/checkpoint_overhead_cpu.json

Saves one checkpoint of the tiny test model and of the demo model (one CPU process, synthetic rows,
one step) into a temporary directory, and records the bytes of the parameters and optimizer state,
the number of tensors, the bytes of each file the save wrote, and the bytes the free-space check
asked for (trainer/loop.py: the tensors plus DCP_BYTES_PER_TENSOR a tensor and DCP_BYTES_PER_RANK).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "tiny (tests)": ["--model.overrides", "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
                     "num_key_value_heads: 2, intermediate_size: 64, moe_intermediate_size: 16, num_experts: 4, "
                     "num_experts_per_tok: 2}", "--data.seq_len", "32"],
    "demo (tiny preset)": [],
}


def measure(name: str, extra: list[str], work: str) -> dict:
    import torch

    import trainer.loop as loop
    from trainer.sft import main

    asked, measured = [], []
    real_require, real_bytes = loop.require_space, loop.Trainer._state_bytes

    def recording(path, nbytes, what="", *a, **k):
        if what.startswith("checkpoint"):
            asked.append(nbytes)
        return real_require(path, nbytes, what, *a, **k)

    def tensors(self):
        params = list(self.model.parameters())
        state = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        measured.append((sum(t.numel() * t.element_size() for t in params + state), len(params + state)))
        return real_bytes(self)

    loop.require_space, loop.Trainer._state_bytes = recording, tensors
    try:
        out = os.path.join(work, name.split()[0])
        main([*extra, "--data.synthetic", "true", "--train.device", "cpu", "--train.progress", "false",
              "--train.steps", "1", "--checkpoint.export_hf", "false", "--output-dir", out])
    finally:
        loop.require_space, loop.Trainer._state_bytes = real_require, real_bytes
    step = os.path.join(out, "checkpoints", "step_00000001")
    files = {f: os.path.getsize(os.path.join(step, f)) for f in sorted(os.listdir(step))}
    written = sum(files.values())
    tensor_bytes, n_tensors = measured[0]
    return {"tensors": n_tensors, "tensor_bytes": tensor_bytes, "files": files, "written_bytes": written,
            "written_over_tensors": written / tensor_bytes,
            "overhead_bytes_per_tensor": (written - tensor_bytes) / n_tensors, "asked_bytes": asked[0],
            "asked_covers_written": asked[0] >= written}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/checkpoint_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import torch

    import trainer.loop as loop

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "bytes_per_tensor": loop.DCP_BYTES_PER_TENSOR,
              "bytes_per_rank": loop.DCP_BYTES_PER_RANK, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in MODELS.items():
            result["models"][name] = measure(name, extra, work)
    for name, r in result["models"].items():
        print(f"{name}: wrote {r['written_bytes']} bytes, the check asked {r['asked_bytes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
