"""Ling 2.0 conversion: HF -> native -> HF bit-exact on the golden V2 checkpoint (MTP layer and
expert biases included), expert biases fp32 through a bf16 conversion, and an export that
verify --serving accepts: the V2 config fields vLLM/SGLang read, the bailing_v2 template, both stop ids."""
import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert import save_native
from checkpoints_convert.checkpoint import convert
from checkpoints_convert.serving import check_serving
from data import load_tokenizer
from data.demo import TOKENIZER_DIR
from moe import BailingMoeConfig, BailingMoeForCausalLM
from tests.conftest import FIXTURES

V2_HF = FIXTURES / "bailing_moe_v2_tiny" / "hf"


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_hf_native_hf_is_bit_identical_and_bf16_keeps_the_bias_fp32(tmp_path):
    convert(V2_HF, tmp_path / "native", "native", shard_size="300KB")
    convert(tmp_path / "native", tmp_path / "hf", "hf", shard_size="300KB")
    golden, back = _tensors(V2_HF), _tensors(tmp_path / "hf")
    assert golden.keys() == back.keys()
    assert any(k.startswith("model.layers.3.eh_proj") for k in back)  # the MTP layer travels
    for k in golden:
        assert golden[k].dtype == back[k].dtype, k
        assert torch.equal(golden[k].view(torch.uint8), back[k].view(torch.uint8)), k
    raw, cfg = (json.loads((d / "config.json").read_text()) for d in (V2_HF, tmp_path / "hf"))
    for k, v in raw.items():  # auto_map is left out: the fixture has no modeling_bailing_moe_v2.py to point at
        assert k == "auto_map" or cfg[k] == v, k
    assert "auto_map" not in cfg
    convert(V2_HF, tmp_path / "bf16", "hf", dtype="bf16")
    half = _tensors(tmp_path / "bf16")
    biases = [k for k in half if k.endswith("expert_bias")]
    assert len(biases) == 3
    for k in half:
        want = torch.float32 if k in biases else torch.bfloat16
        assert half[k].dtype == want, k
        if k in biases:
            assert torch.equal(half[k], golden[k])
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"


def test_a_v2_export_is_complete_for_serving(tmp_path, capsys):
    tok = load_tokenizer(TOKENIZER_DIR)
    cfg = BailingMoeConfig.preset("tiny-v2", vocab_size=-(-tok.vocab_size // 64) * 64, hidden_size=32, head_dim=16,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  moe_intermediate_size=16, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_native(BailingMoeForCausalLM(cfg), tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "hf", "hf", dtype="bf16", tokenizer=TOKENIZER_DIR)
    capsys.readouterr()
    assert check_serving(str(tmp_path / "hf")) == 0, capsys.readouterr().out
    report = capsys.readouterr().out
    print(report)
    assert "BailingMoeV2ForCausalLM" in report and "bailing_v2 template" in report
    tcfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert tcfg["eos_token"] == "<|role_end|>"
    assert gen["eos_token_id"] == [tok.token_to_id("<|role_end|>"), tok.eos_id]
    # A config missing what vLLM reads is refused.
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "use_rmsnorm"}))
    assert check_serving(str(tmp_path / "hf")) == 1
    assert "no use_rmsnorm" in capsys.readouterr().out
