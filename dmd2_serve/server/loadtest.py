"""Load benchmark: concurrent clients against a server on loopback; prints a table.

    python -m dmd2_serve.server.loadtest                       # starts the bundled digits server itself
    python -m dmd2_serve.server.loadtest --url http://127.0.0.1:8000 --clients 1 32 --seconds 20
    python -m dmd2_serve.server.loadtest --clients 1 --format jpeg --size 512x512   # big images, toy model

Each scenario runs ``clients`` closed-loop clients (send, wait for the answer, send again) for a
bounded time and request count, then reports latency percentiles, throughput, the batch sizes the
server formed (from each answer's ``timings_ms.batch_requests``) and errors, and beside the
client's latency the server's own pipeline time (``timings_ms.inference``, the batch's model
time) and the HTTP overhead: each request's latency minus its pipeline time (queueing, request
and response handling, encoding, the loopback round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Scenario:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: list[float]
    pipeline_ms: list[float]  # the server's model time for each answer's batch
    encode_ms: list[float] = field(default_factory=list)  # the server's time making each answer's files
    queue_ms: list[float] = field(default_factory=list)  # from the HTTP process's prepare to its batch's start
    reply_ms: list[float] = field(default_factory=list)  # from the worker's answer to the HTTP process holding it
    output_format: str = "png"
    first_error: str = ""  # what the first failed request got: a status and its detail, or the client's error

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        """The ``q`` quantile of ``values`` (default: the latencies), NaN when there are none."""
        values = self.latencies_ms if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def overhead_ms(self) -> list[float]:
        """Per request: client latency minus the server's pipeline time."""
        return [lat - pipe for lat, pipe in zip(self.latencies_ms, self.pipeline_ms)]


async def run_scenario(url: str, clients: int, seconds: float, max_requests: int, prompt: str,
                       output_format: str = "png", size: str | None = None, api_key: str | None = None) -> Scenario:
    """``clients`` closed-loop clients for at most ``seconds`` and ``max_requests`` requests in all,
    each asking for one image in ``output_format`` (at ``size``, ``WxH``; default: the model's),
    with ``api_key`` as a bearer token when given."""
    latencies: list[float] = []
    encode: list[float] = []
    queue: list[float] = []
    reply: list[float] = []
    batches: list[float] = []
    pipeline: list[float] = []
    errors = 0
    first_error = ""
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as client:
        async def one_client(index: int) -> None:
            nonlocal errors, sent, first_error
            i = 0
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    body = {"prompt": prompt, "seed": index * 100_000 + i, "output_format": output_format}
                    r = await client.post("/generate", json=body | ({"size": size} if size else {}))
                    ok = r.status_code == 200
                    why = "" if ok else f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
                first_error = first_error or why
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    timings = r.json()["timings_ms"]
                    batches.append(timings.get("batch_requests", 1.0))
                    pipeline.append(timings.get("inference", 0.0))
                    encode.append(timings.get("encode", 0.0))
                    queue.append(timings.get("queue", 0.0))
                    reply.append(timings.get("reply", 0.0))
                else:
                    errors += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return Scenario(clients, len(latencies), errors, elapsed, latencies, batches, pipeline, encode, queue, reply,
                    output_format, first_error)


def table(rows: list[Scenario]) -> str:
    """A Markdown table of the scenarios, the first one as the baseline."""
    base = rows[0].throughput or 1.0
    lines = ["| clients | requests | errors | p50 ms | p95 ms | p50 pipeline ms | p50 overhead ms"
             " | of it: queue / reply / encode ms | req/s | vs 1 client | mean batch | max batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean_b = statistics.fmean(r.batch_sizes) if r.batch_sizes else 0
        max_b = max(r.batch_sizes) if r.batch_sizes else 0
        lines.append(f"| {r.clients} | {r.requests} | {r.errors} | {r.percentile(0.5):.1f} | {r.percentile(0.95):.1f}"
                     f" | {r.percentile(0.5, r.pipeline_ms):.1f} | {r.percentile(0.5, r.overhead_ms):.1f}"
                     f" | {r.percentile(0.5, r.queue_ms):.1f} / {r.percentile(0.5, r.reply_ms):.1f}"
                     f" / {r.percentile(0.5, r.encode_ms):.1f}"
                     f" | {r.throughput:.1f} | {r.throughput / base:.1f}x | {mean_b:.1f} | {max_b:.0f} |")
    return "\n".join(lines)


def _positive(kind: type) -> Any:
    """An argparse type: a number above 0."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmd2_serve.server.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server; default: start the bundled digits server on a free port")
    p.add_argument("--clients", type=_positive(int), nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=_positive(float), default=20.0, help="per scenario")
    p.add_argument("--max-requests", type=_positive(int), default=5000, help="per scenario")
    p.add_argument("--prompt", default="a handwritten 7")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="the images' output_format")
    p.add_argument("--size", help="WxH for every image (default: the model's own; the digits model draws"
                                  " at 8x8 and scales up, so 512x512 measures the serving path with big images)")
    p.add_argument("--api-key", default=os.environ.get("DMD2_API_KEY") or None,
                   help="a server started with --api-key (default: $DMD2_API_KEY, as the server reads it)")
    args = p.parse_args(argv)

    server = None
    url = args.url
    if url is None:
        from .launch import launch

        try:
            server = launch(env={"DMD2_API_KEY": args.api_key})
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        url = server.url
    try:
        options = (args.prompt, args.format, args.size, args.api_key)
        warm = asyncio.run(run_scenario(url, 4, 2.0, 50, *options))  # warm the pool and caches
        if not warm.requests:  # nothing answered: no point timing it
            print(f"error: {url} answered none of {warm.errors} requests; the first got {warm.first_error}",
                  file=sys.stderr)
            return 2
        rows = [asyncio.run(run_scenario(url, c, args.seconds, args.max_requests, *options)) for c in args.clients]
    finally:
        if server is not None:
            from .launch import stop

            stop(server.process)
    print(table(rows))
    for r in rows:
        if r.errors:
            print(f"{r.clients} client(s): {r.errors} failed requests; the first got {r.first_error}", file=sys.stderr)
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
