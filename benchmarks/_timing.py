"""Wall times of a GPU (or CPU) callable for the benchmark scripts: CUDA events on a GPU, perf_counter
otherwise; one untimed call first (compilation, caches)."""
from __future__ import annotations

import time

import torch


def times_ms(fn, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times
