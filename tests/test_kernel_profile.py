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
