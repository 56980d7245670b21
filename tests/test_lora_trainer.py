"""LoRA runs of the trainer: only the adapters change, the first step is the base model's, the exports
(PEFT adapter and merged model) agree with the adapters, a killed run resumes bitwise, DPO's
reference is the base (ln 2 at the start, precomputed or live), and what cannot run is refused."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert import load_hf, save_hf
from checkpoints_convert.peft import load_adapter
from checkpoints_convert.serving import check_serving
from data.errors import EXIT_BAD_INPUT
from moe.config import BailingMoeConfig
from moe.lora import is_adapter_name
from moe.model import BailingMoeForCausalLM
from tests.test_dpo import demo_pairs  # noqa: F401  (a fixture)
from tests.trainer_utils import exported, metrics, refused, run_inproc

# The trainer tests' TINY shape (tests/trainer_utils.py) from the tiny preset: a dense first layer,
# then an MoE layer of 4 experts, top-2, one shared expert.
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
COMMON = ["--train.progress", "false", "--data.seq_len", "32", "--train.device", "cpu",
          "--train.global_batch_size", "4", "--data.micro_batch_size", "2", "--optim.lr", "1e-2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF checkpoint of random weights (norms and biases too, so nothing is trivially equal)."""
    d = tmp_path_factory.mktemp("lora_base")
    torch.manual_seed(0)
    model = BailingMoeForCausalLM(BailingMoeConfig.preset("tiny", **SHAPE))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.1)
    save_hf(model, d / "hf")
    return d / "hf"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora_cache"))


def _lora_args(base, cache, *extra):
    return COMMON + ["--model.init_from", str(base), "--lora.rank", "4", "--data.cache_dir", cache, *extra]


@pytest.mark.slow
def test_only_the_adapters_train_and_the_exports_agree(tmp_path, base, cache):
    from trainer import demo
    from trainer.loop import Trainer
    from trainer.options import Options, parse_options
    from trainer.sft import SFTTask

    args = ["--train.steps", "3", "--checkpoint.every", "0"]
    full = run_inproc("sft", COMMON + ["--model.init_from", str(base), "--data.cache_dir", cache, *args,
                                       "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path / "full")])
    opts = parse_options(_lora_args(base, cache, *args, "--output-dir", str(tmp_path / "lora")), "sft", Options, "",
                         "runs/x")
    trainer = Trainer(SFTTask(default_data=demo.sft_data), opts)
    try:
        trainer.build()
        trainer.fit()
        after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()  # FSDP's, or one rank's
                 for n, p in trainer.model.named_parameters()}
    finally:
        trainer.close()
    # The first step's loss is the base model's: B starts at zero.
    first_full, first_lora = metrics(tmp_path / "full")[0], metrics(tmp_path / "lora")[0]
    print("first step loss: full", first_full["loss"], "LoRA", first_lora["loss"])
    assert first_lora["loss"] == first_full["loss"] and full["step"] == 3
    # Router, embeddings, norms, lm_head and every frozen weight bitwise as loaded; the adapters moved.
    base_model = load_hf(base)
    base_sd = base_model.state_dict()
    frozen = [n for n in after if not is_adapter_name(n)]
    assert sorted(frozen) == sorted(base_sd) and all(torch.equal(after[n], base_sd[n]) for n in frozen)
    assert all(after[n].abs().sum() > 0 for n in after if ".lora_B" in n)
    # adapter/ loads into our loader and holds exactly the trained adapters.
    spec = load_adapter(base_model, tmp_path / "lora" / "adapter")
    assert spec.rank == 4 and spec.scale == 2.0
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)
    loaded = dict(base_model.named_parameters())
    assert all(torch.equal(loaded[n], after[n]) for n in after if is_adapter_name(n))
    # hf/ is the base plus s * B @ A on each adapted weight (here one routed expert's up_proj and the
    # dense layer's down_proj, by hand), everything else the base's, and it serves.
    merged, adapter = exported(tmp_path / "lora"), load_file(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    base_hf = exported(base.parent)
    for module in ("model.layers.1.mlp.experts.2.up_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.1.attention.query_key_value"):
        a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(merged[module + ".weight"], base_hf[module + ".weight"] + 2.0 * b @ a, atol=1e-7)
    untouched = [k for k in base_hf if k.endswith(("norm.weight", "mlp.gate.weight", "embeddings.weight", "lm_head.weight"))]
    assert len(untouched) == 8 and all(torch.equal(merged[k], base_hf[k]) for k in untouched)
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_hf(tmp_path / "lora" / "hf")(ids).logits, base_model(ids).logits, atol=1e-5)
    assert check_serving(str(tmp_path / "lora" / "hf"), out=open("/dev/null", "w")) == 0


@pytest.mark.slow
def test_a_killed_lora_run_resumes_bitwise_and_refuses_a_changed_base(tmp_path, base, cache, capsys):
    own = tmp_path / "base"  # this test changes its base afterwards
    shutil.copytree(base, own)
    args = _lora_args(own, cache, "--train.steps", "3", "--checkpoint.every", "1", "--checkpoint.keep_last", "3",
                      "--model.activation_checkpointing", "true", "--lora.dropout", "0.1", "--lora.train_router", "true")
    run_inproc("sft", args + ["--output-dir", str(tmp_path / "straight")])
    crashed = tmp_path / "crashed"
    run_inproc("sft", args + ["--output-dir", str(crashed)])
    # As if killed between step 2's and step 3's checkpoints.
    shutil.rmtree(crashed / "checkpoints" / "step_00000003")
    for d in ("hf", "adapter"):
        shutil.rmtree(crashed / d)
    (crashed / "hf_export.json").unlink()
    spare = tmp_path / "spare"
    shutil.copytree(crashed, spare)
    run_inproc("sft", args + ["--output-dir", str(crashed)])
    straight, resumed = metrics(tmp_path / "straight"), metrics(crashed)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["grad_norm"], a["aux_loss"]) == (b["loss"], b["grad_norm"], b["aux_loss"]), (a, b)
    for d, f in [("adapter", "adapter_model.safetensors"), ("hf", "model-00001-of-00001.safetensors")]:
        assert (tmp_path / "straight" / d / f).read_bytes() == (crashed / d / f).read_bytes(), d
    # The router trained (train_router) and travels in the adapter, as PEFT's modules_to_save.
    adapter = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert not torch.equal(adapter["base_model.model.model.layers.1.mlp.gate.weight"],
                           exported(base.parent)["model.layers.1.mlp.gate.weight"])
    # The same base path with other weights: the adapters do not belong to them, refused before loading.
    model = load_hf(own)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    shutil.rmtree(own)
    save_hf(model, own)
    from trainer.sft import main
    with refused(capsys, r"model.init_from .* is not the base .* trained on", EXIT_BAD_INPUT):
        main(args + ["--output-dir", str(spare)])
    assert not (spare / "checkpoints" / "step_00000003").exists()


@pytest.mark.slow
def test_dpo_with_lora_starts_at_ln2_and_its_reference_is_the_base(tmp_path, base, cache, demo_pairs,  # noqa: F811
                                                                   monkeypatch):
    """'live' switches the adapters off for the reference forward, 'precomputed' did so in its first
    pass: the same reference, so the same run; neither builds a second model."""
    import trainer.dpo

    def no_second_model(*a, **k):
        raise AssertionError("a LoRA run's reference is its own base: no second model")
    monkeypatch.setattr(trainer.dpo, "build_model", no_second_model)
    out = {}
    for reference in ("precomputed", "live"):
        run_inproc("dpo", _lora_args(base, cache, "--data.sources", f"[{demo_pairs}]", "--train.steps", "2",
                                     "--dpo.reference", reference, "--data.seq_len", "128",
                                     "--checkpoint.export_hf", "false", "--output-dir", str(tmp_path / reference)))
        out[reference] = m = metrics(tmp_path / reference)
        print(reference, [(x["loss/dpo"], x["rewards/margins"]) for x in m])
        assert abs(m[0]["loss/dpo"] - math.log(2)) < 1e-6 and abs(m[0]["rewards/margins"]) < 1e-6
        assert abs(m[1]["rewards/margins"]) > 1e-4  # the adapters moved the policy away from its base
    for a, b in zip(out["precomputed"], out["live"]):
        for k in ("loss", "loss/dpo", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (k, a[k], b[k])


def test_what_a_lora_run_cannot_do_is_refused_before_anything_is_written(tmp_path, base, capsys):
    from trainer.sft import main

    out = ["--output-dir", str(tmp_path / "run")]
    with refused(capsys, r"lora.rank 4 adapts existing weights: set model.init_from", EXIT_BAD_INPUT):
        main(COMMON + ["--lora.rank", "4", *out])
    with refused(capsys, r"LoRA with expert parallelism .* not supported yet", EXIT_BAD_INPUT):
        main(COMMON + ["--lora.rank", "4", "--model.init_from", str(base), "--parallel.ep", "2", *out])
    with refused(capsys, r"triton expert backend computes the routed experts' LoRA without dropout \(lora.dropout 0.1\)",
                 EXIT_BAD_INPUT):
        main(COMMON + ["--lora.rank", "4", "--model.init_from", str(base), "--model.expert_backend", "triton",
                       "--lora.dropout", "0.1", *out])
    with refused(capsys, r"LoRA target 'attn': use 'all' or a comma list of attention", EXIT_BAD_INPUT):
        main(COMMON + ["--lora.rank", "4", "--model.init_from", str(base), "--lora.target", "attn", *out])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~20 s: the Triton interpreter
def test_a_lora_run_on_the_triton_kernels_trains_as_on_torch(tmp_path, base, cache):
    """The same LoRA run with the routed experts' adapters inside the Triton kernels (the interpreter, fp32)
    and on the torch backend's grouped GEMMs: the same losses and gradient norms step by step, with
    activation checkpointing on the triton side (the custom op's forward replayed in backward)."""
    steps = ["--train.steps", "3", "--checkpoint.every", "0", "--checkpoint.export_hf", "false",
             "--checkpoint.save_final", "false"]
    run_inproc("sft", _lora_args(base, cache, *steps, "--model.expert_backend", "torch",
                                 "--output-dir", str(tmp_path / "torch")))
    run_inproc("sft", _lora_args(base, cache, *steps, "--model.expert_backend", "triton",
                                 "--model.activation_checkpointing", "true", "--output-dir", str(tmp_path / "triton")))
    a, b = metrics(tmp_path / "torch"), metrics(tmp_path / "triton")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        print(x["loss"], y["loss"], x["grad_norm"], y["grad_norm"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert a[2]["loss"] != a[0]["loss"]  # the adapters moved
