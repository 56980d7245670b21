"""trainer.tools.plan against hand-derived counts for a small config (exact terms: parameters, sharded
state, the gathered block under EP, the all-to-all traffic) and its recommendation."""
import json

import pytest

from moe.config import BailingMoeConfig
from data.errors import BadInputError
from trainer.tools.plan import GIB, activation_bytes_per_token, main, param_counts, plan

CFG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
           num_shared_experts=1, first_k_dense_replace=1, torch_dtype="float32")


def test_counts_and_exact_terms():
    cfg = BailingMoeConfig(**CFG)
    c = param_counts(cfg)
    assert c["total"] == cfg.num_params()  # the config's own formula, independent of the meta model
    assert c["routed"] == 1 * 8 * 3 * 32 * 16  # one MoE layer, E * (2I*H + H*I)
    one = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, ep=1)
    four = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, ep=4)
    assert one.optimizer_gib * GIB == pytest.approx(8 * c["total"] / 4)
    assert one.params_gib == four.params_gib and one.grads_gib * GIB == pytest.approx(4 * c["total"] / 4)
    # A MoE block gathers E/ep experts under EP: 3/4 of 12288 routed weights less, at 2+2+4 bytes each.
    assert (one.gathered_gib - four.gathered_gib) * GIB == pytest.approx(12288 * 3 / 4 * 8)
    # EP4: 4 exchanges of T*K*H bf16 rows per MoE layer, 3/4 of them leave the GPU; none without EP.
    rows = 128 * 2 * 32 * 2
    assert four.all_to_all_comm_gib_per_step * GIB == pytest.approx(4 * rows * 3 / 4)
    assert one.all_to_all_comm_gib_per_step == 0 and one.all_to_all_gib == 0
    ac = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, ep=4, activation_checkpointing=True)
    assert ac.activations_gib < four.activations_gib
    assert ac.all_to_all_comm_gib_per_step * GIB == pytest.approx(6 * rows * 3 / 4)  # the recompute's two
    with pytest.raises(BadInputError, match="must divide"):
        plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, ep=3)


def test_cli_recommends_a_layout_that_fits(capsys):
    res = main(["--model", "ling-lite", "--gpus", "16", "--gpu-memory-gib", "80", "--seq-len", "4096", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["recommended"] == res["recommended"]
    best = next(lay for lay in res["layouts"] if lay["name"] == res["recommended"])
    assert best["fits"] and best["total_gib"] <= 72
    # Too little memory for any layout: none is recommended (without offload; offloading all fits it).
    assert main(["--model", "ling-lite", "--gpus", "2", "--gpu-memory-gib", "16", "--offload", "none",
                 "--json"])["recommended"] is None
    assert "off:all" in main(["--model", "ling-lite", "--gpus", "2", "--gpu-memory-gib", "16", "--json"])["recommended"]


def test_ling_2_presets_plan_with_their_published_sizes():
    """Ling-mini-2.0 and Ling-flash-2.0 (no MTP layers, as published): exact totals from the meta
    model, the ones the Ling 2.0 report / the Hugging Face listing give (16.26B; 102,889,697,280);
    an MTP layer adds one MoE block of activations and one chunk of logits."""
    mini = BailingMoeConfig.preset("ling-mini-2.0")
    assert param_counts(mini)["total"] == 16_255_638_528 == mini.num_params()
    assert param_counts(BailingMoeConfig.preset("ling-flash-2.0"))["total"] == 102_889_697_280
    lay = plan(mini, gpus=8, gpu_memory_gib=80, seq_len=4096, micro_batch=1, ep=8)
    assert lay.params_gib == pytest.approx(4 * 16_255_638_528 / 8 / 2 ** 30)
    with_mtp = plan(BailingMoeConfig.preset("ling-mini-2.0", num_nextn_predict_layers=1), gpus=8, gpu_memory_gib=80,
                    seq_len=4096, micro_batch=1, ep=8)
    block = activation_bytes_per_token(mini, 19, 2) * 4096 + 2 * 4 * 4096 * mini.vocab_size
    assert with_mtp.activations_gib - lay.activations_gib == pytest.approx(block / 2 ** 30)


def test_lora_and_offload_terms_by_hand():
    from moe.lora import LoraSpec
    from trainer.tools.plan import lora_counts, recommend

    cfg = BailingMoeConfig(**CFG)
    spec = LoraSpec(rank=2)
    # Rank 2 on every target, by hand: attention qkv (2x32 + 64x2) and dense (2x32 + 32x2) per layer;
    # the dense layer's MLP (width 48): gate and up 2x32 + 48x2, down 2x48 + 32x2; the MoE layer's 8
    # experts (width 16) and its shared expert (width 16): gate and up 2x32 + 16x2, down 2x16 + 32x2.
    attention = 2 * (192 + 128)
    dense = 160 + 160 + 160
    experts, shared = 8 * (96 + 96 + 96), 96 + 96 + 96
    lc = lora_counts(cfg, spec)
    assert lc["total"] == attention + dense + experts + shared == 3712
    assert lc["per_target"] == {"attention": 640, "shared_experts": 288, "experts": 2304, "dense_mlp": 480}
    total = param_counts(cfg)["total"]
    full = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2)
    lora = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, lora=spec)
    # Frozen weights in the 2-byte compute dtype; adapters as fp32 with fp32 gradients and two moments.
    assert lora.params_gib * GIB == pytest.approx((2 * (total - 3712) + 4 * 3712) / 4)
    assert lora.grads_gib * GIB == pytest.approx(4 * 3712 / 4) and lora.optimizer_gib * GIB == pytest.approx(8 * 3712 / 4)
    # The reduce-scatter carries the adapters' fp32 gradients only; the all-gathers are full training's.
    assert (full.fsdp_comm_gib_per_step - lora.fsdp_comm_gib_per_step) * GIB == \
        pytest.approx(4 * (total - 3712) * 3 / 4, rel=1e-6)
    off = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, offload="optimizer")
    assert off.host_gib == full.optimizer_gib and off.total_gib == pytest.approx(full.total_gib - full.optimizer_gib)
    off = plan(cfg, gpus=4, gpu_memory_gib=80, seq_len=64, micro_batch=2, offload="all")
    assert off.host_gib == pytest.approx(full.params_gib + full.grads_gib + full.optimizer_gib)
    assert recommend([off, full]).offload == "none"  # offload only when nothing fits without it


def test_ling_lite_lora_fits_one_80gb_gpu_and_full_training_needs_offload_on_two(capsys):
    res = main(["--model", "ling-lite", "--gpus", "1", "--lora-rank", "8", "--json"])
    assert res["recommended"] == "FSDP LoRA r8"  # without activation checkpointing, at S=4096
    assert 150e6 < res["lora"]["adapter_params"] < 160e6
    res = main(["--model", "ling-lite", "--gpus", "2", "--json"])
    best = next(lay for lay in res["layouts"] if lay["name"] == res["recommended"])
    assert best["offload"] != "none" and best["total_gib"] <= 72
