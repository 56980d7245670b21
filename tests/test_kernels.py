"""Triton MoE kernels against the plain-PyTorch reference (runs on CPU via the interpreter).

Legend: T tokens, E experts, K top-k, H hidden, I expert width. Shapes are tiny on purpose:
the interpreter costs ~ms per program, and the kernels use 16-wide blocks there, so H=40 and
I=24 already exercise ragged column blocks and multi-tile experts.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: triton.jit picks the interpreter
    # at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels._grouped_gemm import pick_config  # noqa: E402
from kernels.routing import build_routing, max_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _make(T, H, I, E, K, ids_dtype=torch.int64, seed=0, unused_experts=(), skew_to=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w_gu = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w_d = torch.randn(E, H, I, generator=gen) / I ** 0.5
    allowed = torch.tensor([e for e in range(E) if e not in unused_experts])
    rows = []
    for t in range(T):
        perm = allowed[torch.randperm(len(allowed), generator=gen)][:K]
        if skew_to is not None and skew_to not in perm.tolist():
            perm[0] = skew_to  # pile most rows onto one expert: several tiles for it
        rows.append(perm)
    ids = torch.stack(rows).to(ids_dtype)
    tw = torch.rand(T, K, generator=gen) + 0.1
    dy = torch.randn(T, H, generator=gen)
    return [t.to(DEVICE) for t in (x, w_gu, w_d, ids, tw, dy)]


def _fwd_bwd(fn, x, w_gu, w_d, ids, tw, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_gu, w_d, tw)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(),) + grads


CASES = {
    # name: (T, H, I, E, K, ids dtype, extra)
    "empty_expert_ragged": (13, 40, 24, 5, 3, torch.int64, dict(unused_experts=(4,))),
    "T1_int32": (1, 16, 16, 4, 2, torch.int32, {}),
    "K1_int32_ragged": (20, 24, 20, 3, 1, torch.int32, {}),
    "multi_tile_expert": (24, 20, 8, 5, 2, torch.int64, dict(skew_to=0, unused_experts=(3,))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_moe_mlp_matches_reference(case):
    T, H, I, E, K, ids_dtype, extra = CASES[case]
    inputs = _make(T, H, I, E, K, ids_dtype, **extra)
    got = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    want = _fwd_bwd(reference.loop_moe_mlp, *inputs)
    names = ["y", "dx", "dw_gate_up", "dw_down", "dtopk_w"]
    errs = {n: _rel(a, b) for n, a, b in zip(names, got, want)}
    print(case, {n: f"{e:.2e}" for n, e in errs.items()})
    for n, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert errs[n] < 1e-4, (n, errs[n])
    for e in extra.get("unused_experts", ()):
        # no rows -> exactly zero weight gradient (catches uninitialised output tiles)
        assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0


def test_non_contiguous_inputs():
    T, H, I, E, K = 9, 20, 12, 4, 2
    x, w_gu, w_d, ids, tw, dy = _make(T, H, I, E, K, seed=3)
    # Same values in strided storage: column slices of wider buffers, a transposed weight.
    x_base = torch.stack([x, torch.zeros_like(x)], dim=2).requires_grad_(True)
    w_base = w_gu.transpose(1, 2).contiguous().requires_grad_(True)
    tw_base = torch.stack([tw, tw], dim=2).requires_grad_(True)
    x_nc, w_gu_nc, tw_nc = x_base[:, :, 0], w_base.transpose(1, 2), tw_base[:, :, 1]
    ids_nc = torch.stack([ids, ids], dim=2)[:, :, 0]
    dy_nc = torch.stack([dy, dy], dim=2)[:, :, 1]
    for t in (x_nc, w_gu_nc, tw_nc, ids_nc, dy_nc):
        assert not t.is_contiguous()
    y = kernels.triton_moe_mlp(x_nc, w_gu_nc, w_d, ids_nc, tw_nc)
    gx, gw, gtw = torch.autograd.grad(y, (x_base, w_base, tw_base), dy_nc)
    want = _fwd_bwd(reference.loop_moe_mlp, x, w_gu, w_d, ids, tw, dy)
    errs = [_rel(y.detach(), want[0]), _rel(gx[:, :, 0], want[1]),
            _rel(gw.transpose(1, 2), want[2]), _rel(gtw[:, :, 1], want[4])]
    print("non-contiguous rel errs", errs)
    assert max(errs) < 1e-4
    assert torch.count_nonzero(gx[:, :, 1]) == 0 and torch.count_nonzero(gtw[:, :, 0]) == 0


def test_kernels_use_no_atomics():
    # Run-to-run determinism (tests/test_kernels_gpu.py checks it bitwise on a GPU) rests on every output
    # element being written by one program with a fixed reduction order. Under the interpreter programs
    # run one after another, so a second run cannot differ there; what can be checked here is that no
    # kernel accumulates through atomics (a float atomic_add makes the sum's order the scheduler's)
    # and, below, that the result does not depend on the order programs are launched in.
    import inspect

    from kernels import _glue, _grouped_gemm

    for module in (_grouped_gemm, _glue):
        src = inspect.getsource(module)
        assert "@triton.jit" in src and "tl.atomic" not in src, module.__name__


def test_launch_order_changes_nothing_but_the_order(monkeypatch):
    # tile_order only permutes which program runs when; each output element is still computed by
    # one program with the same reduction order, so both orders agree bit for bit. (Output tiles
    # accumulated across programs would differ in their last bits between the two orders.)
    inputs = _make(24, 20, 8, 5, 2, skew_to=1, seed=6, unused_experts=(4,))
    monkeypatch.setenv("LINGMOE_TRITON_CONFIG", "tile_order=0")
    old = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    monkeypatch.setenv("LINGMOE_TRITON_CONFIG", "tile_order=1")
    new = _fwd_bwd(kernels.triton_moe_mlp, *inputs)
    want = _fwd_bwd(reference.loop_moe_mlp, *inputs)
    for a, b, r in zip(old, new, want):
        assert torch.equal(a, b)
        assert _rel(a, r) < 1e-4


def test_routing_hand_example():
    ids = torch.tensor([[2, 0], [2, 2], [1, 2]], device=DEVICE)  # not a valid top-k, fine here
    r = build_routing(ids, num_experts=4, block_m=2)
    # flat ids 2 0 2 2 1 2 -> expert 0: flat 1; expert 1: flat 4; expert 2: flat 0 2 3 5
    assert r.sorted_flat_ids.tolist() == [1, 4, 0, 2, 3, 5]
    assert r.sorted_token_ids.tolist() == [0, 2, 0, 1, 1, 2]
    assert r.expert_counts.tolist() == [1, 1, 4, 0]
    assert r.expert_offsets.tolist() == [0, 1, 2, 6, 6]
    assert max_tiles(6, 4, 2) == 3 + 4
    assert r.tile_expert.tolist() == [0, 1, 2, 2, -1, -1, -1]
    assert r.tile_row_start.tolist()[:4] == [0, 1, 2, 4]
    assert r.num_tiles.tolist() == [4]


@pytest.mark.parametrize("T,E,K,bm,ids_dtype", [(37, 7, 3, 4, torch.int32), (50, 9, 1, 8, torch.int64),
                                                (1, 3, 2, 16, torch.int32)])
def test_routing_against_sort_reference(T, E, K, bm, ids_dtype):
    gen = torch.Generator().manual_seed(T)
    probs = torch.tensor([0.0] + [1.0 / (e + 1) ** 2 for e in range(E - 1)])  # expert 0 empty
    ids = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=gen)
    ids = ids.to(ids_dtype).to(DEVICE)
    r = build_routing(ids, E, bm)
    flat = ids.reshape(-1).cpu().long()
    order = torch.argsort(flat, stable=True)
    assert r.sorted_flat_ids.cpu().tolist() == order.tolist()
    assert r.sorted_token_ids.cpu().tolist() == (order // K).tolist()
    counts = [int((flat == e).sum()) for e in range(E)]
    assert r.expert_counts.cpu().tolist() == counts
    # Tile table built the slow way: walk experts, cut each into bm-row tiles.
    tiles, start = [], 0
    for e in range(E):
        for s in range(start, start + counts[e], bm):
            tiles.append((e, s))
        start += counts[e]
    n_max = max_tiles(T * K, E, bm)
    assert len(tiles) <= n_max == r.tile_expert.numel()
    te, tr = r.tile_expert.cpu().tolist(), r.tile_row_start.cpu().tolist()
    assert list(zip(te, tr))[:len(tiles)] == tiles
    assert te[len(tiles):] == [-1] * (n_max - len(tiles))
    assert r.num_tiles.item() == len(tiles)


@pytest.mark.parametrize("T,E,K,bm,ids_dtype", [(37, 7, 3, 4, torch.int32), (50, 9, 1, 8, torch.int64),
                                                (1, 3, 2, 16, torch.int32), (9, 130, 4, 16, torch.int64)])
@pytest.mark.parametrize("given", [False, True], ids=["counted", "given"])
def test_one_launch_routing_equals_the_reference(T, E, K, bm, ids_dtype, given):
    """The Triton routing kernel against build_routing (itself checked against argsort above): every
    table equal, bit for bit, with experts that get nothing (expert 0), one token, E past a power of
    two, and more programs than one (each rereads the rows before its chunk)."""
    from kernels._glue import build_routing_fused

    gen = torch.Generator().manual_seed(T + E)
    probs = torch.tensor([0.0] + [1.0 / (e + 1) for e in range(E - 1)])
    ids = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=gen).to(ids_dtype).to(DEVICE)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E).to(DEVICE) if given else None
    got = build_routing_fused(ids, E, bm, counts, interpret=not torch.cuda.is_available())
    want = build_routing(ids, E, bm)
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a, b) if name != "block_m" else a == b, name


def test_one_launch_routing_spreads_over_programs():
    # 200 rows under the interpreter: 7 programs of 32 rows (the last one 8), each with a prefix of
    # whole 32-row histogram blocks; every expert's rows cross program borders, and the tile table is
    # split over the programs too.
    from kernels._glue import _routing_blocks, build_routing_fused

    assert _routing_blocks(200, 5, interpret=True) == (8, 16, 32, 32)
    ids = (torch.arange(100)[:, None] * 7 + torch.arange(2)[None, :]) % 5  # [100, 2]
    got = build_routing_fused(ids.to(DEVICE), 5, 4, interpret=not torch.cuda.is_available())
    want = build_routing(ids.to(DEVICE), 5, 4)
    assert all(torch.equal(a, b) for a, b in zip(got[:-1], want[:-1]))


@pytest.mark.parametrize("fn", ["triton", "grouped_mm"])
def test_counts_given_by_the_caller_change_nothing(fn):
    """The model passes the router's histogram down; the result must be the one the backend gets
    by counting itself, bit for bit, gradients included."""
    f = kernels.triton_moe_mlp if fn == "triton" else reference.grouped_mm_moe_mlp
    x, w_gu, w_d, ids, tw, dy = _make(13, 40, 24, 5, 3, unused_experts=(4,), seed=11)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=5).to(DEVICE)  # counted independently
    own = _fwd_bwd(f, x, w_gu, w_d, ids, tw, dy)
    given = _fwd_bwd(lambda *a: f(*a, counts_E=counts), x, w_gu, w_d, ids, tw, dy)
    for a, b in zip(own, given):
        assert torch.equal(a, b)
    tables = build_routing(ids, 5, 4, counts_E=counts)
    assert all(torch.equal(a, b) for a, b in zip(tables[:-1], build_routing(ids, 5, 4)[:-1]))
    with pytest.raises(ValueError, match="counts_E"):
        build_routing(ids, 5, 4, counts_E=counts[:4])


def test_forward_without_grad_and_input_checks():
    x, w_gu, w_d, ids, tw, _ = _make(5, 16, 16, 3, 2, seed=7)
    with torch.no_grad():
        y = kernels.triton_moe_mlp(x, w_gu, w_d, ids, tw)
    assert _rel(y, reference.loop_moe_mlp(x, w_gu, w_d, ids, tw)) < 1e-4
    with pytest.raises(ValueError):
        kernels.triton_moe_mlp(x, w_gu, w_d[:, :, :-1], ids, tw)
    with pytest.raises(TypeError):
        kernels.triton_moe_mlp(x, w_gu, w_d, ids.float(), tw)


def test_grouped_mm_reference_matches_loop():
    inputs = _make(11, 24, 16, 4, 2, seed=9)
    got = _fwd_bwd(reference.grouped_mm_moe_mlp, *inputs)
    want = _fwd_bwd(reference.loop_moe_mlp, *inputs)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


@pytest.mark.slow
def test_bench_cli_rows(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    out = tmp_path / "bench.json"
    T, E, K, H, I = 16, 4, 2, 32, 16
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "kernels.bench", "--tokens", str(T), "--experts", str(E),
           "--topk", str(K), "--hidden", str(H), "--inter", str(I), "--dtype", "fp32",
           "--skew", "0", "1.5", "--reps", "2", "--warmup", "0", "--json", str(out), "--no-plot"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "issue" not in proc.stdout.lower()
    meta = json.loads(out.read_text())
    for field in ("device", "torch", "triton", "git_commit", "date", "rows"):
        assert field in meta
    rows = meta["rows"]
    # 5 impls x 2 passes x 2 skews; only Liger may be skipped: on CPU (its autotuner needs a GPU) or
    # where the package is not installed
    from trainer.tools.kernel_bench import liger_available

    assert len(rows) == 20
    liger_runs = torch.cuda.is_available() and liger_available() is None
    assert {r["impl"] for r in rows if r["skipped"]} == (set() if liger_runs else {"liger"})
    # The FLOPs the bench divides by, against torch's own count of the loop reference's matmuls.
    x, w_gu, w_d, ids, tw, dy = _make(T, H, I, E, K)
    counted = {}
    for pass_ in ("fwd", "fwd+bwd"):
        leaves = [t.detach().requires_grad_(pass_ != "fwd") for t in (x, w_gu, w_d, tw)]
        with FlopCounterMode(display=False) as fc:
            y = reference.loop_moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3])
            if pass_ != "fwd":
                torch.autograd.grad(y, leaves, dy)
        counted[pass_] = fc.get_total_flops()
    for r in (r for r in rows if not r["skipped"]):
        assert (r["T"], r["E"], r["K"], r["H"], r["I"], r["dtype"]) == (T, E, K, H, I, "fp32")
        assert r["flops"] == counted[r["pass"]]
        assert r["ms"] > 0 and r["ms_p10"] <= r["ms"] <= r["ms_p90"] and r["error"] is None
        if r["impl"] == "dense":
            assert r["max_rel_err"] is None
        elif r["impl"] == "liger":
            # Liger's fp32 dots run as tf32 on the GPU: right to ~1e-3, and the bench says it is
            # over the fp32 tolerance instead of hiding it.
            assert r["max_rel_err"] < 5e-3 and r["ok"] == (r["max_rel_err"] <= 1e-4)
        else:
            assert r["ok"] and r["max_rel_err"] < 1e-4
    assert meta["targets"] == []  # the targets are judged at T=8192 only


def test_bench_check_catches_a_wrong_output_or_gradient():
    # What makes a bench row trustworthy: the check against the fp32 loop reference runs before any
    # timing, and it must flag an implementation that is off in its output, in one gradient, or NaN.
    from trainer.tools import kernel_bench as bench

    inputs = _make(12, 24, 16, 4, 2, seed=11)
    ref = bench._reference(inputs)
    assert bench._check(reference.grouped_mm_moe_mlp, inputs, True, ref) < 1e-5

    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong_output(x, wgu, wd, ids, tw):
        return reference.loop_moe_mlp(x, wgu, wd, ids, tw) * 1.01

    def wrong_dx(x, wgu, wd, ids, tw):
        return reference.loop_moe_mlp(ScaledGrad.apply(x), wgu, wd, ids, tw)

    def nan_output(x, wgu, wd, ids, tw):
        return reference.loop_moe_mlp(x, wgu, wd, ids, tw) * float("nan")

    assert bench._check(wrong_output, inputs, False, ref[:1]) == pytest.approx(0.01, rel=1e-3)
    assert bench._check(wrong_dx, inputs, False, ref[:1]) < 1e-6  # forward alone cannot see it
    assert bench._check(wrong_dx, inputs, True, ref) == pytest.approx(0.01, rel=1e-3)
    assert math.isnan(bench._check(nan_output, inputs, False, ref[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows", [6, 512 * 6, 16384 * 6])
def test_gpu_config_heuristic_is_legal(monkeypatch, dtype, n_rows):
    # The GPU branch of the heuristic cannot run here, but its legality can be checked:
    # tl.dot needs power-of-two blocks >= 16, and every pipelined kernel must fit in the
    # H100's 227 KB of shared memory per block with room to spare.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = pick_config(n_rows, 64, dtype)
    blocks = [cfg.block_m, cfg.block_n, cfg.block_n_gu, cfg.block_n_dbwd, cfg.block_k,
              cfg.wg_block_m, cfg.wg_block_n, cfg.wg_block_k]
    assert all(b >= 16 and b & (b - 1) == 0 for b in blocks)
    nbytes = torch.empty(0, dtype=dtype).element_size()
    gate_up = (cfg.block_m * cfg.block_k + 2 * cfg.block_k * cfg.block_n_gu) * nbytes
    rows = (cfg.block_m * cfg.block_k + cfg.block_k * max(cfg.block_n, cfg.block_n_dbwd)) * nbytes
    wgrad = (cfg.wg_block_m * cfg.wg_block_k + cfg.wg_block_k * cfg.wg_block_n) * nbytes
    assert max(gate_up, rows, wgrad) * cfg.num_stages <= 160 * 1024
    assert cfg.num_warps in (4, 8)


def test_config_override_from_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = pick_config(8192 * 6, 64, torch.bfloat16)
    monkeypatch.setenv("LINGMOE_TRITON_CONFIG", "block_n_dbwd=128, num_warps=4")
    got = pick_config(8192 * 6, 64, torch.bfloat16)
    assert got == base._replace(block_n_dbwd=128, num_warps=4) and got != base
    for bad, msg in (("block_q=64", "block_q"), ("num_warps", "num_warps"), ("num_warps=eight", "integer")):
        monkeypatch.setenv("LINGMOE_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match=msg):
            pick_config(8192 * 6, 64, torch.bfloat16)


@pytest.mark.slow
def test_bf16_tiles_compile_for_sm90_without_spills(tmp_path):
    # Compiles the GPU configurations (both tile buckets) for the H100 with triton's own ptxas and
    # reads the machine code: every 16-bit kernel must use wgmma and no local memory.
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this triton build ships no CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), LINGMOE_TRITON_CONFIG="")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "aot_compile_check.py")
    p = subprocess.run([sys.executable, script, "--dtypes", "bf16", "--check-no-spills"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    built = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    # 16 GEMM builds per tile bucket (8 plain, 8 for LoRA on the experts), and the routing and combine kernels
    # (2 builds each; no matmul in them)
    gemms = [line for line in built if "_routing_kernel" not in line and "_combine_kernel" not in line]
    assert len(built) == 40 and len(gemms) == 32
    assert sum("'HAS_LORA': True" in line for line in gemms) == 8
    assert all(" LDL 0 STL 0" in line for line in built) and all(" HGMMA 0 " not in line for line in gemms)


@pytest.mark.slow  # ~10 s: opcheck runs each op several times (schema, fake, autograd, AOT dispatch)
def test_custom_ops_pass_torch_library_opcheck():
    """The ops' fake rules give the real outputs' shapes, dtypes and strides (inductor asserts them),
    their schemas say truly that nothing is mutated, and the autograd rule is registered where it must be."""
    import kernels.moe_mlp as ops

    T, H, I, E, K = 6, 16, 16, 3, 2
    x, w_gu, w_d, ids, tw, dy = _make(T, H, I, E, K, seed=4)
    x, w_gu, w_d, tw = (t.requires_grad_() for t in (x, w_gu, w_d, tw))
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E).to(DEVICE)
    bm = ops.routing_block_m(T * K, E, x.dtype)
    checks = [(ops.moe_routing, (ids, counts, E, bm)), (ops.moe_routing, (ids, None, E, bm))]
    tables = ops.moe_routing(ids, counts, E, bm)
    checks.append((ops.moe_mlp_fwd, (x, w_gu, w_d, tw, tables, bm, True, [], 0.0)))
    _, gu, _, _ = ops.moe_mlp_fwd(x, w_gu, w_d, tw, tables, bm, True, [], 0.0)
    plain = [t.detach() for t in (x, w_gu, w_d, tw, gu)]
    checks.append((ops.moe_mlp_bwd, (dy, *plain, tables, bm, True, True, True, True)))
    # LoRA on the experts (rank 3): the adapters as the forward's list, their gradients from the backward
    g = torch.Generator().manual_seed(5)
    adapters = [(torch.randn(*shape, generator=g) / 4).to(DEVICE).requires_grad_()
                for shape in ((E, 6, H), (E, 2 * I, 3), (E, 3, I), (E, H, 3))]
    frozen = [t.detach() for t in (w_gu, w_d)]
    checks.append((ops.moe_mlp_fwd, (x, *frozen, tw, tables, bm, False, adapters, 2.0)))
    _, gu, u_gu, u_down = ops.moe_mlp_fwd(x, *frozen, tw, tables, bm, True, adapters, 2.0)
    lora_args = [t.detach() for t in adapters] + [u_gu.detach(), u_down.detach(), 2.0, True]
    checks.append((ops.moe_mlp_bwd, (dy, x.detach(), *frozen, tw.detach(), gu.detach(), tables, bm, True, False, False,
                                      True, *lora_args)))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = torch.randn(T * K, H, device=DEVICE, requires_grad=True)
    checks.append((reference.grouped_matmul_op, (xs, w_gu.detach().transpose(1, 2).requires_grad_(), counts, offs)))
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
