"""python -m checkpoints_convert.verify A B [--atol 0]: are two checkpoints (HF or native, either side) the same?

``verify --serving DIR`` instead checks that an export is complete for serving (checkpoints_convert/serving.py).

Both sides are read as native tensors through the adapter, so an HF checkpoint and a native one are
compared tensor for tensor (a layer's stacked experts against its 64 x 3 HF matrices). With the
default --atol 0 equality is bitwise (NaN payloads and signed zeros included) and dtypes must match.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from tqdm import tqdm

from checkpoints_convert.checkpoint import open_checkpoint
from checkpoints_convert.io import dtype_name
from checkpoints_convert.serving import check_serving
from moe.config import BailingMoeConfig
from data.errors import run_cli

# Fields that change nothing about the weights or the computation on them.
_NOT_ARCHITECTURE = {"torch_dtype", "expert_backend", "aux_loss_type", "aux_loss_alpha", "z_loss_coef", "extra_hf",
                     "mtp_enabled",
                     "initializer_range", "transformers_version"}
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class Difference:
    name: str
    message: str


def config_differences(a: BailingMoeConfig, b: BailingMoeConfig) -> list[Difference]:
    out = []
    for f in dataclasses.fields(BailingMoeConfig):
        if f.name in _NOT_ARCHITECTURE:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(Difference(f"config.{f.name}", f"{va!r} vs {vb!r}"))
    return out


def _chunks(t: torch.Tensor):
    """Row blocks of ``t`` of about 64 MB, so comparing never upcasts a whole layer at once."""
    if t.dim() == 0 or t.numel() == 0:
        yield t.reshape(-1)
        return
    flat = t.reshape(t.shape[0], -1)
    rows = max(1, _CHUNK_BYTES // max(1, flat.shape[1] * 4))
    for i in range(0, flat.shape[0], rows):
        yield flat[i:i + rows]


def compare_tensors(name: str, a: torch.Tensor, b: torch.Tensor, atol: float = 0.0,
                    ignore_dtype: bool = False) -> Difference | None:
    """None when equal (bitwise for atol 0), else what differs."""
    if tuple(a.shape) != tuple(b.shape):
        return Difference(name, f"shape {list(a.shape)} vs {list(b.shape)}")
    dtype_differs = a.dtype != b.dtype
    if dtype_differs and not ignore_dtype:
        return Difference(name, f"dtype {dtype_name(a.dtype)} vs {dtype_name(b.dtype)}")
    bitwise = atol == 0 and not dtype_differs and a.element_size() in _INT_OF_SIZE
    n_bad, max_abs, first, offset = 0, 0.0, None, 0
    for ca, cb in zip(_chunks(a), _chunks(b)):
        if bitwise:
            it = _INT_OF_SIZE[a.element_size()]
            bad = ca.contiguous().view(it) != cb.contiguous().view(it)
        else:
            wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
            bad = ~torch.isclose(ca.to(wide), cb.to(wide), rtol=0.0, atol=atol, equal_nan=True)
        k = int(bad.sum())
        if k:
            wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
            diff = (ca.to(wide) - cb.to(wide)).abs()[bad]
            max_abs = max(max_abs, float("nan") if diff.isnan().any() else float(diff.max()))
            if first is None:
                pos = int(bad.reshape(-1).nonzero()[0])
                flat_a, flat_b = ca.reshape(-1), cb.reshape(-1)
                idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(offset + pos), a.shape)) \
                    if a.dim() else ()
                first = (idx, flat_a[pos].item(), flat_b[pos].item())
            n_bad += k
        offset += ca.numel()
    if n_bad == 0:
        return None
    note = f" (dtypes {dtype_name(a.dtype)} vs {dtype_name(b.dtype)})" if dtype_differs else ""
    return Difference(name, f"{n_bad} of {a.numel()} elements differ, max abs diff {max_abs:.3e}; first at "
                            f"index {list(first[0])}: {first[1]!r} vs {first[2]!r}{note}")


def verify(path_a: str, path_b: str, atol: float = 0.0, ignore_dtype: bool = False, max_report: int = 10,
           out=None, progress: bool = False) -> int:
    """Print differences between two checkpoints; 0 when identical, 1 otherwise."""
    out = sys.stdout if out is None else out
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        print(f"A: {path_a} ({a.kind})\nB: {path_b} ({b.kind})", file=out)
        diffs: list[Difference] = []

        def report(d: Difference) -> None:
            diffs.append(d)
            if len(diffs) <= max_report:  # printed as found, so a long run shows problems early
                print(f"DIFF {d.name}: {d.message}", file=out, flush=True)

        for d in config_differences(a.cfg, b.cfg):
            report(d)
        names_a, names_b = a.names, b.names
        set_a, set_b = set(names_a), set(names_b)
        for n in names_a:
            if n not in set_b:
                report(Difference(n, "only in A"))
        for n in names_b:
            if n not in set_a:
                report(Difference(n, "only in B"))
        common = [n for n in names_a if n in set_b]
        compared_bytes = 0
        # In a with block: an unreadable tensor closes the bar before its error is printed.
        with tqdm(total=len(common), unit="tensor", desc="comparing", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress) as bar:
            for name in common:
                ta, tb = a.get_native(name), b.get_native(name)
                d = compare_tensors(name, ta, tb, atol, ignore_dtype)
                compared_bytes += ta.numel() * ta.element_size()
                del ta, tb
                if d is not None:
                    report(d)
                bar.update(1)
    if not diffs:
        how = "bitwise" if atol == 0 else f"with atol {atol}"
        print(f"identical: {len(common)} tensors ({compared_bytes} bytes of A) compared {how}", file=out)
        return 0
    more = f", first {max_report} shown" if len(diffs) > max_report else ""
    print(f"DIFFERENT: {len(diffs)} difference(s){more}; {len(common)} common tensors compared", file=out)
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert.verify",
        description="Compare every tensor of two checkpoints, each HF bailing_moe or lingmoe-native "
                    "(auto-detected from config.json), through the name adapter; also compares the "
                    "architecture fields of the two configs. Prints the first differences (name, "
                    "shape/dtype mismatch, number of differing elements, max abs diff).",
        epilog="Exit status: 0 identical, 1 different, 2 error (unreadable or invalid checkpoint).")
    p.add_argument("a", metavar="A", help="first checkpoint directory (HF or native)")
    p.add_argument("b", metavar="B", nargs="?", help="second checkpoint directory (HF or native)")
    p.add_argument("--serving", action="store_true",
                   help="instead: is the export A complete for serving (weights, config, tokenizer, chat template, "
                        "generation config, and does the template render as data/template.py)? exit 0 yes, 1 no")
    p.add_argument("--atol", type=float, default=0.0,
                   help="largest absolute difference counted as equal (default 0: bitwise equality)")
    p.add_argument("--ignore-dtype", action="store_true",
                   help="compare values across dtypes (e.g. a bf16 checkpoint against its fp32 conversion) "
                        "instead of reporting a dtype mismatch")
    p.add_argument("--max-report", type=int, default=10, metavar="N", help="print at most N differences (default 10)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.serving:
        return check_serving(args.a)
    if args.b is None:
        p.error("verify needs two checkpoints A B (or --serving A)")
    if args.atol < 0:
        p.error("--atol must be >= 0")
    return verify(args.a, args.b, args.atol, args.ignore_dtype, args.max_report, progress=args.progress)


if __name__ == "__main__":
    sys.exit(run_cli(main))
