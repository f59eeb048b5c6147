"""Start a real ``python -m dmd2_serve`` on a free loopback port for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    health_seen: list[int]
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]


def start_server(*args: str, env: dict | None = None, ready_timeout: float = 180) -> Server:
    """Launch the server and wait until ``/health`` answers 200; remember what it answered before."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "dmd2_serve", "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="dmd2-test-metrics-"), **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    seen: list[int] = []
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{open(log.name).read()[-4000:]}")
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
            seen.append(status)
            if status == 200:
                return Server(url, process, seen, log.name)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server not healthy in {ready_timeout} s:\n{open(log.name).read()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
