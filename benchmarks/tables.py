"""Markdown tables from recorded benchmark JSON files (the tables in benchmarks/README.md come from here).

    python benchmarks/tables.py benchmarks/h100_2026-11-23/2_tune_kernels_661e758/moe_bench_lingl.json
    python benchmarks/tables.py --train benchmarks/h100_2026-11-23/3_train_flex_suite_661e758/train_step.json

Kernel bench files (python -m kernels.bench --json): one row per (expert shape, T, skew, pass) with each
implementation's ms and TFLOP/s side by side, and triton's % of the dense GEMM of equal FLOPs and its
speed-up over each peer. Training-step files (benchmarks/train_step.py --json): one row per run, with MFU
against the peak the run used and against --datasheet-tflops.
"""
from __future__ import annotations

import argparse
import json

PEERS = ("liger", "grouped_mm", "loop")


def kernel_table(meta: dict) -> str:
    rows = meta["rows"]
    keys = sorted({(r["E"], r["K"], r["H"], r["I"], r["T"], r["skew"], r["pass"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3], k[6], k[5], k[4]))
    by = {(r["E"], r["K"], r["H"], r["I"], r["T"], r["skew"], r["pass"], r["impl"]): r for r in rows}

    def cell(r):
        if r is None or r.get("skipped"):
            return "-"
        if r.get("error") or r.get("ms") is None:
            return "failed"
        return f"{r['ms']:.2f} ms / {r['tflops']:.0f}"

    out = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit'][:7]}, "
           f"{meta['date'][:10]}" + (f", LINGMOE_TRITON_CONFIG={meta['triton_config_override']}"
                                     if meta.get("triton_config_override") else ""),
           "",
           "| E/K/H/I | pass | T | skew | triton | liger | grouped_mm | loop | dense | triton % of dense | "
           "x liger | x grouped_mm | x loop |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        E, K, H, I, T, skew, pass_ = k
        c = {impl: by.get(k + (impl,)) for impl in ("triton",) + PEERS + ("dense",)}
        t = c["triton"]
        rel = lambda name: (f"{t['speedup_vs_' + name]:.2f}" if t and t.get("speedup_vs_" + name) else "-")  # noqa
        pct = f"{t['pct_of_dense']:.1f}" if t and t.get("pct_of_dense") else "-"
        out.append(f"| {E}/{K}/{H}/{I} | {pass_} | {T} | {skew:g} | " + " | ".join(cell(c[i]) for i in c)
                   + f" | {pct} | {rel('liger')} | {rel('grouped_mm')} | {rel('loop')} |")
    if meta.get("targets"):
        out += ["", "| target (T=8192, triton) | value | threshold | |", "|---|---|---|---|"]
        for tg in meta["targets"]:
            out.append(f"| {tg['target']} (E={tg['E']}) | {tg['value']:.2f} | {tg['threshold']:g} | "
                       f"{'met' if tg['met'] else 'missed'} |")
    return "\n".join(out)


def train_table(metas: list[dict], datasheet: float) -> str:
    out = ["| run | backend | attention | layers | seq x docs | tokens/step | step ms | tokens/s | MFU (run's peak) | "
           f"MFU ({datasheet:g} datasheet) | peak GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for meta in metas:
        tag = f"{meta['device']}, {meta['git_commit'][:7]}"
        for r in meta["rows"]:
            if not r.get("ok"):
                out.append(f"| {tag} | {r['backend']} | {r.get('attn', '')} | {r['layers']} | failed | | | | | | |")
                continue
            mfu = r.get("mfu")
            ds = r["tflops"] / datasheet
            out.append(f"| {tag} | {r['backend']} | {r['attn']} | {r['layers']} | {r['seq_len']} x {r['docs_per_row']} | "
                       f"{r['T']} | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | "
                       f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {100 * ds:.1f}% | {r['memory_gib']:.1f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/tables.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="kernel bench JSON files (python -m kernels.bench --json)")
    p.add_argument("--train", nargs="*", default=[], help="training-step JSON files (benchmarks/train_step.py --json)")
    p.add_argument("--datasheet-tflops", type=float, default=989.0,
                   help="dense bf16 datasheet peak for the second MFU column (default: 989, H100 SXM)")
    args = p.parse_args(argv)
    for f in args.files:
        with open(f) as fh:
            print(kernel_table(json.load(fh)) + "\n")
    if args.train:
        metas = []
        for f in args.train:
            with open(f) as fh:
                metas.append(json.load(fh))
        print(train_table(metas, args.datasheet_tflops))


if __name__ == "__main__":
    main()
