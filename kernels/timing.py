"""Timers for the benchmarks: CUDA events or Triton's ``do_bench`` on a GPU, the wall clock on the CPU.

The kernels' own benchmarks (``renoise_bench``) and the serving benchmark (``dmd2_serve.bench``)
time with these, so their numbers compare.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: torch.device, target_s: float = 1.5, max_reps: int = 30) -> tuple[float, Any]:
    """(median ms, last result) of ``fn`` after one warm-up call; calls over 0.5 s are timed twice."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    min_reps = 2 if time.perf_counter() - t0 > 0.5 else 3
    times: list[float] = []
    deadline = time.perf_counter() + target_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t1) * 1000)
    return statistics.median(times), out


def timed_ms(fn: Callable[[], Any], device: torch.device, target_s: float = 1.5, max_reps: int = 30) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU), after one warm-up call."""
    return timed(fn, device, target_s, max_reps)[0]


def time_us(fn: Callable[[], Any], device: torch.device) -> float:
    """Median microseconds of a short ``fn``: Triton's ``do_bench`` on a GPU (it flushes the L2 cache
    between calls), :func:`timed` for 0.2 s on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return 1000 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return 1000 * timed_ms(fn, device, target_s=0.2)


def graph_us(fn: Callable[[], Any], device: torch.device, calls: int = 20) -> float:
    """Per-call microseconds of ``fn`` replayed from a CUDA graph of ``calls`` calls (no launch gaps);
    :func:`time_us` off CUDA."""
    if device.type != "cuda":
        return time_us(fn, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_us(graph.replay, device) / calls


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read plus written, GB/s: the bar a memory-bound kernel
    is judged by."""
    n = 2**28 if device.type == "cuda" else 2**22
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = timed_ms(lambda: b.copy_(a), device, target_s=0.5)
    return 2 * a.numel() * 4 / (ms / 1000) / 1e9
