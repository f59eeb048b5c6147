"""The real-data stream: a fixed order over a source, read by DataLoader workers, resumable.

Order, a function of the run seed alone: epoch e visits the source's units (shards) in a
permutation drawn from (seed, e), and the samples inside each unit in a permutation drawn from
(seed, e, unit). Process r of W takes every W-th position of that endless sequence; its batch j
is its positions [j n, (j + 1) n). A batch depends on nothing before it, so a run that has
consumed c samples resumes at batch c // n without reading, let alone decoding, anything before
it, and DataLoader worker w of K builds batches w, w + K, ... (the DataLoader hands them back in
order).

Unreadable samples are skipped and counted; their places go to the batch's readable samples in
turn, so every batch holds n samples and the position in the stream stays a function of the
step. A batch with no readable sample at all takes the source's first readable one.
"""

from __future__ import annotations

import os
import signal
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import DataError
from .datasets import Sample, Source, print_warning, try_read

SHOWN_SKIPS = 5  # unreadable samples named on stderr; the rest are only counted


@dataclass(frozen=True)
class StreamPlan:
    """How one process reads the stream."""

    batch: int  # samples per batch: batch_size * gradient_accumulation_steps
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 2  # DataLoader worker processes (0: read in the training process)
    prefetch: int = 2  # batches each worker prepares ahead
    pin_memory: bool = False


class EpochOrder:
    """Position -> (unit, k): units permuted per epoch, samples permuted per (epoch, unit)."""

    def __init__(self, sizes: list[int], seed: int) -> None:
        self.sizes, self.seed = np.asarray(sizes, dtype=np.int64), seed
        self.total = int(self.sizes.sum())
        self._epoch, self._units, self._ends = -1, np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._within: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def locate(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.total)
        if epoch != self._epoch:
            self._epoch = epoch
            self._units = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.sizes))
            self._ends = np.cumsum(self.sizes[self._units])
        slot = int(np.searchsorted(self._ends, i, side="right"))
        unit = int(self._units[slot])
        offset = i - int(self._ends[slot] - self.sizes[unit])
        key = (epoch, unit)
        if key not in self._within:
            self._within[key] = np.random.default_rng([self.seed, epoch, 1, unit]).permutation(int(self.sizes[unit]))
            if len(self._within) > 4:
                self._within.popitem(last=False)
        return unit, int(self._within[key][offset])


@dataclass
class StreamBatch:
    """Batch ``index`` of one process's stream: n samples (pixels, or latent mean and std)."""

    index: int
    captions: list[str]
    pixels: Tensor | None  # (n, C, H, W) float32 in [-1, 1]
    mean: Tensor | None  # (n, C, h, w) float16
    std: Tensor | None
    skipped: int  # unreadable samples among the batch's positions
    uncaptioned: int  # readable samples with no caption
    skips: tuple[str, ...]  # "name: why" of the first unreadable ones (SHOWN_SKIPS at most)

    def pin_memory(self) -> StreamBatch:  # the DataLoader's pin_memory calls this
        pin = {k: getattr(self, k).pin_memory() for k in ("pixels", "mean", "std") if getattr(self, k) is not None}
        return replace(self, **pin)


def _stack(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.stack(parts)  # type: ignore[arg-type]


class RealStream(IterableDataset):
    """The endless batches of one process, from batch ``start`` on (see the module docstring)."""

    def __init__(self, source: Source, fallback: tuple[int, int], plan: StreamPlan, start: int = 0) -> None:
        self.source, self.fallback, self.plan, self.start = source, fallback, plan, start
        self.order = EpochOrder(source.unit_sizes, plan.seed)

    def batch_at(self, j: int) -> StreamBatch:
        n, world, rank = self.plan.batch, self.plan.world, self.plan.rank
        good: list[Sample] = []
        skips: list[str] = []
        for q in range(j * n, (j + 1) * n):
            sample, why = try_read(self.source, *self.order.locate(q * world + rank))
            if sample is None:
                skips.append(why)
            else:
                good.append(sample)
        uncaptioned = sum(not s.caption for s in good)
        if not good:
            sample, why = try_read(self.source, *self.fallback)
            if sample is None:
                raise DataError(f"the {self.source.where} has become unreadable ({why}); check the storage and"
                                " resume with --resume")
            good = [sample]
        picked = [good[i % len(good)] for i in range(n)]
        return StreamBatch(j, [s.caption for s in picked], _stack([s.pixels for s in picked]),
                           _stack([s.mean for s in picked]), _stack([s.std for s in picked]),
                           len(skips), uncaptioned, tuple(skips[:SHOWN_SKIPS]))

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        j = self.start + worker
        while True:
            yield self.batch_at(j)
            j += workers


def _quiet_worker(_: int) -> None:
    """Ctrl-C (and a closed terminal's SIGHUP) reaches the whole process group: workers leave it to
    the training process, which finishes its step (from batches already prefetched) and saves.
    SIGTERM ends a worker with exit code 0 (the DataLoader treats a worker killed by a signal as a
    crash; multiprocessing ends workers with SIGTERM at exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


def _let_go(loader: Iterator[StreamBatch]) -> None:
    """A finalizer's callback: its reference to ``loader`` ends with it (the iterator's own ``__del__`` stops
    its workers)."""


def _one_line(e: Exception) -> str:
    """A worker's exception comes back with its traceback in the message: keep the last line."""
    last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
    return last[0].split(": ", 1)[-1] if last[0].startswith(("dmd2_train.", "DataError")) else last[0]


class StreamReader:
    """The training side of a ``RealStream``: a ``DataLoader`` over it, a small buffer, the counts.

    ``to_latents(batch)`` turns each arriving batch into (mean, std) in UNet space (the VAE
    encoder for pixels, a copy to the device for latent shards); it runs once per batch in a fixed
    composition, so a resumed run sees bit-identical numbers.
    """

    def __init__(self, source: Source, fallback: tuple[int, int], plan: StreamPlan,
                 to_latents: Callable[[StreamBatch], tuple[Tensor, Tensor]]) -> None:
        self.source, self.fallback, self.plan, self.to_latents = source, fallback, plan, to_latents
        self.consumed = 0  # samples this process has taken: the stream position
        self.skipped = self.uncaptioned = 0  # running counts of the batches taken
        self._drop = 0  # samples of the first batch already consumed before a resume
        self._buffer: list[tuple[Tensor, Tensor, list[str]]] = []
        self._loader: Iterator[StreamBatch] | None = None
        self._release: weakref.finalize | None = None
        self._shown: set[str] = set()  # the unreadable samples named so far (each once, SHOWN_SKIPS at most)

    @property
    def epochs(self) -> float:
        """Passes over the whole source so far, all processes together."""
        return self.consumed * self.plan.world / max(1, sum(self.source.unit_sizes))

    def state(self) -> dict[str, int]:
        return {"consumed": self.consumed, "world": self.plan.world, "skipped": self.skipped,
                "uncaptioned": self.uncaptioned}

    def restore(self, state: dict[str, int]) -> None:
        """Continue where ``state`` (saved with ``state()``) left off; the counts go to rank 0,
        the one that holds the totals. On another number of processes the position is the same
        share of the stream, rounded."""
        assert self._loader is None, "restore before the first take"
        self.consumed = int(state["consumed"]) * int(state.get("world", self.plan.world)) // self.plan.world
        self._drop = self.consumed % self.plan.batch
        if self.plan.rank == 0:
            self.skipped, self.uncaptioned = int(state.get("skipped", 0)), int(state.get("uncaptioned", 0))

    def _batches(self) -> Iterator[StreamBatch]:
        if self._loader is None:
            stream = RealStream(self.source, self.fallback, self.plan, start=self.consumed // self.plan.batch)
            workers = self.plan.workers
            self._loader = iter(DataLoader(
                stream, batch_size=None, num_workers=workers, prefetch_factor=self.plan.prefetch if workers else None,
                persistent_workers=workers > 0, pin_memory=self.plan.pin_memory,
                worker_init_fn=_quiet_worker if workers else None))
            # The iterator is also held here until this reader goes. A reader in a reference cycle (its
            # RunBatches holds it and it holds RunBatches' to_latents) goes in the cyclic GC, which took
            # the iterator's queues down before its __del__ asked the workers to stop: each worker's join
            # then waited its 5 s timeout (seconds of a run, wherever the GC happened to run; 76 s of one
            # test). Held here, the iterator is not part of that garbage: it goes whole, after the reader.
            self._release = weakref.finalize(self, _let_go, self._loader)
        return self._loader

    def _receive(self, batch: StreamBatch) -> None:
        mean, std = self.to_latents(batch)
        captions, drop = batch.captions, self._drop
        if drop:  # taken (and counted) before the checkpoint this run resumed from
            mean, std, captions, self._drop = mean[drop:], std[drop:], captions[drop:], 0
        else:
            self.skipped += batch.skipped
            self.uncaptioned += batch.uncaptioned
            for why in batch.skips if self.plan.rank == 0 else ():
                if why in self._shown or len(self._shown) >= SHOWN_SKIPS:
                    continue
                self._shown.add(why)
                print_warning(f"skipped an unreadable sample ({why}); the running count is logged as data/skipped")
        self._buffer.append((mean, std, captions))

    def take(self, n: int) -> tuple[Tensor, Tensor, list[str]]:
        """The next ``n`` samples: latent mean (n, C, h, w), std, and captions."""
        while sum(len(c) for _, _, c in self._buffer) < n:
            try:
                self._receive(next(self._batches()))
            except DataError as e:
                raise DataError(_one_line(e)) from None
        means, stds, captions, need = [], [], [], n
        while need:
            mean, std, caps = self._buffer[0]
            part = min(need, len(caps))
            means.append(mean[:part])
            stds.append(std[:part])
            captions += caps[:part]
            need -= part
            if part == len(caps):
                self._buffer.pop(0)
            else:
                self._buffer[0] = (mean[part:], std[part:], caps[part:])
        self.consumed += n
        return torch.cat(means), torch.cat(stds), captions

    def close(self) -> None:
        """Stop the worker processes (they also stop with the reader)."""
        if self._release is not None:
            self._release()
        self._loader = self._release = None
