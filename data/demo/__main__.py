"""``python -m data.demo``: build the demo tokenizer, write the demo corpora, or prepare them."""
import argparse
import json
import os
import sys

from ..errors import run_cli
from . import DEFAULT_SEED, TOKENIZER_DIR, VOCAB_SIZE, ensure_demo_data, generate, save_tokenizer, train_tokenizer, \
    write_jsonl
from .pipeline import eval_prompts, pipeline_corpus


def build_parser():
    p = argparse.ArgumentParser(prog="python -m data.demo",
                                description="Deterministic demo corpora (reasoning, general, tool calls, DPO pairs) "
                                            "and the demo byte-level BPE tokenizer.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("build-tokenizer", help="train the demo tokenizer from the demo corpus and save it")
    t.add_argument("--out", default=TOKENIZER_DIR, help=f"tokenizer directory to write (default {TOKENIZER_DIR})")
    t.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed (default %(default)s)")
    t.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="BPE vocabulary size (default %(default)s)")
    g = sub.add_parser("generate", help="write the demo JSONL files only")
    g.add_argument("--out", required=True, help="directory for sft_general/sft_reasoning/dpo .jsonl")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed (default %(default)s)")
    pl = sub.add_parser("pipeline", help="write the pipeline-in-miniature corpus (data.demo.pipeline) as JSONL, plus "
                                         "its held-out evaluation prompts")
    pl.add_argument("--out", required=True, help="directory for base/stage1_reasoning/stage2_*/dpo .jsonl and eval_prompts.jsonl")
    pl.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed (default %(default)s)")
    pl.add_argument("-n", type=int, default=100, help="evaluation prompts per family (default %(default)s)")
    e = sub.add_parser("ensure", help="write JSONL and prepared shards (skipped when already intact)")
    e.add_argument("--out", default="demo_data", help="output directory (default %(default)s)")
    e.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed (default %(default)s)")
    e.add_argument("--force", action="store_true", help="rebuild even if the existing data is intact")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "build-tokenizer":
        tok = train_tokenizer(seed=args.seed, vocab_size=args.vocab_size)
        save_tokenizer(tok, args.out)
        print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")
    elif args.cmd == "generate":
        os.makedirs(args.out, exist_ok=True)
        for name, records in generate(args.seed).items():
            path = os.path.join(args.out, name + ".jsonl")
            write_jsonl(records, path)
            print(f"wrote {path} ({len(records)} records)")
    elif args.cmd == "pipeline":
        os.makedirs(args.out, exist_ok=True)
        parts = dict(pipeline_corpus(args.seed))
        parts["eval_prompts"] = [it for items in eval_prompts(args.n).values() for it in items]
        for name, records in parts.items():
            path = os.path.join(args.out, name + ".jsonl")
            write_jsonl(records, path)
            print(f"wrote {path} ({len(records)} records)")
    else:
        paths = ensure_demo_data(args.out, seed=args.seed, force=args.force, quiet=False)
        print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
