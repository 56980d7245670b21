"""benchmarks/kernel_profile.py: composing per-kernel-group winners into one config (hand-made rows)."""
import os
import sys

from tests.trainer_utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import kernel_profile as kp  # noqa: E402


def _row(variant, ok=True, **ms):
    r = {"variant": variant, "ok": ok}
    for k in kp.KERNELS:
        r[k] = {"ms": ms.get(k, 1.0)}
    return r


def test_compose_joins_each_groups_fastest_variant_and_ignores_the_rest():
    rows = [_row("default"),
            _row("dbwd_warps=4", down_bwd=0.8),                               # down_bwd: 20% faster
            _row("wg_block_k=32", down_wgrad=0.5, gate_up_wgrad=1.2),         # wgrad group 1.7 of 2.0
            _row("wg_warps=4", down_wgrad=0.6),                               # wgrad group 1.6: the winner
            _row("block_n_gu=128", gate_up_fwd=0.99),                         # 1%: under the 3% bar
            _row("num_stages=4", down_bwd=0.1),                               # touches every kernel: not composable
            _row("block_n=64", ok=False, down_fwd=0.1),                       # failed its accuracy check
            {"variant": "block_n_dbwd=128", "error": "OutOfResources"}]       # did not compile
    assert kp.compose(rows) == "dbwd_warps=4,wg_warps=4"
    assert kp.compose([_row("default"), _row("wg_warps=4", down_wgrad=2.0)]) == ""
    assert kp.compose([{"variant": "default", "error": "x"}, _row("dbwd_warps=4", down_bwd=0.1)]) == ""


def test_tables_put_peers_side_by_side_with_triton_speedups():
    import tables
    from trainer.tools.kernel_bench import _add_relative

    def row(impl, ms, tflops, **kw):
        return dict(impl=impl, T=8192, E=64, K=6, H=2048, I=1408, skew=0.0, ms=ms, tflops=tflops,
                    skipped=None, error=None, **{"pass": "fwd+bwd"}, **kw)

    rows = [row("triton", 8.0, 300.0), row("liger", 10.0, 240.0), row("grouped_mm", 9.6, 250.0),
            row("loop", 240.0, 10.0), row("dense", 4.8, 500.0)]
    _add_relative(rows)
    meta = dict(device="GPU", torch="t", triton="3.6", git_commit="abcdef0123", date="2026-11-23T00:00:00",
                triton_config_override="block_n_gu=128", rows=rows, targets=[])
    text = tables.kernel_table(meta)
    line = [ln for ln in text.splitlines() if ln.startswith("| 64/6/2048/1408 |")][0]
    # triton 300/500 = 60% of dense; 10/8 = 1.25x Liger, 9.6/8 = 1.2x grouped_mm, 240/8 = 30x the loop
    assert line == ("| 64/6/2048/1408 | fwd+bwd | 8192 | 0 | 8.00 ms / 300 | 10.00 ms / 240 | 9.60 ms / 250 | "
                    "240.00 ms / 10 | 4.80 ms / 500 | 60.0 | 1.25 | 1.20 | 30.00 |")
    assert "LINGMOE_TRITON_CONFIG=block_n_gu=128" in text and "abcdef0" in text
    rows[1].update(ms=None, error="RuntimeError: x")
    assert "| failed |" in tables.kernel_table(meta)
