"""Prometheus metrics, shared by the HTTP process and the inference workers.

LitServe runs the model in worker processes, so the metrics use prometheus-client's
multiprocess mode: every process writes to files under ``PROMETHEUS_MULTIPROC_DIR`` and
``GET /metrics`` sums them. prometheus-client decides where values live (memory or those files)
when it is first imported, so this module points it at a folder before importing it; the HTTP
process (forked) and the inference workers (spawned) inherit the variable.

A folder made here is removed when the server exits. A server killed with SIGKILL (or by the
kernel's OOM killer) cannot do that, so each folder holds an ``flock`` on its ``.owner.lock`` for
the life of the server (the kernel lets go of it however the server ends) and the next start
removes every ``dmd2-metrics-*`` folder in the temp directory whose lock is free.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

PREFIX = "dmd2-metrics-"
OWNER_LOCK = ".owner.lock"  # not *.db: prometheus-client's collector never reads it
_held: list[int] = []  # the lock's descriptor, open (and so locked) until this process exits


def ensure_multiprocess_dir() -> str:
    """Point prometheus-client at a fresh folder for this server's metric files; one made here is
    removed when this process exits (a folder the user set is theirs)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        remove_dead_servers_folders(Path(tempfile.gettempdir()))
        path = tempfile.mkdtemp(prefix=PREFIX)
        _hold_owner_lock(Path(path))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(_remove_made_by, os.getpid(), path)
    os.makedirs(path, exist_ok=True)
    return path


def remove_dead_servers_folders(temp: Path) -> list[Path]:
    """Remove the metrics folders in ``temp`` whose server is gone (their owner lock is free); return them.

    A folder without the lock file is left alone: a server between making its folder and locking it, or
    one made by a version before the lock."""
    removed = []
    for folder in temp.glob(f"{PREFIX}*"):
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDONLY)
        except OSError:  # no lock file, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its server is running
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():  # not another user's, in a shared /tmp
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _hold_owner_lock(folder: Path) -> None:
    """Lock a file under another name, then give it the name a sweep looks for: never seen unlocked."""
    fd = os.open(folder / f"{OWNER_LOCK}.new", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(folder / f"{OWNER_LOCK}.new", folder / OWNER_LOCK)
    _held.append(fd)


def _remove_made_by(pid: int, path: str) -> None:
    if os.getpid() == pid:  # not in a forked child that runs exit handlers
        shutil.rmtree(path, ignore_errors=True)


if "prometheus_client" not in sys.modules:  # imported earlier without the folder: this process counts in memory
    ensure_multiprocess_dir()

# after the folder is set (see the module docstring)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUESTS = Counter("dmd2_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
LATENCY = Histogram(
    "dmd2_request_latency_seconds", "End-to-end request latency", ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("dmd2_queue_depth", "Generation requests admitted and not yet answered",
                    multiprocess_mode="livesum")
BATCH_SIZE = Histogram("dmd2_batch_size", "Requests per model forward batch", buckets=(1, 2, 4, 8, 16, 32, 64))
BATCH_IMAGES = Histogram("dmd2_batch_images", "Images per model forward batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
REJECTED = Counter("dmd2_rejected_total", "Requests refused because the queue was full")
CANCELLED = Counter("dmd2_cancelled_total", "Queued requests skipped because their client went away")
# Per served model (the worker knows which model and adapter ran each request; the HTTP counters above do not).
MODEL_REQUESTS = Counter("dmd2_model_requests_total", "Generation requests run, by model and LoRA adapter ('': none)",
                         ["model", "lora"])
MODEL_INFERENCE = Histogram(
    "dmd2_model_inference_seconds", "Time of one forward group (one model, adapter, shape and steps) in a batch",
    ["model"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LORA_LOADS = Counter("dmd2_lora_loads_total", "LoRA adapters loaded into a model (cache misses of --lora-cache)",
                     ["model"])


def render() -> tuple[bytes, str]:
    """The exposition text of every process's metrics, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
