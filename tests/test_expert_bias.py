"""Aux-loss-free balancing (--model.expert_bias_update_rate) and MTP training in the trainer: the update
rule by hand, the global-batch counts over 2 ranks x 2 micro-batches against counts recomputed here,
exact resume, a frozen bias at rate 0, a v1 model given a bias, and MTP switched off."""
import json
import shutil

import pytest
import torch

from checkpoints_convert.dcp_layout import iter_native_tensors, read_model_config
from moe.heads import CHUNK_TOKENS, CrossEntropy
from moe.router import expert_bias_update
from tests.conftest import FIXTURES, TINY_HF
from tests.trainer_utils import exported, metrics, run_inproc, run_torchrun

V2_HF = FIXTURES / "bailing_moe_v2_tiny" / "hf"
BIAS_LAYERS = (1, 2, 3)  # the fixture's MoE layers; 3 is its MTP layer


def _bias(state, layer):
    return state[f"model.layers.{layer}.mlp.gate.expert_bias"]


def test_update_rule_by_hand():
    """Counts of 2 ranks x 2 micro-batches summed; mean load 4: under-loaded experts go up by the rate,
    over-loaded ones down, one exactly at the mean stays; zero-mean re-centres the update."""
    per_micro = torch.tensor([[[3, 0, 1, 0], [1, 1, 0, 2]],  # rank 0, micro-batches 0 and 1
                              [[2, 0, 2, 0], [2, 1, 1, 0]]])  # rank 1
    counts = per_micro.sum((0, 1))  # [8, 2, 4, 2]: the step's global-batch counts, mean 4
    assert counts.tolist() == [8, 2, 4, 2]
    plain = expert_bias_update(counts, 1e-3, zero_mean=False)
    assert plain.tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 1e-3])
    centred = expert_bias_update(counts, 1e-3, zero_mean=True)  # the plain update's mean is 0.25e-3
    assert centred.tolist() == pytest.approx([-1.25e-3, 0.75e-3, -0.25e-3, 0.75e-3])
    assert abs(centred.sum().item()) < 1e-9
    assert plain.dtype == torch.float32
    layered = expert_bias_update(torch.stack([counts, counts.flip(0)]), 1e-3, zero_mean=False)
    assert layered[1].tolist() == pytest.approx(plain.flip(0).tolist())  # each layer by its own counts


ARGS = ["--model.init_from", str(V2_HF), "--data.synthetic", "true", "--data.seq_len", "24",
        "--train.global_batch_size", "4", "--data.micro_batch_size", "1", "--optim.lr", "1e-3",
        "--train.progress", "false", "--model.aux_loss_alpha", "0.0"]


def _step_batches(world, accum, seed=1234):
    """The rows the synthetic loader gives each rank and micro-batch of step 1."""
    from trainer.synthetic import SyntheticLoader

    return [next(loader) for r in range(world)
            for loader in [SyntheticLoader(512, 24, 1, accum, r, world, seed)] for _ in range(accum)]


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])  # 2: the routed experts split over the two ranks, the routers replicated
def test_two_ranks_two_micro_batches_move_the_bias_by_the_global_counts_and_resume_exactly(tmp_path, ep):
    from checkpoints_convert import load_hf

    rate = 0.01
    args = ARGS + ["--model.expert_bias_update_rate", str(rate), "--train.steps", "2", "--checkpoint.every", "1",
                   "--checkpoint.keep_last", "5", "--parallel.ep", str(ep)]
    run_torchrun("sft", args + ["--output-dir", str(tmp_path / "run")])
    # The counts of step 1, recomputed here from the initial model and the rows of all four micro-batches.
    model = load_hf(V2_HF, expert_backend="torch").eval()
    total = {L: torch.zeros(16, dtype=torch.int64) for L in BIAS_LAYERS}
    with torch.no_grad():
        for b in _step_batches(world=2, accum=2):
            out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                        document_ids=b["document_ids"], head=CrossEntropy(chunk_size=CHUNK_TOKENS))
            for L in BIAS_LAYERS:
                total[L] += out.expert_counts[L]
    step1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    saved = dict(iter_native_tensors(str(step1), read_model_config(str(step1))))
    for L in BIAS_LAYERS:
        counts = total[L].tolist()
        mean = sum(counts) / 16
        up = [rate * ((mean > c) - (mean < c)) for c in counts]  # rate * sign(mean - load), by hand
        up = [u - sum(up) / 16 for u in up]  # zero-mean (the default)
        start = _bias(model.state_dict(), L)
        want = start + torch.tensor(up, dtype=torch.float32)
        got = _bias(saved, L)
        print(f"layer {L}: counts {counts}; max |bias - hand| {(got - want).abs().max().item():.1e}")
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-7, rtol=0), L
        assert not torch.equal(got, start)
    m = metrics(tmp_path / "run")
    assert m[0]["expert_bias_drift_max"] > 0 and "mtp_loss" in m[0]
    assert m[-1]["expert_bias_drift_mean"] >= m[0]["expert_bias_drift_mean"] * 0.5
    # Resume from step 1 to the end: the same biases and weights as the run that never stopped.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    shutil.rmtree(resumed / "hf")
    run_torchrun("sft", args + ["--output-dir", str(resumed)])
    a, b = exported(tmp_path / "run"), exported(resumed)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("expert_bias"):
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [x["loss"] for x in metrics(resumed)[1:]] == pytest.approx([x["loss"] for x in m[1:]], rel=1e-5)


def test_rate_zero_keeps_the_bias_and_mtp_false_keeps_the_mtp_layer(tmp_path):
    """The fine-tuning default: the bias is exported bit for bit as loaded. With --model.mtp false the
    MTP layer is neither run nor trained (its weights come back as loaded) while the rest moves;
    with it on, it trains and its loss is logged."""
    from safetensors.torch import load_file

    start = {}
    for f in V2_HF.glob("*.safetensors"):
        start.update(load_file(str(f)))
    run_inproc("sft", ARGS + ["--train.steps", "1", "--model.mtp", "false", "--output-dir", str(tmp_path / "off")])
    run_inproc("sft", ARGS + ["--train.steps", "1", "--output-dir", str(tmp_path / "on")])
    off, on = exported(tmp_path / "off"), exported(tmp_path / "on")
    assert off.keys() == start.keys() == on.keys()
    for L in BIAS_LAYERS:
        for w in (off, on):
            assert torch.equal(_bias(w, L), _bias(start, L)) and _bias(w, L).dtype == torch.float32
    mtp_names = [k for k in start if k.startswith("model.layers.3.") and not k.endswith("expert_bias")]
    assert all(torch.equal(off[k], start[k]) for k in mtp_names)
    assert not torch.equal(off["model.layers.1.mlp.gate.weight"], start["model.layers.1.mlp.gate.weight"])
    assert not torch.equal(on["model.layers.3.eh_proj.weight"], start["model.layers.3.eh_proj.weight"])
    assert "mtp_loss" in metrics(tmp_path / "on")[0] and "mtp_loss" not in metrics(tmp_path / "off")[0]
    assert "expert_bias_drift_max" in metrics(tmp_path / "off")[0]
    assert metrics(tmp_path / "off")[-1]["expert_bias_drift_max"] == 0.0


def test_a_v1_model_gets_a_zero_bias_that_moves_and_is_exported(tmp_path):
    run_inproc("sft", ["--model.init_from", str(TINY_HF), "--data.synthetic", "true", "--data.seq_len", "16",
                       "--train.global_batch_size", "2", "--data.micro_batch_size", "2", "--train.steps", "1",
                       "--train.progress", "false", "--model.expert_bias_update_rate", "0.001",
                       "--output-dir", str(tmp_path)])
    w = exported(tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["BailingMoeForCausalLM"] and cfg["moe_router_enable_expert_bias"] is True
    assert "score_function" not in cfg  # a v1 config.json says nothing of what it does not use
    for L in range(3):
        b = _bias(w, L)
        assert b.dtype == torch.float32 and b.abs().max().item() > 0  # moved from zero by the update
        assert torch.allclose(b.abs(), torch.full_like(b, b.abs().max()), atol=1e-3)  # steps of the rate
    from checkpoints_convert import load_hf
    model = load_hf(tmp_path / "hf")
    assert torch.equal(model.model.layers[0].mlp.gate.expert_bias, _bias(w, 0))
