"""--parallel.offload: AdamW's moments in host memory (HostStateAdamW) or FSDP2's CPU offload policy give
the run of no offload, and checkpoints move between them. On this CPU machine host and device are the
same memory, so these check the arithmetic and the state's plumbing, not where bytes live."""
import pytest
import torch

from tests.trainer_utils import TINY, exported, metrics, run_inproc
from trainer.optim import HostStateAdamW


def test_host_state_adamw_is_adamw_and_its_state_loads_in_host_memory():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())

    def groups(m):
        return [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    host = HostStateAdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        x = torch.randn(3, 8)
        for m, opt in ((a, ref), (b, host)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # torch's update, op for op
    again = HostStateAdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    again.load_state_dict(host.state_dict())
    for p in (b.weight, b.bias):
        for k in ("exp_avg", "exp_avg_sq"):
            assert again.state[p][k].device.type == "cpu" and torch.equal(again.state[p][k], host.state[p][k])
        assert again.state[p]["step"] == 4


@pytest.mark.slow
def test_offloaded_runs_equal_the_plain_run_and_resume_across_modes(tmp_path):
    common = TINY + ["--data.synthetic", "true", "--train.steps", "3", "--train.global_batch_size", "4",
                     "--data.micro_batch_size", "2", "--optim.lr", "3e-3", "--checkpoint.keep_last", "3"]
    for mode in ("none", "optimizer", "all"):
        every = "2" if mode == "none" else "0"
        run_inproc("sft", common + ["--parallel.offload", mode, "--checkpoint.every", every,
                                    "--output-dir", str(tmp_path / mode)])
    plain = metrics(tmp_path / "none")
    for mode in ("optimizer", "all"):
        for a, b in zip(plain, metrics(tmp_path / mode)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and \
                a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (mode, a, b)
        w, w_plain = exported(tmp_path / mode), exported(tmp_path / "none")
        assert all(torch.allclose(w[k], w_plain[k], atol=1e-6) for k in w), mode
    # A checkpoint written without offload resumes with the moments offloaded (and on to the end).
    import shutil
    shutil.rmtree(tmp_path / "none" / "checkpoints" / "step_00000003")
    shutil.rmtree(tmp_path / "none" / "hf")
    (tmp_path / "none" / "hf_export.json").unlink()
    run_inproc("sft", common + ["--parallel.offload", "optimizer", "--checkpoint.every", "2",
                                "--output-dir", str(tmp_path / "none")])
    assert metrics(tmp_path / "none")[-1]["loss"] == pytest.approx(plain[-1]["loss"], rel=1e-6)
    w = exported(tmp_path / "none")
    assert all(torch.allclose(w[k], exported(tmp_path / "optimizer")[k], atol=1e-6) for k in w)
