"""--train.profile_step: the summary's arithmetic on hand-made traces, and a real profiled CPU run."""
import gzip
import json

import pytest

from tests.trainer_utils import TINY, metrics, run_inproc
from trainer.options import Options, OptionsError, parse_options
from trainer.profiling import summarize_trace, union_ms


def test_union_of_intervals_by_hand():
    # [0, 15) from two overlapping, [20, 31) from two touching: 15 + 11 = 26 us.
    assert union_ms([(20, 30), (0, 10), (5, 15), (30, 31)]) == pytest.approx(0.026)
    assert union_ms([]) == 0.0
    assert union_ms([(0, 10), (2, 3)]) == pytest.approx(0.010)  # nested


def _x(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summary_of_a_hand_made_trace():
    trace = {"traceEvents": [
        _x("kernel", "gemm", 0, 300), _x("kernel", "gemm", 200, 300),  # overlap: busy 500 us, time 600
        _x("gpu_memcpy", "Memcpy DtoH", 600, 100),                       # busy 100 us more
        _x("kernel", "reduce", 700, 50),                                 # touches the copy: +50
        _x("cuda_runtime", "cudaLaunchKernel", 0, 5), _x("cuda_runtime", "cudaLaunchKernel", 10, 5),
        _x("cuda_driver", "cuLaunchKernel", 20, 5),
        _x("cuda_runtime", "cudaStreamSynchronize", 30, 50), _x("cuda_runtime", "cudaStreamSynchronize", 90, 30),
        _x("cuda_runtime", "cudaMemcpyAsync", 80, 2),  # not a wait
        *[_x("cpu_op", "aten::mm", i, 1) for i in range(5)],
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 900},  # instant events are not intervals
    ]}
    s = summarize_trace(trace, wall_ms=1.0)
    assert s["device_busy_ms"] == pytest.approx(0.65)
    assert s["device_idle_share"] == pytest.approx(0.35)
    assert s["top_kernels"] == [{"name": "gemm", "calls": 2, "ms": 0.6}, {"name": "reduce", "calls": 1, "ms": 0.05}]
    assert s["host_waits"] == [{"name": "cudaStreamSynchronize", "calls": 2, "ms": 0.08}]
    assert s["launches"] == 3 and s["host_ops"] == 5


def test_summary_without_device_events():
    s = summarize_trace({"traceEvents": [_x("cpu_op", "aten::add", 0, 3)]}, wall_ms=2.0)
    assert s["device_busy_ms"] is None and s["device_idle_share"] is None and s["top_kernels"] == []
    assert s["host_ops"] == 1 and s["wall_ms"] == 2.0


ARGS = TINY + ["--data.synthetic", "true", "--train.steps", "3", "--train.global_batch_size", "4",
               "--data.micro_batch_size", "2", "--checkpoint.every", "0", "--checkpoint.export_hf", "false"]


def test_a_profiled_cpu_run_writes_trace_and_summary(tmp_path):
    run_inproc("sft", ARGS + ["--train.profile_step", "2", "--output-dir", str(tmp_path)])
    prof = tmp_path / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["step2-rank0.json", "step2-trace.json.gz"]
    s = json.loads((prof / "step2-rank0.json").read_text())
    assert s["step"] == 2 and s["rank"] == 0 and s["device"] == "cpu"
    assert s["device_busy_ms"] is None and "error" not in s
    # The profiled interval holds the whole step the trainer timed (two micro-batches of the model).
    step2 = metrics(tmp_path)[1]
    assert step2["step"] == 2
    assert s["wall_ms"] >= 1e3 * step2["step_time_s"]
    with gzip.open(prof / "step2-trace.json.gz") as f:
        trace = json.load(f)
    ops = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"]
    assert s["host_ops"] == len(ops) > 0
    assert {"aten::mm", "aten::addmm"} & set(ops)


def test_a_summary_that_fails_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import trainer.profiling as profiling

    def broken(trace, wall_ms, top=15):
        raise KeyError("traceEvents")

    monkeypatch.setattr(profiling, "summarize_trace", broken)
    out = run_inproc("sft", ARGS + ["--train.profile_step", "1", "--output-dir", str(tmp_path)])
    assert out["step"] == 3
    s = json.loads((tmp_path / "profile" / "step1-rank0.json").read_text())
    assert s["error"] == "KeyError: 'traceEvents'" and s["wall_ms"] > 0


@pytest.mark.parametrize("step", ["-1", "4"])
def test_profile_step_outside_the_run_is_refused(step):
    with pytest.raises(OptionsError, match="train.profile_step must be a step in 1..train.steps"):
        parse_options(["--train.steps", "3", "--train.profile_step", step], "trainer/sft.py", Options, "",
                      "runs/x")


def test_a_profile_that_cannot_be_written_leaves_the_run_going(tmp_path, monkeypatch, capsys):
    import trainer.profiling as profiling

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profiling, "_write_json", full_disk)
    out = run_inproc("sft", ARGS + ["--train.profile_step", "2", "--output-dir", str(tmp_path)])
    assert out["step"] == 3 and len(metrics(tmp_path)) == 3
    assert not (tmp_path / "profile" / "step2-rank0.json").exists()
    assert "profile of step 2 not written: [Errno 28] No space left on device" in capsys.readouterr().err
