"""Prometheus metrics, shared by the HTTP process and the inference workers.

LitServe runs the model in worker processes, so the metrics use prometheus-client's
multiprocess mode: every process writes to files under ``PROMETHEUS_MULTIPROC_DIR`` and
``GET /metrics`` sums them. prometheus-client decides where values live (memory or those files)
when it is first imported, so this module points it at a folder before importing it; the HTTP
process (forked) and the inference workers (spawned) inherit the variable.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile


def ensure_multiprocess_dir() -> str:
    """Point prometheus-client at a fresh folder for this server's metric files; one made here is
    removed when this process exits (a folder the user set is theirs)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="dmd2-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(_remove_made_by, os.getpid(), path)
    os.makedirs(path, exist_ok=True)
    return path


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
