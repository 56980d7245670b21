"""Corpus statistics: samples per domain and tag, token totals, and a text length histogram."""
import argparse
import sys

import numpy as np

from .errors import DataError, run_cli
from .formats import detect_kind, dpo_conversations, read_jsonl
from .template import TEMPLATES, encode_chat, IGNORE_INDEX
from .tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer


def histogram_lines(lengths, bins=10, width=40):
    """Text histogram of integer lengths, one line per bin."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return ["(no samples)"]
    lo, hi = int(lengths.min()), int(lengths.max())
    edges = np.linspace(lo, hi + 1, bins + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, counts.max())
    lines = []
    for i, c in enumerate(counts):
        a, b = int(np.ceil(edges[i])), int(np.ceil(edges[i + 1])) - 1
        lines.append(f"  {a:>6}-{b:<6} {c:>7} {'#' * int(round(width * c / top))}")
    return lines


def collect(files, tokenizer, skip_bad=False, template="bailing"):
    st = {"samples": 0, "domains": {}, "tags": {}, "lengths": [], "tokens": 0, "trained": 0, "bad": []}
    for path in files:
        kind = detect_kind(path)
        for line, rec in read_jsonl(path, kind=kind, skip_bad=skip_bad, bad=st["bad"]):
            st["samples"] += 1
            d = rec["domain"] or "(none)"
            st["domains"][d] = st["domains"].get(d, 0) + 1
            for t in rec["tags"]:
                st["tags"][t] = st["tags"].get(t, 0) + 1
            convs = [rec["messages"]] if kind == "sft" else dpo_conversations(rec)
            for msgs in convs:
                try:
                    ids, labels = encode_chat(tokenizer, msgs, train_history=kind == "sft", template=template,
                                              tools=rec.get("tools"), thinking=rec.get("thinking"))
                except DataError as e:  # a field this template cannot render: the record's file and line
                    raise e.located(path, line) from None
                st["lengths"].append(len(ids))
                st["tokens"] += len(ids)
                st["trained"] += sum(1 for x in labels if x != IGNORE_INDEX)
    return st


def report(st, bins=10):
    lines = [f"samples: {st['samples']}"]
    lines.append("per domain:")
    lines += [f"  {k:<24} {v}" for k, v in sorted(st["domains"].items())]
    if st["tags"]:
        lines.append("per tag:")
        lines += [f"  {k:<24} {v}" for k, v in sorted(st["tags"].items())]
    L = np.asarray(st["lengths"])
    lines.append(f"sequences: {L.size}  tokens: {st['tokens']}  trained tokens: {st['trained']}")
    if L.size:
        lines.append(f"length min/mean/p50/p95/max: {L.min()} / {L.mean():.1f} / {int(np.percentile(L, 50))} / "
                     f"{int(np.percentile(L, 95))} / {L.max()}")
    lines.append("length histogram (tokens per sequence; DPO counts each side):")
    lines += histogram_lines(L, bins)
    if st["bad"]:
        lines.append(f"skipped bad records: {len(st['bad'])}")
        lines += [f"  {f}:{ln}: {p}" for f, ln, p in st["bad"][:10]]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m data.stats",
                                description="Counts per domain/tag, token totals and a length histogram for "
                                            "SFT or DPO JSONL files (tokenized with the chat template of --template).")
    p.add_argument("files", nargs="+", metavar="FILE", help="JSONL files; SFT/DPO is detected per file")
    p.add_argument("--tokenizer", metavar="DIR", default=DEMO_TOKENIZER_DIR,
                   help="tokenizer directory used for token counts (default: the shipped demo tokenizer)")
    p.add_argument("--bins", type=int, default=10, help="histogram bins (default %(default)s)")
    p.add_argument("--template", choices=TEMPLATES, default="bailing",
                   help="the chat template to count with, as data.prepare's --template (default %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    st = collect(args.files, tok, skip_bad=args.skip_bad, template=args.template)
    print(f"tokenizer: {args.tokenizer}")
    print(report(st, args.bins))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
