"""LoRA and offload on CUDA: where each tensor lives and in which dtype, and the runs against plain
training (bf16, so with tolerances). Skipped without a GPU; not yet run on one (no GPU where this was
written)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.trainer_utils import metrics, run_inproc  # noqa: E402

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
COMMON = ["--train.device", "cuda", "--model.param_dtype", "bf16", "--train.progress", "false",
          "--data.synthetic", "true", "--data.seq_len", "64", "--train.global_batch_size", "8",
          "--data.micro_batch_size", "4", "--optim.lr", "1e-3", "--checkpoint.every", "0",
          "--checkpoint.export_hf", "false", "--checkpoint.save_final", "false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from checkpoints_convert import save_hf
    from moe.config import BailingMoeConfig
    from moe.model import BailingMoeForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpu_base") / "hf"
    save_hf(BailingMoeForCausalLM(BailingMoeConfig.preset("tiny", **SHAPE)), path)
    return path


def _trainer(args):
    from trainer.loop import Trainer
    from trainer.options import Options, parse_options
    from trainer.sft import SFTTask

    return Trainer(SFTTask(), parse_options(args, "sft", Options, "", "runs/x"))


def test_lora_frozen_weights_are_bf16_on_the_gpu_and_only_adapters_hold_state(tmp_path, base):
    t = _trainer(COMMON + ["--model.init_from", str(base), "--lora.rank", "4", "--train.steps", "2",
                           "--output-dir", str(tmp_path / "lora")])
    try:
        t.build()
        t.fit()
        for name, p in t.model.named_parameters():
            local = p.to_local()
            assert local.is_cuda, name
            # frozen: stored in bf16, no gradient; adapters: fp32 masters with AdamW state
            assert local.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
            assert (".lora_" in name) == p.requires_grad, name
        assert all(".lora_" in n for n, p in t.model.named_parameters() if p in t.optimizer.state)
    finally:
        t.close()
    full = run_inproc("sft", COMMON + ["--model.init_from", str(base), "--train.steps", "2",
                                       "--output-dir", str(tmp_path / "full")])
    assert full["step"] == 2
    first_lora, first_full = metrics(tmp_path / "lora")[0]["loss"], metrics(tmp_path / "full")[0]["loss"]
    assert abs(first_lora - first_full) <= 1e-3 * abs(first_full)  # the same bf16 weights, B = 0


@pytest.mark.parametrize("mode", ["optimizer", "all"])
def test_offloaded_state_lives_in_host_memory_and_trains_as_without(tmp_path, base, mode):
    t = _trainer(COMMON + ["--model.init_from", str(base), "--parallel.offload", mode, "--train.steps", "3",
                           "--output-dir", str(tmp_path / mode)])
    try:
        t.build()
        t.fit()
        for p, st in t.optimizer.state.items():
            assert st["exp_avg"].to_local().device.type == "cpu" and st["exp_avg_sq"].to_local().device.type == "cpu"
            assert p.to_local().device.type == ("cpu" if mode == "all" else "cuda")
    finally:
        t.close()
    run_inproc("sft", COMMON + ["--model.init_from", str(base), "--train.steps", "3",
                                "--output-dir", str(tmp_path / "none")])
    for a, b in zip(metrics(tmp_path / "none"), metrics(tmp_path / mode)):
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * abs(a["loss"]), (mode, a["loss"], b["loss"])


def test_triton_lora_kernels_equal_the_torch_backend_in_bf16():
    """The adapters inside the Triton grouped GEMMs against torch._grouped_mm's extra grouped GEMMs, at a shape
    with several tiles per expert (bf16: relative to each tensor's norm)."""
    from kernels import triton_moe_mlp
    from kernels.lora import ExpertLoRA
    from kernels.reference import grouped_mm_moe_mlp

    g = torch.Generator().manual_seed(0)
    T, E, K, H, I, r = 1024, 8, 2, 256, 128, 8

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).cuda().to(torch.bfloat16)

    x, w_gu, w_d = rnd(T, H), rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5)
    tw, ids = torch.rand(T, E, generator=g).topk(K, dim=-1)
    tw, ids = tw.cuda().to(torch.bfloat16), ids.cuda()
    adapters = [rnd(E, 2 * r, H, scale=H ** -0.5), rnd(E, 2 * I, r, scale=r ** -0.5), rnd(E, r, I, scale=I ** -0.5),
                rnd(E, H, r, scale=r ** -0.5)]
    dy = rnd(T, H)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in [x, tw, *adapters]]
        y = fn(leaves[0], w_gu, w_d, ids, leaves[1], lora=ExpertLoRA(*leaves[2:], 2.0))
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    got, want = run(triton_moe_mlp), run(grouped_mm_moe_mlp)
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want)]
    print("triton vs torch LoRA, relative errors:", [f"{e:.1e}" for e in errs])
    assert max(errs) < 2e-2
