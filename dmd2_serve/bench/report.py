"""The benchmark's bookkeeping: the table it prints, timers, the time budget and its watchdog."""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class OutOfTime(Exception):
    """Raised by the watchdog when the budget is spent."""


class Report:
    """Rows of the result table, printed as they come and written to JSON at the end."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.out = out

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("row:", json.dumps(row), flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("note:", text, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps({"rows": self.rows, "notes": self.notes}, indent=1))

    def table(self) -> str:
        """The end-to-end and kernel rows as two markdown tables."""
        lines = ["| arch | batch | backend | ms / batch | ms / image | images / s | vs plain | prepare s | peak GiB | check |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        plain = {(r["arch"], r["batch"]): r["ms"] for r in self.rows if r.get("backend") == "plain"}
        for r in self.rows:
            if "arch" not in r:
                continue
            base = plain.get((r["arch"], r["batch"])) if r.get("kind") != "part" else None
            speed = f"{base / r['ms']:.2f}x" if base and r.get("ms") else ""
            lines.append(f"| {r['arch']} | {r['batch']} | {r['backend']} | {_f(r.get('ms'))} | "
                         f"{_f(r['ms'] / r['batch'] if r.get('ms') else None)} | {_f(r.get('images_per_s'), 1)} | {speed} | "
                         f"{_f(r.get('prepare_s'), 1)} | "
                         f"{_f(r.get('peak_gib'), 1)} | {r.get('check', '')} |")
        lines += ["", "| re-noise, fp16 | eager PyTorch us | kernel us | kernel in graph us | eager in graph us |"
                  " speed-up (graph) | GB/s (kernel) | % of copy |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if r.get("kind") == "renoise":
                lines.append(f"| {r['shape']} {r['mode']} | {_f(r['eager_us'])} | {_f(r['kernel_us'])} | "
                             f"{_f(r['kernel_graph_us'])} | {_f(r['eager_graph_us'])} | "
                             f"{_f(r['eager_us'] / r['kernel_graph_us'], 1)}x | {_f(r['gbps'], 0)} | "
                             f"{_f(r['pct_copy'], 0)}% |")
        lines += ["", "| re-noise from eps, variants | block | fast math | in graph us | GB/s | % of copy | max err |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if r.get("kind") == "renoise-variant":
                lines.append(f"| {r['shape']} | {r['block']} | {r['fast_math']} | {_f(r['graph_us'])} | "
                             f"{_f(r['gbps'], 0)} | {_f(r['pct_copy'], 0)}% | {r['max_err']:.1e} |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _f(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def timed_ms(fn: Callable[[], Any], device: torch.device, target_s: float = 1.5, max_reps: int = 30) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU), after one warm-up call."""
    return timed(fn, device, target_s, max_reps)[0]


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


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read plus written, GB/s."""
    n = 2**28 if device.type == "cuda" else 2**22
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = timed_ms(lambda: b.copy_(a), device, target_s=0.5)
    return 2 * a.numel() * 4 / (ms / 1000) / 1e9


# --------------------------------------------------------------------------------------------
# Re-noise kernel
# --------------------------------------------------------------------------------------------

def _bench_us(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return 1000 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return 1000 * timed_ms(fn, device, target_s=0.2)


def _graph_us(fn: Callable[[], Any], device: torch.device, calls: int = 20) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph of ``calls`` calls (no launch gaps)."""
    if device.type != "cuda":
        return _bench_us(fn, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _bench_us(graph.replay, device) / calls


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

class Budget:
    """Seconds left for the run; stages that would not fit are skipped with a note."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.end = time.perf_counter() + seconds
        self.report = report

    def left(self) -> float:
        return self.end - time.perf_counter()

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"skipped {what} and everything after it in its stage: {self.left():.0f} s left,"
                            f" about {seconds:.0f} s needed")


def _watchdog(seconds: float) -> None:
    def fire(signum: int, frame: Any) -> None:
        raise OutOfTime(f"the {seconds:.0f} s budget ran out mid-stage")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(max(1, int(seconds)))
