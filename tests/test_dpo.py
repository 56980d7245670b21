"""DPO: loss formulas against hand numbers, ln 2 at the start, FSDP vs single process, resume, learning."""
import math
import shutil

import pytest
import torch

from tests.trainer_utils import TINY, exported, metrics, run_inproc, run_torchrun
from trainer.dpo import dpo_loss


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    import data

    paths = data.ensure_demo_data(str(tmp_path_factory.mktemp("demo")))
    return paths["jsonl"]["dpo"]


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_loss_formulas_by_hand():
    # policy chosen -10, rejected -12; reference -11 for both: dw = +1, dl = -1; beta 0.1 -> margin 0.2.
    pw, pl, rw, rl, nw, nl = _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0), _t(4.0), _t(5.0)
    loss, rew_w, rew_l = dpo_loss(pw, pl, rw, rl, nw, nl, 0.1, "sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-12)  # 0.598139
    assert rew_w.item() == pytest.approx(0.1) and rew_l.item() == pytest.approx(-0.1)
    loss, _, _ = dpo_loss(pw, pl, rw, rl, nw, nl, 0.1, "ipo")
    assert loss.item() == pytest.approx((1 / 4 + 1 / 5 - 5.0) ** 2, rel=1e-12)  # 20.7025
    loss, _, _ = dpo_loss(pw, pl, rw, rl, nw, nl, 0.1, "hinge")
    assert loss.item() == pytest.approx(0.8, rel=1e-12)
    loss, _, _ = dpo_loss(_t(-10.0), _t(-1.0), _t(-10.0), _t(-10.0), nw, nl, 0.1, "hinge")
    assert loss.item() == pytest.approx(1.9, rel=1e-12)  # relu(1 - 0.1 * (0 - 9))
    with pytest.raises(ValueError, match="not one of"):
        dpo_loss(pw, pl, rw, rl, nw, nl, 0.1, "kto")


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_first_step_loss_is_ln2_when_policy_equals_reference(tmp_path, demo_pairs, reference):
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--dpo.reference", reference,
                              "--data.seq_len", "128", "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path)])
    m = metrics(tmp_path)[0]
    print(reference, m["loss"], m["rewards/margins"])
    assert abs(m["loss"] - math.log(2)) < 1e-5
    assert abs(m["rewards/margins"]) < 1e-5 and abs(m["rewards/chosen"]) < 1e-5
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0


def test_two_rank_fsdp_equals_single_process(tmp_path, demo_pairs):
    # DPOLoader gives rank r the global positions r, r+W, ...: one rank with 4 pairs per micro-batch
    # sees exactly the pairs two ranks with 2 each see, and the loss is a sum over pairs / pairs.
    common = TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "3", "--train.global_batch_size", "4",
                     "--data.seq_len", "128", "--model.aux_loss_type", "none", "--optim.lr", "3e-3",
                     "--checkpoint.every", "0", "--data.cache_dir", str(tmp_path / "cache")]
    run_inproc("dpo", common + ["--data.micro_batch_size", "4", "--output-dir", str(tmp_path / "one")])
    run_torchrun("dpo", common + ["--data.micro_batch_size", "2", "--output-dir", str(tmp_path / "two")])
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])
    # Adam divides by sqrt(v): a rarely seen token's embedding row, whose gradient is ~1e-9 and
    # carries summation-order noise, can move ~1e-4 differently; everything else agrees to ~1e-6.
    w1, w2 = exported(tmp_path / "one"), exported(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), (k, (w1[k] - w2[k]).abs().max())


def test_resume_reproduces_the_uninterrupted_run_and_reuses_reference_cache(tmp_path, demo_pairs):
    args = TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "4", "--checkpoint.every", "2",
                   "--checkpoint.keep_last", "3", "--data.seq_len", "128", "--train.global_batch_size", "4",
                   "--data.micro_batch_size", "2", "--data.cache_dir", str(tmp_path / "cache")]
    run_inproc("dpo", args + ["--output-dir", str(tmp_path / "straight")])
    crashed = tmp_path / "crashed"
    run_inproc("dpo", args + ["--output-dir", str(crashed)])
    shutil.rmtree(crashed / "checkpoints" / "step_00000004")
    shutil.rmtree(crashed / "hf")
    run_inproc("dpo", args + ["--output-dir", str(crashed)])
    a, b = metrics(tmp_path / "straight"), metrics(crashed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["rewards/margins"] == y["rewards/margins"]
    wa, wb = exported(tmp_path / "straight"), exported(crashed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    caches = list((tmp_path / "cache").rglob("ref_logps-*.pt"))
    assert len(caches) == 1  # one data x model key, computed once and reused by the later runs
    table = torch.load(caches[0])
    assert table.shape == (1000, 2) and torch.isfinite(table).all() and (table < 0).all()


def test_demo_pairs_are_learned(tmp_path, demo_pairs):
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "30", "--optim.lr", "3e-3",
                              "--data.seq_len", "128", "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path)])
    m = metrics(tmp_path)
    late = sum(x["rewards/accuracies"] for x in m[-5:]) / 5
    print("reward accuracy, first step:", m[0]["rewards/accuracies"], "last 5:", late)
    assert late > 0.5
    assert sum(x["loss"] for x in m[-5:]) / 5 < math.log(2)
