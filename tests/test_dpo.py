"""DPO: loss formulas against hand numbers, ln 2 at the start, FSDP vs single process, resume, and the
first update against one computed by hand (plain autograd and AdamW's first-step formula)."""
import glob
import json
import math
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_utils import TINY, exported, metrics, run_inproc, run_torchrun
from trainer.dpo import NLL_DIVISOR, chosen_nll_sum, dpo_loss

N_PAIRS = 64  # of the demo's 1000: the reference pass and the runs stay short


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    from data.demo import ensure_demo_data

    d = tmp_path_factory.mktemp("demo")
    paths = ensure_demo_data(str(d))
    lines = pathlib.Path(paths["jsonl"]["dpo"]).read_text().splitlines()[:N_PAIRS]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(d / "pairs.jsonl")


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


def test_nll_term_per_sequence_or_per_token_by_hand():
    # Chosen log-probs -4 over 2 tokens and -9 over 3: per answer 2 and 3, mean over the 2 pairs 2.5;
    # over all 5 tokens 13 / 5 = 2.6 (the caller divides by the step's pairs or chosen tokens).
    lp, n = _t(-4.0, -9.0), _t(2.0, 3.0)
    assert chosen_nll_sum(lp, n, "sequence").item() / 2 == pytest.approx(2.5)
    assert chosen_nll_sum(lp, n, "token").item() / 5 == pytest.approx(2.6)


def test_nll_term_trl_is_the_mean_of_micro_batch_token_means_by_hand():
    # Two micro-batches of a step: 12 chosen tokens with NLL 24 (2.0 a token), and 25 with NLL 75 (3.0).
    # TRL's "sft" term averages the micro-batches' means: (2.0 + 3.0) / 2 = 2.5. Over all 37 tokens
    # ('token') it is 99 / 37 = 2.6757, 7% more; by answer ('sequence', one answer each) 2.5 as well.
    mbs = [(_t(-24.0), _t(12.0)), (_t(-75.0), _t(25.0))]
    for average, divisor, want in (("trl", NLL_DIVISOR["trl"], 2.5), ("token", "chosen_tokens", 99 / 37),
                                   ("sequence", "pairs", 2.5)):
        totals = {"micro_batches": 2, "chosen_tokens": 37, "pairs": 2}
        step = sum(chosen_nll_sum(lp, n, average).item() for lp, n in mbs) / totals[divisor]
        assert NLL_DIVISOR[average] == divisor and step == pytest.approx(want, rel=1e-12), average


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_first_step_loss_is_ln2_when_policy_equals_reference(tmp_path, demo_pairs, reference):
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--dpo.reference", reference,
                              "--data.seq_len", "128", "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path)])
    m = metrics(tmp_path)[0]
    print(reference, m["loss/dpo"], m["rewards/margins"])
    assert abs(m["loss/dpo"] - math.log(2)) < 1e-5
    assert abs(m["rewards/margins"]) < 1e-5 and abs(m["rewards/chosen"]) < 1e-5
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    # TRL's convention: the total is logged as loss, the parts beside it (the script's nll_coef is 1.0).
    assert m["loss"] == pytest.approx(m["loss/dpo"] + 1.0 * m["loss/nll"] + m["loss/aux"], rel=1e-12)
    assert m["loss/aux"] > 0 and m["loss/nll"] > 0


@pytest.mark.slow
def test_two_rank_fsdp_equals_single_process(tmp_path, demo_pairs):
    # DPOLoader gives rank r the global positions r, r+W, ...: one rank with 4 pairs per micro-batch
    # sees exactly the pairs two ranks with 2 each see, and the loss is a sum over pairs / pairs. The
    # token-mean NLL term divides by the chosen tokens of the whole step, on both ranks together.
    common = TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "3", "--train.global_batch_size", "4",
                     "--data.seq_len", "128", "--model.aux_loss_type", "none", "--optim.lr", "3e-3",
                     "--dpo.nll_average", "token", "--checkpoint.every", "0", "--data.cache_dir", str(tmp_path / "cache")]
    run_inproc("dpo", common + ["--data.micro_batch_size", "4", "--output-dir", str(tmp_path / "one")])
    run_torchrun("dpo", common + ["--data.micro_batch_size", "2", "--output-dir", str(tmp_path / "two")])
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for k in ("loss", "loss/dpo", "loss/nll", "rewards/margins", "logps/chosen", "logps/rejected"):
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
    caches = list((tmp_path / "cache").rglob("ref_logps-*.safetensors"))
    assert len(caches) == 1  # one data x model key, computed once and reused by the later runs
    table = load_file(caches[0])["logps"]
    assert table.shape == (N_PAIRS, 2) and torch.isfinite(table).all() and (table < 0).all()


def test_reference_logps_recomputed_on_resume_are_the_initial_models(tmp_path, demo_pairs):
    # The cache is gone when a run resumes: the reference pass must use the initial weights (what the
    # first run stored), not the trained ones the resume restores.
    args = TINY + ["--data.sources", f"[{demo_pairs}]", "--checkpoint.every", "1", "--checkpoint.keep_last", "3",
                   "--data.seq_len", "128", "--train.global_batch_size", "4", "--data.micro_batch_size", "4",
                   "--optim.lr", "1e-2", "--checkpoint.export_hf", "false", "--data.cache_dir", str(tmp_path / "cache"),
                   "--output-dir", str(tmp_path / "run")]
    run_inproc("dpo", args + ["--train.steps", "2"])
    (cache,) = (tmp_path / "cache").rglob("ref_logps-*.safetensors")
    first = load_file(cache)["logps"]
    cache.unlink()
    run_inproc("dpo", args + ["--train.steps", "3"])  # resumes at step 2, recomputes the cache
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
    assert torch.equal(load_file(cache)["logps"], first)


def _sequence_logp(model, ids, labels):
    """log p(completion | prompt) of one unpadded sequence, straight from the full logits."""
    logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
    target, trained = labels[1:], labels[1:] != -100
    return logp[:-1].gather(-1, target.clamp_min(0)[:, None])[:, 0][trained].sum()


@pytest.mark.parametrize("nll_average", ["sequence", "token", "trl"])
def test_first_update_equals_adamw_on_the_hand_computed_dpo_gradient(tmp_path, demo_pairs, nll_average):
    # One step, policy = reference: the trainer's weights after it must be AdamW's first step,
    #   theta1 = theta0 * (1 - lr * wd) - lr * g / (|g| + eps)     (wd on matrices only),
    # with g the gradient of  mean_pairs[-log sigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))] + NLL term,
    # computed here on the unpadded sequences of the step's pairs by a plain model and autograd. The step
    # is two micro-batches of 2 pairs: 'trl' averages their two token means.
    import data
    from checkpoints_convert.dcp_layout import iter_native_tensors, latest_checkpoint, read_model_config
    from moe import BailingMoeForCausalLM
    from moe.model import initial_value

    # eps 1e-4 keeps the update a smooth function of g (slope <= lr/eps): with the default 1e-8 an entry
    # whose gradient is ~1e-8 turns summation-order noise into a visible difference.
    lr, wd, eps, beta, seed = 1e-3, 0.1, 1e-4, 0.1, 1234
    run_inproc("dpo", TINY + ["--data.sources", f"[{demo_pairs}]", "--train.steps", "1", "--data.seq_len", "128",
                              "--train.global_batch_size", "4", "--data.micro_batch_size", "2",
                              "--dpo.reference", "live", "--dpo.nll_average", nll_average, "--dpo.nll_coef", "1.0",
                              "--model.aux_loss_type", "none", "--optim.lr", str(lr), "--optim.weight_decay", str(wd),
                              "--optim.eps", str(eps), "--optim.warmup_steps", "0", "--optim.grad_clip", "0",
                              "--train.seed", str(seed), "--checkpoint.export_hf", "false",
                              "--output-dir", str(tmp_path)])
    ckpt = latest_checkpoint(str(tmp_path / "checkpoints"))
    cfg = read_model_config(ckpt)
    after = dict(iter_native_tensors(ckpt, cfg))

    model = BailingMoeForCausalLM(dataclasses_replace(cfg, expert_backend="loop"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, tuple(p.shape), cfg, seed))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    source, = [d for d in glob.glob(str(tmp_path / "prepared" / "pairs-*")) if os.path.isdir(d)]  # not its .lock
    batch = next(data.DPOLoader(source, 128, 4, rank=0, world_size=1, seed=seed))
    lp, n_tok = {"chosen": [], "rejected": []}, []
    for i in range(4):
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"][i]
            real = int((labels != -100).nonzero().max()) + 1
            lp[side].append(_sequence_logp(model, batch[f"{side}_input_ids"][i, :real], labels[:real]))
        n_tok.append(int((batch["chosen_labels"][i, 1:] != -100).sum()))
    lw, ll = torch.stack(lp["chosen"]), torch.stack(lp["rejected"])
    dpo = -torch.nn.functional.logsigmoid(beta * ((lw - lw.detach()) - (ll - ll.detach()))).mean()
    n = torch.tensor(n_tok, dtype=lw.dtype)
    if nll_average == "sequence":
        nll = (-lw / n).mean()
    elif nll_average == "token":
        nll = -lw.sum() / n.sum()
    else:  # the micro-batches' token means, averaged: pairs 0-1 and 2-3 (the loader's order on one rank)
        nll = (-lw[:2].sum() / n[:2].sum() - lw[2:].sum() / n[2:].sum()) / 2
    (dpo + nll).backward()
    moved = 0
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        decay = wd if p.ndim >= 2 else 0.0
        want = theta0[name] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        err = (after[name] - want).abs().max().item()
        assert err < 1e-3 * lr, (name, err)
        moved += int((after[name] - theta0[name]).abs().max() > 0.5 * lr)
    assert moved > len(theta0) // 2  # the update is a real one, not weight decay alone


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
