"""One rank trains without FSDP (parallel.one_rank 'plain', trainer/precision.py): no parameter is
copied per micro-batch, and the numbers are FSDP's (fp32 and bf16 compute, bitwise), so the loss
curve, the checkpoints and a resume from either path are the same.

bf16 runs on CPU here by replacing trainer.loop.compute_dtype (the trainer computes in fp32 on CPU):
CPU's bf16 matmuls are slow but exact to their own rounding, which is all a bitwise comparison of
two paths needs."""
import collections
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe import BailingMoeForCausalLM
from moe.heads import CrossEntropy
from tests.trainer_utils import TINY, exported, metrics, run_inproc

aten = torch.ops.aten
# Ops that copy or cast tensors. FSDP's gradient copy-in is its own op, fsdp::chunk_cat (out=).
COPIES = {aten.copy_, aten._to_copy, aten.clone, aten.cat, aten.stack, aten._foreach_copy_}


class CopiedBytes(TorchDispatchMode):
    """Bytes written by the ops in COPIES (and fsdp::chunk_cat): the tensors an op writes into
    (copy_'s self, an out= argument), else the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in COPIES or func.namespace == "fsdp":
            names = [a.name for a in func._schema.arguments]
            given = {**dict(zip(names, args)), **kwargs}
            written = [given[a.name] for a in func._schema.arguments
                       if a.alias_info is not None and a.alias_info.is_write and a.name in given]
            self.bytes[str(func.overloadpacket)] += sum(t.numel() * t.element_size()
                                                        for t in tree_leaves(written or out)
                                                        if isinstance(t, torch.Tensor))
        return out

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _options(one_rank: str):
    from trainer.options import Options, parse_options

    return parse_options(TINY + ["--parallel.one_rank", one_rank, "--model.aux_loss_type", "micro",
                                 "--data.synthetic", "true"], "t", Options, "", "unused")


def _copied_per_micro_batch(model, n=2) -> list[int]:
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    per = []
    for _ in range(n):
        with CopiedBytes() as rec:
            out = model(ids, labels=ids, head=CrossEntropy())
            (out.ce_sum + out.aux_loss).backward()
        per.append(rec.total)
    return per


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_micro_batch_copies_no_parameter_at_one_rank(dtype, monkeypatch):
    """The bytes copied per micro-batch beyond what the model's own forward and backward copy (a
    bare module of the same dtype): none in fp32; in bf16 only each gradient's first fold into its
    fp32 master (4 bytes a parameter, on the first micro-batch of a step; later ones add in place).
    FSDP at one rank copies at least every parameter in its gather and every gradient on the way
    back, per micro-batch."""
    from trainer import loop, parallel
    from trainer.sft import SFTTask

    monkeypatch.setattr(loop, "compute_dtype", lambda opts, device: None if dtype == torch.float32 else dtype)
    info = parallel.init_distributed("cpu")
    try:
        built = {mode: loop.build_model(_options(mode), info, SFTTask()) for mode in ("plain", "fsdp")}
        model, cfg, weights = built["plain"]
        bare = BailingMoeForCausalLM(cfg)  # the same weights, a plain module of the dtype: the model's own copies
        bare.load_state_dict(weights.module.state_dict())
        bare.to(dtype)
        n_params = sum(p.numel() for p in bare.parameters())
        with torch.no_grad():  # once per process, the torch backend probes torch._grouped_mm (a few cats)
            bare(torch.zeros(1, 4, dtype=torch.long))
        base = _copied_per_micro_batch(bare)
        plain = _copied_per_micro_batch(model)
        fsdp = _copied_per_micro_batch(built["fsdp"][0])
        print(f"{dtype}: {n_params} parameters; bytes copied per micro-batch: the model's own {base}, "
              f"plain one rank {plain}, FSDP at one rank {fsdp}")
        fold = [4 * n_params, 0] if dtype == torch.bfloat16 else [0, 0]
        assert [p - b for p, b in zip(plain, base)] == fold
        assert all(f - b >= 2 * 4 * n_params for f, b in zip(fsdp, base))  # the test sees FSDP's copies
        with CopiedBytes() as rec:
            weights.push()  # once per optimizer step: the masters into the bf16 parameters
        assert rec.total == (2 * n_params if dtype == torch.bfloat16 else 0)
    finally:
        built = model = weights = None
        parallel.shutdown_distributed()


def _run(out, *extra):
    return run_inproc("sft", TINY + ["--data.synthetic", "true", "--train.global_batch_size", "4",
                                     "--data.micro_batch_size", "2", "--optim.lr", "3e-3",
                                     "--checkpoint.every", "2", "--output-dir", str(out), *extra])


def _resume_from_step_2(out, *extra):
    """As if the run in ``out`` had died after its step-2 checkpoint: then run it again with ``extra``."""
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    shutil.rmtree(out / "hf")
    _run(out, "--train.steps", "3", *extra)


def _same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert (x["loss"], x["aux_loss"], x["grad_norm"]) == (y["loss"], y["aux_loss"], y["grad_norm"]), (x, y)
    ea, eb = exported(a), exported(b)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_one_rank_trains_bitwise_as_fsdp_and_each_resumes_the_others_checkpoints(dtype, tmp_path, monkeypatch):
    """Two micro-batches a step; in bf16 (the masters against FSDP's mixed precision) also with
    activation checkpointing and the global balance loss. Then each run is cut back to its step-2
    checkpoint and finished by the other path: bf16 resumes FSDP's checkpoint without FSDP (loaded
    into the masters, then pushed into the bf16 parameters), fp32 the plain one's under FSDP."""
    from trainer import loop

    common = ()
    if dtype == torch.bfloat16:
        monkeypatch.setattr(loop, "compute_dtype", lambda opts, device: torch.bfloat16)
        common = ("--model.activation_checkpointing", "true", "--model.aux_loss_type", "global")
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    _run(plain, "--train.steps", "3", *common)
    _run(fsdp, "--train.steps", "3", "--parallel.one_rank", "fsdp", *common)
    _same_run(plain, fsdp)
    if dtype == torch.bfloat16:
        _resume_from_step_2(fsdp, *common)
        _same_run(plain, fsdp)
        changes = (fsdp / "config_changes.jsonl").read_text()
        assert '"parallel.one_rank": {"old": "fsdp", "new": "plain"}' in changes
    else:
        _resume_from_step_2(plain, "--parallel.one_rank", "fsdp", *common)
        _same_run(plain, fsdp)
