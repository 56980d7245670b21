"""The training forward and backward read nothing back to the host.

On CUDA, an op that reads a device value on the host (``.item()``, ``bincount``'s min/max, boolean-mask
indexing's nonzero count, ...) makes the CPU wait until the GPU has finished everything queued; the GPU
then idles while the CPU launches what follows. One such op per MoE layer puts that stall in every
layer of every micro-batch, forward and recompute. These tests record, on CPU, every dispatched aten
op that would read back on CUDA. CPU cannot see ``.cpu()`` or ``.tolist()`` (they dispatch nothing
there); tests/test_trainer_gpu.py checks the same steps on CUDA with ``torch.cuda.set_sync_debug_mode``.
"""
import collections

import pytest
import torch

from moe import BailingMoeConfig, BailingMoeForCausalLM
from moe.heads import CHUNK_TOKENS, CrossEntropy
from kernels.routing import expert_counts
from moe.router import kept_and_all_counts
from tests.dispatch_utils import SeesInsideOurOps
from tests.trainer_utils import TINY, run_inproc

aten = torch.ops.aten
# Ops whose CUDA kernels copy a value to the host before they return (their output size, or their
# result, depends on the data).
READS_BACK = {aten._local_scalar_dense, aten.nonzero, aten.bincount, aten.masked_select, aten._unique2,
              aten.unique_dim, aten.unique_consecutive, aten.is_nonzero, aten.equal}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class ReadBacks(SeesInsideOurOps):
    """Counts the ops above, and indexing or index_put with a boolean mask (nonzero underneath), and
    repeat_interleave without output_size; inside our custom ops too."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def record(self, func, args, kwargs):
        packet = func.overloadpacket
        if packet in READS_BACK:
            self.ops[str(func)] += 1
        elif packet in INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.ops[f"{func} with a boolean mask"] += 1
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.ops[str(func)] += 1
        return func(*args, **kwargs)


def test_the_recorder_sees_each_kind_of_read_back():
    ids = torch.tensor([0, 2, 2, 1])
    with ReadBacks() as rb:
        torch.bincount(ids, minlength=4)
        ids[ids > 0]
        ids.sum().item()
        bool(ids.any())
        torch.zeros(4, dtype=torch.int64).scatter_add_(0, ids, torch.ones_like(ids))  # none: fixed size
    # .item() and bool() both end in _local_scalar_dense; the scatter-add adds nothing.
    assert dict(rb.ops) == {"aten.bincount.default": 1, "aten.index.Tensor with a boolean mask": 1,
                            "aten._local_scalar_dense.default": 2}, rb.ops


def test_expert_counts_equal_bincount_over_the_kept_and_all_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (50, 3), generator=g)
    mask = torch.rand(50, generator=g) > 0.3
    every = torch.bincount(ids.flatten(), minlength=9)
    assert torch.equal(expert_counts(ids, 9), every)
    kept, all_ = kept_and_all_counts(ids, 9, mask)
    assert torch.equal(kept, torch.bincount(ids[mask].flatten(), minlength=9))
    assert torch.equal(all_, every)
    assert kept.dtype == all_.dtype == torch.int64
    kept, all_ = kept_and_all_counts(ids, 9, torch.zeros(50, dtype=torch.bool))
    assert kept.sum() == 0 and torch.equal(all_, every)
    kept, all_ = kept_and_all_counts(ids, 9)
    assert torch.equal(kept, every) and all_ is kept  # no mask: one histogram serves both


def _model(backend, aux):
    torch.manual_seed(0)
    cfg = BailingMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                           num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                           initializer_range=0.05, torch_dtype="float32", expert_backend=backend,
                           aux_loss_type=aux, aux_loss_alpha=0.01, z_loss_coef=1e-3)
    return BailingMoeForCausalLM(cfg)


@pytest.mark.parametrize("aux", ["micro", "global", "sequence"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_forward_and_backward_read_nothing_back(backend, aux):
    model = _model(backend, aux)
    ids = torch.randint(0, 97, (2, 16))
    labels = ids.clone()
    labels[0, 13:] = -100
    packed = dict(position_ids=torch.tensor([list(range(9)) + list(range(5)) + [0, 0], list(range(16))]),
                  document_ids=torch.tensor([[0] * 9 + [1] * 5 + [-1] * 2, [0] * 16]))
    padded = dict(attention_mask=torch.tensor([[1] * 12 + [0] * 4, [1] * 16]))
    for inputs in (packed, padded):
        model.zero_grad()
        with ReadBacks() as rb:
            out = model(ids, labels=labels, head=CrossEntropy(chunk_size=CHUNK_TOKENS), **inputs,
                        balance_counts_fn=(lambda c: c) if aux == "global" else None)
            (out.ce_sum + out.aux_loss).backward()
        assert not rb.ops, (backend, aux, sorted(inputs), dict(rb.ops))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class Histograms(SeesInsideOurOps):
    """Counts integer scatter-adds: in a forward each is one histogram of expert ids (the sequence
    balance loss scatter-adds in fp32, and nothing else scatter-adds integers)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def record(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten.scatter_add, aten.scatter_add_) and not out.is_floating_point():
            self.n += 1
        return out

    def ours(self, func, args, kwargs):
        # The Triton routing op counts inside its kernel when it is given no counts (args[1]).
        if func._schema.name == "lingmoe::moe_routing" and args[1] is None:
            self.n += 1


@pytest.mark.parametrize("backend", ["loop", "torch", "triton"])
def test_each_moe_layer_counts_its_experts_once(backend):
    """The router's one histogram serves the balance loss, the load metrics and the expert
    backend's sorted tables, with padding in the input (the tables count it, the statistics do not)
    and without."""
    model = _model(backend, "micro")  # 3 layers, the first dense: 2 MoE layers
    ids = torch.randint(0, 97, (2, 16))
    for inputs in (dict(document_ids=torch.tensor([[0] * 9 + [1] * 5 + [-1] * 2, [0] * 16])),
                   dict(attention_mask=torch.tensor([[1] * 12 + [0] * 4, [1] * 16])), {}):
        with Histograms() as h:
            model(ids, labels=ids, **inputs)
        assert h.n == 2, (backend, sorted(inputs), h.n)


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_trainer_micro_steps_read_nothing_back(tmp_path, monkeypatch, script):
    """The task's whole micro-step (forward, losses, metric sums) as the trainer runs it."""
    if script == "sft":
        from trainer.sft import SFTTask as Task

        data = ["--data.synthetic", "true"]
    else:
        from data.demo import ensure_demo_data
        from trainer.dpo import DPOTask as Task

        pairs = ensure_demo_data(str(tmp_path / "demo"))["jsonl"]["dpo"]
        lines = open(pairs).read().splitlines()[:16]
        (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
        data = ["--data.sources", f"[{tmp_path / 'pairs.jsonl'}]", "--data.seq_len", "128"]
    seen = []
    original = Task.micro_step

    def recorded(self, ctx, b):
        with ReadBacks() as rb:
            out = original(self, ctx, b)
        seen.append(dict(rb.ops))
        return out

    monkeypatch.setattr(Task, "micro_step", recorded)
    run_inproc(script, TINY + data + ["--train.steps", "1", "--train.global_batch_size", "4",
                                      "--data.micro_batch_size", "2", "--model.aux_loss_type", "global",
                                      "--checkpoint.every", "0", "--checkpoint.export_hf", "false",
                                      "--output-dir", str(tmp_path / "run")])
    assert len(seen) == 2 and seen == [{}, {}], seen
