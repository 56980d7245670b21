"""Compile every Triton kernel variant for sm_90 (H100) without a GPU.

Catches type and lowering errors the interpreter cannot see; uses the ptxas bundled with triton.
Run: `PYTHONPATH=. python benchmarks/aot_compile_check.py [--check-no-spills]`. Arguments get the
alignment hints the JIT gives at Ling-Lite shapes. Each line reports shared memory, registers, stack frame
and, from the machine code (cuobjdump), the count of Hopper warpgroup MMAs (HGMMA), older MMAs
(HMMA), async global->shared copies (LDGSTS) and local-memory loads/stores (LDL/STL: spills).
Run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
Takes about a minute with a cold triton cache.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
if __package__ in (None, ""):  # run as a file: import from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels._glue as glue  # noqa: E402
import kernels._grouped_gemm as gg  # noqa: E402

target = GPUTarget("cuda", 90, 32)

FLOAT_ARGS = ("lora_scale",)


def sig_of(fn, ptr_types, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*i32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_report(cubin: bytes) -> dict:
    """Registers, spill bytes and the matrix instructions in the machine code, read with the
    cuobjdump bundled with triton: HGMMA = Hopper warpgroup MMA (wgmma), HMMA = the older mma.sync."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(TOOLS, "cuobjdump")
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    counts = {op: len(re.findall(rf"\b{op}[.\s]", sass)) for op in ("HGMMA", "HMMA", "LDGSTS", "LDL", "STL")}
    text = (f"regs {regs.group(1) if regs else '?'} stack {stack.group(1) if stack else '?'} "
            f"HGMMA {counts['HGMMA']} HMMA {counts['HMMA']} LDGSTS {counts['LDGSTS']} "
            f"LDL {counts['LDL']} STL {counts['STL']}")
    return dict(counts, text=text)


def build(fn, ptr_types, consts, warps, stages, not_multiple_of_16=()) -> dict:
    # What the JIT infers at Ling-Lite shapes: every pointer 16-byte aligned and every integer
    # argument (H=2048, I=1408, the strides) a multiple of 16. Without these hints the loads
    # cannot be 16-byte cp.async copies and the report would describe a kernel that never runs.
    # (K=6 and the d topk_w block count 22 are not: those take no hint.)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in not_multiple_of_16 and n not in FLOAT_ARGS}
    src = ASTSource(fn, sig_of(fn, ptr_types, consts), constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    flags = {k_: v for k_, v in consts.items() if k_ not in ("BM", "BN", "BK", "TILE_ORDER", "RB")}
    tiles = "x".join(str(consts.get(n, "-")) for n in ("BM", "BN", "BK"))
    rep = sass_report(k.asm["cubin"])
    print("ok", fn.__name__, tiles, flags, "smem", k.metadata.shared, rep["text"], flush=True)
    return dict(rep, kernel=fn.__name__, tiles=tiles, flags=flags, smem=k.metadata.shared)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("gate_up", "rows", "down_bwd", "wgrad", "routing", "combine")
# LoRA on the experts at the rank of the Ling repository's LoRA recipes: its narrow products' tiles
LORA_RANK = 8
# the LoRA inputs: u [N, R] rows take no 16-multiple hint (R = 8 or 16 is one, but the rank is the user's)
LORA_ODD = ("stride_lu", "stride_lbe", "stride_lbk", "stride_lbn", "R")


def check_config(dtype_name: str, nrows: int, kernels=KERNELS) -> list[dict]:
    dt = DTYPES[dtype_name]
    tt = "*" + dtype_name
    cfg = gg.pick_config(nrows, 64, dt)
    print(f"# {dtype_name}, {nrows} routed rows over 64 experts: {cfg}")
    prec = gg._dot_precision(dt)
    W, S = cfg.num_warps, cfg.num_stages
    act = {n: tt for n in ("x_ptr", "w_ptr", "h_ptr", "gu_ptr", "a_ptr", "b_ptr", "out_ptr", "dy_ptr", "dgu_ptr",
                           "hw_ptr")}
    act.update(tw_ptr="*fp32", dtw_part_ptr="*fp32", lu_ptr=tt, lb_ptr=tt)
    out = []
    rb = gg._rank_block(LORA_RANK)
    narrow = min(cfg.block_n, max(16, triton.next_power_of_2(2 * LORA_RANK)))  # rows_product's BN for u [N, 2R]
    odd = LORA_ODD
    if "gate_up" in kernels:
        for save, lora in ((True, False), (False, False), (True, True)):
            out.append(build(gg._gate_up_fwd_kernel, act, dict(SAVE_GU=save, HAS_LORA=lora, RB=rb, TILE_ORDER=cfg.tile_order,
                                                               BM=cfg.block_m, BN=cfg.block_n_gu, BK=cfg.block_k,
                                                               DOT_PREC=prec), W, S, odd))
    if "rows" in kernels:
        # down (scaled), dx, and with LoRA: down and dx with the adapter's term, the narrow products
        # x[tok] A^T (gathered) and h A^T into sorted rows
        for ag, sc, srt, lora, bn in ((False, True, False, False, cfg.block_n), (False, False, False, False, cfg.block_n),
                                      (True, False, False, False, cfg.block_n), (False, True, False, True, cfg.block_n),
                                      (False, False, False, True, cfg.block_n), (True, False, True, False, narrow),
                                      (False, False, True, False, narrow)):
            out.append(build(gg._rows_gemm_kernel, act, dict(A_GATHER=ag, SCALE=sc, OUT_SORTED=srt, HAS_LORA=lora, RB=rb,
                                                             TILE_ORDER=cfg.tile_order, BM=cfg.block_m, BN=bn,
                                                             BK=cfg.block_k, DOT_PREC=prec), W, S, odd + ("N_OUT",)))
    if "down_bwd" in kernels:
        for lora in (False, True):
            out.append(build(gg._down_bwd_kernel, act, dict(STORE_HW=True, HAS_LORA=lora, RB=rb, TILE_ORDER=cfg.tile_order,
                                                            BM=cfg.block_m, BN=cfg.block_n_dbwd, BK=cfg.block_k,
                                                            DOT_PREC=prec), cfg.dbwd_warps or W, S, odd))
    if "routing" in kernels and dtype_name == "bf16":  # integer kernel: one build per row count suffices
        e_pad, block, block_h, _ = glue._routing_blocks(nrows, 64, interpret=False)
        for have in (True, False):
            out.append(build(glue._routing_kernel, {"ids_ptr": "*i64"},
                             dict(HAVE_COUNTS=have, E_PAD=e_pad, BLOCK=block, BLOCK_H=block_h, BLOCK_J=min(64, block)),
                             4, 1, not_multiple_of_16=("K",)))
    if "combine" in kernels:
        for has_part in (False, True):
            out.append(build(glue._combine_kernel, {"o_ptr": tt, "y_ptr": tt, "part_ptr": "*fp32", "dtw_ptr": "*fp32"},
                             dict(HAS_PART=has_part, BT=16, BH=256, NB_PAD=32), 4, 1, not_multiple_of_16=("K", "NB")))
    if "wgrad" in kernels:
        # the frozen weights' dW_down and dW_gate_up (unit output column stride: the JIT makes a 1 a constant),
        # then the adapters' (kernels.moe_mlp), the wide side as M: dB_down [H, R] and dA_gate_up^T [H, 2R]
        # (dy, x gathered; one build at R = 8, both 16 wide), dB_gate_up's halves and dA_down^T [I, R] (sorted
        # rows; the transposed ones written through a strided view)
        r = LORA_RANK
        for flags, (m, n) in (((True, False), (0, 0)), ((False, True), (0, 0)), ((True, False), (2048, r)),
                              ((False, False), (1408, r))):
            c = dict(zip(("A_GATHER", "B_GATHER"), flags))
            wc = gg.narrow_wgrad_config(cfg, m, n) if m else cfg
            c.update(TILE_ORDER=cfg.tile_order, BM=wc.wg_block_m, BN=wc.wg_block_n, BK=cfg.wg_block_k, DOT_PREC=prec)
            if not m:
                c["stride_on"] = 1
            out.append(build(gg._expert_wgrad_kernel, act, c, cfg.wg_warps or W, cfg.wg_stages or S,
                             ("N",) if m else ()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16", "fp32"],
                   help="operand dtypes (default: all three)")
    p.add_argument("--rows", nargs="+", type=int, default=[3072, 98304],
                   help="routed rows T*K, which pick the tile bucket (default: 3072 98304, i.e. T=512 and "
                        "T=16384 at K=6)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="kernels to build")
    p.add_argument("--check-no-spills", action="store_true",
                   help="exit 1 if a 16-bit kernel touches local memory (LDL/STL) or lacks HGMMA")
    args = p.parse_args(argv)
    print(f"# triton {triton.__version__}, torch {torch.__version__}, target sm_90")
    bad = []
    for d in args.dtypes:
        for n in args.rows:
            for r in check_config(d, n, args.kernels):
                needs_mma = r["kernel"] not in ("_routing_kernel", "_combine_kernel")  # no matmul in them
                if d != "fp32" and (r["LDL"] or r["STL"] or (needs_mma and not r["HGMMA"])):
                    bad.append(f"{d} rows={n} {r['kernel']} {r['tiles']} {r['flags']}: {r['text']}")
    if args.check_no_spills and bad:
        print("kernels that spill or miss wgmma:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
