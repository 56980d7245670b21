"""Tokenize JSONL once into memory-mapped shards that every loader rank reads without parsing text.

Layout of a prepared directory (all arrays are raw little-endian files read with np.memmap; their
dtype and length are in manifest.json):

    SFT  tokens.bin  int32  all samples' token ids, concatenated
         mask.bin    uint8  1 where the token is trained (its label is the token itself), 2 where its label
                            is the EOS id instead (the <role> after an answer, data.eos_every_turn), else 0
         offsets.bin int64  num_samples + 1 start offsets into tokens/mask
         domain.bin  int16  domain id per sample (names in manifest "domains")
    DPO  chosen_{tokens,mask,offsets}.bin and rejected_{...}.bin as above, plus domain.bin

manifest.json also carries ``data_hash``, a SHA-256 over the arrays and the special ids, so a
trainer can key caches (e.g. precomputed reference log-probs) by the exact prepared content.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

from .errors import BadInputError, DataError, MissingFileError, run_cli
from .files import OwnedTempDir, require_space
from .dataset import FORMAT_NAME, FORMAT_VERSION, MANIFEST, MASK_EOS, MASK_TOKEN, TEMPLATE_VERSION
from .formats import dpo_conversations, normalize_dpo, normalize_sft, read_jsonl
from .packing import fit_document
from .template import (chat_segments, check_fields, check_stop_token, check_template, EOS_TOKEN, IGNORE_INDEX,
                       segment_labels, TEMPLATES)
from .tokenizer import load_tokenizer

_CHUNK = 256  # records per encode_batch call; amortizes the Rust call overhead


class _ArrayWriter:
    """Appends to one raw array file while hashing exactly the bytes written."""

    def __init__(self, directory, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype).newbyteorder("<")
        self.f = open(os.path.join(directory, name + ".bin"), "wb")
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, values):
        arr = np.asarray(values, dtype=self.dtype)
        b = arr.tobytes()
        self.f.write(b)
        self.hash.update(b)
        self.count += arr.size

    def close(self):
        self.f.close()
        return {"dtype": self.dtype.str, "length": self.count, "sha256": self.hash.hexdigest()}


class _Sequences:
    """tokens/mask/offsets triple for one stream of sequences (SFT, or one DPO side)."""

    def __init__(self, directory, prefix, eos_id):
        self.eos_id = eos_id
        self.tokens = _ArrayWriter(directory, prefix + "tokens", np.int32)
        self.mask = _ArrayWriter(directory, prefix + "mask", np.uint8)
        self.offsets = _ArrayWriter(directory, prefix + "offsets", np.int64)
        self.offsets.write([0])
        self.total = 0
        self.trained = 0

    def add(self, ids, labels):
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        trained = labels != IGNORE_INDEX
        other = trained & (labels != ids)
        if np.any(labels[other] != self.eos_id):  # the template labels a token only with itself or EOS
            raise ValueError("a label that is neither its token nor the EOS id cannot be stored")
        mask = np.where(other, MASK_EOS, np.where(trained, MASK_TOKEN, 0)).astype(np.uint8)
        self.tokens.write(ids)
        self.mask.write(mask)
        self.total += len(ids)
        self.trained += int(trained.sum())
        self.offsets.write([self.total])

    def close(self):
        return [self.tokens.close(), self.mask.close(), self.offsets.close()]


def _encode_many(tokenizer, conversations, eos_every_turn=False, train_history=True, template="bailing", tools=None,
                 thinking=None):
    """encode_chat over many conversations with one batched tokenizer call; ``tools``: each
    conversation's function signatures (bailing_v2 renders them), or None; ``thinking`` likewise, each
    conversation's "detailed thinking" line (bailing_v2), or None."""
    tools = tools or [None] * len(conversations)
    thinking = thinking or [None] * len(conversations)
    seg_lists = [chat_segments(msgs, eos_every_turn=eos_every_turn, train_history=train_history, template=template,
                               tools=t, thinking=th) for msgs, t, th in zip(conversations, tools, thinking)]
    pieces = iter(tokenizer.encode_batch([seg.text for segs in seg_lists for seg in segs]))
    return [segment_labels(segs, [next(pieces) for _ in segs], tokenizer.eos_id) for segs in seg_lists]


def _count_lines(path):
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def _check_output(out_dir):
    """The absolute output path, after refusing to replace anything that is not prepared data."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise DataError("output exists and is not a directory", file=out_dir)
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
            # Refuse to replace a directory we did not write.
            raise DataError("output directory is not empty and holds no prepared data; refusing to replace it",
                            file=out_dir)
    return out_dir


# Bytes per token (int32 id + uint8 mask) and per sample (int64 offset + int16 domain, per side).
_TOKEN_BYTES, _SAMPLE_BYTES = 5, 10
_SAMPLE_RECORDS = 256  # records per file tokenized to measure tokens per input byte


def estimate_bytes(files, tokenizer, kind, eos_every_turn=False, template="bailing"):
    """Bytes the prepared arrays will take, from a quick pass: the first records of each file are
    tokenized and their tokens per input byte scaled to the whole file (exact for small files; DPO
    counts the prompt once per side, as it is stored). Bad records are left to the real pass."""
    total = 0
    for path in files:
        size = os.path.getsize(path)
        recs, nbytes = [], 0
        with open(path, "rb") as f:
            for raw in f:
                nbytes += len(raw)
                try:
                    rec = (normalize_sft if kind == "sft" else normalize_dpo)(json.loads(raw.decode("utf-8-sig")))
                except (UnicodeDecodeError, ValueError):  # DataError and JSONDecodeError are ValueErrors
                    continue
                recs.append(rec)
                if len(recs) >= _SAMPLE_RECORDS:
                    break
        if not recs or not nbytes:
            continue
        if kind == "sft":
            convs = [r["messages"] for r in recs]
        else:
            convs = [c for r in recs for c in dpo_conversations(r)]
        need = sum(len(ids) for ids, _ in _encode_many(tokenizer, convs, eos_every_turn, kind == "sft", template)) \
            * _TOKEN_BYTES
        need += len(convs) * _SAMPLE_BYTES
        total += int(need * size / nbytes) + 1
    return total + 64 * 1024  # manifest, offsets' leading zeros


def prepare(files, tokenizer, out_dir, kind="sft", skip_bad=False, max_len=None, overlong="truncate",
            default_domain=None, progress=False, eos_every_turn=False, template="bailing"):
    """Tokenize ``files`` into ``out_dir``; returns the manifest dict.

    ``eos_every_turn`` (SFT): the end of every answer is trained, as LLaMA-Factory's bailing template
    encodes multi-turn data (data/template.py), not only the last; recorded in the manifest as
    template.eos_every_turn. DPO pairs train only the final answer either way.
    ``template``: "bailing" (Ling, Ling-Lite) or "bailing_v2" (Ling 2.0, whose records may carry
    "tools"); recorded as template.name.

    ``tokenizer`` is a Tokenizer or a tokenizer directory. Raises DataError on the first bad
    record unless ``skip_bad``; either way nothing is left at ``out_dir`` unless it all worked.
    Before writing, the arrays' size is estimated (estimate_bytes) and compared with the free space
    (data.files.NoSpaceError: "needs X GB at PATH, Y GB free"); a write that still runs out of space
    raises NoSpaceError naming the path, and the temporary directory is removed.
    """
    if kind not in ("sft", "dpo"):
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    check_template(template)
    if template == "bailing_v2":
        if eos_every_turn and kind == "sft":
            raise DataError("eos_every_turn is a choice of the bailing template only: bailing_v2 ends every turn "
                            "with <|role_end|> already")
        check_stop_token(tokenizer, template)
    elif tokenizer.eos_id is None or tokenizer.token_to_id(EOS_TOKEN) != tokenizer.eos_id:
        raise DataError(f"tokenizer eos must be {EOS_TOKEN!r} for the bailing template", file=tokenizer.name)
    if tokenizer.vocab_size >= 2 ** 31:
        raise DataError("vocabulary too large for int32 token storage")
    files = [str(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise MissingFileError(f"{f}: input file not found")
    out_dir = _check_output(out_dir)
    require_space(os.path.dirname(out_dir), estimate_bytes(files, tokenizer, kind, eos_every_turn, template),
                  f"preparing {', '.join(files)}")
    # An owned temporary beside out_dir: removed on any failure, renamed into place on success, and
    # swept by the next preparation of out_dir if this process is killed.
    with OwnedTempDir(out_dir, replace=True) as tmp:
        manifest = _prepare_into(files, tokenizer, tmp, kind, skip_bad, max_len, overlong, default_domain, progress,
                                 eos_every_turn, template)
    return manifest


def _prepare_into(files, tokenizer, tmp, kind, skip_bad, max_len, overlong, default_domain, progress, eos_every_turn,
                  template="bailing"):
    from tqdm import tqdm

    sides = [""] if kind == "sft" else ["chosen_", "rejected_"]
    seqs = {s: _Sequences(tmp, s, tokenizer.eos_id) for s in sides}
    domain_w = _ArrayWriter(tmp, "domain", np.int16)
    domains, domain_counts, tag_counts = [], {}, {}
    bad, sources = [], []
    stats = {"truncated": 0, "dropped_long": 0}
    n_samples = 0
    def flush(chunk):
        nonlocal n_samples
        if not chunk:
            return
        if kind == "sft":
            convs = [[r["messages"]] for r in chunk]
            tools = [r.get("tools") for r in chunk]
        else:
            convs = [dpo_conversations(r) for r in chunk]
            tools = None
        thinking = [r.get("thinking") for r in chunk for _ in convs[0]]
        flat = _encode_many(tokenizer, [c for group in convs for c in group], eos_every_turn, kind == "sft",
                            template, tools, thinking)
        per = len(sides)
        for i, rec in enumerate(chunk):
            encoded = flat[i * per:(i + 1) * per]
            fitted, status = [], "ok"
            for ids, labels in encoded:
                if max_len is not None:
                    ids, labels, st = fit_document(ids, labels, max_len, overlong)
                    if st == "dropped":
                        status = "dropped"
                    elif st == "truncated" and status == "ok":
                        status = "truncated"
                fitted.append((ids, labels))
            if status == "dropped":
                stats["dropped_long"] += 1
                continue
            if status == "truncated":
                stats["truncated"] += 1
            for s, (ids, labels) in zip(sides, fitted):
                seqs[s].add(ids, labels)
            name = rec["domain"] or default_domain or "default"
            if name not in domains:
                if len(domains) >= 2 ** 15 - 1:
                    raise DataError("too many distinct domains (int16 ids)")
                domains.append(name)
            domain_w.write([domains.index(name)])
            domain_counts[name] = domain_counts.get(name, 0) + 1
            for t in rec["tags"]:
                tag_counts[t] = tag_counts.get(t, 0) + 1
            n_samples += 1

    # In a with block: a bad record closes the bar before its error is printed on a line of its own.
    with tqdm(total=sum(_count_lines(f) for f in files) if progress else None, unit="rec", desc="prepare",
              disable=not progress, file=sys.stderr) as bar:
        for f in files:
            bad_before, records = len(bad), 0
            chunk = []
            for line, rec in read_jsonl(f, kind=kind, skip_bad=skip_bad, bad=bad):
                try:  # fields only the bailing_v2 template renders: refused here, with the line, not dropped
                    check_fields(template, rec.get("tools"), rec.get("thinking"))
                except DataError as e:
                    raise e.located(f, line) from None
                records += 1
                chunk.append(rec)
                if len(chunk) >= _CHUNK:
                    flush(chunk)
                    bar.update(len(chunk))
                    chunk = []
            flush(chunk)
            bar.update(len(chunk))
            sources.append({"file": os.path.abspath(f), "records": records, "skipped": len(bad) - bad_before})

    arrays = {}
    for s in sides:
        for info, w in zip(seqs[s].close(), (seqs[s].tokens, seqs[s].mask, seqs[s].offsets)):
            arrays[w.name] = info
    arrays["domain"] = domain_w.close()
    if n_samples == 0:
        raise DataError("no usable samples in " + ", ".join(files))

    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "domains": domains, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                         "version": FORMAT_VERSION}, sort_keys=True).encode())
    for name in sorted(arrays):
        h.update(name.encode() + arrays[name]["sha256"].encode())
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
        "num_samples": n_samples,
        "num_tokens": {s.rstrip("_") or "tokens": seqs[s].total for s in sides},
        "num_trained_tokens": {s.rstrip("_") or "tokens": seqs[s].trained for s in sides},
        "domains": domains, "domain_counts": domain_counts, "tag_counts": tag_counts,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
        # name: absent for bailing (manifests written before templates had names say nothing)
        "template": {"eos_every_turn": bool(eos_every_turn) if kind == "sft" else False,
                     "version": TEMPLATE_VERSION, **({"name": template} if template != "bailing" else {})},
        "max_len": max_len, "overlong": overlong if max_len is not None else None,
        "truncated": stats["truncated"], "dropped_long": stats["dropped_long"],
        "num_skipped": len(bad),
        "skipped": [{"file": f, "line": ln, "problem": p} for f, ln, p in bad[:1000]],
        "sources": sources, "arrays": arrays, "data_hash": h.hexdigest(),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    return manifest


def summary(manifest):
    """A few human lines describing a prepared directory."""
    lines = [f"kind={manifest['kind']} samples={manifest['num_samples']} hash={manifest['data_hash'][:16]}"]
    for name, n in manifest["num_tokens"].items():
        lines.append(f"  {name}: {n} tokens, {manifest['num_trained_tokens'][name]} trained")
    lines.append("  domains: " + ", ".join(f"{d}={c}" for d, c in sorted(manifest["domain_counts"].items())))
    lines.append(f"  truncated={manifest['truncated']} dropped_long={manifest['dropped_long']} "
                 f"skipped_bad={manifest['num_skipped']}")
    for s in manifest["skipped"][:10]:
        lines.append(f"    skipped {s['file']}:{s['line']}: {s['problem']}")
    if manifest["num_skipped"] > 10:
        lines.append(f"    ... and {manifest['num_skipped'] - 10} more (see manifest.json)")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize chat JSONL (SFT or DPO pairs) with the bailing template into memory-mapped "
                    "shards plus manifest.json. Output is written to a temp dir and renamed at the end.")
    p.add_argument("files", nargs="+", metavar="FILE", help="input JSONL files, read in the given order")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="Hugging Face tokenizer directory (tokenizer.json [+ tokenizer_config.json])")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced if it holds prepared data)")
    p.add_argument("--kind", choices=("sft", "dpo"), default="sft",
                   help="sft: messages/conversations records; dpo: prompt/chosen/rejected pairs (default sft)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count malformed records instead of stopping at the first one")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="cut samples (each DPO side) longer than N tokens; counted in the summary")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                   help="with --max-len: truncate long samples to N tokens or drop them (default truncate)")
    p.add_argument("--domain", default=None,
                   help="domain name for records without a 'domain' field (default 'default')")
    p.add_argument("--eos-every-turn", action="store_true",
                   help="SFT: train the end of every assistant turn (the label <|endoftext|> on the next turn's "
                        "<role>, no EOS in the input), exactly as LLaMA-Factory's bailing template encodes "
                        "multi-turn data (default: only the final answer's EOS)")
    p.add_argument("--template", choices=TEMPLATES, default="bailing",
                   help="chat template: bailing (Ling, Ling-Lite; default) or bailing_v2 (Ling 2.0: every turn ends "
                        "with <|role_end|>, records may carry 'tools')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_len is not None and args.max_len < 2:  # below 2 no sample keeps a token to train on
        raise BadInputError(f"--max-len must be at least 2 (a token to predict from and one to predict), "
                            f"got {args.max_len}")
    manifest = prepare(args.files, args.tokenizer, args.out, kind=args.kind, skip_bad=args.skip_bad,
                       max_len=args.max_len, overlong=args.overlong, default_domain=args.domain,
                       progress=not args.quiet, eos_every_turn=args.eos_every_turn, template=args.template)
    print(f"wrote {os.path.abspath(args.out)}")
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
