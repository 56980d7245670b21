"""One optimizer step under torch.profiler (``--train.profile_step N``): where did the step's time go?

Writes to <output-dir>/profile/:
  step{N}-trace.json.gz    rank 0's Chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
  step{N}-rank{R}.json     every rank's summary, read off the trace:
      wall_ms              the step, from a device synchronization before it to one after it;
      device_busy_ms       the union of the intervals in which a kernel, copy or memset ran on the GPU;
      device_idle_share    1 - busy / wall: the share of the step the GPU waited (for the host, for
                           communication, or at a synchronization);
      top_kernels          the kernels with the most GPU time (name, calls, ms);
      host_waits           runtime calls that block the host until the GPU catches up
                           (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize,
                           blocking cudaMemcpy): name, calls, ms;
      host_ops, launches   CPU-side aten ops and kernel launches issued in the step.
On CPU the device fields are null and the summary holds the wall time and the host counts.

The summary is computed from the exported trace, whose format (Kineto's Chrome trace: events with a
"cat" of kernel, gpu_memcpy, gpu_memset, cuda_runtime, cuda_driver, cpu_op, a "ts" and a "dur" in
microseconds) is the same across torch versions; a failure to summarise is written into the summary
and never stops the run.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver")
# Runtime calls after which the host has waited for the device.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def union_ms(intervals_us) -> float:
    """Total length, in ms, of the union of [start, end) intervals given in microseconds."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals_us):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def _by_name(events, top: int) -> list[dict]:
    calls, us = collections.Counter(), collections.Counter()
    for ev in events:
        calls[ev["name"]] += 1
        us[ev["name"]] += float(ev.get("dur", 0.0))
    return [{"name": n, "calls": calls[n], "ms": round(us[n] / 1e3, 4)} for n, _ in us.most_common(top)]


def summarize_trace(trace: dict, wall_ms: float, top: int = 15) -> dict:
    """The summary described in the module docstring, from a Chrome trace dict and the step's wall time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    runtime = [e for e in events if e.get("cat") in RUNTIME_CATS]
    out = {"wall_ms": round(wall_ms, 3),
           "host_ops": sum(1 for e in events if e.get("cat") == "cpu_op"),
           "launches": sum(1 for e in runtime if e["name"] in LAUNCHES),
           "host_waits": _by_name([e for e in runtime if e["name"] in WAITS], top),
           "device_busy_ms": None, "device_idle_share": None, "top_kernels": []}
    if device:
        busy = union_ms((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in device)
        out.update(device_busy_ms=round(busy, 3), device_idle_share=round(max(0.0, 1.0 - busy / wall_ms), 4),
                   top_kernels=_by_name([e for e in device if e.get("cat") == "kernel"], top))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class StepProfiler:
    """``with StepProfiler(out_dir, step, rank, device, logger): trainer.step()``."""

    def __init__(self, out_dir: str, step: int, rank: int, device: torch.device, logger=None):
        self.out_dir, self.step, self.rank, self.device, self.logger = out_dir, step, rank, device, logger
        self.summary: dict | None = None

    def __enter__(self):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        _sync(self.device)
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        _sync(self.device)
        wall_ms = 1e3 * (time.perf_counter() - self.t0)
        self.prof.__exit__(exc_type, exc, tb)
        if exc_type is None:
            try:
                self._write(wall_ms)
            except OSError as e:  # a full disk, say: the run goes on without its profile
                if self.logger is not None:
                    self.logger.info(f"profile of step {self.step} not written: {e}")
        return False

    def _write(self, wall_ms: float) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        stem = os.path.join(self.out_dir, f"step{self.step}")
        with tempfile.TemporaryDirectory(dir=self.out_dir) as tmp:
            raw = os.path.join(tmp, "trace.json")
            try:
                self.prof.export_chrome_trace(raw)
                with open(raw) as f:
                    summary = summarize_trace(json.load(f), wall_ms)
            except Exception as e:  # a profiler problem must never end the run it measures
                summary = {"wall_ms": round(wall_ms, 3), "error": f"{type(e).__name__}: {e}"}
            summary.update(step=self.step, rank=self.rank, device=str(self.device))
            self.summary = summary
            _write_json(f"{stem}-rank{self.rank}.json", summary)
            if self.rank == 0 and os.path.exists(raw):
                gz = os.path.join(tmp, "trace.json.gz")
                with open(raw, "rb") as src, gzip.open(gz, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(gz, f"{stem}-trace.json.gz")
        if self.logger is not None:
            busy = summary.get("device_busy_ms")
            where = f"{stem}-rank{self.rank}.json"
            if busy is not None:
                self.logger.info(f"profile of step {self.step}: {summary['wall_ms']:.1f} ms, GPU busy {busy:.1f} ms "
                                 f"({100 * (1 - summary['device_idle_share']):.0f}%), "
                                 f"{sum(w['calls'] for w in summary['host_waits'])} host waits; {where}")
            else:
                self.logger.info(f"profile of step {self.step}: {summary['wall_ms']:.1f} ms; {where}")
