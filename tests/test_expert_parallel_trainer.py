"""--parallel.ep in the trainer: two ranks with ep=2 train like two ranks without EP (losses, router
loss, gradient norm, exported weights), and a checkpoint saved under one ep resumes under the other
(DCP reshards the experts) to the same weights as the uninterrupted run."""
import shutil

import pytest
import torch

from tests.trainer_utils import TINY, exported, metrics, run_torchrun


def _close(a, b, rtol=1e-5, atol=1e-6):
    return abs(a - b) <= atol + rtol * abs(b)


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.slow
def test_ep2_trains_like_ep1_and_resumes_across_ep(tmp_path):
    args = TINY + ["--data.synthetic", "true", "--train.steps", "4", "--train.global_batch_size", "4",
                   "--data.micro_batch_size", "2", "--checkpoint.every", "2", "--checkpoint.keep_last", "3",
                   "--model.aux_loss_type", "global", "--model.aux_loss_alpha", "0.01", "--optim.lr", "3e-3"]
    run_torchrun("sft", args + ["--parallel.ep", "1", "--output-dir", str(tmp_path / "ep1")])
    run_torchrun("sft", args + ["--parallel.ep", "2", "--output-dir", str(tmp_path / "ep2")])
    m1, m2 = metrics(tmp_path / "ep1"), metrics(tmp_path / "ep2")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        print(f"step {a['step']}: loss {a['loss']:.7f} vs {b['loss']:.7f}, grad_norm {a['grad_norm']:.6f} vs "
              f"{b['grad_norm']:.6f}")
        assert _close(a["loss"], b["loss"]) and _close(a["aux_loss"], b["aux_loss"]), (a, b)
        assert _close(a["grad_norm"], b["grad_norm"], rtol=1e-5), (a["grad_norm"], b["grad_norm"])
        assert a["expert_load_per_layer"] == pytest.approx(b["expert_load_per_layer"])
    w1 = exported(tmp_path / "ep1")
    _same_weights(exported(tmp_path / "ep2"), w1)  # the HF export does not depend on the layout

    # Step 2's checkpoint, saved under one ep, resumed under the other.
    for saved, resumed in (("ep2", "1"), ("ep1", "2")):
        run_dir = tmp_path / f"{saved}_resumed_ep{resumed}"
        shutil.copytree(tmp_path / saved, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
        shutil.rmtree(run_dir / "hf")
        run_torchrun("sft", args + ["--parallel.ep", resumed, "--output-dir", str(run_dir)])
        m = metrics(run_dir)
        assert [x["step"] for x in m] == [1, 2, 3, 4]
        for a, b in zip(m1[2:], m[2:]):
            assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"], rtol=1e-5), (a, b)
        _same_weights(exported(run_dir), w1)


@pytest.mark.slow
def test_ep_that_does_not_divide_the_experts_is_refused(tmp_path):
    p = run_torchrun("sft", TINY + ["--data.synthetic", "true", "--train.steps", "1", "--parallel.ep", "3",
                                    "--output-dir", str(tmp_path)], nproc=2, check=False)
    assert p.returncode != 0
    assert "parallel.ep (3) must divide" in p.stdout + p.stderr


@pytest.mark.slow
def test_four_ranks_ep2_x_edp2_and_ep4_from_hf_equal_ep1(tmp_path):
    # From the golden HF checkpoint (8 experts): each rank reads only its own expert rows, FSDP2 shards
    # the experts over edp=2 (a reduce-scatter of expert gradients) or not at all (ep=4).
    from tests.conftest import TINY_HF

    args = ["--model.init_from", str(TINY_HF), "--data.synthetic", "true", "--train.steps", "3",
            "--train.global_batch_size", "4", "--data.micro_batch_size", "1", "--checkpoint.every", "0",
            "--train.progress", "false", "--data.seq_len", "32"]
    for ep in (1, 2, 4):
        run_torchrun("sft", args + ["--parallel.ep", str(ep), "--output-dir", str(tmp_path / f"ep{ep}")], nproc=4)
    ref, w1 = metrics(tmp_path / "ep1"), exported(tmp_path / "ep1")
    for ep in (2, 4):
        for a, b in zip(ref, metrics(tmp_path / f"ep{ep}")):
            assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"], rtol=1e-5), (ep, a, b)
        w = exported(tmp_path / f"ep{ep}")
        assert w.keys() == w1.keys()
        for k in w1:  # three AdamW steps: gradient rounding differences show up to ~1e-6
            assert torch.allclose(w[k], w1[k], atol=1e-5), (ep, k)
