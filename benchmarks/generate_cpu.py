"""Decoding speed with and without the KV cache: the demo model on CPU, 256 new tokens.

    python benchmarks/generate_cpu.py [--model DIR] [--batch 1 16] [--threads 1 2] [--reps 3] [--out FILE.json]

The model is the demo's (the tiny preset with the demo tokenizer's vocabulary; --model takes an
export such as runs/sft/hf instead: speed does not depend on the weights). The prompt is a demo
reasoning question in the bailing template, repeated over the batch. End-of-sequence is disabled so
every run decodes exactly --new-tokens tokens; tokens/s counts generated tokens of all rows. Each
setting runs once to warm up, then --reps times; the median is reported. Before timing, the cached
and uncached outputs are checked to be the same tokens.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def git_state() -> str:
    """The commit the code ran at, with '-dirty' when the tree had uncommitted changes."""
    try:
        return subprocess.check_output(["git", "describe", "--always", "--dirty", "--abbrev=7"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def demo_model(path: str | None):
    from moe import BailingMoeConfig, BailingMoeForCausalLM

    if path:
        from checkpoints_convert import load_checkpoint

        return load_checkpoint(path, dtype=torch.float32, expert_backend="torch").eval()
    import data
    from data.demo import TOKENIZER_DIR as DEMO_TOKENIZER

    tok = data.load_tokenizer(DEMO_TOKENIZER)
    cfg = BailingMoeConfig.preset("tiny", vocab_size=(tok.vocab_size + 63) // 64 * 64, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)
    model = BailingMoeForCausalLM(cfg)
    model.init_weights(seed=1234)
    return model.eval()


def demo_prompt() -> list[int]:
    import data
    from data.demo import generate
    from data.demo import TOKENIZER_DIR as DEMO_TOKENIZER

    tok = data.load_tokenizer(DEMO_TOKENIZER)
    rec = generate(seed=7, sizes={"general": 0, "tool": 0, "reasoning": 1, "dpo": 0})["sft_reasoning"][0]
    return data.encode_prompt(tok, rec["messages"][:-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/generate_cpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="DIR", help="an exported model (default: the tiny demo model, seed 1234)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row (default 256)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to time (default 1 16)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to time (default 1 2)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per setting; the median is reported (default 3)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    import moe

    model = demo_model(a.model)
    prompt = demo_prompt()
    rows = []
    for B in a.batch:
        ids = torch.tensor([prompt] * B)
        check = [moe.generate(model, ids[:, :], max_new_tokens=32, eos_token_id=[], use_cache=c) for c in (True, False)]
        if not torch.equal(*check):
            raise SystemExit("error: cached and uncached decoding disagree")
        for threads in a.threads:
            torch.set_num_threads(threads)
            for use_cache in (True, False):
                moe.generate(model, ids, max_new_tokens=8, eos_token_id=[], use_cache=use_cache)
                secs = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    out = moe.generate(model, ids, max_new_tokens=a.new_tokens, eos_token_id=[], use_cache=use_cache)
                    secs.append(time.perf_counter() - t0)
                assert out.shape == (B, len(prompt) + a.new_tokens)
                tps = B * a.new_tokens / statistics.median(secs)
                rows.append({"batch": B, "threads": threads, "kv_cache": use_cache, "seconds": [round(s, 3) for s in secs],
                             "tokens_per_s": round(tps, 1)})
                print(f"batch {B:>3}  threads {threads}  {'cache   ' if use_cache else 'no cache'}  "
                      f"{tps:8.1f} tokens/s  (runs: {', '.join(f'{s:.2f}' for s in secs)} s)", flush=True)
    speedups = []
    for B in a.batch:
        for threads in a.threads:
            r = {x["kv_cache"]: x["tokens_per_s"] for x in rows if x["batch"] == B and x["threads"] == threads}
            speedups.append({"batch": B, "threads": threads, "speedup": round(r[True] / r[False], 2)})
            print(f"batch {B:>3}  threads {threads}  cache speed-up {r[True] / r[False]:.2f}x")
    if a.out:
        cfg = model.config
        rec = {"commit": git_state(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "device": f"CPU {platform.machine()} ({os.cpu_count()} cores)",
               "command": "python benchmarks/generate_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "model": a.model or "tiny preset, demo vocabulary, init seed 1234",
               "model_shape": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                            "num_experts", "num_experts_per_tok", "expert_backend")},
               "prompt_tokens": len(prompt), "new_tokens": a.new_tokens, "reps": a.reps,
               "results": rows, "speedups": speedups}
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
