"""benchmarks/train_step.py: the trainer timed per backend, MFU by the documented formula, nothing saved."""
import json
import os
import sys

import pytest

from tests.trainer_utils import ROOT
from trainer.options import Options, OptionsError, parse_options

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import train_step  # noqa: E402

# Training FLOPs per token of the tiny preset cut to 2 layers (layer 0 dense, layer 1 MoE), by hand:
#   attention per layer: q,k,v,o = 128*(128 + 2*64) + 128*128                    = 49152
#   layer 0 (dense MLP 256 wide): 49152 + 2 norms*128 + 3*128*256               = 147712
#   layer 1 (MoE, K=2 of 8 experts 64 wide, 1 shared, router 128x8):
#           49152 + 256 + 2*3*128*64 + 128*8 + 3*128*64                          = 124160
#   lm head 2048*128 + final norm 128 (the embedding lookup is not a matmul)    = 262272
#   6 x (147712 + 124160 + 262272)                                              = 3204864
#   causal attention, 2 layers x 4 heads x 32 dims, S=64: 6*2*4*32*64            = 98304
TINY2_FLOPS_PER_TOKEN_S64 = 3204864 + 98304


@pytest.mark.slow
def test_train_step_bench_times_each_backend_around_one_save(tmp_path):
    out = tmp_path / "ts.json"
    runs = tmp_path / "runs"
    res = train_step.main(["--backends", "torch", "loop", "--layers", "2", "--seq-len", "64", "--micro-batch", "2",
                           "--global-batch", "4", "--steps", "4", "--warmup", "1", "--save-at", "3",
                           "--peak-tflops", "0.001", "--ceiling-tflops", "0.004", "--json", str(out),
                           "--workdir", str(runs), "--keep-runs",
                           "--", "--train.device", "cpu"])
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    for key in ("device", "torch", "triton", "git_commit", "date"):
        assert on_disk[key]
    torch_row, loop_row = res["rows"]
    for r in res["rows"]:
        assert r["ok"] and r["layers"] == 2 and (r["E"], r["K"]) == (8, 2)
        assert r["T"] == 256 and r["global_batch"] == 4  # 2 accumulated micro-batches of 2 rows of 64
        assert r["flops_per_token"] == TINY2_FLOPS_PER_TOKEN_S64
        # MFU = FLOPs/token x tokens/s over the peak given (0.001 TFLOP/s per device, one device).
        assert r["mfu"] == pytest.approx(TINY2_FLOPS_PER_TOKEN_S64 * r["tokens_per_s"] / 1e9, rel=1e-6)
        assert r["mfu_vs_measured_peak"] == pytest.approx(r["mfu"] / 4, rel=1e-6)  # over a ceiling 4x the peak
        assert len(r["step_ms_all"]) == 5 and r["save_at"] == 3
        assert r["ms_before_save"] > 0 and r["ms_after_save"] > 0
        # The trainer saved after step 3 and nothing at the end: no final checkpoint, no export.
        run_dir = runs / f"{r['backend']}-L2"
        assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "hf").exists()
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000003"]
    # Same seed, same rows, same init: the two backends compute the same first loss.
    assert torch_row["loss_first"] == pytest.approx(loop_row["loss_first"], rel=1e-5)
    table = train_step.format_table(res)
    assert "| torch | auto | 2 | 64 x 1 | 256 |" in table and f"{torch_row['ms_before_save']:.1f} / " in table


def test_save_step_and_the_split_around_it():
    assert train_step.save_step("auto", 3, 10) == 8 and train_step.save_step("auto", 1, 3) == 3
    assert train_step.save_step("auto", 1, 1) == 0 and train_step.save_step("0", 1, 3) == 0
    for bad in ("4", "-1", "soon"):
        with pytest.raises(ValueError, match="--save-at"):
            train_step.save_step(bad, 1, 3)
    # warm-up 1, save after step 3: steps 2-3 are before it, steps 4-5 after.
    got = train_step.split_at_save([900.0, 10.0, 12.0, 30.0, 20.0], warmup=1, save_at=3)
    assert got == {"ms_before_save": 11.0, "ms_after_save": 25.0, "after_save_over_before": 25.0 / 11.0}
    assert train_step.split_at_save([1.0, 2.0], warmup=1, save_at=0) == {}


def test_layers_that_fit_grows_with_memory_and_is_at_least_one():
    small = train_step.layers_that_fit("ling-lite", 4096, 1, 40 << 30)
    big = train_step.layers_that_fit("ling-lite", 4096, 1, 140 << 30)
    # A Ling-Lite MoE layer carries ~0.57B parameters: 16 B each is ~9.2 GB of training state.
    assert 2 <= small < big and big - small >= 8
    assert train_step.layers_that_fit("ling-lite", 4096, 1, 1 << 30) == 1


def _parse(args):
    return parse_options(args, "sft", Options, "", default_output="runs/x")


def test_save_final_false_needs_export_off_and_docs_per_row_is_checked():
    with pytest.raises(OptionsError, match="save_final false needs checkpoint.export_hf false"):
        _parse(["--checkpoint.save_final", "false"])
    assert not _parse(["--checkpoint.save_final", "false", "--checkpoint.export_hf", "false"]).checkpoint.save_final
    with pytest.raises(OptionsError, match="synthetic_docs_per_row must be 1 or 2"):
        _parse(["--data.synthetic_docs_per_row", "3"])


def test_profile_adds_one_untimed_step_and_its_summary(tmp_path):
    out = tmp_path / "ts.json"
    res = train_step.main(["--backends", "torch", "--layers", "2", "--seq-len", "32", "--micro-batch", "2",
                           "--global-batch", "2", "--steps", "2", "--warmup", "1", "--save-at", "0", "--profile",
                           "--json", str(out), "--", "--train.device", "cpu"])
    (row,) = res["rows"]
    assert row["ok"] and len(row["step_ms_all"]) == 3  # warm-up + timed: the profiled 4th step is not among them
    prof = row["profile"]
    assert prof["step"] == 4 and prof["wall_ms"] > 0 and prof["host_ops"] > 0 and "error" not in prof
    assert (tmp_path / prof["trace"]).stat().st_size > 0 and prof["trace"] == "ts-torch-trace.json.gz"
    assert f"profile (torch): step {prof['wall_ms']:.1f} ms, {prof['launches']} launches" in \
        train_step.format_table(res)
