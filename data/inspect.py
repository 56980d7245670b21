"""Show samples as the model sees them, with the trained spans marked.

Reads JSONL (SFT or DPO, detected from the first record) or a prepared directory. Trained text
is wrapped in [[ ]] (or shown green on a terminal); with a tokenizer the marks come from the
actual label mask, so this is a direct check of what the loss is computed on. A trained label that
is not the token at its position (the EOS of a non-final answer with eos_every_turn, labelled on the
next turn's <role>) is shown as ``[[(<|endoftext|>)]]`` before that token: a target, not input.
"""
import argparse
import os
import sys

import numpy as np

from .dataset import open_prepared
from .errors import DataError, MissingFileError, run_cli
from .formats import dpo_conversations, read_jsonl, detect_kind
from .format_check import format_check
from .template import EOS_TOKEN, TEMPLATES, chat_segments, encode_chat, IGNORE_INDEX
from .tokenizer import load_tokenizer

_GREEN, _RESET = "\033[32m", "\033[0m"


def _mark(text, trained, color):
    if not trained or not text:
        return text
    return f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"


def _label_only(text, color):
    """A target that is not in the input (the EOS label on the <role> after an answer)."""
    return _mark(f"({text})", True, color)


def mark_segments(segments, color=False):
    """Template segments joined, with adjacent trained segments marked as one span."""
    out, run, run_trained = [], [], None
    for seg in segments:
        if run and (seg.trained != run_trained or seg.eos_label):
            out.append(_mark("".join(run), run_trained, color))
            run = []
        if seg.eos_label:
            out.append(_label_only(EOS_TOKEN, color))
        run.append(seg.text)
        run_trained = seg.trained
    if run:
        out.append(_mark("".join(run), run_trained, color))
    return "".join(out)


def mark_tokens(tokenizer, ids, labels, color=False):
    """Decode ids, grouping runs of trained / untrained tokens and marking the trained runs."""
    out, run, run_trained = [], [], None
    for tok, lab in zip(ids, labels):
        label_only = lab != IGNORE_INDEX and lab != tok
        t = lab != IGNORE_INDEX and not label_only
        if run and (t != run_trained or label_only):
            out.append(_mark(tokenizer.decode(run), run_trained, color))
            run = []
        if label_only:
            out.append(_label_only(tokenizer.decode([int(lab)]), color))
        run.append(int(tok))
        run_trained = t
    if run:
        out.append(_mark(tokenizer.decode(run), run_trained, color))
    return "".join(out)


def _conversations(rec, kind):
    if kind == "sft":
        return [("", rec["messages"])]
    return list(zip(("chosen", "rejected"), dpo_conversations(rec)))


def inspect_jsonl(path, n, tokenizer=None, color=False, out=None, skip_bad=False, eos_every_turn=False,
                  template="bailing"):
    out = out or sys.stdout
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such file")
    kind = detect_kind(path)
    bad = []
    shown = 0
    totals = {"tokens": 0, "trained": 0}
    for lineno, rec in read_jsonl(path, kind=kind, skip_bad=skip_bad, bad=bad):
        if shown >= n:
            break
        meta = f"domain={rec['domain']} tags={','.join(rec['tags'])}" if rec["domain"] or rec["tags"] else ""
        print(f"=== {path}:{lineno} ({kind}) {meta}", file=out)
        # What data.prepare trains: every answer of an SFT conversation, only the final one of a DPO side.
        how = {"eos_every_turn": eos_every_turn and kind == "sft", "train_history": kind == "sft",
               "template": template, "tools": rec.get("tools"), "thinking": rec.get("thinking")}
        for side, msgs in _conversations(rec, kind):
            if side:
                print(f"--- {side}", file=out)
            try:
                segs = chat_segments(msgs, **how) if tokenizer is None else None
                ids, labels = encode_chat(tokenizer, msgs, **how) if tokenizer is not None else (None, None)
            except DataError as e:  # a field this template cannot render: the record's file and line
                raise e.located(path, lineno) from None
            if segs is not None:
                print(mark_segments(segs, color), file=out)
            else:
                trained = sum(1 for x in labels if x != IGNORE_INDEX)
                totals["tokens"] += len(ids)
                totals["trained"] += trained
                print(mark_tokens(tokenizer, ids, labels, color), file=out)
                print(f"    tokens={len(ids)} trained={trained}", file=out)
            answer = msgs[-1]["content"]
            errs = format_check(answer)
            if errs:
                print("    format errors: " + "; ".join(errs), file=out)
        shown += 1
    if tokenizer is not None and shown:
        print(f"shown {shown} samples: {totals['tokens']} tokens, {totals['trained']} trained "
              f"({100.0 * totals['trained'] / max(1, totals['tokens']):.1f}%)", file=out)
    if bad:
        print(f"skipped {len(bad)} bad records (first: {bad[0][0]}:{bad[0][1]}: {bad[0][2]})", file=out)
    if not shown and not bad:
        raise DataError("no records (the file is empty or holds only blank lines)", file=path)


def inspect_prepared(directory, n, tokenizer, color=False, out=None):
    out = out or sys.stdout
    ds = open_prepared(directory)
    print(f"=== {directory}: {ds.manifest['kind']} samples={len(ds)} hash={ds.data_hash[:16]}", file=out)
    names = ds.domains
    dom = ds.domain_ids()
    for i in range(min(n, len(ds))):
        print(f"--- sample {i} domain={names[dom[i]]}", file=out)
        sides = [("", ds[i])] if ds.manifest["kind"] == "sft" else list(ds[i].items())
        for side, (ids, labels) in sides:
            if side:
                print(f"  [{side}]", file=out)
            print(mark_tokens(tokenizer, ids, labels, color), file=out)
            print(f"    tokens={len(ids)} trained={int(np.sum(labels != IGNORE_INDEX))}", file=out)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m data.inspect",
                                description="Print rendered samples with trained spans marked ([[...]] or green on a "
                                            "terminal) and token statistics.")
    p.add_argument("file", metavar="FILE", help="a JSONL file (SFT or DPO) or a prepared directory")
    p.add_argument("-n", type=int, default=3, help="number of samples to show (default %(default)s)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory; marks come from the real label mask and token counts are shown "
                        "(required for a prepared directory). Without it, marks are per template segment.")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour trained text instead of brackets (default auto: only on a terminal)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--eos-every-turn", action="store_true",
                   help="JSONL SFT: show the encoding of data.eos_every_turn true (every answer's end trained)")
    p.add_argument("--template", choices=TEMPLATES, default="bailing",
                   help="JSONL: the chat template to render with, as data.prepare's --template (default "
                        "%(default)s; bailing_v2 renders a record's tools and thinking fields)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if os.path.isdir(args.file):
        if tok is None:
            p.error("a prepared directory needs --tokenizer to decode")
        inspect_prepared(args.file, args.n, tok, color)
    else:
        if args.eos_every_turn and args.template == "bailing_v2":
            p.error("--eos-every-turn is the bailing template's: bailing_v2 ends every turn with <|role_end|>")
        inspect_jsonl(args.file, args.n, tok, color, skip_bad=args.skip_bad, eos_every_turn=args.eos_every_turn,
                      template=args.template)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
