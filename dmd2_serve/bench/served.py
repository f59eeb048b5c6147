"""The served path, end to end: ``python -m dmd2_serve`` on a random-weight SD1.5 generator under load.

    python -m dmd2_serve.bench.served [--budget-s 300] [--out served.json] [--cache-dir DIR]
                                      [--bucket 1,4,16] [--seconds 15] [--backend compile] [--tiny]
                                      [-- SERVER ARGS ...]   # e.g. -- --compile-tuning decoder

Writes a random-weight generator folder in SD1.5's real architecture (``random_folder.py``: the
CLIP ViT-L/14 text encoder included, so prompt encoding counts), starts the real server on it on
a loopback port (``--backend compile``: compilation and CUDA-graph capture of every bucket happen
before ``/health`` says 200), drives it with the load test's closed-loop clients
(``server/loadtest.py``) at 1 and at 32 clients, asking for PNG and for JPEG, then stops it as an operator does (SIGTERM to its
main process, which drains) and checks that it exits 0.

Per scenario it reports the client's p50 / p90 latency, throughput, the batches the server formed,
the server's own pipeline time per batch (``timings_ms.inference``: prompt encoding, the few-step
loop and decoding), the queue time (``timings_ms.queue``: from the HTTP process's parsing of the
request to the start of its batch in the worker), the reply time (``timings_ms.reply``: from the
worker's answer to the HTTP process holding it), the encoding time (``timings_ms.encode``: the
HTTP process making the image files) and the overhead (latency minus pipeline time: queueing,
HTTP, the reply, image encoding, the loopback round trip). ``model-bound req/s`` is what the
pipeline alone would give at the batches formed (mean batch / p50 pipeline time). Rows go to
``--out`` as JSON (``{"kind": "served", "arch": "sd15", "clients": N, ...}``) and a Markdown table is printed.

Nothing is downloaded. The run stays within ``--budget-s``: the server start gets what the
scenarios leave, a watchdog ends the run past the budget, and every failure prints the server's
log tail and exits 1. ``--tiny`` serves a toy-sized folder (CPU tests of this script). Arguments
after ``--`` go to ``python -m dmd2_serve`` as they are (the fast-path options the pipeline
benchmark chose, say).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..__main__ import _sizes  # the server's own --bucket parser
from ..server.loadtest import Scenario, run_scenario
from .report import OutOfTime, Report, _watchdog

ARCH = "sd15"
# (clients, output format): PNG is the default answer; JPEG shows what the PNG encoder costs.
SCENARIOS = ((1, "png"), (1, "jpeg"), (32, "png"), (32, "jpeg"))
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
MAX_REQUESTS = 100_000  # per scenario: the time bounds it
STOP_S = 60.0  # SIGTERM -> exit; the scenarios are over, so the drain has nothing to wait for
LOG_TAIL = 4000


def served_row(s: Scenario, backend: str) -> dict[str, Any]:
    """One scenario as a JSON row."""
    pipeline = s.percentile(0.5, s.pipeline_ms)
    batch = statistics.fmean(s.batch_sizes) if s.batch_sizes else float("nan")
    return {"kind": "served", "arch": ARCH, "backend": backend, "clients": s.clients, "requests": s.requests,
            "errors": s.errors, "seconds": s.seconds, "p50_ms": s.percentile(0.5), "p90_ms": s.percentile(0.9),
            "req_s": s.throughput, "mean_batch": batch, "max_batch": max(s.batch_sizes, default=float("nan")),
            "output_format": s.output_format, "p50_encode_ms": s.percentile(0.5, s.encode_ms),
            "p50_pipeline_ms": pipeline, "p50_overhead_ms": s.percentile(0.5, s.overhead_ms),
            "p50_queue_ms": s.percentile(0.5, s.queue_ms), "p50_reply_ms": s.percentile(0.5, s.reply_ms),
            "model_bound_req_s": 1000 * batch / pipeline if pipeline > 0 else float("nan")}


def served_table(rows: list[dict[str, Any]]) -> str:
    """The served rows as a Markdown table."""
    lines = [("| clients | format | requests | errors | p50 ms | p90 ms | req/s | mean batch | p50 pipeline ms"
              " | p50 queue ms | p50 reply ms | p50 encode ms | p50 overhead ms | model-bound req/s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['output_format']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f}"
                     f" | {r['p90_ms']:.1f}"
                     f" | {r['req_s']:.1f} | {r['mean_batch']:.1f} | {r['p50_pipeline_ms']:.1f}"
                     f" | {r['p50_queue_ms']:.1f} | {r['p50_reply_ms']:.1f} | {r['p50_encode_ms']:.1f}"
                     f" | {r['p50_overhead_ms']:.1f} | {r['model_bound_req_s']:.1f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmd2_serve.bench.served", description=__doc__.split("\n")[0],
                                epilog="Arguments after -- go to python -m dmd2_serve as they are.")
    p.add_argument("--budget-s", type=float, default=300.0, help="the whole run, folder to exit")
    p.add_argument("--seconds", type=float, default=15.0, help="per scenario (1 and 32 clients, PNG and JPEG)")
    p.add_argument("--bucket", type=_sizes, default=(1, 4, 16), metavar="N[,N...]",
                   help="the server's --bucket; its --max-batch-size is the largest")
    p.add_argument("--backend", default="compile", choices=["eager", "compile", "aoti", "tensorrt"],
                   help="the server's --backend")
    p.add_argument("--compile-scope", default="full", choices=["full", "regional"], help="the server's --compile-scope")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the server's --compile-cache (share the pipeline benchmark's to reuse its compiled"
                        " artefacts; default: a fresh temp folder)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--tiny", action="store_true", help="a toy-sized folder on the CPU (tests of this script)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This benchmark's arguments and the server's (after ``--``), both checked before anything is written:
    a server argument that ``python -m dmd2_serve`` refuses stops here, not after the folder and a start."""
    from ..__main__ import _parser as server_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = _parser().parse_args(argv[:cut]), argv[cut + 1:]
    server_parser().parse_args(extra)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    """Write the folder, serve it, load it at 1 and 32 clients (PNG, JPEG), stop it; 1 on any failure."""
    import torch

    from ..server.launch import launch, stop, terminate
    from .random_folder import write_random_sd15_generator

    args, extra = parse_args(argv)
    end = time.perf_counter() + args.budget_s
    report = Report(args.out)
    work = Path(tempfile.mkdtemp(prefix="dmd2-served-"))
    log_path = work / "server.log"
    server = None
    _watchdog(args.budget_s)  # the hard stop; the steps below plan to end well before it
    try:
        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
        report.note(f"served path: {'GPU ' + torch.cuda.get_device_name() if device == 'cuda' else 'CPU'};"
                    f" torch {torch.__version__}; backend {args.backend} ({args.compile_scope}), bucket {args.bucket}"
                    + (f"; server args {' '.join(extra)}" if extra else ""))
        t0 = time.perf_counter()
        folder = write_random_sd15_generator(work / "generator", tiny=args.tiny, device=device)
        if device == "cuda":  # the server's worker needs the memory, not this process
            gc.collect()
            torch.cuda.empty_cache()
        report.note(f"random {ARCH} generator folder written in {time.perf_counter() - t0:.1f} s")

        scenarios_s = len(SCENARIOS) * (args.seconds + 5) + 5  # each: its time, a last batch; the warm-up
        ready_s = end - time.perf_counter() - scenarios_s - 10
        if ready_s < 5:
            raise OutOfTime(f"no time left to start the server: raise --budget-s above {args.budget_s:.0f}")
        server_args = ["--model", str(folder), "--backend", args.backend, "--compile-scope", args.compile_scope,
                       "--bucket", ",".join(map(str, args.bucket)), "--max-batch-size", str(max(args.bucket)),
                       "--compile-cache", str(args.cache_dir or work / "compile-cache"), "--grace", "10", *extra]
        (work / "metrics").mkdir()  # the server's own prometheus folder, fresh
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            server = launch(*server_args, log=log, env={"PROMETHEUS_MULTIPROC_DIR": str(work / "metrics")},
                            ready_timeout=ready_s)
        report.note(f"server ready in {time.perf_counter() - t0:.1f} s (load, {args.backend} warm-up of buckets"
                    f" {args.bucket}, then /health 200)")

        asyncio.run(run_scenario(server.url, 4, 2.0, 50, PROMPT))  # warm the connections and the server's caches
        rows = []
        for clients, fmt in SCENARIOS:
            if end - time.perf_counter() < args.seconds + 15:
                raise OutOfTime(f"no time left for the {clients}-client {fmt} scenario: raise --budget-s")
            scenario = asyncio.run(run_scenario(server.url, clients, args.seconds, MAX_REQUESTS, PROMPT, fmt))
            # the server's configuration on every row, so that runs with other buckets or workers compare
            rows.append({**served_row(scenario, args.backend), "bucket": list(args.bucket),
                         "server_args": " ".join(extra)})
            report.add(**rows[-1])

        t0 = time.perf_counter()
        status = terminate(server.process, timeout=min(STOP_S, max(5.0, end - time.perf_counter())))
        report.note(f"SIGTERM: the server drained and exited with status {status} in {time.perf_counter() - t0:.1f} s")
        print("\n" + served_table(rows), flush=True)
        failed = [f"{r['errors']} of {r['requests'] + r['errors']} requests failed at {r['clients']} clients"
                  for r in rows if r["errors"] or not r["requests"]]
        if status != 0:
            failed.append(f"the server exited with status {status} after SIGTERM (0 expected)")
        if failed:
            _fail("; ".join(failed), log_path)
            return 1
        return 0
    except Exception as e:  # OutOfTime, a server that would not start or stop, a broken folder
        _fail(f"{type(e).__name__}: {e}", log_path)
        return 1
    finally:
        signal.alarm(0)
        if server is not None and server.process.poll() is None:
            stop(server.process)  # SIGINT to its process group, then SIGKILL whatever is left
        shutil.rmtree(work, ignore_errors=True)


def _fail(what: str, log_path: Path) -> None:
    tail = log_path.read_text(errors="replace")[-LOG_TAIL:] if log_path.is_file() else "(no server log)"
    print(f"--- the server's log, last {LOG_TAIL} characters ---\n{tail}\n---", file=sys.stderr)
    print(f"error: the served-path benchmark failed: {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
