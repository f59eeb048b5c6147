"""The served-path benchmark runs end to end on the CPU at toy size (its GPU numbers come from a real card)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_served_bench_serves_a_random_sd15_folder_under_load(tmp_path: Path) -> None:
    out = tmp_path / "served.json"
    run = subprocess.run(
        [sys.executable, "-m", "dmd2_serve.bench.served", "--tiny", "--backend", "eager", "--bucket", "1,4",
         "--seconds", "2", "--budget-s", "120", "--out", str(out), "--", "--batch-timeout", "0.002"],
        capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    formats = {(r["clients"], r["output_format"]): r for r in result["rows"]}
    assert set(formats) == {(1, "png"), (1, "jpeg"), (32, "png"), (32, "jpeg")}
    assert all(r["p50_encode_ms"] > 0 for r in formats.values())
    rows = {clients: formats[(clients, "png")] for clients in (1, 32)}
    for r in rows.values():
        assert r["kind"] == "served" and r["arch"] == "sd15" and r["backend"] == "eager"
        assert r["requests"] > 0 and r["errors"] == 0 and r["req_s"] > 0
        assert 0 < r["p50_pipeline_ms"] <= r["p50_ms"] <= r["p90_ms"]
        assert r["p50_overhead_ms"] >= 0 and r["model_bound_req_s"] > 0
        assert 0 < r["p50_queue_ms"] < r["p50_ms"]  # the server's own clock, from parsing to the batch's start
        assert 0 < r["p50_reply_ms"] < r["p50_ms"]  # and from the worker's answer to the HTTP process
        assert r["bucket"] == [1, 4] and r["server_args"] == "--batch-timeout 0.002"
    assert rows[1]["mean_batch"] == 1 and rows[32]["max_batch"] <= 4  # the largest bucket
    assert rows[32]["mean_batch"] > 1  # 32 closed-loop clients fill batches
    assert any("exited with status 0" in n for n in result["notes"])
    assert any("server args --batch-timeout 0.002" in n for n in result["notes"])  # passed through after --
    assert "| 32 | jpeg |" in run.stdout  # the printed table


def test_served_bench_fails_with_the_server_log_when_the_server_cannot_start(tmp_path: Path) -> None:
    # TensorRT needs CUDA and torch-tensorrt: the server refuses to start, and the benchmark says so
    run = subprocess.run(
        [sys.executable, "-m", "dmd2_serve.bench.served", "--tiny", "--backend", "tensorrt", "--seconds", "2",
         "--budget-s", "60"],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1
    log = run.stderr.split("the server's log")[1]
    assert "error: " in log and "tensorrt" in log.lower()  # the server's own reason, shown
    assert run.stderr.rstrip().splitlines()[-1].startswith("error: the served-path benchmark failed: RuntimeError")
