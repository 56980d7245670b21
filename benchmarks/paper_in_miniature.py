"""The Ring-Lite-Distill pipeline in miniature, on CPU: base -> stage 1 -> stage 2 -> DPO, plus the
one-stage ablation, each evaluated on held-out prompts; one table, a plot and a JSON.

    python benchmarks/paper_in_miniature.py [--out-dir runs/paper] [--json benchmarks/paper_in_miniature.json]

What runs (all from scratch, the tiny preset, the demo tokenizer, data.demo.pipeline's corpus):
  base       general + instruction following + tool use + knowledge SFT (the stand-in for Ling-Lite)
  stage1     base -> reasoning-only SFT (the report: 2.59M reasoning samples, lr 4e-5)
  stage2     stage1 -> SFT on general : reasoning drawn 340 : 550 (the report: 890K samples, lr 1e-5)
  dpo        stage2 -> DPO on format-repair pairs (sigmoid, beta 0.1, plus the NLL term on chosen answers)
  one_stage  base -> one SFT run over the same data as stage 1 + stage 2 (same steps in all, the
             sources drawn in proportion to what the two stages draw), at stage 1's learning rate
Every model answers the same held-out prompts (trainer.tools.evaluate's families suite, n per family).
A stage whose export exists in --out-dir is reused when its settings and data are unchanged (else,
or with --fresh, it is retrained); seeds are fixed, so a fresh rerun on the same machine and thread
count gives the same table. --scale 0.01 is a smoke run of about a minute.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

ROWS = ("base", "stage1", "stage2", "dpo", "one_stage")
COLUMNS = ("reasoning", "instruction_following", "tool_use", "knowledge")
MIX = {"general": 340, "reasoning": 550}

# Steps and learning rates of each stage (global batch 8 packed rows of 256 tokens).
# Stage 1 is the long reasoning stage (the report: 2.59M reasoning samples against stage 2's 550K);
# learning rates fall stage by stage as in the report (4e-5, 1e-5); DPO moves the model least.
PLAN = {
    "base": {"steps": 800, "lr": 1e-3},
    "stage1": {"steps": 800, "lr": 5e-4},
    "stage2": {"steps": 400, "lr": 2.5e-4},
    "dpo": {"steps": 100, "lr": 5e-5, "nll_coef": 4.0},
}


def write_corpus(out_dir: str, seed: int, scale: float = 1.0) -> dict[str, str]:
    from data.demo import write_jsonl
    from data.demo.pipeline import PIPELINE_SIZES, pipeline_corpus

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    sizes = {k: max(8, int(v * scale)) for k, v in PIPELINE_SIZES.items()}
    for part, records in pipeline_corpus(seed, sizes).items():
        paths[part] = os.path.join(out_dir, part + ".jsonl")
        write_jsonl(records, paths[part])
    return paths


def _sources(items: list[tuple[str, float]]) -> str:
    return "[" + ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in items) + "]"


def scaled_plan(scale: float = 1.0) -> dict:
    """PLAN with every stage's steps times ``scale`` (at least 2), plus the one-stage ablation."""
    plan = {k: dict(v, steps=max(2, round(v["steps"] * scale))) for k, v in PLAN.items()}
    plan["one_stage"] = {"steps": plan["stage1"]["steps"] + plan["stage2"]["steps"], "lr": plan["stage1"]["lr"]}
    return plan


def stage_args(name: str, out: str, corpus: dict[str, str], seed: int, scale: float = 1.0) -> tuple[str, list[str]]:
    """(task, argv) of one stage for trainer/sft.py or trainer/dpo.py."""
    plans = scaled_plan(scale)
    plan = plans[name]
    common = ["--output-dir", os.path.join(out, name), "--train.steps", str(plan["steps"]),
              "--optim.lr", str(plan["lr"]), "--train.seed", str(seed), "--train.progress", "false",
              "--train.log_every", "50", "--checkpoint.every", "0", "--checkpoint.keep_last", "1",
              "--checkpoint.resume", "false", "--data.cache_dir", os.path.join(out, "prepared")]
    hf = lambda stage: os.path.join(out, stage, "hf")  # noqa: E731
    if name == "base":
        return "sft", common + ["--data.sources", _sources([(corpus["base"], 1)])]
    if name == "stage1":
        return "sft", common + ["--model.init_from", hf("base"),
                                "--data.sources", _sources([(corpus["stage1_reasoning"], 1)])]
    if name == "stage2":
        return "sft", common + ["--model.init_from", hf("stage1"), "--data.sources",
                                _sources([(corpus["stage2_general"], MIX["general"]),
                                          (corpus["stage2_reasoning"], MIX["reasoning"])])]
    if name == "one_stage":
        s1, s2 = plans["stage1"]["steps"], plans["stage2"]["steps"]
        total = sum(MIX.values())
        return "sft", common + ["--model.init_from", hf("base"), "--data.sources",
                                _sources([(corpus["stage1_reasoning"], s1),
                                          (corpus["stage2_general"], s2 * MIX["general"] / total),
                                          (corpus["stage2_reasoning"], s2 * MIX["reasoning"] / total)])]
    if name == "dpo":
        return "dpo", common + ["--model.init_from", hf("stage2"), "--data.sources", _sources([(corpus["dpo"], 1)]),
                                "--optim.warmup_ratio", "0.05", "--dpo.nll_coef", str(plan["nll_coef"])]
    raise ValueError(name)


def train(name: str, out: str, corpus: dict[str, str], seed: int, fresh: bool, scale: float = 1.0) -> float:
    """Train one stage (unless its export exists and not fresh); returns seconds spent."""
    from trainer.loop import run
    from trainer.options import DPORunOptions, Options, parse_options

    run_dir = os.path.join(out, name)
    task_name, argv = stage_args(name, out, corpus, seed, scale)
    stamp = os.path.join(run_dir, "pipeline_stage.json")
    signature = {"task": task_name, "argv": argv, "corpus_hashes": _hashes(corpus)}
    if not fresh and os.path.exists(os.path.join(run_dir, "hf", "config.json")) and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == signature:
                print(f"[{name}] reusing {run_dir}/hf (same settings and data)", flush=True)
                return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if task_name == "sft":
        from trainer.sft import SFTTask

        run(SFTTask(), parse_options(argv, "trainer/sft.py", Options, "", run_dir), shutdown=False)
    else:
        from trainer.dpo import DPOTask

        run(DPOTask(), parse_options(argv, "trainer/dpo.py", DPORunOptions, "", run_dir), shutdown=False)
    dt = time.perf_counter() - t0
    with open(stamp, "w") as f:
        json.dump(signature, f, indent=1)
    print(f"[{name}] trained in {dt:.0f} s", flush=True)
    return dt


def _hashes(corpus: dict[str, str]) -> dict[str, str]:
    import hashlib

    out = {}
    for part, path in sorted(corpus.items()):
        with open(path, "rb") as f:
            out[part] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path})")
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(COLUMNS))]
        ax.bar(xs, [100 * r[c] for c in COLUMNS], width, label=r["model"])
    ax.set_xticks(range(len(COLUMNS)), [c.replace("_", " ") for c in COLUMNS])
    ax.set_ylabel("accuracy on held-out prompts (%)")
    ax.set_title(f"Ring-Lite-Distill in miniature: {rows[0]['n']} prompts per family", fontsize=10, pad=28)
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(rows), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.1))
    ax2.bar([r["model"] for r in rows], [r["format_errors"] for r in rows], color="gray")
    ax2.set_title(f"answers with a format error (of {4 * rows[0]['n']})", fontsize=10)
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def table(rows: list[dict]) -> str:
    head = f"| model | {' | '.join(COLUMNS)} | format errors |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{100 * r[c]:.0f}%" for c in COLUMNS)
                     + f" | {r['format_errors']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/paper_in_miniature.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/paper", help="where the corpus, runs and evaluations go (default runs/paper)")
    p.add_argument("--json", default="benchmarks/paper_in_miniature.json", help="the result JSON (default %(default)s)")
    p.add_argument("--plot", default="benchmarks/paper_in_miniature.png", help="the plot (default %(default)s)")
    p.add_argument("-n", type=int, default=100, help="held-out prompts per family (default 100)")
    p.add_argument("--seed", type=int, default=1234, help="corpus, init and data-order seed (default 1234)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, fixed so reruns match (default 2)")
    p.add_argument("--fresh", action="store_true", help="retrain every stage even if its export exists")
    p.add_argument("--only", nargs="+", choices=ROWS, default=None, help="run only these stages and evaluate them (a stage's parent must exist already)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's steps and the corpus sizes (a quick smoke run: 0.01; default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer budget in the evaluation (default 128)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from trainer.tools.evaluate import evaluate_families, git_state, load_model_and_tokenizer

    t_start = time.perf_counter()
    corpus = write_corpus(os.path.join(a.out_dir, "corpus"), a.seed, a.scale)
    stages = [s for s in ("base", "stage1", "stage2", "dpo", "one_stage") if a.only is None or s in a.only]
    seconds = {}
    from trainer import parallel

    try:
        for s in stages:
            seconds[s] = train(s, a.out_dir, corpus, a.seed, a.fresh, a.scale)
    finally:  # the stages share one process group; leave none behind (nor its port in the environment)
        parallel.shutdown_distributed()
    rows, details = [], {}
    for s in stages:
        t0 = time.perf_counter()
        model, tok = load_model_and_tokenizer(os.path.join(a.out_dir, s, "hf"))
        r = evaluate_families(model, tok, a.n, a.max_new_tokens)
        details[s] = r
        rows.append({"model": s, **{c: round(r[c], 4) for c in COLUMNS}, "format_errors": r["format_errors"], "n": a.n})
        with open(os.path.join(a.out_dir, s, "eval.json"), "w") as f:
            json.dump(r, f, indent=1)
        print(f"[{s}] evaluated in {time.perf_counter() - t0:.0f} s: " +
              ", ".join(f"{c} {100 * r[c]:.0f}%" for c in COLUMNS) + f", format errors {r['format_errors']}",
              flush=True)
    total = time.perf_counter() - t_start
    print(table(rows))
    print(f"total {total / 60:.1f} min on {a.threads} threads")
    record = {"commit": git_state(), "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/paper_in_miniature.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": f"CPU {platform.machine()} ({os.cpu_count()} cores), {a.threads} threads",
              "torch": torch.__version__, "seed": a.seed, "scale": a.scale, "plan": scaled_plan(a.scale),
              "mix_general_reasoning": MIX, "max_new_tokens": a.max_new_tokens,
              "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_minutes": round(total / 60, 1),
              "rows": rows,
              "details": {s: {k: v for k, v in d.items() if k != "examples"} for s, d in details.items()},
              "examples": {s: d["examples"] for s, d in details.items()}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"wrote {a.json}")
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
