"""trainer.parallel.all_reduce_by_name: sums by name over real ranks, whatever order each rank built its dict in."""

import pytest
import torch

from tests.trainer_utils import free_port


def _rank(rank, port, out):
    import torch.distributed as dist

    from trainer.parallel import all_reduce_by_name

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # The two ranks insert the names in opposite orders, with a scalar, an int and a [2, 2] tensor.
        if rank == 0:
            values = {"loss": 1.5, "load": torch.tensor([[1, 2], [3, 4]]), "tokens": 7}
        else:
            values = {"tokens": 5, "load": torch.tensor([[10, 20], [30, 40]]), "loss": 0.25}
        got = all_reduce_by_name(values, torch.device("cpu"))
        out[rank] = {k: v.tolist() for k, v in got.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sums_by_name_over_two_ranks():
    import torch.multiprocessing as mp

    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    want = {"loss": 1.75, "load": [[11.0, 22.0], [33.0, 44.0]], "tokens": 12.0}
    assert out[0] == out[1] == want


def test_one_process_returns_the_values_as_float64_by_name():
    from trainer.parallel import all_reduce_by_name

    got = all_reduce_by_name({"b": 2, "a": torch.tensor([1, 2, 3])}, torch.device("cpu"))
    assert got["a"].dtype == torch.float64 and got["a"].tolist() == [1.0, 2.0, 3.0] and got["b"].item() == 2.0
    assert all_reduce_by_name({}, torch.device("cpu")) == {}
