"""Compile every Triton kernel variant for sm_90 (H100) without a GPU.

Catches type and lowering errors the interpreter cannot see; uses the ptxas bundled with
triton. Run: `PYTHONPATH=. python benchmarks/aot_compile_check.py`. Integer arguments carry no
divisibility hints here, so the reported shared memory is the unpipelined worst case.
Run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
Takes about a minute with a cold triton cache.
"""
import torch
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import kernels._grouped_gemm as gg

target = GPUTarget("cuda", 90, 32)

def sig_of(fn, ptr_types, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*i32")
        else:
            sig[name] = "i32"
    return sig

def build(fn, ptr_types, consts, warps, stages):
    src = ASTSource(fn, sig_of(fn, ptr_types, consts), constexprs=consts)
    k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    print("ok", fn.__name__, {k_: v for k_, v in consts.items() if k_ not in ("BM","BN","BK")}, "smem", k.metadata.shared)

for dt, tt in [(torch.bfloat16, "*bf16"), (torch.float16, "*fp16"), (torch.float32, "*fp32")]:
    for nrows in (3072, 98304):
        cfg = gg.pick_config(nrows, 64, dt)
        prec = gg._dot_precision(dt)
        W, S = cfg.num_warps, cfg.num_stages
        act = {n: tt for n in ("x_ptr", "w_ptr", "h_ptr", "gu_ptr", "a_ptr", "b_ptr", "out_ptr", "dy_ptr", "dgu_ptr")}
        act.update(tw_ptr="*fp32", dtw_part_ptr="*fp32")
        for save in (True, False):
            build(gg._gate_up_fwd_kernel, act, dict(SAVE_GU=save, BM=cfg.block_m, BN=cfg.block_n_gu, BK=cfg.block_k, DOT_PREC=prec), W, S)
        for ag, sc in ((False, True), (False, False), (True, False)):
            build(gg._rows_gemm_kernel, act, dict(A_GATHER=ag, SCALE=sc, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, DOT_PREC=prec), W, S)
        build(gg._down_bwd_kernel, act, dict(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, DOT_PREC=prec), W, S)
        for flags in ((True, True, False, True), (False, False, True, False)):
            c = dict(zip(("A_GATHER", "A_SCALE", "B_GATHER", "B_SWIGLU"), flags))
            c.update(BM=cfg.wg_block_m, BN=cfg.wg_block_n, BK=cfg.wg_block_k, DOT_PREC=prec)
            build(gg._expert_wgrad_kernel, act, c, W, S)
